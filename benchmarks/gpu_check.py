"""Inference on one device: slices/s at several batch sizes in fp32 and AMP, Grad-CAM cost, one series end to end.

The Python half of ``benchmarks/gpu_check.sh`` (which makes the fresh ``gpu`` install and calls this on CUDA);
``--device cpu`` runs the same measurements on the CPU, which is how the tests exercise it. Every rate is paired
with the eager fp32 batch-1 baseline measured in the same process on the same slices, so ratios stay comparable
on a busy machine. AMP's outputs are compared with fp32 on the same slices (argmax agreement, max |Δp|): a faster
precision is only worth having with the same answers. Sections that no longer fit the time budget are skipped and
named in ``skipped``.

Usage: ``python -m benchmarks.gpu_check --json OUT [--device cuda] [--slices 256] [--batches 1,32,128]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triaged.config import DEFAULT_MODEL_DIR
from triaged.demo_phantom import phantom_series
from triaged.ml.device import Placement, choose_placement
from triaged.ml.inference import Predictor, Triage
from triaged.ml.registry import load_model, load_ood
from triaged.ml.results import SeriesMeta

TARGET_SLICES_PER_S = 2000.0  # issue 13: AMP inference on an H100-class GPU
META = SeriesMeta("MR", "HEAD", "t1 post contrast gpu check", "", ("ORIGINAL", "PRIMARY"), ("GR",), (), (), 0)


class Clock:
    """Seconds left of the budget; sections ask before they start."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Best of ``repeats`` after one warm-up (cuDNN autotuning, allocator, oneDNN kernel choice)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def amp_precision(device: str) -> str:
    """What the daemon's ``precision = "auto"`` picks on this device (bf16 where supported, else fp16 on CUDA)."""
    return choose_placement(device, "auto").precision if device == "cuda" else "bf16"


def throughput(
    model_dir: Path, device: str, slices: list[np.ndarray], *, batches: list[int], repeats: int, clock: Clock
) -> tuple[dict[str, Any], list[str]]:
    """slices/s of ``Predictor.logits`` per precision and batch size, the baseline, and AMP's agreement."""
    spec, eager = load_model(model_dir)
    ood = load_ood(model_dir, spec)
    fp32 = Predictor(spec, eager, Placement(device, "fp32"), ood=ood)
    x = fp32.preprocess_slices(slices)
    n = x.shape[0]
    out: dict[str, Any] = {"slices": n, "input_size": spec.preprocessing.input_size, "model_version": spec.version}
    skipped: list[str] = []

    _, plain = load_model(model_dir)  # a separate copy as loaded: no channels-last, no batching
    plain = plain.to(device)

    def baseline() -> None:
        with torch.no_grad():
            for i in range(n):
                plain(x[i : i + 1].to(device))

    base = n / _best_seconds(baseline, device, repeats)
    out["baseline_fp32_eager_batch1_slices_per_s"] = base
    amp = amp_precision(device)
    out["amp_precision"] = amp
    predictors = {"fp32": fp32, "amp": Predictor(spec, eager, Placement(device, amp), ood=ood)}
    for label, predictor in predictors.items():
        for batch in batches:
            key = f"{label}_batch{batch}"
            if clock.left() < 15:
                skipped.append(key)
                continue
            predictor.batch_size = batch
            rate = n / _best_seconds(lambda p=predictor: p.logits(x), device, repeats)
            out[f"{key}_slices_per_s"] = rate
            out[f"{key}_speedup"] = rate / base
    rates = [v for k, v in out.items() if k.startswith("amp_batch") and k.endswith("_slices_per_s")]
    out["best_amp_slices_per_s"] = max(rates) if rates else None
    out["target_slices_per_s"] = TARGET_SLICES_PER_S
    out["meets_target"] = bool(rates) and max(rates) >= TARGET_SLICES_PER_S
    predictors["fp32"].batch_size = predictors["amp"].batch_size = max(batches)
    p32 = predictors["fp32"].calibrated(predictors["fp32"].logits(x))
    pamp = predictors["amp"].calibrated(predictors["amp"].logits(x))
    out["amp_vs_fp32_argmax_agreement"] = float((p32.argmax(1) == pamp.argmax(1)).mean())
    out["amp_vs_fp32_max_abs_dprob"] = float(np.abs(p32 - pamp).max())
    return out, skipped


def gradcam_cost(model_dir: Path, device: str, slices: list[np.ndarray], repeats: int) -> dict[str, Any]:
    """Seconds per slice of Grad-CAM (fp32 with gradients, the layer and method of model.json) on 3 key slices."""
    predictor = Predictor.from_dir(model_dir, device=device, precision="fp32")
    x = predictor.preprocess_slices(slices[:3])
    seconds = _best_seconds(lambda: predictor.cams(x, 0), device, repeats)
    return {"gradcam_seconds_per_slice": seconds / x.shape[0], "gradcam_method": predictor.cam_config.method}


def end_to_end(model_dir: Path, device: str, n_slices: int, size: int, repeats: int) -> dict[str, Any]:
    """One phantom series with a lesion through ``Triage.assess`` (gate, preprocessing, TTA, OOD, aggregation, CAM)."""
    triage = Triage(model_dir, device=device)
    slices = phantom_series(n_slices, size=size, lesion=True, seed=13)
    meta = dataclasses.replace(META, number_of_slices=n_slices)
    results = []

    def once() -> None:
        results.append(triage.assess(slices, meta, cam_top_k=3))

    seconds = _best_seconds(once, device, repeats)
    last = results[-1]
    return {
        "series_slices": n_slices,
        "series_seconds": seconds,
        "series_slices_per_s": n_slices / seconds,
        "series_assessable": last.assessable,
        "series_reason": last.reason,
        "series_label": last.label,
        "series_urgent": last.urgent,
        "series_cams": len(last.cams),
        "series_timings_s": {k: round(v, 4) for k, v in last.timings.items()},
    }


def _save(path: Path, report: dict[str, Any]) -> None:
    """Write the report as it grows, so a run cut short by its time limit still leaves what it measured."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    clock = Clock(args.budget)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    rng = np.random.default_rng(0)
    size = args.size
    slices = phantom_series(min(args.slices, 24), size=size, seed=1)
    while len(slices) < args.slices:  # phantom slices plus noise: realistic content, no two alike
        slices.append(slices[len(slices) % 24] + rng.normal(0, 5, (size, size)).astype(np.float32))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "ok": False,  # true once every section has run or been skipped for time
        "environment": environment(args.device),
        "model_dir": str(args.model_dir),
    }
    _save(args.json, report)
    section, skipped = throughput(
        args.model_dir, args.device, slices, batches=args.batches, repeats=args.repeats, clock=clock
    )
    report["inference"] = section
    _save(args.json, report)
    if clock.left() > 20:
        report["gradcam"] = gradcam_cost(args.model_dir, args.device, slices, args.repeats)
        _save(args.json, report)
    else:
        skipped.append("gradcam")
    if clock.left() > 20:
        report["end_to_end"] = end_to_end(args.model_dir, args.device, args.series_slices, args.size, args.repeats)
    else:
        skipped.append("end_to_end")
    report.update(ok=True, skipped=skipped, seconds=round(time.perf_counter() - started, 1))
    _save(args.json, report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="Write the report here.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--slices", type=int, default=256, help="Slices per throughput measurement.")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32, 128])
    parser.add_argument("--size", type=int, default=256, help="Slice size in pixels (MR matrix; resized by the model).")
    parser.add_argument("--series-slices", type=int, default=24, help="Slices of the end-to-end series.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions (best is kept) after a warm-up.")
    parser.add_argument("--budget", type=float, default=300.0, help="Seconds; later sections are skipped past it.")
    args = parser.parse_args(argv)
    if args.slices < max(args.batches) or min(args.batches) < 1 or args.repeats < 1:
        parser.error("--slices must be >= the largest batch; batches and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(args), indent=1, default=str))


if __name__ == "__main__":
    main()
