"""Console accounts, browser sessions and API tokens (tables ``users``, ``web_sessions``, ``api_tokens``).

Secrets never reach the database: passwords arrive already hashed (argon2, :mod:`triaged.web.passwords`) and
session/API tokens are stored as their SHA-256, so a copy of the database lets nobody in.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from triaged.db.models import ApiToken, User, UserRole, WebSession, utcnow
from triaged.errors import NotFoundError

TOKEN_PREFIX = "tri_"  # lets secret scanners and people recognise a triaged API token


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def user_by_name(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def add_user(session: Session, name: str, role: UserRole, password_hash: str) -> User:
    """Create ``name``, or replace the role and password of an existing account (re-running is a reset)."""
    user = user_by_name(session, name)
    if user is None:
        user = User(name=name, role=role, password_hash=password_hash, disabled=False)
        session.add(user)
    else:
        user.role, user.password_hash, user.disabled = role, password_hash, False
    session.flush()
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def create_session(session: Session, user: User, lifetime: timedelta) -> str:
    """A new browser session for ``user``; returns the cookie value (shown once, stored only hashed)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(WebSession(token_sha256=digest(token), user_id=user.id, created_at=now, expires_at=now + lifetime))
    user.last_login_at = now
    session.execute(delete(WebSession).where(WebSession.expires_at < now))  # housekeeping on each login
    return token


def user_for_session(session: Session, token: str) -> User | None:
    row = session.scalar(select(WebSession).where(WebSession.token_sha256 == digest(token)))
    if row is None or _aware(row.expires_at) <= utcnow():
        return None
    user = session.get(User, row.user_id)
    return None if user is None or user.disabled else user


def end_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.token_sha256 == digest(token)))


def create_api_token(session: Session, name: str, label: str = "") -> str:
    """A bearer token for account ``name``; returns it (shown once, stored only hashed)."""
    user = user_by_name(session, name)
    if user is None:
        raise NotFoundError(f"no user named {name!r} (create it with `triaged user add`)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(token_sha256=digest(token), user_id=user.id, label=label[:64]))
    return token


def user_for_api_token(session: Session, token: str) -> User | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest(token)))
    if row is None:
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    row.last_used_at = utcnow()
    return user
