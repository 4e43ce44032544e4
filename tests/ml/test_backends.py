"""Compiled forward backends (OpenVINO, ONNX Runtime) decide as the torch path does, on real slices.

The ``accel`` extra is optional for a deployment (the daemon then runs on torch) but part of the ``test`` extra, so
CI, where skips fail, always runs these comparisons.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.pipeline_support import LABELS, kaggle_files, load_slice, shipped_model_available
from triaged.config import DEFAULT_MODEL_DIR
from triaged.errors import ModelError
from triaged.ml.backends import available, onnx_file, resolve_backend
from triaged.ml.inference import Predictor, Triage
from triaged.ml.registry import load_model
from triaged.ml.results import SeriesMeta

MODEL_DIR = DEFAULT_MODEL_DIR  # the daemon's default
META = SeriesMeta("MR", "HEAD", "T1 AX POST GD", "", ("ORIGINAL", "PRIMARY"), ("GR",), (), (), 12)
# On 183 real slices OpenVINO bf16 moved no probability by more than 1.1e-2 from fp32 (torch bf16: 2.3e-2).
MAX_DP = {"fp32": 1e-4, "bf16": 0.03}


def _needs(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"backend {backend!r} needs the accel extra (pip install -e '.[accel]'); CI installs it")


@pytest.fixture(scope="module")
def real_slices() -> list[np.ndarray]:
    """Twelve unseen Kaggle test slices, three per class, as one 256x256 stack (a DICOM series' shape)."""
    files = [f for label in LABELS for f in kaggle_files(label)[:3]]
    return [np.asarray(Image.fromarray(load_slice(f)).resize((256, 256)), dtype=np.float32) for f in files]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def torch_fp32() -> Triage:
    if not shipped_model_available():
        pytest.skip("needs the shipped model in models/")
    return Triage(MODEL_DIR, device="cpu", precision="fp32", threads=1)


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def compiled(request: pytest.FixtureRequest, cache_dir: Path, torch_fp32: Triage) -> Triage:
    backend = str(request.param)
    _needs(backend)
    return Triage(MODEL_DIR, device="cpu", threads=1, backend=backend, cache_dir=cache_dir)


def test_backend_gives_the_torch_decisions_on_real_slices(
    real_slices: list[np.ndarray], compiled: Triage, torch_fp32: Triage
) -> None:
    reference_predictor, predictor = torch_fp32._predictor, compiled._predictor
    assert predictor.backend != "torch"
    x = reference_predictor.preprocess_slices(real_slices)
    reference = reference_predictor.calibrated(reference_predictor.logits_and_features(x)[0])
    logits, features = predictor.logits_and_features(x)
    probs = predictor.calibrated(logits)
    assert (probs.argmax(axis=1) == reference.argmax(axis=1)).all()
    assert np.abs(probs - reference).max() <= MAX_DP[predictor.forward_precision]
    assert features.shape == (len(real_slices), 1024)
    assert len(set(reference.argmax(axis=1))) == 4  # three slices of each class: the comparison can fail


def test_series_assessment_matches_torch(real_slices: list[np.ndarray], compiled: Triage, torch_fp32: Triage) -> None:
    expected = torch_fp32.assess(real_slices, META)
    result = compiled.assess(real_slices, META)
    assert result.assessable and expected.assessable
    assert (result.label, result.urgent) == (expected.label, expected.urgent)
    assert abs((result.urgency or 0.0) - (expected.urgency or 0.0)) < 0.01
    assert set(result.cams) == set(result.key_slice_indices[:3])


def test_export_is_cached_by_weights(random_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the ONNX export needs the accel extra; CI installs it")
    spec, model = load_model(random_model_dir)
    first = onnx_file(model, spec, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert onnx_file(model, spec, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert spec.weights_sha256[:16] in first.name
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_auto_falls_back_to_torch_without_the_runtimes(random_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: find_spec sees None
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert not available("openvino") and not available("onnxruntime")
    assert resolve_backend("auto", "cpu") == "torch"
    predictor = Predictor.from_dir(random_model_dir, device="cpu", backend="auto")
    assert predictor.backend == "torch"
    with pytest.raises(ModelError, match="accel"):
        resolve_backend("openvino", "cpu")


def test_auto_without_a_cache_dir_runs_torch_and_explicit_refuses(random_model_dir: Path) -> None:
    _needs("openvino")
    assert Predictor.from_dir(random_model_dir, device="cpu", backend="auto").backend == "torch"
    with pytest.raises(ModelError, match="cache directory"):
        Predictor.from_dir(random_model_dir, device="cpu", backend="openvino")


def test_unknown_backend_and_gpu_device_are_refused() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt", "cpu")
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ModelError, match="CPU only"):
        resolve_backend("onnxruntime", "cuda")
