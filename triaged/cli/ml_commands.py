"""`triaged train`, `triaged evaluate` and `triaged model info` (registered by :mod:`triaged.cli.app`).

Thin wrappers: parse options, validate paths with one-line errors, call one function of :mod:`triaged.ml`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from triaged.cli.common import EXIT_USAGE, fail, settings_from
from triaged.errors import TriagedError
from triaged.ml.spec import read_spec, verify_weights

DEFAULT_DATA_ROOT = Path("../shared/data")


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    fail(message, code)


def _check_data_root(data_root: Path) -> None:
    for sub in ("kaggle_4class/index.csv", "cheng_figshare/index.csv"):
        if not (data_root / sub).is_file():
            _fail(f"{data_root} is not the shared data folder (missing {sub}); pass --data-root")


def train_command(  # noqa: PLR0917 (one parameter per CLI option)
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Run folder: checkpoints, manifest, history, model/.")],
    data_root: Annotated[
        Path, typer.Option("--data-root", help="Folder holding kaggle_4class/ and cheng_figshare/.")
    ] = DEFAULT_DATA_ROOT,
    arch: Annotated[str, typer.Option(help="densenet121 | resnet50 | smallcnn.")] = "densenet121",
    input_size: Annotated[int, typer.Option(help="Model input size in pixels.")] = 128,
    epochs: Annotated[int, typer.Option(help="Epochs of the step-based warm-up + cosine schedule.")] = 20,
    batch_size: Annotated[int, typer.Option()] = 32,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option()] = 0.05,
    label_smoothing: Annotated[float, typer.Option()] = 0.1,
    seed: Annotated[int, typer.Option()] = 20260,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (CUDA).")] = "auto",
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 2,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for augmentation.")] = 1,
    max_minutes: Annotated[float | None, typer.Option(help="Stop cleanly between epochs after this long.")] = None,
    time_budget_minutes: Annotated[
        float | None, typer.Option(help="Cosine schedule over wall-clock minutes instead of epochs.")
    ] = None,
    patience: Annotated[int, typer.Option(help="Early stopping patience in epochs (0 = off).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT_DIR/last.pt.")] = False,
    init: Annotated[
        str | None, typer.Option(help="imagenet:PATH, checkpoint:PATH or model:DIR (continue from a model directory).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache of preprocessed images.")] = None,
    cam_loss_weight: Annotated[
        float, typer.Option(help="Weight of the mask-guided attention loss on Cheng slices (0 = labels only).")
    ] = 0.0,
    cam_mask_sources: Annotated[
        str, typer.Option(help="Comma-separated sources whose tumour masks the attention loss uses.")
    ] = "cheng,tcga_lgg",
    sampling: Annotated[
        str,
        typer.Option(
            help="uniform | balanced (every source and contrast an equal share of each epoch) | kaggle_contrast"
            " (the classes of each estimated Kaggle contrast an equal share; needs --contrast-estimates)."
        ),
    ] = "uniform",
    contrast_estimates: Annotated[
        Path | None,
        typer.Option(
            help="--sampling kaggle_contrast: path,contrast CSV from python -m triaged.training.contrast_probe."
        ),
    ] = None,
    augment: Annotated[
        str,
        typer.Option(
            help="standard | scanner (adds JPEG re-compression, resampling, Gibbs and Rician noise) | strip (adds a"
            " random skull strip)."
        ),
    ] = "standard",
    strip_prob: Annotated[float, typer.Option(help="--augment strip: share of training slices stripped.")] = 0.25,
    strip_whole_heads_only: Annotated[
        bool,
        typer.Option("--strip-whole-heads-only", help="--augment strip: only slices with the whole head in view."),
    ] = False,
) -> None:
    """Train a classifier on the leak-free split and export OUT_DIR/model."""
    from triaged.ml.networks import ARCHITECTURES
    from triaged.training.train import TrainConfig, train

    _check_data_root(data_root)
    if arch not in ARCHITECTURES:
        _fail(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if init is not None and not Path(init.partition(":")[2]).exists():
        _fail(f"--init path {init.partition(':')[2]!r} does not exist")
    if cam_loss_weight < 0 or (cam_loss_weight > 0 and arch != "densenet121"):
        _fail("--cam-loss-weight must be >= 0 and needs --arch densenet121")
    from triaged.training.choices import AUGMENTS, SAMPLINGS

    if sampling not in SAMPLINGS or augment not in AUGMENTS:
        _fail(f"--sampling must be one of {', '.join(SAMPLINGS)}; --augment one of {', '.join(AUGMENTS)}")
    if sampling == "kaggle_contrast" and (contrast_estimates is None or not contrast_estimates.is_file()):
        _fail("--sampling kaggle_contrast needs --contrast-estimates FILE (python -m triaged.training.contrast_probe)")
    if not 0.0 <= strip_prob <= 1.0:
        _fail(f"--strip-prob must be between 0 and 1, got {strip_prob}")
    if epochs < 1 or batch_size < 1 or input_size < 32:
        _fail("--epochs and --batch-size must be >= 1 and --input-size >= 32")
    cfg = TrainConfig(
        data_root=data_root,
        out_dir=out_dir,
        arch=arch,
        input_size=input_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        seed=seed,
        device=device,
        precision=precision,
        threads=threads,
        workers=workers,
        max_minutes=max_minutes,
        time_budget_minutes=time_budget_minutes,
        patience=patience,
        resume=resume,
        init=init,
        cache_dir=cache_dir,
        cam_loss_weight=cam_loss_weight,
        cam_mask_sources=cam_mask_sources,
        sampling=sampling,
        augment=augment,
        strip_prob=strip_prob,
        strip_whole_heads_only=strip_whole_heads_only,
        contrast_estimates=contrast_estimates,
    )
    try:
        best = train(cfg)
    except (TriagedError, ValueError) as exc:
        _fail(str(exc), 1)
    typer.echo(f"best checkpoint {best}; model directory {out_dir / 'model'}")


def evaluate_command(  # noqa: PLR0917 (one parameter per CLI option)
    model_dir: Annotated[Path, typer.Argument(help="Model directory (model.json, model.safetensors, manifest.csv).")],
    data_root: Annotated[Path, typer.Option("--data-root")] = DEFAULT_DATA_ROOT,
    out_dir: Annotated[Path | None, typer.Option(help="Report folder (default MODEL_DIR/evaluation).")] = None,
    calibrate: Annotated[
        bool, typer.Option("--calibrate/--no-calibrate", help="Write temperature, thresholds, OOD into model.json.")
    ] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help="Average with horizontally flipped inputs (--calibrate records it for the daemon).",
        ),
    ] = False,
    cam_limit: Annotated[int, typer.Option(help="Test Cheng slices scored for Grad-CAM localisation.")] = 240,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap rounds for 95 % CIs.")] = 1000,
    release: Annotated[
        bool, typer.Option("--release/--no-release", help="Run the real-DICOM release criteria.")
    ] = True,
    cache_dir: Annotated[Path | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    precision: Annotated[str, typer.Option()] = "auto",
    threads: Annotated[int | None, typer.Option()] = None,
    compare: Annotated[
        list[Path] | None, typer.Option(help="Evaluated model directories to compare with in the model card.")
    ] = None,
    cam_select: Annotated[
        bool,
        typer.Option(
            "--cam-select/--no-cam-select",
            help="Choose the Grad-CAM layer and method on validation (slow on a CPU) or keep model.json's.",
        ),
    ] = True,
    release_only: Annotated[
        bool,
        typer.Option(
            "--release-only",
            help="Re-run only the release criteria against the stored evaluation.json (rewrites it, evaluation.md "
            "and, with --calibrate, the model card); for a change in the daemon's path that leaves slice scores.",
        ),
    ] = False,
) -> None:
    """Evaluate a model directory; writes evaluation.json/.md and PNG plots (and MODEL_CARD.md with --calibrate)."""
    from triaged.training.evaluate import EvalOptions, evaluate_model, refresh_release

    _check_data_root(data_root)
    if not (model_dir / "model.json").is_file():
        _fail(f"{model_dir} is not a model directory (no model.json)")
    options = EvalOptions(
        calibrate=calibrate,
        tta=tta,
        cam_limit=cam_limit,
        rounds=bootstrap,
        release=release,
        cache_dir=cache_dir,
        device=device,
        precision=precision,
        threads=threads,
        compare=tuple(compare or ()),
        select_cam=cam_select,
    )
    for other in options.compare:
        if not (other / "evaluation" / "evaluation.json").is_file():
            _fail(f"--compare {other} has no evaluation/evaluation.json; evaluate it first")
    try:
        run = refresh_release if release_only else evaluate_model
        report = run(model_dir, data_root, out_dir or model_dir / "evaluation", options)
    except (TriagedError, ValueError) as exc:
        _fail(str(exc), 1)
    test = report["sets"]["test"]
    typer.echo(
        f"test accuracy {test['accuracy']['value']:.4f}, macro AUC {test['macro_auc']['value']:.4f}; "
        f"release criteria {'PASS' if report.get('release', {}).get('passed') else 'FAIL or not run'}"
    )


def model_info_command(
    ctx: typer.Context,
    model_dir: Annotated[
        Path | None,
        typer.Argument(help="Model directory (default: the configured model.directory, TRIAGED_MODEL__DIRECTORY)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print model.json as JSON.")] = False,
) -> None:
    """Show a model directory's identity and headline metrics (verifies the weights' sha256; no torch needed)."""
    if model_dir is None:
        model_dir = settings_from(ctx).model.directory
    if not (model_dir / "model.json").is_file():
        _fail(f"{model_dir} is not a model directory (no model.json)")
    try:
        spec = read_spec(model_dir)
        verify_weights(model_dir, spec)
    except TriagedError as exc:
        _fail(str(exc), 1)
    if as_json:
        typer.echo(json.dumps(spec.to_json(), indent=2))
        return
    metrics = dict(spec.extra.get("metrics", {}))
    typer.echo(f"{spec.name} {spec.version}{' (provisional)' if spec.provisional else ''}")
    typer.echo(
        f"  arch           {spec.arch}, input {spec.preprocessing.input_size} px, classes {', '.join(spec.classes)}"
    )
    typer.echo(f"  directory      {model_dir}")
    typer.echo(f"  weights sha256 {spec.weights_sha256}")
    typer.echo(f"  temperature    {spec.temperature:.4f}; thresholds {dict(spec.thresholds)}")
    for key, value in metrics.items():
        typer.echo(f"  {key:<30} {value:.4f}" if isinstance(value, float) else f"  {key:<30} {value}")
