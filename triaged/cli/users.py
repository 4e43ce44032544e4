"""`triaged user add|list|token`: local accounts of the web console and API tokens for scripts.

SQLAlchemy and argon2 are imported inside the commands: `triaged --help` must not pay for them.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any

import typer

from triaged.cli.common import echo_json, echo_table, fail, session_scope, settings_from
from triaged.db.states import UserRole
from triaged.errors import NotFoundError

app = typer.Typer(help="Web console accounts and API tokens.", no_args_is_help=True)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        fail("no terminal to ask for the password: pipe it in with --password-stdin", 2)
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Login name (letters, digits, . _ @ -).")],
    role: Annotated[UserRole, typer.Option("--role", case_sensitive=False, help="viewer: read; admin: also act.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of standard input.")
    ] = False,
) -> None:
    """Create an account (or reset the role and password of an existing one); the password is argon2-hashed."""
    from triaged.db import users
    from triaged.web.passwords import hash_password

    if not re.match(NAME_PATTERN, name):
        fail(f"not a valid account name: {name!r} (letters, digits, . _ @ -; at most 64)", 2)
    settings = settings_from(ctx)
    try:
        hashed = hash_password(_password(password_stdin))
    except ValueError as exc:
        fail(str(exc), 2)
    with session_scope(settings) as session:
        existed = users.user_by_name(session, name) is not None
        users.add_user(session, name, role, hashed)
    typer.echo(f"{'updated' if existed else 'created'} {role} account {name}")


@app.command("list")
def list_users(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False
) -> None:
    """Accounts, their role and last login."""
    from triaged.db import users

    settings = settings_from(ctx)
    with session_scope(settings) as session:
        rows: list[dict[str, Any]] = [
            {
                "name": u.name,
                "role": str(u.role),
                "disabled": u.disabled,
                "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None,
            }
            for u in users.list_users(session)
        ]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo("no accounts (create one with `triaged user add NAME --role admin`)")
        return
    echo_table(
        ["NAME", "ROLE", "LAST LOGIN (UTC)"],
        [
            [r["name"], str(r["role"]) + (" (disabled)" if r["disabled"] else ""), (r["last_login_at"] or "-")[:19]]
            for r in rows
        ],
    )


@app.command("token")
def token(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The account the token acts as.")],
    label: Annotated[str, typer.Option("--label", help="What the token is for (shown nowhere secret).")] = "",
) -> None:
    """Make an API token (`Authorization: Bearer TOKEN`); it is printed once and stored only hashed."""
    from triaged.db import users

    settings = settings_from(ctx)
    with session_scope(settings) as session:
        try:
            value = users.create_api_token(session, name, label)
        except NotFoundError as exc:
            fail(str(exc))
    typer.echo(value)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="user")
