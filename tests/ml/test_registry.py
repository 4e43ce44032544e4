"""Model directories: round trip, checksum refusal, fp16 storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from triaged.errors import ModelError
from triaged.ml.networks import build_network
from triaged.ml.registry import build_random_model_dir, load_model, read_spec, save_model_dir


def test_random_model_dir_loads(tmp_path: Path) -> None:
    spec, model = load_model(build_random_model_dir(tmp_path / "m", seed=3))
    assert spec.classes == ("glioma", "meningioma", "notumor", "pituitary")
    assert spec.provisional
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 4)


def test_refuses_tampered_weights(tmp_path: Path) -> None:
    model_dir = build_random_model_dir(tmp_path / "m")
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"does not match model\.json"):
        load_model(model_dir)


def test_refuses_missing_or_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no model\.json"):
        read_spec(tmp_path)
    model_dir = build_random_model_dir(tmp_path / "m")
    data = json.loads((model_dir / "model.json").read_text())
    del data["classes"]
    (model_dir / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="malformed"):
        read_spec(model_dir)


def test_half_precision_storage_round_trips(tmp_path: Path) -> None:
    spec, model = load_model(build_random_model_dir(tmp_path / "a"))
    written = save_model_dir(tmp_path / "b", model, spec, half=True)
    _, reloaded = load_model(tmp_path / "b")
    assert written.weights_sha256 != spec.weights_sha256
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(reloaded(x), model(x), atol=1e-2, rtol=1e-2)


def test_unknown_architecture_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("vgg", 4)
