"""A tiny end-to-end training run: leak-free split, a few steps, a loadable model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.ml.conftest import _blob_image
from triaged.ml.networks import build_network
from triaged.ml.registry import load_model
from triaged.ml.results import SeriesMeta
from triaged.training.data import assign_splits, build_samples, read_manifest
from triaged.training.train import TrainConfig, train

#: A training run small enough for a unit test (one CPU thread, no workers, fp32 for exact comparisons).
TINY = {"arch": "smallcnn", "input_size": 32, "batch_size": 8, "threads": 1, "workers": 0, "precision": "fp32"}
META = SeriesMeta("MR", "", "t2 ax", "", ("ORIGINAL", "PRIMARY"), ("SE",), (), (), 1)


def test_split_keeps_groups_together(tiny_data_root: Path) -> None:
    samples = assign_splits(build_samples(tiny_data_root), seed=1)
    by_group: dict[str, set[str]] = {}
    for s in samples:
        by_group.setdefault(s.group, set()).add(s.split)
    assert all(len(splits) == 1 for splits in by_group.values())
    assert {s.split for s in samples} == {"train", "val", "test"}


def test_tiny_training_run_writes_a_loadable_model(tiny_data_root: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        data_root=tiny_data_root,
        out_dir=tmp_path / "run",
        arch="smallcnn",
        input_size=32,
        epochs=2,
        batch_size=8,
        lr=1e-2,
        threads=1,
        workers=0,
        max_steps=3,
        seed=7,
        precision="fp32",
    )
    best = train(cfg)
    assert best.is_file() and (tmp_path / "run" / "last.pt").is_file()
    spec, model = load_model(tmp_path / "run" / "model")
    assert spec.arch == "smallcnn" and spec.preprocessing.input_size == 32
    assert spec.aggregation["min_matrix"] == 32  # images smaller than the input are refused as too coarse
    assert spec.extra["data_manifest_sha256"] == (tmp_path / "run" / "manifest.csv.sha256").read_text().split()[0]
    assert read_manifest(tmp_path / "run" / "model" / "manifest.csv")
    torch.manual_seed(cfg.seed)
    initial = build_network("smallcnn", 4).state_dict()
    trained = model.state_dict()
    changed = [k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], trained[k])]
    assert changed, "training did not change any weight"
    from triaged.ml.api import Triage

    result = Triage(tmp_path / "run" / "model", device="cpu", precision="fp32").assess(
        [_blob_image(np.random.default_rng(0), 0).astype(np.float32)], META, cam_top_k=1
    )  # a head-like blob: uniform noise fills the field to its corners and is (rightly) not brain
    assert result.assessable and result.slice_probabilities.shape == (1, 4)


def test_resume_continues_from_last_checkpoint(tiny_data_root: Path, tmp_path: Path) -> None:
    base = {"data_root": tiny_data_root, "out_dir": tmp_path / "run", **TINY}
    train(TrainConfig(**base, epochs=1))  # type: ignore[arg-type]
    train(TrainConfig(**base, epochs=2, resume=True))  # type: ignore[arg-type]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2


def test_resumed_wall_clock_schedule_continues_where_it_stopped(tiny_data_root: Path, tmp_path: Path) -> None:
    base = {"data_root": tiny_data_root, "out_dir": tmp_path / "run", **TINY, "lr": 1e-2, "warmup_epochs": 0.01}
    train(TrainConfig(**base, epochs=1, time_budget_minutes=1.0))  # type: ignore[arg-type]
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["compute"]["wall_seconds"] = 54.0  # as if 90 % of the one-minute budget had been spent before the stop
    torch.save(state, last)
    resumed = {**base, "threads": 2}
    train(TrainConfig(**resumed, epochs=2, time_budget_minutes=1.0, resume=True, max_steps=1))  # type: ignore[arg-type]
    state = torch.load(last, weights_only=True)
    # cosine at >= 90 % of the budget: at most 3.4 % of the peak (a restarted clock would give ~100 %)
    assert state["optimizer"]["param_groups"][0]["lr"] < 0.04 * 1e-2
    assert state["compute"]["threads"] == "1; then 2"


def test_wall_clock_schedule_warms_up_then_decays_to_one_percent() -> None:
    from triaged.training.train import _time_lr_factor

    assert _time_lr_factor(0, 10, 0.0) == pytest.approx(0.1)
    assert _time_lr_factor(10, 10, 0.0) == pytest.approx(1.0)
    assert _time_lr_factor(50, 10, 0.5) == pytest.approx(0.505)
    assert _time_lr_factor(99, 10, 1.7) == pytest.approx(0.01)


def test_init_from_a_model_directory_starts_from_its_weights_and_sums_compute(
    tiny_data_root: Path, tmp_path: Path
) -> None:
    base = {"data_root": tiny_data_root, **TINY, "epochs": 1, "max_steps": 1}
    train(TrainConfig(**base, out_dir=tmp_path / "first"))  # type: ignore[arg-type]
    first_spec, first_model = load_model(tmp_path / "first" / "model")
    cfg = TrainConfig(
        **base,  # type: ignore[arg-type]
        out_dir=tmp_path / "second",
        init=f"model:{tmp_path / 'first' / 'model'}",
        lr=0.0,  # no update: the continued run must hold exactly the first run's parameters
        weight_decay=0.0,
    )
    train(cfg)
    spec, model = load_model(tmp_path / "second" / "model")
    first_params = dict(first_model.named_parameters())  # (batch-norm running statistics do move)
    assert all(torch.equal(first_params[k], p) for k, p in model.named_parameters())
    training = spec.extra["training"]
    assert training["init_from"]["weights_sha256"] == first_spec.weights_sha256
    first_compute = first_spec.extra["training"]["compute"]
    assert training["total_compute"]["images_seen"] == first_compute["images_seen"] + training["compute"]["images_seen"]
    assert training["total_compute"]["epochs"] == 2


def test_init_from_a_model_of_another_input_size_is_refused(tiny_data_root: Path, tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "data_root": tiny_data_root,
        "arch": "smallcnn",
        "batch_size": 8,
        "threads": 1,
        "workers": 0,
    }
    train(TrainConfig(**base, out_dir=tmp_path / "first", input_size=32, epochs=1, max_steps=1))
    with pytest.raises(ValueError, match="at 32 px"):
        train(
            TrainConfig(
                **base, out_dir=tmp_path / "second", input_size=48, init=f"model:{tmp_path / 'first' / 'model'}"
            )
        )
