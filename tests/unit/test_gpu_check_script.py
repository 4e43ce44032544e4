"""benchmarks/gpu_check.sh on a machine without CUDA: a clear one-line refusal, exit 3, and the reason in OUT.json.

Three ways a machine can lack CUDA, each faked without a GPU: no NVIDIA driver (no nvidia-smi), a driver that
lists no GPU, and a GPU whose torch is a CPU build (this test's own interpreter stands in for the gpu install).
Nothing is installed: every case stops before the venv step or uses GPU_CHECK_PYTHON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def _fake_smi(tmp_path: Path, output: str, code: int) -> Path:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{output}'\nexit {code}\n")
    smi.chmod(0o755)
    return smi


def _run(tmp_path: Path, **env: str) -> tuple[int, str, dict[str, object]]:
    out = tmp_path / "report" / "gpu.json"
    full_env = {**os.environ, "GPU_CHECK_VENV": str(tmp_path / "venv"), **env}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=full_env, timeout=120, check=False
    )
    assert not (tmp_path / "venv").exists(), "no install may start on a machine without CUDA"
    return proc.returncode, proc.stderr, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("smi", "message"),
    [
        (None, "nvidia-smi not found"),
        (("No devices were found", 6), "nvidia-smi lists no GPU (No devices were found)"),
    ],
)
def test_no_cuda_is_a_clear_refusal(tmp_path: Path, smi: tuple[str, int] | None, message: str) -> None:
    path = str(tmp_path / "absent") if smi is None else str(_fake_smi(tmp_path, *smi))
    code, stderr, report = _run(tmp_path, GPU_CHECK_NVIDIA_SMI=path)
    assert code == 3
    assert stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA here: ")
    assert message in stderr
    assert report["ok"] is False and report["stage"] == "cuda"


def test_a_cpu_torch_is_refused_before_measuring(tmp_path: Path) -> None:
    smi = _fake_smi(tmp_path, "GPU 0: Fake GPU (UUID: GPU-0)", 0)
    code, stderr, report = _run(tmp_path, GPU_CHECK_NVIDIA_SMI=str(smi), GPU_CHECK_PYTHON=sys.executable)
    assert code == 3
    assert "sees no CUDA device" in stderr.strip().splitlines()[-1]
    assert report == {"ok": False, "stage": "cuda", "error": report["error"]} and "torch" in str(report["error"])


def test_usage_without_an_output_path() -> None:
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: ")
