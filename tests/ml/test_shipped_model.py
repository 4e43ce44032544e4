"""The shipped model directory: loads with its checksums, predicts known images, gates DWI series.

The fixed images are Kaggle ``clean_test`` rows that are not Cheng slices (test side of the manifest, never
trained on).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from triaged.ml.extent import MAX_BRAIN_HEIGHT_MM
from triaged.ml.gate import gate_reason
from triaged.ml.inference import Predictor, Triage
from triaged.ml.reformat import axial_reformat
from triaged.ml.registry import read_spec
from triaged.training.dataset import load_image
from triaged.training.release import RELEASE_PATHS
from triaged.training.series_eval import read_series

REPO = Path(__file__).resolve().parents[2]
PREVIOUS_DIR = REPO / "models" / "densenet121-brainmri-v1"  # 1.2.0, the previous default: still loadable by path
DEFAULT_DIR = REPO / "models" / "densenet121-brainmri-v2"  # 2.2.0, the daemon's default
TOSHIBA_DWI_PATH = RELEASE_PATHS["toshiba_dti_b0"]
UIH_T1_PATH = RELEASE_PATHS["uih_t1_gre_3d_sag"]
XA30_MPRAGE_PATH = RELEASE_PATHS["siemens_xa30_mprage"]
DATA = REPO.parent / "shared" / "data"
EXPECTED = {
    "kaggle_4class/Testing/glioma/Te-gl_0131.jpg": "glioma",
    "kaggle_4class/Testing/glioma/Te-gl_0157.jpg": "glioma",
    "kaggle_4class/Testing/meningioma/Te-me_0201.jpg": "meningioma",
    "kaggle_4class/Testing/meningioma/Te-me_0273.jpg": "meningioma",
    "kaggle_4class/Testing/notumor/Te-no_0399.jpg": "notumor",
    "kaggle_4class/Testing/notumor/Te-no_0328.jpg": "notumor",
    "kaggle_4class/Testing/pituitary/Te-pi_0241.jpg": "pituitary",
    "kaggle_4class/Testing/pituitary/Te-pi_0118.jpg": "pituitary",
}


@pytest.fixture(scope="module")
def data_root() -> Path:
    if not (DATA / "README.md").is_file():
        pytest.skip(f"needs ../shared/data beside the repository (looked in {DATA})")
    return DATA


def test_model_json_describes_the_product() -> None:
    spec = read_spec(DEFAULT_DIR)
    assert spec.arch == "densenet121"
    assert spec.classes == ("glioma", "meningioma", "notumor", "pituitary")
    assert 0.0 < spec.thresholds["urgency"] < 1.0
    assert not spec.provisional  # the daemon default passed its release criteria


def test_predicts_expected_labels_on_unseen_images(data_root: Path) -> None:
    predictor = Predictor.from_dir(DEFAULT_DIR, device="cpu")
    x = predictor.preprocess_slices([load_image(data_root / path) for path in EXPECTED])
    logits, _ = predictor.logits_and_features(x)  # the daemon's path (flip TTA as model.json says)
    probs = predictor.calibrated(logits)
    predicted = [predictor.spec.classes[int(i)] for i in probs.argmax(axis=1)]
    assert predicted == list(EXPECTED.values())
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_diffusion_series_from_dicom_is_not_assessable(data_root: Path) -> None:
    slices, meta = read_series(data_root / "dicom" / "neurolabusc_dcm_qa_philips/In/Vanderbilt_2018/601_WIP_dti_ax")
    result = Triage(DEFAULT_DIR, device="cpu", threads=1).assess(slices, meta)
    assert not result.assessable and not result.urgent
    assert "diffusion" in (result.reason or "")
    assert torch.get_num_threads() == 1


def test_a_diffusion_series_whose_description_is_removed_is_still_refused(data_root: Path) -> None:
    """The issue's case: a DWI with its series description and protocol name removed. ScanningSequence still
    says EP, which the gate refuses whatever the description says, so it never reaches the model."""
    slices, meta = read_series(data_root / "dicom" / TOSHIBA_DWI_PATH)
    anonymous = dataclasses.replace(meta, series_description="", protocol_name="")
    result = Triage(DEFAULT_DIR, device="cpu", threads=1).assess(slices, anonymous, cam_top_k=0)
    assert not result.assessable and not result.urgent
    assert "EPI" in (result.reason or ""), result.reason


@pytest.mark.parametrize("name", ["toshiba_dti_b0", "siemens_dwi_sag_b0", "philips_dti_b0", "ge_epi_fmri"])
def test_a_diffusion_or_epi_series_whose_metadata_says_nothing_is_refused_by_its_pixels(
    data_root: Path, name: str
) -> None:
    """The issue's case, for every DWI/EPI release series: description, protocol, b-values, EPI flag and timing
    stripped, so the metadata gate has nothing to go on. Their feature distances are in range (2.1.0: 1.1-1.4
    against 3.70; the Siemens sagittal b0 then scored 0.977 pituitary, urgent), but their matrices (64-82 px) are
    coarser than the 128-pixel input every training image was reduced to, and that refuses them."""
    slices, meta = read_series(data_root / "dicom" / RELEASE_PATHS[name])
    stripped = dataclasses.replace(
        meta,
        series_description="AX",
        protocol_name="",
        diffusion_b_values=(),
        scanning_sequence=("SE",),
        image_type=("ORIGINAL", "PRIMARY"),
        echo_time=None,
        repetition_time=None,
        inversion_time=None,
    )
    assert gate_reason(stripped) is None
    result = Triage(DEFAULT_DIR, device="cpu", threads=1).assess(slices, stripped, cam_top_k=0)
    assert not result.assessable and not result.urgent, (result.label, result.urgency, result.ood_score)
    assert "coarser than the model's 128-pixel input" in (result.reason or ""), result.reason


@pytest.mark.parametrize("model_dir", [DEFAULT_DIR, PREVIOUS_DIR], ids=["2.2.0", "1.2.0"])
def test_accepts_the_real_anatomical_series(data_root: Path, model_dir: Path) -> None:
    """Neither the gate nor the OOD score refuses the real normal T1 volumes, and neither model flags them. The
    isotropic 3-D MPRAGE is scored on its axial reformat (in its acquired sagittal plane 2.0.0 read the sella as
    a pituitary tumour); the UIH subset (every 5th slice, 5 mm apart on 0.5 mm pixels) is not isotropic and is
    scored as acquired. 1.2.0 has no ``scoring_plane`` and scores both as acquired."""
    triage = Triage(model_dir, device="cpu", threads=1)
    # 1.2.0 predates scoring_plane in model.json: it scores every series as acquired, as it always did
    expected_reformat = {UIH_T1_PATH: False, XA30_MPRAGE_PATH: model_dir == DEFAULT_DIR}
    for relative, reformatted in expected_reformat.items():
        slices, meta = read_series(data_root / "dicom" / relative)
        result = triage.assess(slices, meta, cam_top_k=1)
        assert result.assessable, (relative, result.reason)
        assert not result.urgent, (relative, result.urgency, result.threshold)
        assert (result.reformat is not None) == reformatted, (relative, result.reformat)
        if reformatted:
            assert set(result.key_images) == set(result.key_slice_indices)
            assert all(result.cams[i].shape == result.key_images[i].shape for i in result.cams)


def test_the_neck_of_the_whole_head_mprage_is_not_brain(data_root: Path) -> None:
    """The XA30 MPRAGE covers the head down to the upper neck. Its lowest axial reformat slices (cervical spine,
    mandible) pass the image-based in-brain rule, and a skull-strip candidate chose three of them as the key images
    of a false urgent flag. With the shipped model, no in-brain slice lies more than 170 mm below the highest one,
    and the neck slice at the bottom of the reformat is out."""
    slices, meta = read_series(data_root / "dicom" / XA30_MPRAGE_PATH)
    reformat = axial_reformat(slices, meta.geometry)
    assert reformat is not None
    result = Triage(DEFAULT_DIR, device="cpu", threads=1).assess(slices, meta, cam_top_k=0)
    assert result.assessable and result.reformat is not None
    heights = reformat.heights_mm[result.slice_in_brain]
    assert heights.max() - heights.min() <= MAX_BRAIN_HEIGHT_MM
    assert not result.slice_in_brain[0]
    assert min(result.key_slice_indices[:3]) > 0
