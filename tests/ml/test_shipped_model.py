"""The shipped model directory: loads with its checksums, predicts known images, gates DWI series.

The fixed images are Kaggle ``clean_test`` rows that are not Cheng slices (test side of the manifest, never
trained on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from triaged.ml.inference import Predictor, Triage
from triaged.ml.registry import read_spec
from triaged.training.dataset import load_image

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "densenet121-brainmri-v1"
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
    spec = read_spec(MODEL_DIR)
    assert spec.arch == "densenet121"
    assert spec.classes == ("glioma", "meningioma", "notumor", "pituitary")
    assert 0.0 < spec.thresholds["urgency"] < 1.0


def test_predicts_expected_labels_on_unseen_images(data_root: Path) -> None:
    predictor = Predictor.from_dir(MODEL_DIR, device="cpu")
    x = predictor.preprocess_slices([load_image(data_root / path) for path in EXPECTED])
    logits, _ = predictor.logits_and_features(x)  # the daemon's path (flip TTA as model.json says)
    probs = predictor.calibrated(logits)
    predicted = [predictor.spec.classes[int(i)] for i in probs.argmax(axis=1)]
    assert predicted == list(EXPECTED.values())
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_diffusion_series_from_dicom_is_not_assessable(data_root: Path) -> None:
    from triaged.training.release import read_series

    slices, meta = read_series(data_root / "dicom" / "neurolabusc_dcm_qa_philips/In/Vanderbilt_2018/601_WIP_dti_ax")
    result = Triage(MODEL_DIR, device="cpu", threads=1).assess(slices, meta)
    assert not result.assessable and not result.urgent
    assert "diffusion" in (result.reason or "")
    assert torch.get_num_threads() == 1
