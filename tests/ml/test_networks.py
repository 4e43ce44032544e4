"""Networks: output shapes, and ImageNet initialisation from a torchvision-style DenseNet121 state dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from triaged.ml.networks import ARCHITECTURES, build_network, load_torchvision_densenet121


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_networks_classify_one_channel_slices(arch: str) -> None:
    assert build_network(arch, 4).eval()(torch.zeros(2, 1, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("arch", ["densenet121", "resnet50"])
def test_last_feature_map_has_the_standard_stride_32(arch: str) -> None:
    """Both comparison networks see the same spatial detail: 128 px in, a 4x4 map before pooling."""
    model = build_network(arch, 4).eval()
    layer = dict(model.named_modules())["class_layers.relu" if arch == "densenet121" else "layer4"]
    shapes: list[tuple[int, ...]] = []
    layer.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    model(torch.zeros(1, 1, 128, 128))
    assert shapes[0][-2:] == (4, 4)


def test_imagenet_init_maps_torchvision_keys(tmp_path: Path) -> None:
    source = build_network("densenet121", 1000, in_channels=3)
    tv_state = {
        key.replace(".layers.", ".").replace("class_layers.out.", "classifier."): value
        for key, value in source.state_dict().items()
    }
    path = tmp_path / "densenet121_imagenet.pth"
    torch.save(tv_state, path)
    model = build_network("densenet121", 4)
    load_torchvision_densenet121(model, path)
    state = model.state_dict()
    torch.testing.assert_close(state["features.conv0.weight"], tv_state["features.conv0.weight"].sum(1, keepdim=True))
    key = "features.denseblock2.denselayer3.layers.conv1.weight"
    torch.testing.assert_close(state[key], tv_state[key.replace(".layers.", ".")])
    assert state["class_layers.out.weight"].shape == (4, 1024)


def test_imagenet_init_rejects_a_foreign_file(tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"does not fit|lacks"):
        load_torchvision_densenet121(build_network("densenet121", 4), tmp_path / "other.pth")
