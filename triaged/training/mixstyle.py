"""MixStyle (Zhou et al., ICLR 2021, "Domain generalization with MixStyle"): a training-only generalisation lever.

Early convolutional features carry an image's *style* (contrast, texture, noise: what a scanner, a site or an export
pipeline leaves) in their per-channel mean and standard deviation, and its content in the normalised rest. Mixing
those statistics between images of a batch makes the training set look as if it came from many more acquisition
styles than it does, without inventing anatomy: each image keeps its own normalised features (its content and its
label) and takes a random convex mix of its own and another image's channel statistics. The mixing weight is drawn
from Beta(alpha, alpha), so most mixes stay close to one of the two images.

It acts only in training mode, through forward hooks on chosen modules, so the exported network is an unchanged
DenseNet121 and the daemon loads and runs it as any other (nothing in :mod:`triaged.ml` knows about it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: After the first two dense blocks of MONAI's DenseNet121: early enough that the statistics are style, not class
#: (Zhou et al. mix after the first layers of a ResNet and report that mixing the last layers hurts).
DEFAULT_LAYERS = ("features.denseblock1", "features.denseblock2")


@dataclass(frozen=True)
class MixStyleOptions:
    """``prob``: chance that a training batch is mixed at each hooked layer; ``alpha``: the Beta parameter."""

    prob: float = 0.5
    alpha: float = 0.1
    eps: float = 1e-6


def mix_styles(x: torch.Tensor, options: MixStyleOptions) -> torch.Tensor:
    """``x`` (N, C, H, W) with each image's channel mean and std replaced by a mix of its own and another image's
    (partners form one random cycle, so no image is paired with itself). The statistics are detached, as in the
    paper, so the gradient does not learn to undo the mix."""
    if x.shape[0] < 2:
        return x
    mean = x.mean(dim=(2, 3), keepdim=True).detach()
    std = (x.var(dim=(2, 3), keepdim=True) + options.eps).sqrt().detach()
    normalised = (x - mean) / std
    beta = torch.distributions.Beta(options.alpha, options.alpha)
    lam = beta.sample((x.shape[0], 1, 1, 1)).to(device=x.device, dtype=x.dtype)
    order = torch.randperm(x.shape[0])
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)  # one random cycle: every image mixes with another one, never with itself
    perm = partner.to(x.device)
    mixed_mean = lam * mean + (1 - lam) * mean[perm]
    mixed_std = lam * std + (1 - lam) * std[perm]
    return normalised * mixed_std + mixed_mean


def attach_mixstyle(
    model: nn.Module, options: MixStyleOptions, layers: Sequence[str] = DEFAULT_LAYERS
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook :func:`mix_styles` onto the outputs of ``layers``; active only while ``model.training``.

    Returns the hook handles (remove them to detach). A layer name the model lacks is an error, not a no-op: a
    lever that silently did nothing would be measured as "no effect"."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"model has no module(s) {', '.join(missing)} to apply MixStyle to")

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or float(torch.rand(())) >= options.prob:
            return None
        return mix_styles(output, options)

    return [modules[name].register_forward_hook(hook) for name in layers]
