"""Real tumour volumes through `triaged serve`: tcga_lgg test series by C-STORE, urgent, Grad-CAM on the lesion.

The series are built by the same writer that ``triaged evaluate`` uses for its series-level report, so this test
checks the daemon end to end (receiver, completion, queue, decode, gate, model, aggregation, threshold, maps on
disk) on patients the model never trained on, not the model's accuracy (that is the evaluation report's job).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import free_port, shared_data
from tests.support.fake_pacs import running_fake_pacs
from tests.support.pipeline_daemon import daemon_config, running_daemon, send_series
from tests.support.pipeline_support import SHIPPED_MODEL, results_for, wait_for
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import ResultStatus, SlicePrediction
from triaged.db.schema import upgrade
from triaged.training.camscore import localisation_scores
from triaged.training.data import read_manifest
from triaged.training.lgg import lgg_mask_path
from triaged.training.series_eval import volume_series, write_volume_series

CANDIDATE_MODEL = SHIPPED_MODEL  # 2.2.0, the daemon default
# Test-split patients (never trained on): one of the seen site, one of the site that never trained at all.
SERIES = (("TCGA_DU_7018", "flair"), ("TCGA_HT_7616", "t1_post"))

pytestmark = [pytest.mark.slow]


@pytest.fixture
def sqlite_factory(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def test_tcga_lgg_series_come_back_urgent_with_gradcam_on_the_lesion(
    tmp_path: Path, sqlite_url: str, sqlite_factory: sessionmaker[Session]
) -> None:
    data = shared_data()
    samples = read_manifest(CANDIDATE_MODEL / "manifest.csv")
    wanted = {v.patient + "/" + v.contrast: v for v in volume_series(samples, "test")}
    volumes = [wanted[f"{p}/{c}"] for p, c in SERIES]
    written = {v: write_volume_series(data, v, tmp_path / "series" / v.patient / v.contrast) for v in volumes}
    config = daemon_config(tmp_path, db_url=sqlite_url, model_dir=CANDIDATE_MODEL, dicom_port=free_port())
    uids = {
        v: str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID) for v, paths in written.items()
    }
    with running_daemon(config, log_path=tmp_path / "serve.log") as daemon:
        assert daemon.dicom_port is not None
        for paths in written.values():
            send_series(daemon.dicom_port, paths)
        wait_for(lambda: all(results_for(sqlite_factory, u) for u in uids.values()), timeout=240, what="results")
    storage = tmp_path / "data" / "storage"
    for volume, uid in uids.items():
        [result] = results_for(sqlite_factory, uid)
        assert result.status == ResultStatus.ASSESSED, (volume.patient, result.reason)
        assert result.urgent, (volume.patient, volume.contrast, result.urgency, result.threshold)
        with sqlite_factory() as session:
            keys = session.scalars(
                select(SlicePrediction)
                .where(SlicePrediction.result_id == result.id, SlicePrediction.cam_path.is_not(None))
                .order_by(SlicePrediction.tumour_probability.desc())
            ).all()
        assert keys, "no Grad-CAM maps stored for the key images"
        top = keys[0]
        cam = np.load(storage / str(top.cam_path))
        with Image.open(lgg_mask_path(data, volume.samples[top.slice_index].path)) as m:
            mask = np.asarray(m.convert("L")) > 127
        assert mask.any(), f"key image {top.slice_index + 1} of {volume.patient} {volume.contrast} has no lesion"
        hits, _ = localisation_scores(cam[None], mask[None])
        assert hits[0], f"Grad-CAM maximum of {volume.patient} {volume.contrast} is off the lesion"


def test_a_normal_sagittal_mprage_is_scored_on_its_axial_reformat_and_its_captures_show_it(
    tmp_path: Path, sqlite_url: str, sqlite_factory: sessionmaker[Session]
) -> None:
    """The real Siemens XA30 3-D MPRAGE (Enhanced MR, one file of 96 sagittal frames) by C-STORE: assessed on its
    axial reformat, not urgent, one slice row per reformatted slice, and every Secondary Capture that reaches the
    PACS is an axial image that says it is a reformat; no KOS (there is no acquired key image to point at)."""
    mprage = shared_data() / "dicom" / "neurolabusc_dcm_qa_xa30" / "In" / "6_anat-T1w_acq-tfl"
    files = sorted(p for p in mprage.iterdir() if p.is_file())
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with running_fake_pacs() as pacs:
        config = daemon_config(
            tmp_path,
            db_url=sqlite_url,
            model_dir=CANDIDATE_MODEL,
            dicom_port=free_port(),
            dicom={"peers": {"pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}}},
            outputs={"mode": "all", "destination": "pacs"},
        )
        with running_daemon(config, log_path=tmp_path / "serve.log") as daemon:
            assert daemon.dicom_port is not None
            send_series(daemon.dicom_port, files)
            wait_for(lambda: bool(results_for(sqlite_factory, uid)), timeout=240, what="result")
            [result] = results_for(sqlite_factory, uid)
            with sqlite_factory() as session:
                keys = session.scalars(
                    select(SlicePrediction).where(SlicePrediction.result_id == result.id, SlicePrediction.is_key)
                ).all()
                rows = session.scalars(select(SlicePrediction).where(SlicePrediction.result_id == result.id)).all()
            wait_for(
                lambda: sum(1 for ds in pacs.received if ds.SOPClassUID == SecondaryCaptureImageStorage) >= len(keys),
                timeout=240,
                what="Secondary Captures at the PACS",
            )
    assert result.status == ResultStatus.ASSESSED and not result.urgent, (result.urgency, result.threshold)
    assert len(rows) > 96  # 2 mm cubes over the head's 256 mm superior-inferior extent, not the 96 sagittal frames
    assert keys and all(k.frame_number is None for k in keys)
    captures = [ds for ds in pacs.received if ds.SOPClassUID == SecondaryCaptureImageStorage]
    assert captures
    for capture in captures:
        assert str(capture.DerivationDescription).startswith("Axial reformat")
        assert list(capture.PatientOrientation) == ["L", "P"]
    assert not [ds for ds in pacs.received if ds.SOPClassUID == KeyObjectSelectionDocumentStorage]
