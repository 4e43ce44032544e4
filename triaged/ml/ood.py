"""Feature-space out-of-distribution score: Mahalanobis distance to the nearest class in a PCA-whitened space.

Energy and max-softmax scores proved blind to the domain shift that matters here (DWI b0 slices got *more*
confident logits than the validation images), so the penultimate-layer features are compared with the training
distribution instead (Lee et al. 2018, with PCA for a stable covariance from a few thousand images). The
fitted statistics live in ``ood.safetensors`` next to the weights, checksummed in ``model.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

OOD_FILE = "ood.safetensors"


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

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, n_components: int = 64) -> FeatureOOD:
        """Fit on in-distribution (training) features; whitening uses within-class scatter."""
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

    def save(self, path: Path) -> None:
        save_file(
            {"mean": self.mean, "components": self.components, "scale": self.scale, "centroids": self.centroids},
            str(path),
        )

    @classmethod
    def load(cls, path: Path) -> FeatureOOD:
        t = load_file(str(path))
        return cls(t["mean"], t["components"], t["scale"], t["centroids"])


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier's final linear layer, whose input is the feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no linear classifier layer")
    return linears[-1]


class FeatureTap:
    """Context manager capturing the input of the final linear layer during forward passes."""

    def __init__(self, model: nn.Module) -> None:
        self.layer = last_linear(model)
        self.features: list[torch.Tensor] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> FeatureTap:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.features.append(args[0].detach().float().cpu())

        self._handle = self.layer.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def array(self) -> np.ndarray:
        result: np.ndarray = torch.cat(self.features).numpy().astype(np.float32)
        return result
