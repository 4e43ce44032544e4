"""Fixtures for the ML tests: single-threaded torch, a random model directory, a tiny synthetic data root."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():
    # MONAI's import triggers torch's `torch.jit.interface` DeprecationWarning from torch's own module, which the
    # project's "ignore::DeprecationWarning:monai.*" filter does not match; import it once here, quietly.
    warnings.simplefilter("ignore", DeprecationWarning)
    import monai  # noqa: F401

from triaged.ml.registry import build_random_model_dir

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
KAGGLE_FIELDS = [
    "file",
    "split",
    "label",
    "sha256",
    "phash",
    "dup_group",
    "dup_group_size",
    "clean_test",
    "in_cheng",
    "cheng_match",
    "cheng_match_label",
    "cheng_match_dist",
    "dup_group_label_conflict",
]
CHENG_FIELDS = ("file", "mask_file", "label", "cheng_index")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_model_dir(tmp_path_factory.mktemp("model") / "random", seed=0)


def _blob_image(rng: np.random.Generator, label: int, size: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2) * 90.0
    if label != 2:
        cy, cx = [(12, 12), (28, 12), (0, 0), (20, 28)][label]
        head += ((yy - cy) ** 2 + (xx - cx) ** 2 < 16) * 150.0
    image: np.ndarray = np.clip(head + rng.normal(0, 5, head.shape), 0, 255).astype(np.uint8)
    return image


@pytest.fixture
def tiny_data_root(tmp_path: Path) -> Path:
    """A data root in the shared-data layout with 48 synthetic Kaggle and 12 Cheng images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "cheng_figshare" / "images").mkdir(parents=True)
    (root / "cheng_figshare" / "masks").mkdir(parents=True)
    rows = []
    for i in range(48):
        label = i % 4
        split = "Testing" if i >= 40 else "Training"
        rel = f"{split}/{CLASSES[label]}/img_{i:03d}.jpg"
        (root / "kaggle_4class" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_blob_image(rng, label)).save(root / "kaggle_4class" / rel)
        rows.append(
            {
                "file": rel,
                "split": split,
                "label": CLASSES[label],
                "dup_group": f"k{i:05d}",
                "clean_test": "true" if split == "Testing" else "",
                "in_cheng": "false",
                "cheng_match": "",
                "dup_group_label_conflict": "false",
            }
        )
    with (root / "kaggle_4class" / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, KAGGLE_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    cheng = []
    for i in range(12):
        label = [0, 1, 3][i % 3]
        name = f"cheng_{i + 1:04d}"
        Image.fromarray(_blob_image(rng, label)).save(root / "cheng_figshare" / "images" / f"{name}.jpg")
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "cheng_figshare" / "masks" / f"{name}_mask.png")
        cheng.append(
            {
                "file": f"images/{name}.jpg",
                "mask_file": f"masks/{name}_mask.png",
                "label": CLASSES[label],
                "cheng_index": str(i + 1),
            }
        )
    with (root / "cheng_figshare" / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CHENG_FIELDS)
        writer.writeheader()
        writer.writerows(cheng)
    return root
