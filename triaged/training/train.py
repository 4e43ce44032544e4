"""Training loop: ``python -m triaged.training.train`` or ``triaged train``.

Fixed-length warm-up + cosine schedule, AdamW, label smoothing, class-balanced loss, channels-last, bf16 autocast
where fast. A checkpoint is written after every epoch (``last.pt`` and ``best.pt``) so a run can be resumed or
exported at any time; ``--max-minutes`` stops cleanly between epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from triaged.ml.device import Placement, choose_placement
from triaged.ml.networks import build_network, count_parameters, load_torchvision_densenet121
from triaged.ml.registry import (
    DEFAULT_CLASSES,
    NO_TUMOUR,
    ModelSpec,
    default_aggregation,
    load_model,
    save_model_dir,
)
from triaged.ml.transforms import PreprocessingConfig
from triaged.training.attention import attention_loss, cell_hits, logits_and_cams
from triaged.training.augment import PairedAugment, StripOptions, build_train_augment
from triaged.training.camscore import cheng_mask_path, load_masks
from triaged.training.choices import AUGMENTS, SAMPLINGS
from triaged.training.contrast_probe import read_estimates
from triaged.training.data import (
    Sample,
    assign_splits,
    build_samples,
    read_manifest,
    split_summary,
    training_samples,
    write_manifest,
)
from triaged.training.dataset import CachedImages, MaskedImages, preprocess_files, sample_labels, sample_paths
from triaged.training.lgg import is_lgg, lgg_mask_path
from triaged.training.mixstyle import MixStyleOptions, attach_mixstyle
from triaged.training.mpr import is_mpr, mask_path_of
from triaged.training.sampling import balanced_weights, effective_class_counts, kaggle_contrast_weights

log = structlog.get_logger()


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (recorded in checkpoints and ``model.json``)."""

    data_root: Path
    out_dir: Path
    arch: str = "densenet121"
    input_size: int = 128
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 20260
    device: str = "auto"
    precision: str = "auto"
    threads: int = 2
    workers: int = 1
    max_minutes: float | None = None
    time_budget_minutes: float | None = None
    max_steps: int | None = None
    patience: int = 0
    resume: bool = False
    init: str | None = None
    limit: int | None = None
    manifest: Path | None = None
    cache_dir: Path | None = None
    model_name: str = "densenet121-brainmri"
    model_version: str = "1.0.0"
    cam_loss_weight: float = 0.0
    cam_mask_sources: str = "cheng,tcga_lgg"
    sampling: str = "uniform"
    augment: str = "standard"
    strip_prob: float = StripOptions.prob  # --augment strip: share of training slices stripped
    strip_whole_heads_only: bool = StripOptions.whole_heads_only  # --augment strip: only whole heads in the frame
    mixstyle_prob: float = 0.0  # > 0: MixStyle after the first two dense blocks with this chance per batch
    contrast_estimates: Path | None = None  # --sampling kaggle_contrast: path,contrast of every Kaggle image
    validate: bool = True  # off: no per-epoch validation pass (the lever study evaluates each arm itself)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(total_steps: int, warmup_steps: int) -> Any:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _load_arrays(cfg: TrainConfig, prep: PreprocessingConfig) -> tuple[dict[str, Any], str]:
    if cfg.manifest is not None:
        samples = read_manifest(cfg.manifest)
    else:
        samples = assign_splits(build_samples(cfg.data_root), seed=cfg.seed)
    manifest_sha = write_manifest(samples, cfg.out_dir / "manifest.csv")
    log.info("data_split", manifest_sha256=manifest_sha, summary=split_summary(samples))
    arrays: dict[str, Any] = {}
    for split in ("train", "val"):
        chosen = training_samples(samples, split)
        if cfg.limit is not None:
            chosen = random.Random(cfg.seed).sample(chosen, min(cfg.limit, len(chosen)))
        images = preprocess_files(sample_paths(cfg.data_root, chosen), prep, cache_dir=cfg.cache_dir)
        arrays[split] = (images, sample_labels(chosen, DEFAULT_CLASSES))
        if cfg.cam_loss_weight > 0:
            sources = frozenset(cfg.cam_mask_sources.split(","))
            arrays[split] += _tumour_masks(cfg.data_root, chosen, prep.input_size, sources)
        arrays[f"{split}_samples"] = chosen
    return arrays, manifest_sha


def tumour_mask_path(data_root: Path, sample: Sample) -> Path | None:
    """The tumour mask of a training image, where one exists: Cheng slices, and tcga_lgg slices labelled tumour
    (the FLAIR-abnormality mask, co-registered with the T1 channels) and their sagittal/coronal reformats labelled
    tumour. Kaggle images and no-tumour slices have none."""
    if sample.source == "cheng":
        return cheng_mask_path(data_root, sample.path)
    if is_lgg(sample) and sample.label != NO_TUMOUR:
        return lgg_mask_path(data_root, sample.path)
    if is_mpr(sample) and sample.label != NO_TUMOUR:
        return data_root / mask_path_of(sample.path)
    return None


def _tumour_masks(
    data_root: Path, samples: Sequence[Sample], size: int, sources: frozenset[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S) uint8 masks and an (N,) has-mask flag (see :func:`tumour_mask_path`); only masks of ``sources``
    are used (``--cam-mask-sources``: the lever "attention loss on LGG FLAIR masks as well as on Cheng")."""
    paths = [tumour_mask_path(data_root, s) if s.source in sources else None for s in samples]
    has_mask = np.array([p is not None for p in paths], dtype=bool)
    masks = np.zeros((len(samples), size, size), dtype=np.uint8)
    rows = np.flatnonzero(has_mask)
    masks[rows] = load_masks([p for p in paths if p is not None], size)
    log.info("tumour_masks", images=len(samples), with_mask=int(rows.size))
    return masks, has_mask


@torch.inference_mode()
def _validate(model: nn.Module, loader: DataLoader[Any], placement: Placement) -> dict[str, float]:
    """Loss, accuracy and balanced accuracy; with masks also the share of masked slices whose CAM peaks on tumour."""
    model.eval()
    logits_all, labels_all, hits_all = [], [], []
    for batch in loader:
        x, y = batch[0].to(placement.device).contiguous(memory_format=torch.channels_last), batch[1]
        with placement.autocast():
            if len(batch) == 4:
                logits, cams = logits_and_cams(model, x, y.to(placement.device))
                masks, has_mask = batch[2].to(placement.device), batch[3].to(placement.device)
                hits_all.append(cell_hits(cams.float(), masks)[has_mask].cpu())
            else:
                logits = model(x)
        logits_all.append(logits.float().cpu())
        labels_all.append(y)
    logits, labels = torch.cat(logits_all), torch.cat(labels_all)
    pred = logits.argmax(1)
    recalls = [float((pred[labels == c] == c).float().mean()) for c in range(logits.shape[1]) if (labels == c).any()]
    metrics = {
        "val_loss": float(nn.functional.cross_entropy(logits, labels)),
        "val_acc": float((pred == labels).float().mean()),
        "val_balanced_acc": float(np.mean(recalls)),
    }
    hits = torch.cat(hits_all) if hits_all else torch.zeros(0, dtype=torch.bool)
    if hits.numel():
        metrics["val_cam_cell_hit"] = float(hits.float().mean())
    return metrics


def _build_model(cfg: TrainConfig) -> tuple[nn.Module, dict[str, Any] | None]:
    """The network, initialised as ``--init`` says, and the record of the model directory it continues from."""
    model = build_network(cfg.arch, num_classes=len(DEFAULT_CLASSES))
    init_from = None
    if cfg.init:
        kind, _, path = cfg.init.partition(":")
        if kind == "imagenet" and cfg.arch == "densenet121":
            load_torchvision_densenet121(model, Path(path))
        elif kind == "checkpoint":
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        elif kind == "model":
            spec, shipped = load_model(Path(path))
            # A DenseNet ends in adaptive pooling, so its weights serve any input size (the 160 px lever).
            size_free = cfg.arch == "densenet121"
            if spec.arch != cfg.arch or (not size_free and spec.preprocessing.input_size != cfg.input_size):
                raise ValueError(
                    f"--init {cfg.init}: that model is {spec.arch} at {spec.preprocessing.input_size} px,"
                    f" this run is {cfg.arch} at {cfg.input_size} px"
                )
            model.load_state_dict(shipped.float().state_dict())
            init_from = init_record(spec)
        else:
            raise ValueError(
                f"--init must be imagenet:PATH (densenet121 only), checkpoint:PATH or model:DIR, got {cfg.init!r}"
            )
    return model, init_from


def init_record(spec: ModelSpec) -> dict[str, Any]:
    """What a run continued from a model directory records about it (its weights and all compute behind it)."""
    training = dict(spec.extra.get("training", {}))
    return {
        "name": spec.name,
        "version": spec.version,
        "weights_sha256": spec.weights_sha256,
        "total_compute": dict(training.get("total_compute") or training.get("compute") or {}),
    }


def add_compute(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """Total compute of a model trained in several runs (the model card reports the sum)."""
    total = {key: earlier.get(key, 0) + later.get(key, 0) for key in ("wall_seconds", "images_seen", "epochs")}
    for key in ("device", "precision", "threads"):
        values = [str(v) for v in (earlier.get(key), later.get(key)) if v is not None]
        total[key] = values[0] if len(set(values)) == 1 else "; then ".join(values)
    return total


def export_checkpoint(
    checkpoint: Path,
    model_dir: Path,
    *,
    provisional: bool = True,
    half: bool = False,
    init_from: ModelSpec | None = None,
) -> ModelSpec:
    """Write a model directory from a training checkpoint (uncalibrated until :mod:`evaluate` updates it).

    ``init_from`` (or the record a ``--init model:DIR`` run kept in its checkpoint) adds the earlier model's
    compute to ``training.total_compute``, so the card states everything spent on the weights.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = state["config"]
    training: dict[str, Any] = {
        "config": cfg,
        "epoch": state["epoch"],
        "history": state["history"],
        "compute": state["compute"],
    }
    # The best checkpoint may be an earlier epoch than the run's last: the run's compute is the last one's.
    last = checkpoint.with_name("last.pt")
    run_compute = (
        torch.load(last, map_location="cpu", weights_only=True)["compute"] if last.is_file() else state["compute"]
    )
    prior = init_record(init_from) if init_from is not None else state.get("init_from")
    if prior:
        training["init_from"] = prior
        training["total_compute"] = add_compute(prior["total_compute"], run_compute)
    elif run_compute != state["compute"]:
        training["total_compute"] = run_compute
    model = build_network(cfg["arch"], num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    preprocessing = PreprocessingConfig.from_dict(state["preprocessing"])
    spec = ModelSpec(
        name=cfg["model_name"],
        version=cfg["model_version"],
        arch=cfg["arch"],
        classes=tuple(state["classes"]),
        preprocessing=preprocessing,
        weights_sha256="",
        temperature=1.0,
        thresholds={"urgency": 0.5},
        aggregation=default_aggregation(preprocessing.input_size),
        ood={},
        provisional=provisional,
        extra={
            "data_manifest_sha256": state["manifest_sha256"],
            "training": training,
        },
    )
    written = save_model_dir(model_dir, model, spec, half=half)
    manifest = checkpoint.parent / "manifest.csv"
    if manifest.is_file():
        shutil.copyfile(manifest, model_dir / "manifest.csv")
        shutil.copyfile(manifest.with_name("manifest.csv.sha256"), model_dir / "manifest.csv.sha256")
    return written


def _sampling_weights(cfg: TrainConfig, samples: Sequence[Sample]) -> np.ndarray:
    """Per-sample draw probabilities of ``cfg.sampling`` (uniform: all equal)."""
    if cfg.sampling == "balanced":
        return balanced_weights(samples)
    if cfg.sampling == "kaggle_contrast":
        if cfg.contrast_estimates is None or not cfg.contrast_estimates.is_file():
            raise ValueError(
                "--sampling kaggle_contrast needs --contrast-estimates FILE "
                "(python -m triaged.training.contrast_probe MODEL_DIR --out FILE)"
            )
        return kaggle_contrast_weights(samples, read_estimates(cfg.contrast_estimates))
    return np.full(len(samples), 1.0 / len(samples))


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the path of the best checkpoint."""
    torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    placement = choose_placement(cfg.device, cfg.precision)
    log.info("train_start", device=placement.device, precision=placement.precision, arch=cfg.arch, config=cfg.to_json())
    prep = PreprocessingConfig(input_size=cfg.input_size)
    arrays, manifest_sha = _load_arrays(cfg, prep)
    train_x, train_y = arrays["train"][:2]
    if cfg.sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {cfg.sampling!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = _sampling_weights(cfg, arrays["train_samples"])
    weighted = cfg.sampling != "uniform"
    # the loss's class weights come from the class mix the sampler draws (uniform: the plain class counts)
    counts = effective_class_counts(train_y, weights, len(DEFAULT_CLASSES))
    sampler = (
        WeightedRandomSampler(weights.tolist(), len(train_y), replacement=True, generator=gen) if weighted else None
    )
    class_weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    strip = StripOptions(cfg.strip_prob, cfg.strip_whole_heads_only)
    train_set: CachedImages | MaskedImages = (
        MaskedImages(
            train_x,
            train_y,
            arrays["train"][2],
            arrays["train"][3],
            PairedAugment(cfg.input_size, seed=cfg.seed, augment=cfg.augment, strip=strip),
        )
        if cfg.cam_loss_weight > 0
        else CachedImages(
            train_x, train_y, build_train_augment(cfg.input_size, seed=cfg.seed, augment=cfg.augment, strip=strip)
        )
    )
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        generator=gen,
        persistent_workers=cfg.workers > 0,
        worker_init_fn=_worker_init,
    )
    val_set = MaskedImages(*arrays["val"]) if cfg.cam_loss_weight > 0 else CachedImages(*arrays["val"])
    val_loader = DataLoader(val_set, batch_size=64, shuffle=False)
    model, init_from = _build_model(cfg)
    model = model.to(placement.device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.mixstyle_prob > 0:
        attach_mixstyle(model, MixStyleOptions(prob=cfg.mixstyle_prob))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    # A --max-steps run (the lever study's equal budget) decays its cosine over those steps, not the epochs.
    total = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, max(1, int(cfg.warmup_epochs * steps_per_epoch)))
    )
    loss_fn = nn.CrossEntropyLoss(weight=class_weight.to(placement.device), label_smoothing=cfg.label_smoothing)
    history: list[dict[str, float]] = []
    compute: dict[str, Any] = {
        "wall_seconds": 0.0,
        "images_seen": 0,
        "epochs": 0,
        "device": placement.device,
        "precision": placement.precision,
        "threads": cfg.threads,
    }
    start_epoch, best, stale = 0, (-1.0, -math.inf), 0
    last_path, best_path = cfg.out_dir / "last.pt", cfg.out_dir / "best.pt"
    if cfg.resume and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, compute = state["epoch"], state["history"], state["compute"]
        if str(compute.get("threads")).rpartition(" ")[2] != str(cfg.threads):
            compute["threads"] = f"{compute.get('threads')}; then {cfg.threads}"
        best, stale = tuple(state["best"]), int(state["stale"])
        gen.set_state(state["generator"])
        log.info("train_resumed", epoch=start_epoch)
    log.info(
        "train_plan",
        params=count_parameters(model),
        train_images=len(train_y),
        val_images=len(arrays["val"][1]),
        steps_per_epoch=steps_per_epoch,
        class_weight=class_weight.tolist(),
    )
    t_run = time.monotonic()
    # A resumed run's wall-clock budget counts the epochs already done, so its cosine continues where it stopped.
    t_budget = t_run - float(compute["wall_seconds"])
    step = 0
    warmup_steps = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    budget_s = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
    out_of_time = False
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.monotonic()
        model.train()
        run_loss, run_correct, run_n = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=20.0)
        for batch in bar:
            x = batch[0].to(placement.device).contiguous(memory_format=torch.channels_last)
            y = batch[1].to(placement.device)
            with placement.autocast():
                if cfg.cam_loss_weight > 0:
                    logits, cams = logits_and_cams(model, x, y)
                else:
                    logits = model(x)
            loss = loss_fn(logits.float(), y)
            if cfg.cam_loss_weight > 0:
                masks, has_mask = batch[2].to(placement.device), batch[3].to(placement.device)
                loss = loss + cfg.cam_loss_weight * attention_loss(cams, masks, has_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if budget_s is not None:
                global_step = epoch * steps_per_epoch + bar.n
                factor = _time_lr_factor(global_step, warmup_steps, (time.monotonic() - t_budget) / budget_s)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
            optimizer.step()
            if budget_s is None:
                scheduler.step()
            run_loss += float(loss.detach()) * len(y)
            run_correct += int((logits.argmax(1) == y).sum())
            run_n += len(y)
            bar.set_postfix(
                loss=f"{run_loss / run_n:.4f}",
                acc=f"{run_correct / run_n:.4f}",
                lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                refresh=False,
            )
            step += 1
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            if budget_s is not None and time.monotonic() - t_budget >= budget_s:
                out_of_time = True
                break
        bar.close()
        metrics = {
            "epoch": epoch + 1,
            "train_loss": run_loss / max(run_n, 1),
            "train_acc": run_correct / max(run_n, 1),
            **(_validate(model, val_loader, placement) if cfg.validate else {"val_acc": 0.0, "val_loss": 0.0}),
        }
        epoch_s = time.monotonic() - t_epoch
        metrics["epoch_seconds"] = epoch_s
        history.append(metrics)
        compute["wall_seconds"] += epoch_s
        compute["images_seen"] += run_n
        compute["epochs"] = epoch + 1
        score = (metrics["val_acc"], -metrics["val_loss"])
        improved = score > best
        best, stale = (score, 0) if improved else (best, stale + 1)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "compute": compute,
            "best": list(best),
            "stale": stale,
            "generator": gen.get_state(),
            "config": cfg.to_json(),
            "classes": list(DEFAULT_CLASSES),
            "preprocessing": prep.to_dict(),
            "manifest_sha256": manifest_sha,
            "init_from": init_from,
        }
        _atomic_save(state, last_path)
        if improved:
            _atomic_save(state, best_path)
        (cfg.out_dir / "history.json").write_text(json.dumps({"history": history, "compute": compute}, indent=1))
        log.info(
            "epoch_done",
            **{k: round(v, 5) for k, v in metrics.items()},
            best=improved,
            img_per_s=round(run_n / epoch_s, 1),
        )
        elapsed = time.monotonic() - t_run
        if (cfg.max_steps is not None and step >= cfg.max_steps) or out_of_time:
            break
        if cfg.patience and stale >= cfg.patience:
            log.info("early_stop", epoch=epoch + 1)
            break
        if cfg.max_minutes is not None and elapsed + epoch_s > cfg.max_minutes * 60 and epoch + 1 < cfg.epochs:
            log.warning("time_budget_reached", epoch=epoch + 1, elapsed_s=round(elapsed))
            break
    export_checkpoint(best_path, cfg.out_dir / "model")
    log.info("train_done", best_checkpoint=str(best_path), compute=compute)
    return best_path


def _time_lr_factor(global_step: int, warmup_steps: int, progress: float) -> float:
    """Linear warm-up by steps, then cosine over the wall-clock budget (ends on time whatever the load)."""
    if global_step < warmup_steps:
        return (global_step + 1) / warmup_steps
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, CachedImages | MaskedImages) and info.dataset.augment is not None:
        augment = info.dataset.augment
        if hasattr(augment, "set_random_state"):
            augment.set_random_state(seed=int(info.seed % 2**31))


def _atomic_save(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command-line interface for ``python -m triaged.training.train`` (same options as ``triaged train``)."""
    p = argparse.ArgumentParser(prog="python -m triaged.training.train", description=__doc__)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    p.add_argument("--out-dir", type=Path, required=True)
    for name in ("arch", "device", "precision", "init", "model_name", "model_version", "cam_mask_sources"):
        p.add_argument("--" + name.replace("_", "-"), default=defaults[name])
    for name in ("input_size", "epochs", "batch_size", "threads", "workers", "max_steps", "patience", "limit", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    for name in (
        "lr",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "max_minutes",
        "time_budget_minutes",
        "cam_loss_weight",
        "strip_prob",
        "mixstyle_prob",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=defaults[name])
    p.add_argument("--sampling", choices=SAMPLINGS, default=defaults["sampling"])
    p.add_argument("--augment", choices=AUGMENTS, default=defaults["augment"])
    p.add_argument("--manifest", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument(
        "--contrast-estimates", type=Path, default=None, help="--sampling kaggle_contrast: contrast_probe's output"
    )
    p.add_argument("--strip-whole-heads-only", action="store_true", help="--augment strip: only whole heads")
    p.add_argument("--resume", action="store_true")
    ns = p.parse_args(argv)
    return TrainConfig(**vars(ns))


def main(argv: Sequence[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
