"""`/healthz`, `/readyz` and `/metrics`: the routes an orchestrator and a Prometheus scraper call.

`/healthz` answers while the process runs; `/readyz` answers 200 only when every readiness check passes
(database reachable, schema current, model loaded, receiver listening) and lists them as JSON either way;
`/metrics` is the Prometheus text format of :data:`triaged.metrics.REGISTRY` (it needs a login or an API token
like every other route, unless ``http.public_metrics = true``).
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from triaged.metrics import REGISTRY
from triaged.web.auth import SESSION_COOKIE, api_user, bearer_scheme
from triaged.web.context import WebContext, web_context

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok\n")


@router.get("/readyz")
def readyz(context: Annotated[WebContext, Depends(web_context)]) -> Response:
    try:
        checks = context.readiness()
    except Exception as exc:  # a failing check must answer 503, not a 500 page
        checks = {"readiness": f"{type(exc).__name__}: {exc}"}
    ready = all(value == "ok" for value in checks.values())
    body = json.dumps({"ready": ready, "checks": checks}, sort_keys=True) + "\n"
    return Response(body, status_code=200 if ready else 503, media_type="application/json")


@router.get("/metrics")
def metrics(
    request: Request,
    context: Annotated[WebContext, Depends(web_context)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Response:
    if not context.settings.http.public_metrics:
        api_user(context, credentials, request.cookies.get(SESSION_COOKIE))
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
