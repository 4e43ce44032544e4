"""What every route needs, built once by the composition root and kept on ``app.state`` (style P2)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from triaged.config import Settings
from triaged.web.passwords import LoginLimiter

ReadinessCheck = Callable[[], dict[str, str]]
"""Returns ``{check name: "ok" | reason}``; ready when every value is ``"ok"``."""


class PathStore(Protocol):
    def path_for(self, relative: str) -> Path: ...


@dataclass(frozen=True)
class WebContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: PathStore
    readiness: ReadinessCheck
    limiter: LoginLimiter

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success (reads commit nothing; admin actions and logins do)."""
        with self.session_factory.begin() as session:
            yield session


def web_context(request: Request) -> WebContext:
    context: WebContext = request.app.state.context
    return context
