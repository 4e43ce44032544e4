"""The crude skull strip used to augment training and to measure stripped-slice AUC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from triaged.training.augment import RandSkullStrip, StripOptions, build_train_augment
from triaged.training.skullstrip import brain_mask, head_inside_frame, head_mask, skull_strip


def _head(size: int = 128) -> torch.Tensor:
    """Bright scalp ring, dark skull ring, grey brain with a dark ventricle: a slice a strip must get right."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = torch.sqrt((xx / 0.8) ** 2 + (yy / 0.9) ** 2)
    image = torch.zeros(size, size)
    image[r < 1.0] = 0.9  # scalp fat
    image[r < 0.92] = 0.05  # skull: as dark as air, but inside the head
    image[r < 0.85] = 0.45  # brain
    image[(xx.abs() < 0.08) & (yy.abs() < 0.2)] = 0.1  # ventricle
    return image


def test_head_mask_closes_the_dark_skull_and_the_ventricle() -> None:
    head = _head()
    mask = head_mask(head)
    assert mask[64, 64] and mask[64, 64 - 47]  # the ventricle and a skull pixel (r ~ 0.88) count as head
    assert not mask[2, 2] and not mask[64, 1]


def test_the_strip_removes_scalp_and_skull_and_keeps_the_brain_centre() -> None:
    head = _head()
    brain = brain_mask(head, erosion=0.06)
    assert brain[64, 64] and brain[64, 64 + 40]  # centre and deep brain (r ~ 0.63) kept
    assert not brain[64, 64 + 50] and not brain[64, 64 + 58]  # skull (r ~ 0.88) and scalp (r ~ 0.95) gone
    stripped = skull_strip(head, erosion=0.06)
    assert float(stripped.max()) == float(head[64, 64 + 30])  # the bright scalp is gone, the brain untouched
    assert torch.equal(stripped[brain], head[brain]) and float(stripped[~brain].max()) == 0.0


def test_a_larger_erosion_removes_more() -> None:
    head = _head()
    assert int(brain_mask(head, 0.03).sum()) > int(brain_mask(head, 0.06).sum()) > 0


def test_the_augmentation_rescales_like_preprocessing_and_keeps_shape() -> None:
    transform = RandSkullStrip(prob=1.0)
    transform.set_random_state(0)
    out = transform(_head()[None])
    assert out.shape == (1, 128, 128) and float(out.min()) >= 0.0 and float(out.max()) == 1.0
    assert float(out[0, 64, 64 + 58]) == 0.0  # scalp gone
    assert float(out[0, 64, 64 + 30]) == 1.0  # the brain is now the brightest tissue, as a stripped series gives
    empty = torch.zeros(1, 32, 32)
    assert torch.equal(transform(empty), empty)


def test_the_strip_augment_choice_adds_the_strip_and_nothing_else() -> None:
    kinds = [type(t).__name__ for t in build_train_augment(64, augment="strip").transforms]
    standard = [type(t).__name__ for t in build_train_augment(64, augment="standard").transforms]
    assert kinds.count("RandSkullStrip") == 1 and [k for k in kinds if k != "RandSkullStrip"] == standard
    out = build_train_augment(64, augment="strip", seed=3)(
        torch.from_numpy(np.random.default_rng(0).random((1, 64, 64)))
    )
    assert out.shape == (1, 64, 64)


def test_a_head_cropped_by_the_frame_is_not_a_whole_head() -> None:
    head = _head()  # the scalp reaches 0.9 of the half-height: 6 px of air above and below at 128 px
    assert head_inside_frame(head)
    cropped = head[10:-10, 10:-10]  # cropped to the skull, as most Kaggle exports are
    assert not head_inside_frame(cropped)


def test_whole_heads_only_leaves_cropped_slices_alone_and_strips_whole_heads() -> None:
    transform = RandSkullStrip(prob=1.0, whole_heads_only=True)
    transform.set_random_state(0)
    cropped = _head()[10:-10, 10:-10][None]
    assert torch.equal(transform(cropped), cropped)
    whole = _head()[None]
    assert float(transform(whole)[0, 64, 64 + 58]) == 0.0  # the whole head is stripped: scalp gone


def test_the_strip_probability_sets_how_often_slices_are_stripped() -> None:
    def stripped_share(prob: float) -> float:
        aug = build_train_augment(128, augment="strip", strip=StripOptions(prob), seed=5)
        strip = aug.transforms[[type(t).__name__ for t in aug.transforms].index("RandSkullStrip")]
        head = _head()[None]
        return sum(not torch.equal(strip(head), head) for _ in range(200)) / 200

    assert stripped_share(0.0) == 0.0 and stripped_share(1.0) == 1.0
    assert 0.03 < stripped_share(0.1) < 0.2
    with pytest.raises(ValueError, match="strip probability"):
        build_train_augment(64, augment="strip", strip=StripOptions(1.5))


def test_stripped_metrics_split_sites_and_contrasts() -> None:
    """strip_eval's table: per site group and contrast, AUC on 1 - p(no tumour); undefined groups are None."""
    from triaged.training.data import Sample
    from triaged.training.strip_eval import strip_metrics

    def sample(patient: str, contrast: str, k: int, label: str) -> Sample:
        path = f"tcga_lgg/{patient}/{contrast}/{k:03d}.jpg"
        return Sample(path, "tcga_lgg", label, "val", patient, False, "", False, False)

    samples = [
        sample("TCGA_HT_0001", "flair", 1, "glioma"),
        sample("TCGA_HT_0001", "flair", 2, "notumor"),
        sample("TCGA_DU_0002", "t1_pre", 1, "glioma"),
        sample("TCGA_DU_0002", "t1_pre", 2, "notumor"),
    ]
    # columns: glioma, meningioma, notumor, pituitary; HT ranked right, DU ranked wrong
    probs = np.array([[0.9, 0, 0.1, 0], [0.2, 0, 0.8, 0], [0.1, 0, 0.9, 0], [0.7, 0, 0.3, 0]])
    metrics = strip_metrics(samples, probs)
    assert metrics["stripped_unseen_auc"] == 1.0 and metrics["stripped_unseen_auc_flair"] == 1.0
    assert metrics["stripped_seen_auc"] == 0.0 and metrics["stripped_seen_auc_t1_pre"] == 0.0
    assert metrics["stripped_unseen_auc_t1_pre"] is None


def test_comparison_tools_refuse_a_malformed_model_argument(tmp_path: Path) -> None:
    import argparse

    import pytest

    from triaged.training.levers import named_model_dirs

    parser = argparse.ArgumentParser(prog="x")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text("{}")
    assert named_model_dirs(parser, [f"new={tmp_path / 'm'}"]) == {"new": tmp_path / "m"}
    for bad in ("no-equals-sign", f"missing={tmp_path / 'nothing'}", f"={tmp_path / 'm'}"):
        with pytest.raises(SystemExit):
            named_model_dirs(parser, [bad])


def test_stripped_probabilities_score_each_slice_stripped(random_model_dir: Path, tmp_path: Path) -> None:
    """Each slice is stripped before the daemon's preprocessing; the unstripped comparison
    (``validation_probabilities``) scores the same files differently; kept probabilities are read back, not redone."""
    from PIL import Image

    from triaged.ml.inference import Predictor
    from triaged.ml.transforms import preprocess_stack
    from triaged.training import levers, strip_eval
    from triaged.training.data import Sample

    heads = [(_head(96 + 8 * k) * 255).to(torch.uint8).numpy() for k in range(3)]
    samples = []
    for k, pixels in enumerate(heads):
        Image.fromarray(pixels).save(tmp_path / f"{k}.png")
        samples.append(Sample(f"{k}.png", "tcga_lgg", "notumor", "val", f"p{k}", False, "", False, False))
    probs = strip_eval.stripped_probabilities(random_model_dir, tmp_path, samples)
    predictor = Predictor.from_dir(random_model_dir, device="cpu", precision="fp32", backend="torch")
    one = torch.as_tensor(
        preprocess_stack(predictor.spec.preprocessing, [skull_strip(torch.from_numpy(heads[1])).numpy()])
    )
    expected = torch.softmax(torch.from_numpy(predictor.logits(one)), dim=1).numpy()[0]
    assert probs.shape == (3, 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(probs[1], expected, atol=1e-5)
    kept = levers.kept_probabilities(tmp_path / "kept.npy", lambda: probs)
    assert np.array_equal(kept, levers.kept_probabilities(tmp_path / "kept.npy", lambda: probs * 0))  # read back
    plain = levers.validation_probabilities(random_model_dir, tmp_path, samples, tmp_path / "cache")
    assert plain.shape == (3, 4) and not np.allclose(plain, probs, atol=1e-4)
