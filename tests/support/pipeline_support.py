"""Helpers for pipeline/daemon tests: labelled MR series from ../shared/data, models, DB waits."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import shared_data
from triaged.db.models import Job, Result, Series
from triaged.dicom.synthetic import write_mr_series

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "densenet121-brainmri-v2"
LABELS = ("glioma", "meningioma", "notumor", "pituitary")
UIH_T1 = "neurolabusc_dcm_qa_uih/In/DTI_132225/t1_gre_fsp_3d_sag__132750"
XA30_MPRAGE = "neurolabusc_dcm_qa_xa30/In/6_anat-T1w_acq-tfl"
TOSHIBA_DWI = "neurolabusc_dcm_qa_toshiba/In/Galan/8006_DTI_AX_30d"


@cache
def _kaggle_rows() -> tuple[dict[str, str], ...]:
    with (shared_data() / "kaggle_4class" / "index.csv").open(encoding="utf-8") as fh:
        return tuple(csv.DictReader(fh))


def kaggle_files(label: str, *, split: str = "Testing", clean: bool = True) -> list[str]:
    """Relative file names of one class (Testing rows with ``clean_test`` by default: no train leak)."""
    return [
        row["file"]
        for row in _kaggle_rows()
        if row["label"] == label and row["split"] == split and (not clean or row["clean_test"] == "true")
    ]


def load_slice(relative: str) -> np.ndarray:
    with Image.open(shared_data() / "kaggle_4class" / relative) as image:
        return np.asarray(image.convert("L"), dtype=np.float32)


def labelled_series(
    out_dir: Path, files: Sequence[str], *, seed: int | str, size: tuple[int, int] | None = None, **kwargs: Any
) -> list[Path]:
    """One DICOM MR series whose slices are the given Kaggle images (resized to one shape if needed)."""
    arrays = [load_slice(f) for f in files]
    shape = size or arrays[0].shape
    resized = [
        a if a.shape == shape else np.asarray(Image.fromarray(a).resize((shape[1], shape[0])), dtype=np.float32)
        for a in arrays
    ]
    return write_mr_series(resized, out_dir, seed=seed, series_description=kwargs.pop("description", "T1 AX POST GD"))


def shipped_model_available() -> bool:
    return (SHIPPED_MODEL / "model.json").is_file() and (SHIPPED_MODEL / "model.safetensors").is_file()


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


def count(session_factory: sessionmaker[Session], model: type[Any], *where: Any) -> int:
    with session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def results_for(session_factory: sessionmaker[Session], series_uid: str) -> list[Result]:
    with session_factory() as session:
        return list(
            session.scalars(
                select(Result)
                .join(Series, Series.id == Result.series_id)
                .where(Series.series_instance_uid == series_uid)
                .order_by(Result.id)
            )
        )


def jobs_for(session_factory: sessionmaker[Session], series_uid: str) -> list[Job]:
    with session_factory() as session:
        return list(
            session.scalars(
                select(Job)
                .join(Series, Series.id == Job.series_id)
                .where(Series.series_instance_uid == series_uid)
                .order_by(Job.id)
            )
        )
