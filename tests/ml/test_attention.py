"""Mask-guided attention: the CAM identity it relies on, the loss, paired augmentation and a training run using it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from triaged.ml.networks import build_network
from triaged.training.attention import attention_loss, cell_hits, logits_and_cams, mask_distribution
from triaged.training.augment import PairedAugment
from triaged.training.data import assign_splits, build_samples, write_manifest
from triaged.training.dataset import MaskedImages
from triaged.training.train import TrainConfig, train


def _densenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("densenet121", num_classes=4).eval()


def test_cam_of_the_label_class_averages_to_its_logit() -> None:
    model = _densenet()
    x = torch.rand(3, 1, 64, 64)
    labels = torch.tensor([0, 2, 3])
    with torch.no_grad():
        logits, cams = logits_and_cams(model, x, labels)
        expected = model(x)
    assert cams.shape == (3, 2, 2)
    torch.testing.assert_close(logits, expected)
    head = model.get_submodule("class_layers.out")
    assert isinstance(head, torch.nn.Linear)
    bias = head.bias[labels]
    torch.testing.assert_close(cams.mean((1, 2)) + bias, logits[torch.arange(3), labels])


def test_other_architectures_are_refused() -> None:
    with pytest.raises(ValueError, match="densenet121"):
        logits_and_cams(build_network("smallcnn", 4), torch.rand(1, 1, 32, 32), torch.tensor([0]))


def test_mask_distribution_is_the_share_of_tumour_area_per_cell() -> None:
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :2] = 1  # 8 px in the top-left cell
    masks[0, 4:, 4:6] = 1  # 8 px in the bottom-right cell
    dist = mask_distribution(masks, (2, 2))
    torch.testing.assert_close(dist[0], torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    assert float(dist[1].sum()) == 0.0


def test_attention_loss_ignores_images_without_a_mask() -> None:
    cams = torch.randn(2, 4, 4, requires_grad=True)
    masks = torch.ones(2, 16, 16)
    loss = attention_loss(cams, masks, torch.tensor([False, False]))
    loss.backward()  # type: ignore[no-untyped-call]
    assert float(loss.detach()) == 0.0 and cams.grad is not None and float(cams.grad.abs().sum()) == 0.0
    empty = attention_loss(cams, torch.zeros(2, 16, 16), torch.tensor([True, True]))
    assert float(empty.detach()) == 0.0


def test_optimising_the_attention_loss_moves_the_cam_peak_onto_the_mask() -> None:
    model = _densenet()
    x = torch.rand(2, 1, 64, 64)
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, 64, 64)
    masks[0, 40:60, 36:60] = 1  # bottom-right cell
    masks[1, 2:20, 4:26] = 1  # top-left cell
    has_mask = torch.tensor([True, True])
    with torch.no_grad():
        before = attention_loss(logits_and_cams(model, x, labels)[1], masks, has_mask)
    optimizer = torch.optim.Adam(model.get_submodule("class_layers.out").parameters(), lr=0.05)
    for _ in range(30):
        _, cams = logits_and_cams(model, x, labels)
        loss = attention_loss(cams, masks, has_mask)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    with torch.no_grad():
        _, cams = logits_and_cams(model, x, labels)
        after = attention_loss(cams, masks, has_mask)
    assert float(after) < 0.5 * float(before)
    assert bool(cell_hits(cams, masks).all())
    assert cams[0].argmax() == 3 and cams[1].argmax() == 0


def test_paired_augment_moves_image_and_mask_together() -> None:
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:30, 12:28] = 1.0
    image = 0.2 + 0.7 * mask
    moved = 0
    for seed in range(12):
        out = PairedAugment(64, seed=seed)(torch.cat([image, mask]))
        assert out.shape == (2, 64, 64) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        inside, outside = out[1] > 0.5, out[1] <= 0.5
        assert bool(inside.any())
        # Wherever the mask went, the bright square went too (intensity augmentation keeps it the brightest part).
        assert float(out[0][inside].mean()) > float(out[0][outside].mean()) + 0.2
        moved += int(not torch.equal(out[1] > 0.5, mask[0] > 0.5))
    assert moved >= 6, "geometric augmentation was not applied to the mask"


def test_masked_images_yields_the_mask_and_whether_it_exists() -> None:
    images = np.random.default_rng(0).uniform(0, 1, (2, 1, 16, 16)).astype(np.float16)
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 4:8, 4:8] = 1
    data = MaskedImages(images, [1, 2], masks, np.array([True, False]))
    x, y, m, has = data[0]
    assert x.shape == (1, 16, 16) and y == 1 and has is True and float(m.sum()) == 16.0
    torch.testing.assert_close(x, torch.from_numpy(images[0].astype(np.float32)))
    assert data[1][3] is False
    with pytest.raises(ValueError, match="differ in length"):
        MaskedImages(images, [1], masks, np.array([True, False]))


def _draw_tumour_masks(data_root: Path) -> None:
    """The tiny fixture's Cheng masks are empty; put each one where its image's bright blob is."""
    for image_path in (data_root / "cheng_figshare" / "images").glob("*.jpg"):
        with Image.open(image_path) as img:
            pixels = np.asarray(img.convert("L"))
        mask = (pixels > 180).astype(np.uint8) * 255
        Image.fromarray(mask).save(data_root / "cheng_figshare" / "masks" / f"{image_path.stem}_mask.png")


def test_training_with_the_attention_loss_reports_cam_hits(tiny_data_root: Path, tmp_path: Path) -> None:
    _draw_tumour_masks(tiny_data_root)
    # The tiny root's 12 Cheng slices form one group; put half of them in validation so the CAM hit rate is measured.
    samples = assign_splits(build_samples(tiny_data_root), seed=3)
    cheng = [i for i, s in enumerate(samples) if s.source == "cheng"]
    for n, i in enumerate(cheng):
        samples[i] = dataclasses.replace(samples[i], split="val" if n % 2 else "train")
    manifest = tmp_path / "manifest.csv"
    write_manifest(samples, manifest)
    cfg = TrainConfig(
        data_root=tiny_data_root,
        out_dir=tmp_path / "run",
        arch="densenet121",
        input_size=64,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        threads=1,
        workers=0,
        max_steps=2,
        seed=3,
        precision="fp32",
        cam_loss_weight=0.5,
        manifest=manifest,
    )
    train(cfg)
    history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert min(abs(history[0]["val_cam_cell_hit"] - n / 6) for n in range(7)) < 1e-6  # a share of 6 slices
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["cam_loss_weight"] == 0.5
