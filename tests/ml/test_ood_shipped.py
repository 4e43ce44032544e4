"""The shipped model's feature OOD check refuses what the metadata gate lets through and accepts real anatomy.

Two off-distribution series pass the metadata gate: a Toshiba DTI b0 (64 x 64 EPI) whose description, b-values
and EPI flag are stripped, and the demo's numpy-drawn phantom. Neither was used to choose the method or its
threshold (:mod:`triaged.training.ood_fit`: statistics from training images, threshold from the unseen site's
validation series), so they are a blind check. The real anatomical series (the two shared normal volunteers and
fixed tcga_lgg test volumes in all three contrasts, none used for the threshold) must stay assessable.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest

from triaged.demo_phantom import phantom_series
from triaged.ml.gate import gate_reason
from triaged.ml.inference import Triage
from triaged.ml.registry import read_spec
from triaged.ml.results import SeriesMeta
from triaged.training.data import read_manifest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "models" / "densenet121-brainmri-v2"
PREVIOUS_DIR = REPO / "models" / "densenet121-brainmri-v1"
DATA = REPO.parent / "shared" / "data"
TOSHIBA_DWI_PATH = "neurolabusc_dcm_qa_toshiba/In/Galan/8006_DTI_AX_30d"
NORMAL_PATHS = (
    "neurolabusc_dcm_qa_uih/In/DTI_132225/t1_gre_fsp_3d_sag__132750",
    "neurolabusc_dcm_qa_xa30/In/6_anat-T1w_acq-tfl",
)
TEST_PATIENTS = ("TCGA_DU_7018", "TCGA_HT_7616")  # test split: a trained site and the unseen one
PHANTOM_META = SeriesMeta("MR", "HEAD", "T1 AX POST GD PHANTOM", "", ("ORIGINAL", "PRIMARY"), ("GR",), (), (), 12)


@pytest.fixture(scope="module")
def triage() -> Triage:
    return Triage(DEFAULT_DIR, device="cpu", threads=1)


@pytest.fixture(scope="module")
def data_root() -> Path:
    if not (DATA / "README.md").is_file():
        pytest.skip(f"needs ../shared/data beside the repository (looked in {DATA})")
    return DATA


def _refused_by_ood(result: object) -> bool:
    reason = getattr(result, "reason", None) or ""
    return not getattr(result, "assessable", True) and reason.startswith("out of distribution")


def test_the_shipped_model_scores_several_layers() -> None:
    ood = read_spec(DEFAULT_DIR).ood
    assert ood["method"] == "mahalanobis-layers" and ood["layers"] == ["features.pool0", "penultimate"]
    quantiles = ood["stem"]["unseen_site_val_series_score_quantiles"]  # set on those series, not by hand
    assert quantiles["0.95"] <= ood["layer_thresholds"]["features.pool0"] <= quantiles["1.0"]
    assert ood["layer_thresholds"]["penultimate"] == pytest.approx(3.2296, abs=1e-3)  # as released
    assert read_spec(PREVIOUS_DIR).ood["method"] == "mahalanobis"  # 1.2.0 keeps its penultimate-layer check


def test_refuses_the_demo_phantom(triage: Triage) -> None:
    result = triage.assess(phantom_series(12, lesion=False, seed=1), PHANTOM_META, cam_top_k=0)
    assert _refused_by_ood(result), (result.reason, result.ood_score, result.urgency)
    assert not result.urgent


def test_refuses_a_diffusion_b0_whose_metadata_says_nothing(data_root: Path, triage: Triage) -> None:
    from triaged.training.series_eval import read_series

    slices, meta = read_series(data_root / "dicom" / TOSHIBA_DWI_PATH)
    stripped = dataclasses.replace(
        meta, series_description="AX", protocol_name="", diffusion_b_values=(), scanning_sequence=("SE",)
    )
    assert gate_reason(stripped) is None  # the metadata gate lets it through: only the OOD check can refuse it
    result = triage.assess(slices, stripped, cam_top_k=0)
    assert _refused_by_ood(result), (result.reason, result.ood_score)


def test_accepts_the_real_anatomical_series(data_root: Path, triage: Triage) -> None:
    from triaged.training.series_eval import assess_dicom_files, read_series, volume_series, write_volume_series

    threshold = float(read_spec(DEFAULT_DIR).ood["threshold"])
    for relative in NORMAL_PATHS:
        slices, meta = read_series(data_root / "dicom" / relative)
        result = triage.assess(slices, meta, cam_top_k=0)
        assert result.assessable, (relative, result.reason)
        assert result.ood_score is not None and result.ood_score <= threshold, (relative, result.ood_score)
    volumes = [
        v for v in volume_series(read_manifest(DEFAULT_DIR / "manifest.csv"), "test") if v.patient in TEST_PATIENTS
    ]
    assert {v.contrast for v in volumes} == {"flair", "t1_pre", "t1_post"} and len(volumes) == 6
    with tempfile.TemporaryDirectory() as tmp:
        for volume in volumes:
            paths = write_volume_series(data_root, volume, Path(tmp) / volume.patient / volume.contrast)
            result = assess_dicom_files(triage, paths, cam_top_k=0)
            assert result.assessable, (volume.patient, volume.contrast, result.reason)
