"""Who is asking: a console session cookie or an API bearer token, resolved to a local account.

Every page and API route depends on :func:`api_user`, :func:`api_admin` or :func:`page_user`; only the
probes (and ``/metrics`` when ``http.public_metrics``) are open. Cookies are HttpOnly and SameSite=Strict
(a form on another site cannot post with them), and Secure whenever the console is served over TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from triaged.config import Settings
from triaged.db import users
from triaged.db.models import UserRole
from triaged.web.context import WebContext, web_context

SESSION_COOKIE = "triaged_session"

bearer_scheme = HTTPBearer(auto_error=False, description="an API token made by `triaged user token NAME`")
cookie_scheme = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="a console login session")


@dataclass(frozen=True)
class Principal:
    user_id: int
    name: str
    role: UserRole

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


class LoginRequired(Exception):  # noqa: N818 - a redirect, not an error
    """A console page was asked for without a valid session: the app answers with a redirect to /login."""


def _resolve(context: WebContext, token: str | None, session_token: str | None) -> Principal | None:
    if not token and not session_token:
        return None
    with context.session() as session:
        user = users.user_for_api_token(session, token) if token else None
        if user is None and session_token:
            user = users.user_for_session(session, session_token)
        if user is None:
            return None
        return Principal(user.id, user.name, UserRole(user.role))


def api_user(
    context: Annotated[WebContext, Depends(web_context)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    session_token: Annotated[str | None, Depends(cookie_scheme)],
) -> Principal:
    principal = _resolve(context, credentials.credentials if credentials else None, session_token)
    if principal is None:
        raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
    return principal


def api_admin(principal: Annotated[Principal, Depends(api_user)]) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "this action needs the admin role")
    return principal


def page_user(request: Request, context: Annotated[WebContext, Depends(web_context)]) -> Principal:
    principal = _resolve(context, None, request.cookies.get(SESSION_COOKIE))
    if principal is None:
        raise LoginRequired
    return principal


def cookies_secure(settings: Settings) -> bool:
    return settings.http.secure_cookies or settings.http.tls_cert_file is not None


def set_session_cookie(response: Response, settings: Settings, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.http.session_hours * 3600),
        httponly=True,
        samesite="strict",
        secure=cookies_secure(settings),
        path="/",
    )


def clear_session_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=cookies_secure(settings), path="/")
