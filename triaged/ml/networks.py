"""Network factory: the product DenseNet121 and the comparison models, all 1-channel 2-D classifiers."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

ARCHITECTURES = ("densenet121", "resnet50", "smallcnn")


class SmallCNN(nn.Module):
    """A ~50k-parameter baseline: four conv-BN-ReLU-pool stages and global average pooling."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(chans[-1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def build_network(arch: str, num_classes: int, in_channels: int = 1) -> nn.Module:
    """Instantiate ``arch`` (one of :data:`ARCHITECTURES`) with random weights."""
    net: nn.Module
    if arch == "densenet121":
        net = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)
        return net
    if arch == "resnet50":
        net = ResNet(
            block="bottleneck",
            layers=[3, 4, 6, 3],
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=in_channels,
            num_classes=num_classes,
            # The standard ResNet stem (7x7 stride 2, then max-pool): MONAI's default stride 1 keeps 4x the
            # activations through every stage (5x slower here, measured) for a model meant to be compared as-is.
            conv1_t_stride=2,
        )
        return net
    if arch == "smallcnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def cam_target_layer(arch: str) -> str:
    """Name of the layer Grad-CAM hooks for ``arch`` (last feature map before pooling)."""
    return {"densenet121": "class_layers.relu", "resnet50": "layer4", "smallcnn": "features.13"}[arch]


def cam_layer_candidates(arch: str) -> list[tuple[str, int]]:
    """(layer, atrous factor) pairs whose Grad-CAM localisation is compared on validation.

    For DenseNet121 the last layer on 2x and 4x denser à trous grids (see :mod:`triaged.ml.dense_cam`) and two
    earlier, finer layers; other architectures only have their last layer at its own resolution.
    """
    if arch == "densenet121":
        last = cam_target_layer(arch)
        return [(last, 1), (last, 2), (last, 4), ("features.transition3.conv", 1), ("features.denseblock3", 1)]
    return [(cam_target_layer(arch), 1)]


def load_torchvision_densenet121(model: nn.Module, path: Path) -> None:
    """Initialise a MONAI DenseNet121 from a local torchvision ImageNet state dict (nothing is downloaded).

    Keys are renamed (``denselayerN.`` → ``denselayerN.layers.``; old-style ``norm.1`` → ``norm1``), ``conv0`` is
    summed over RGB for one input channel, and the classifier head is left freshly initialised.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = re.sub(r"\.(norm|relu|conv)\.(\d)", r".\1\2", str(key))
        k = re.sub(r"(denselayer\d+)\.", r"\1.layers.", k)
        if k.startswith("classifier."):
            continue
        if k == "features.conv0.weight" and value.shape[1] != own[k].shape[1]:
            mapped[k] = value.sum(dim=1, keepdim=True)
        else:
            mapped[k] = value
        if k not in own or own[k].shape != mapped[k].shape:
            raise ValueError(f"ImageNet weight {key!r} does not fit the network (as {k!r})")
    missing = [k for k in own if k not in mapped and not k.startswith("class_layers")]
    if missing:
        raise ValueError(f"ImageNet file lacks {len(missing)} weights, e.g. {missing[0]!r}")
    model.load_state_dict(mapped, strict=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
