"""MixStyle: statistics mixed, content kept, training only, and a wrong layer name is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from triaged.ml.networks import build_network
from triaged.training.mixstyle import DEFAULT_LAYERS, MixStyleOptions, attach_mixstyle, mix_styles
from triaged.training.train import TrainConfig, parse_args, train


def _styled_batch() -> torch.Tensor:
    """Two images with the same content pattern in two very different styles (offset and contrast per channel)."""
    torch.manual_seed(0)
    content = torch.randn(1, 3, 8, 8)
    return torch.cat([content * 1.0 + 0.0, content * 5.0 + 10.0])


def test_mixing_moves_each_images_statistics_between_the_two_and_keeps_its_normalised_content() -> None:
    x = _styled_batch()
    torch.manual_seed(1)
    out = mix_styles(x, MixStyleOptions(alpha=1.0))  # alpha 1: a uniform mix weight, clearly inside (0, 1)
    means = out.mean(dim=(2, 3))
    lo, hi = x.mean(dim=(2, 3)).min(0).values, x.mean(dim=(2, 3)).max(0).values
    assert torch.all(means >= lo - 1e-4) and torch.all(means <= hi + 1e-4)
    assert not torch.allclose(out, x, atol=1e-3)  # something was mixed
    normalise = lambda t: (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(normalise(out), normalise(x), atol=1e-3)  # the content (and so the label) is unchanged


def test_a_batch_of_one_is_left_alone() -> None:
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(mix_styles(x, MixStyleOptions()), x)


def test_hooks_change_features_in_training_and_never_in_evaluation() -> None:
    model = build_network("densenet121", num_classes=4)
    x = torch.randn(4, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        plain = model(x)
    handles = attach_mixstyle(model, MixStyleOptions(prob=1.0))
    with torch.no_grad():
        assert torch.equal(model(x), plain)  # evaluation (what export and the daemon run): no effect
        model.train()
        torch.manual_seed(3)
        mixed = model(x)
        for handle in handles:
            handle.remove()
        torch.manual_seed(3)
        unmixed = model(x)
    assert not torch.allclose(mixed, unmixed, atol=1e-5)


def test_an_unknown_layer_is_an_error_not_a_silent_no_op() -> None:
    model = build_network("densenet121", num_classes=4)
    assert all(name in dict(model.named_modules()) for name in DEFAULT_LAYERS)
    with pytest.raises(ValueError, match=r"features\.nope"):
        attach_mixstyle(model, MixStyleOptions(), layers=("features.nope",))


def test_the_training_cli_records_mixstyle_and_the_exported_model_is_plain(
    tiny_data_root: Path, tmp_path: Path
) -> None:
    cfg = parse_args(["--data-root", str(tiny_data_root), "--out-dir", str(tmp_path / "run"), "--mixstyle-prob", "0.5"])
    assert cfg.mixstyle_prob == 0.5
    train(
        TrainConfig(
            data_root=tiny_data_root,
            out_dir=tmp_path / "run",
            input_size=32,
            epochs=1,
            max_steps=2,
            batch_size=4,
            threads=1,
            workers=0,
            seed=7,
            precision="fp32",
            mixstyle_prob=1.0,
        )
    )
    spec = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert '"mixstyle_prob": 1.0' in json.dumps(spec)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["mixstyle_prob"] == 1.0
    assert set(state["model"]) == set(build_network("densenet121", num_classes=4).state_dict())
