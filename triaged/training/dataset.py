"""Decoded, preprocessed image tensors cached in RAM (and on disk) so JPEG decoding never limits training."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from triaged.ml.transforms import PreprocessingConfig, preprocess_stack
from triaged.training.data import Sample


def load_image(path: Path) -> np.ndarray:
    """Decode an image file to a 2-D float32 grayscale array (the same pixel values the daemon would see)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float32)


_CHUNK = 256


def preprocess_files(
    paths: Sequence[Path], config: PreprocessingConfig, *, cache_dir: Path | None = None, progress: bool = True
) -> np.ndarray:
    """Return an (N, 1, S, S) float16 array of preprocessed images, cached under ``cache_dir`` when given.

    The cache key covers the file list and the preprocessing parameters, so a stale cache is never reused.
    """
    key_src = json.dumps([[str(p) for p in paths], config.to_dict()]).encode()
    key = hashlib.sha256(key_src).hexdigest()[:16]
    cache = cache_dir / f"pre_{key}.npy" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        cached: np.ndarray = np.load(cache)
        return cached
    size = config.input_size
    out = np.empty((len(paths), 1, size, size), dtype=np.float16)
    # In chunks through the daemon's stacked path (bit-identical to MONAI slice by slice, several times faster).
    with tqdm(total=len(paths), desc="preprocess", disable=not progress, mininterval=5.0) as bar:
        for start in range(0, len(paths), _CHUNK):
            chunk = paths[start : start + _CHUNK]
            stacked = preprocess_stack(config, [load_image(p) for p in chunk])
            out[start : start + len(chunk)] = stacked.numpy().astype(np.float16)
            bar.update(len(chunk))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache)
    return out


class CachedImages(Dataset[tuple[torch.Tensor, int]]):
    """Preprocessed images + integer labels, with an optional per-sample random augmentation."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = [int(x) for x in labels]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[index].astype(np.float32))
        if self.augment is not None:
            x = self.augment(x).as_subclass(torch.Tensor).clamp_(0.0, 1.0)
        return x, self.labels[index]


class MaskedImages(Dataset[tuple[torch.Tensor, int, torch.Tensor, bool]]):
    """Like :class:`CachedImages`, plus a tumour mask per image (all zeros and ``has_mask`` False where none exists).

    Image and mask are augmented together (:class:`triaged.training.augment.PairedAugment`) so the mask stays on the
    tumour after every rotation, zoom and flip.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        masks: np.ndarray,
        has_mask: np.ndarray,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not len(images) == len(labels) == len(masks) == len(has_mask):
            raise ValueError("images, labels and masks differ in length")
        self.images = images
        self.labels = [int(x) for x in labels]
        self.masks = masks
        self.has_mask = has_mask.astype(bool)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
        image = torch.from_numpy(self.images[index].astype(np.float32))
        pair = torch.cat([image, torch.from_numpy(self.masks[index].astype(np.float32))[None]])
        if self.augment is not None:
            pair = self.augment(pair)
        return pair[:1], self.labels[index], pair[1], bool(self.has_mask[index])


def sample_paths(data_root: Path, samples: Sequence[Sample]) -> list[Path]:
    return [data_root / s.path for s in samples]


def sample_labels(samples: Sequence[Sample], classes: Sequence[str]) -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    return [index[s.label] for s in samples]
