"""Per-series CPU cost of the worker, stage by stage, for every forward backend, in one interleaved run.

Usage (repository root, ../shared/data present, ``accel`` extra installed for the compiled backends):

    .venv/bin/python -m benchmarks.inference [--slices 24] [--rounds 5] [--threads 1] [--json OUT]

A "series" is ``--slices`` real Kaggle test slices made one 256x256 stack (as a DICOM series is), assessed as the
worker does: preprocessing, forward passes with flip TTA (two per slice), OOD and aggregation, Grad-CAM on the 3
key slices. Each figure is the median over ``--rounds`` of this process's CPU time (``time.process_time``), the
variants taking turns within every round, so a busy shared machine slows them alike; with ``--threads 1`` the
figures are per core. Ratios are against two baselines measured in the same run: the eager fp32 batch-1 forward
(the old benchmark's baseline) and "today", the worker before the batched preprocessing and the input-free
Grad-CAM (per-slice MONAI preprocessing, torch forward passes, Grad-CAM backpropagated to the input).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.visualize import GradCAM
from PIL import Image

from tests.support.pipeline_support import LABELS, kaggle_files, load_slice
from triaged.config import DEFAULT_MODEL_DIR
from triaged.ml.backends import available
from triaged.ml.cam import disable_inplace_activations, scale_to_unit
from triaged.ml.inference import Predictor, Triage
from triaged.ml.results import SeriesMeta
from triaged.ml.transforms import build_preprocess, preprocess_slice

META = SeriesMeta("MR", "HEAD", "T1 AX POST GD", "", ("ORIGINAL", "PRIMARY"), ("GR",), (), (), 0)
COMPILED = ("onnxruntime", "openvino")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def real_series(n: int, shape: tuple[int, int] = (256, 256)) -> list[np.ndarray]:
    files = [f for group in zip(*(kaggle_files(label) for label in LABELS), strict=False) for f in group][:n]
    return [np.asarray(Image.fromarray(load_slice(f)).resize(shape[::-1]), dtype=np.float32) for f in files]


def legacy_cams(predictor: Predictor, x: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM as the worker computed it before: gradients for every weight and back to the input."""
    model = predictor.model
    disable_inplace_activations(model)
    cam = GradCAM(nn_module=model, target_layers=predictor.cam_config.target_layer, postprocessing=scale_to_unit)
    with torch.enable_grad():
        out = cam(x.contiguous().requires_grad_(True), class_idx=class_index).detach().numpy()[:, 0]
    model.zero_grad(set_to_none=True)
    return np.clip(np.nan_to_num(out), 0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    slices = real_series(args.slices)
    n = len(slices)
    meta = dataclasses.replace(META, number_of_slices=n)
    cache = Path(tempfile.mkdtemp(prefix="triaged-bench-onnx-"))
    backends = ["torch", *[b for b in COMPILED if available(b)]]
    triages = {b: Triage(args.model_dir, threads=args.threads, backend=b, cache_dir=cache) for b in backends}
    torch_predictor = triages["torch"]._predictor
    fp32 = Predictor.from_dir(args.model_dir, device="cpu", precision="fp32")
    eager = copy.deepcopy(fp32.model).to(memory_format=torch.contiguous_format).eval()
    compose = build_preprocess(torch_predictor.spec.preprocessing)
    x = torch_predictor.preprocess_slices(slices)
    both = torch.cat([x, torch.flip(x, dims=[-1])])
    key = list(triages["torch"].assess(slices, meta).key_slice_indices[:3])

    def eager_batch1() -> None:
        with torch.no_grad():
            for i in range(both.shape[0]):
                eager(both[i : i + 1])

    def today_series() -> None:
        raw = torch.stack([preprocess_slice(compose, s) for s in slices])
        logits, _ = torch_predictor.logits_and_features(raw)
        legacy_cams(torch_predictor, raw[key], int(logits.argmax(axis=1)[0]))

    variants: dict[str, Callable[[], Any]] = {
        "forward eager fp32 batch1": eager_batch1,
        "forward torch fp32 batch32": lambda: fp32.logits_and_features(x),
        f"forward torch {torch_predictor.placement.precision} batch32": lambda: torch_predictor.logits_and_features(x),
    }
    for b in COMPILED:
        if b in triages:
            p = triages[b]._predictor
            variants[f"forward {b} {p.forward_precision}"] = lambda p=p: p.logits_and_features(x)
    variants["preprocess per slice (MONAI)"] = lambda: torch.stack([preprocess_slice(compose, s) for s in slices])
    variants["preprocess stack"] = lambda: torch_predictor.preprocess_slices(slices)
    variants["gradcam 3 slices, to the input"] = lambda: legacy_cams(torch_predictor, x[key], 0)
    variants["gradcam 3 slices, to the layer"] = lambda: torch_predictor.cams(x[key], 0)
    variants["series today"] = today_series
    for b, triage in triages.items():
        variants[f"series {b}"] = lambda t=triage: t.assess(slices, meta)

    load_before = os.getloadavg()
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up: allocations, kernel selection
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = time.process_time()
            fn()
            cpu[name].append(time.process_time() - t)
    median = {name: statistics.median(values) for name, values in cpu.items()}
    eager_s = median["forward eager fp32 batch1"]
    today_s = median["series today"]
    rows = {
        name: {
            "cpu_s_median": round(m, 4),
            "cpu_s_min": round(min(cpu[name]), 4),
            "cpu_s_max": round(max(cpu[name]), 4),
            **(
                {"slices_per_s": round(n / m, 1), "vs_eager_fp32_batch1": round(eager_s / m, 2)}
                if "forward" in name
                else {}
            ),
            **(
                {"series_per_hour_per_core": round(3600 / m / args.threads), "vs_today": round(today_s / m, 2)}
                if name.startswith("series")
                else {}
            ),
        }
        for name, m in median.items()
    }
    report = {
        "cpu": _cpu_model(),
        "threads": args.threads,
        "slices_per_series": n,
        "flip_tta": torch_predictor.flip_tta,
        "rounds": args.rounds,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": rows,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(f"\n{'variant':42s} {'cpu s':>8s} {'ratio':>8s}  series/h/core")
    for name, row in rows.items():
        ratio = row.get("vs_eager_fp32_batch1", row.get("vs_today", ""))
        print(f"{name:42s} {row['cpu_s_median']:8.3f} {ratio!s:>8s}  {row.get('series_per_hour_per_core', '')}")


if __name__ == "__main__":
    main()
