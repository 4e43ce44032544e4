"""Inference throughput of the ML API vs an eager fp32 batch-1 baseline, and Grad-CAM cost per slice.

Usage: ``python benchmarks/inference.py [--model-dir models/densenet121-brainmri-v2] [--slices 64] [--json OUT]``.
The baseline and the API run in the same process on the same slices, so the speed-up is comparable even on a
busy machine (absolute numbers are not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triaged.ml.inference import Predictor, Triage
from triaged.ml.registry import load_model
from triaged.ml.results import SeriesMeta

META = SeriesMeta("MR", "HEAD", "t1 bench", "", ("ORIGINAL", "PRIMARY"), ("GR",), (), (), 0)


def _timed(fn: Any, repeats: int = 2) -> float:
    fn()  # warm-up (allocations, oneDNN kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _cpu_model() -> str:
    """The CPU's model name: speed-ups differ between CPUs (bf16 paid off on an AMD EPYC, not on an Intel Xeon)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/densenet121-brainmri-v2"))
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    slices = [rng.uniform(0, 1000, (256, 256)).astype(np.float32) for _ in range(args.slices)]
    spec, eager = load_model(args.model_dir)
    predictor = Predictor.from_dir(args.model_dir)  # as the daemon loads it: "auto" device and precision
    x = predictor.preprocess_slices(slices)
    n = len(slices)

    def baseline() -> None:
        with torch.no_grad():
            for i in range(n):
                eager(x[i : i + 1])

    results: dict[str, Any] = {
        "cpu": _cpu_model(),
        "model_version": spec.version,
        "flip_tta": predictor.flip_tta,
        "device": predictor.placement.device,
        "precision": predictor.placement.precision,
        "threads": args.threads,
        "slices": n,
        "input_size": spec.preprocessing.input_size,
    }
    base = n / _timed(baseline)
    results["baseline_fp32_eager_batch1_slices_per_s"] = base
    for batch in (1, 8, 32):
        predictor.batch_size = batch
        rate = n / _timed(lambda: predictor.logits(x))
        results[f"api_batch{batch}_slices_per_s"] = rate
        results[f"api_batch{batch}_speedup"] = rate / base
    triage = Triage(args.model_dir, threads=args.threads)
    meta = dataclasses.replace(META, number_of_slices=n)
    series_s = _timed(lambda: triage.assess(slices, meta, cam_top_k=0), repeats=1)
    results["assess_end_to_end_slices_per_s"] = n / series_s
    cam_s = _timed(lambda: predictor.cams(x[:4], 0), repeats=1) / 4
    results["gradcam_seconds_per_slice"] = cam_s
    text = json.dumps(results, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
