"""The FastAPI application: probes, the JSON API (with its OpenAPI document), the console and its files.

Built by :func:`create_app` from a :class:`~triaged.web.context.WebContext`; the daemon serves it with
uvicorn (:mod:`triaged.web.server`), tests may drive it in-process. Every response carries headers that
keep the console in its own origin (no framing, no sniffing, same-origin resources only).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from triaged import __version__
from triaged.web import api, pages, probes
from triaged.web.auth import LoginRequired, Principal, api_user
from triaged.web.context import WebContext

OPENAPI_URL = "/api/v1/openapi.json"
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"


def _to_login(request: Request, exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


async def _security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    if not request.url.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def create_app(context: WebContext) -> FastAPI:
    app = FastAPI(
        title="triaged",
        version=__version__,
        summary="Brain MRI triage daemon: what arrived, what was found, what is stuck.",
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN: the console serves nothing from outside
        redoc_url=None,
        openapi_url=None,  # served below, behind a login like every other API route
    )
    app.state.context = context
    app.include_router(probes.router)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).with_name("static")), name="static")
    app.add_exception_handler(LoginRequired, _to_login)
    app.middleware("http")(_security_headers)

    @app.get(OPENAPI_URL, include_in_schema=False)
    def openapi(user: Annotated[Principal, Depends(api_user)]) -> JSONResponse:
        document: dict[str, Any] = app.openapi()
        return JSONResponse(document)

    return app
