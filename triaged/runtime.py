"""The composition root's product: everything a job handler needs, built once per process (style P2).

A :class:`Runtime` is immutable; the model is loaded once (by ``serve`` / ``worker``) and shared by the
worker threads. Reprocessing with another model directory (``triaged reprocess --model DIR``) loads that
model on first use and keeps it for the life of the process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from triaged.config import Settings
from triaged.db.engine import make_engine, make_session_factory
from triaged.errors import ModelError

if TYPE_CHECKING:
    from triaged.ml.api import Triage
    from triaged.receive.storage import InstanceStore


@dataclass
class _ModelCache:
    """Extra models named by reprocess jobs, loaded lazily and shared between threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    models: dict[Path, Triage] = field(default_factory=dict)


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: InstanceStore
    triage: Triage | None
    engine: Engine | None = None
    _extra: _ModelCache = field(default_factory=_ModelCache, repr=False, compare=False)

    def triage_for(self, model_dir: str | None) -> Triage:
        """The default model, or the one in ``model_dir`` (a reprocess job's payload)."""
        if model_dir is None or (
            self.triage is not None and Path(model_dir).resolve() == self.settings.model.directory.resolve()
        ):
            if self.triage is None:
                raise ModelError("no model loaded in this process")
            return self.triage
        path = Path(model_dir).resolve()
        with self._extra.lock:
            if path not in self._extra.models:
                self._extra.models[path] = load_triage(self.settings, path)
            return self._extra.models[path]


def load_triage(settings: Settings, model_dir: Path | None = None) -> Triage:
    from triaged.ml.api import Triage

    return Triage(
        model_dir or settings.model.directory,
        device=settings.model.device,
        precision=settings.model.precision,
        threads=settings.worker.torch_threads,
        backend=settings.model.backend,
        cache_dir=settings.model_cache_dir,
    )


def build_store(settings: Settings) -> InstanceStore:
    from triaged.receive.storage import InstanceStore

    return InstanceStore(settings.storage_dir, settings.storage.min_free_bytes)


def build_runtime(settings: Settings, *, load_model: bool) -> Runtime:
    """Engine, session factory, store and (optionally) the model; the schema check is the caller's."""
    engine = make_engine(settings.database_url, busy_timeout_ms=settings.database.busy_timeout_ms)
    return Runtime(
        settings=settings,
        session_factory=make_session_factory(engine),
        store=build_store(settings),
        triage=load_triage(settings) if load_model else None,
        engine=engine,
    )
