"""The multi-layer feature OOD check: its statistics, its features on the same forward pass, its file format."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from triaged.errors import ModelError
from triaged.ml.backends import LogitsAndFeatures
from triaged.ml.inference import Predictor
from triaged.ml.ood import OOD_FILE, PENULTIMATE, FeatureOOD, FeatureTap, LayeredOOD, ood_layers
from triaged.ml.registry import load_model, load_ood, read_spec, sha256_file, write_spec

LAYERS = ("features.3", "features.7")  # two pooling stages of the random SmallCNN


def _layered(rng: np.random.Generator) -> tuple[LayeredOOD, np.ndarray]:
    widths = (6, 10)
    train = rng.standard_normal((400, sum(widths)))
    labels = rng.integers(0, 2, 400)
    spaces = (
        FeatureOOD.fit(train[:, :6], labels, n_components=4),
        FeatureOOD.fit(train[:, 6:], labels, n_components=5),
    )
    return LayeredOOD(("features.3", PENULTIMATE), spaces, (2.0, 0.5)), train


def test_slice_score_is_the_largest_normalised_layer_distance(tmp_path: Path) -> None:
    ood, train = _layered(np.random.default_rng(0))
    x = train[:50].astype(np.float32)
    expected = np.maximum(ood.spaces[0].score(x[:, :6]) / 2.0, ood.spaces[1].score(x[:, 6:]) / 0.5)
    np.testing.assert_allclose(ood.score(x), expected, rtol=1e-6)
    shifted = x.copy()
    shifted[:, :6] += 10.0  # off in the first layer only: the maximum must see it
    assert np.median(ood.score(shifted)) > 5 * np.median(ood.score(x))
    ood.save(tmp_path / OOD_FILE)
    loaded = LayeredOOD.load(tmp_path / OOD_FILE)
    assert loaded.layers == ood.layers and loaded.references == pytest.approx(ood.references)
    np.testing.assert_allclose(loaded.score(x), ood.score(x), rtol=1e-6)
    assert ood_layers(loaded) == ("features.3",) and ood_layers(ood.spaces[0]) == ()
    with pytest.raises(ValueError, match="columns"):
        ood.score(x[:, :10])


def test_pooled_layers_come_from_the_same_forward_pass(random_model_dir: Path) -> None:
    predictor = Predictor.from_dir(random_model_dir, device="cpu", precision="fp32")
    x = torch.rand((3, 1, 64, 64), generator=torch.Generator().manual_seed(1))
    plain = predictor.features(x)
    calls: list[int] = []
    handle = predictor.model.register_forward_hook(lambda *_: calls.append(1))
    predictor.ood_layers = LAYERS
    try:
        logits, layered = predictor.logits_and_features(x)
    finally:
        handle.remove()
    assert len(calls) == 1 + int(predictor.flip_tta)  # no extra pass for the OOD features
    pooled = layered.shape[1] - plain.shape[1]
    assert pooled == 2 * (16 + 32) or pooled > 0  # mean and std per channel of each layer
    np.testing.assert_allclose(layered[:, pooled:], plain, rtol=1e-5, atol=1e-6)  # the penultimate features, last
    with FeatureTap(predictor.model, LAYERS) as tap, torch.inference_mode():
        predictor.model(x)
    first = tap.pooled[LAYERS[0]][0]
    channels = first.shape[1] // 2
    with torch.inference_mode():
        stage = predictor.model.get_submodule("features")[:4](x)
    np.testing.assert_allclose(first[:, :channels].numpy(), stage.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first[:, channels:].numpy(), stage.std(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    assert logits.shape == (3, 4)


def test_compiled_export_gives_the_torch_ood_features(random_model_dir: Path) -> None:
    """The ONNX graph (OpenVINO and ONNX Runtime read it) carries the same pooled features as the torch hooks."""
    spec, model = load_model(random_model_dir)
    x = torch.rand((2, 1, 64, 64), generator=torch.Generator().manual_seed(2))
    wrapper = LogitsAndFeatures(model, LAYERS).eval()
    with torch.inference_mode():
        logits, features = wrapper(x)
        again = wrapper(x)[1]  # no state left over from the previous call
    with FeatureTap(model.eval(), LAYERS) as tap, torch.inference_mode():
        expected_logits = model(x)
    torch.testing.assert_close(features, torch.from_numpy(tap.array()))
    torch.testing.assert_close(again, features)
    torch.testing.assert_close(logits, expected_logits)
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("the ONNX Runtime comparison needs the accel extra; CI installs it")
    import onnxruntime as ort

    from triaged.ml.backends import onnx_file

    cache = random_model_dir.parent / "onnx-layers"
    path = onnx_file(model, spec, cache, LAYERS)
    assert path != onnx_file(model, spec, cache)  # pooled layers are part of the cached file's name
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = session.run(["features"], {"x": x.numpy()})[0]
    np.testing.assert_allclose(compiled, features.numpy(), rtol=1e-4, atol=1e-4)


def test_model_json_must_name_the_layers_the_file_scores(random_model_dir: Path, tmp_path: Path) -> None:
    ood, _ = _layered(np.random.default_rng(3))
    target = tmp_path / "model"
    target.mkdir()
    for name in ("model.json", "model.safetensors"):
        (target / name).write_bytes((random_model_dir / name).read_bytes())
    ood.save(target / OOD_FILE)
    spec = read_spec(target)
    block = {"method": "mahalanobis-layers", "file": OOD_FILE, "sha256": sha256_file(target / OOD_FILE)}
    write_spec(target, dataclasses.replace(spec, ood={**block, "layers": list(ood.layers)}))
    assert isinstance(load_ood(target, read_spec(target)), LayeredOOD)
    write_spec(target, dataclasses.replace(spec, ood={**block, "layers": ["features.7", PENULTIMATE]}))
    with pytest.raises(ModelError, match="layers"):
        load_ood(target, read_spec(target))
