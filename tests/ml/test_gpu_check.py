"""benchmarks/gpu_check.py, the Python half of benchmarks/gpu_check.sh, run on the CPU with a tiny model.

On CUDA it measures the real numbers; here it must produce every field of the report, compare AMP with fp32 on
the same slices, push one series through Triage end to end, and skip what does not fit its time budget.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import gpu_check

TINY = ["--device", "cpu", "--slices", "2", "--batches", "1,2", "--series-slices", "3", "--size", "64"]


def test_report_on_the_cpu(random_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    gpu_check.main([*TINY, "--repeats", "1", "--model-dir", str(random_model_dir), "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["skipped"] == []
    assert report["environment"]["device"] == "cpu"
    inference = report["inference"]
    for precision in ("fp32", "amp"):
        for batch in (1, 2):
            assert inference[f"{precision}_batch{batch}_slices_per_s"] > 0
            assert inference[f"{precision}_batch{batch}_speedup"] > 0
    assert inference["baseline_fp32_eager_batch1_slices_per_s"] > 0
    assert inference["amp_precision"] == "bf16"
    assert 0.0 <= inference["amp_vs_fp32_argmax_agreement"] <= 1.0
    assert inference["amp_vs_fp32_max_abs_dprob"] >= 0.0
    assert inference["target_slices_per_s"] == gpu_check.TARGET_SLICES_PER_S
    assert report["gradcam"]["gradcam_seconds_per_slice"] > 0
    series = report["end_to_end"]
    assert series["series_slices"] == 3 and series["series_seconds"] > 0
    assert {"preprocess", "inference"} <= set(series["series_timings_s"])


def test_sections_past_the_budget_are_skipped_and_named(random_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    gpu_check.main([*TINY, "--repeats", "1", "--budget", "0", "--model-dir", str(random_model_dir), "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["skipped"] == ["fp32_batch1", "fp32_batch2", "amp_batch1", "amp_batch2", "gradcam", "end_to_end"]
    assert report["inference"]["best_amp_slices_per_s"] is None and report["inference"]["meets_target"] is False
