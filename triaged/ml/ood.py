"""Feature-space out-of-distribution score: Mahalanobis distance to the nearest class in PCA-whitened spaces.

Energy and max-softmax scores proved blind to the domain shift that matters here (DWI b0 slices got *more*
confident logits than the validation images), so features are compared with the training distribution instead
(Lee et al. 2018, with PCA for a stable covariance from a few thousand images). 1.2.0 uses the penultimate layer
only (:class:`FeatureOOD`). That layer is trained to separate the four classes and forgets what the classes do
not need: a 64-pixel DWI b0 series and a numpy-drawn phantom sat inside the validation range there. Earlier
layers still describe resolution, noise and texture, so 2.0.0 scores several (:class:`LayeredOOD`: each layer's
channel means and standard deviations, one Mahalanobis space per layer, each distance divided by its median on
validation images, the series score the largest of them). The fitted statistics live in ``ood.safetensors`` next
to the weights, checksummed in ``model.json``; :mod:`triaged.training.ood_fit` fits them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch import nn

OOD_FILE = "ood.safetensors"
PENULTIMATE = "penultimate"  # the input of the final linear layer (the only layer 1.2.0 scores)


@dataclass(frozen=True)
class FeatureOOD:
    """PCA whitening (mean, components, scale) and class centroids in the whitened space."""

    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray
    centroids: np.ndarray

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared whitened distance to the nearest class centroid, divided by the dimension (≈1 in distribution)."""
        z = ((features - self.mean) @ self.components.T) / self.scale
        d = ((z[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1).min(axis=1)
        result: np.ndarray = (d / self.components.shape[0]).astype(np.float32)
        return result

    @property
    def dimension(self) -> int:
        """Length of the feature vector this space reads."""
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, n_components: int = 64) -> FeatureOOD:
        """Fit on in-distribution (training) features; whitening uses within-class scatter."""
        features = features.astype(np.float64)
        mean = features.mean(axis=0)
        centred = features - mean
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        components = vt[:n_components]
        z = centred @ components.T
        classes = np.unique(labels)
        centroids = np.stack([z[labels == c].mean(axis=0) for c in classes])
        within = z - centroids[np.searchsorted(classes, labels)]
        scale = within.std(axis=0) + 1e-6
        return cls(
            mean.astype(np.float32),
            components.astype(np.float32),
            scale.astype(np.float32),
            (centroids / scale).astype(np.float32),
        )

    def tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {
            f"{prefix}mean": self.mean,
            f"{prefix}components": self.components,
            f"{prefix}scale": self.scale,
            f"{prefix}centroids": self.centroids,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], prefix: str = "") -> FeatureOOD:
        return cls(t[f"{prefix}mean"], t[f"{prefix}components"], t[f"{prefix}scale"], t[f"{prefix}centroids"])

    def save(self, path: Path) -> None:
        save_file(self.tensors(), str(path))

    @classmethod
    def load(cls, path: Path) -> FeatureOOD:
        return cls.from_tensors(load_file(str(path)))


@dataclass(frozen=True)
class LayeredOOD:
    """One :class:`FeatureOOD` per layer; a slice's score is the largest layer distance over its validation median.

    Dividing by the validation median puts every layer on the same scale (≈1 for an image like the validation
    images) without any out-of-distribution example to weigh them with (Lee et al. fit weights on OOD data we do
    not have). The feature vector is the layers' pooled features in :attr:`layers` order, then the penultimate
    features: what :class:`FeatureTap` and the compiled backends produce for these ``layers``.
    """

    layers: tuple[str, ...]
    spaces: tuple[FeatureOOD, ...]
    references: tuple[float, ...]

    @property
    def pooled_layers(self) -> tuple[str, ...]:
        """The layers the forward pass must pool (all but the penultimate features, which come last)."""
        return tuple(name for name in self.layers if name != PENULTIMATE)

    def layer_scores(self, features: np.ndarray) -> np.ndarray:
        """(N, L) distances, each divided by its validation median."""
        needed = sum(space.dimension for space in self.spaces)
        if features.shape[1] != needed:
            raise ValueError(f"OOD features have {features.shape[1]} columns; the layers need {needed}")
        out, start = [], 0
        for space, reference in zip(self.spaces, self.references, strict=True):
            stop = start + space.dimension
            out.append(space.score(features[:, start:stop]) / reference)
            start = stop
        result: np.ndarray = np.stack(out, axis=1).astype(np.float32)
        return result

    def score(self, features: np.ndarray) -> np.ndarray:
        """Per-slice score: the largest normalised layer distance (≈1 in distribution)."""
        result: np.ndarray = self.layer_scores(features).max(axis=1)
        return result

    def save(self, path: Path) -> None:
        tensors: dict[str, np.ndarray] = {}
        for i, space in enumerate(self.spaces):
            tensors.update(space.tensors(f"{i}."))
        tensors["references"] = np.asarray(self.references, dtype=np.float32)
        save_file(tensors, str(path), metadata={"layers": json.dumps(list(self.layers))})

    @classmethod
    def load(cls, path: Path) -> LayeredOOD:
        with safe_open(str(path), framework="numpy") as fh:
            layers = tuple(json.loads((fh.metadata() or {})["layers"]))
        t = load_file(str(path))
        spaces = tuple(FeatureOOD.from_tensors(t, f"{i}.") for i in range(len(layers)))
        return cls(layers, spaces, tuple(float(v) for v in t["references"]))


OOD = FeatureOOD | LayeredOOD


def ood_layers(ood: OOD | None) -> tuple[str, ...]:
    """The layers whose pooled features the forward pass must add for ``ood`` (none for 1.2.0's penultimate)."""
    return ood.pooled_layers if isinstance(ood, LayeredOOD) else ()


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier's final linear layer, whose input is the feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no linear classifier layer")
    return linears[-1]


def pool_map(y: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) feature maps to (N, 2C): each channel's spatial mean and standard deviation, in fp32."""
    y = y.float()
    return torch.cat([y.mean(dim=(2, 3)), y.std(dim=(2, 3))], dim=1)


class FeatureTap:
    """Context manager capturing OOD features during forward passes: pooled ``layers`` then the penultimate.

    Forward hooks on the same pass: the OOD score costs no second forward pass.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] = ()) -> None:
        self.model = model
        self.layer = last_linear(model)
        self.layers = tuple(layers)
        self.pooled: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        self.features: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureTap:
        def penultimate(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.features.append(args[0].detach().float().cpu())

        self._handles.append(self.layer.register_forward_pre_hook(penultimate))
        for name in self.layers:

            def pooled(_module: nn.Module, _args: object, output: torch.Tensor, name: str = name) -> None:
                self.pooled[name].append(pool_map(output.detach()).cpu())

            self._handles.append(self.model.get_submodule(name).register_forward_hook(pooled))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def array(self) -> np.ndarray:
        parts = [torch.cat(self.pooled[name]) for name in self.layers] + [torch.cat(self.features)]
        result: np.ndarray = torch.cat(parts, dim=1).numpy().astype(np.float32)
        return result
