"""Device and numeric precision selection, shared by training and inference.

bf16 autocast is only chosen on CPUs that execute it natively (AVX-512 BF16 or AMX): measured 2× faster than
fp32 there, but 6× slower on AVX2-only CPUs where it is emulated. The flag alone is not enough: on an Intel Xeon
with AVX-512 BF16 but no AMX, DenseNet121 inference at batch 32 ran at 78 slices/s in bf16 against 101 in fp32, so
inference times the model itself once at load (:func:`time_cpu_precisions`) before it settles on bf16.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    """Where and how a network runs."""

    device: str
    precision: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=dtype)


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU advertises native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16``)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_placement(device: str = "auto", precision: str = "auto") -> Placement:
    """Resolve ``auto`` settings: CUDA if asked or available under ``auto``; bf16 only where it is fast."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if precision == "auto":
        if dev == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if dev == "cpu" and precision == "fp16":
        raise ValueError("fp16 is only supported on CUDA; use fp32 or bf16 on the CPU")
    return Placement(dev, precision)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None`` leaves it alone)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_cpu_precisions(model: nn.Module, input_shape: tuple[int, ...], *, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds of one forward pass of ``model`` on the CPU in fp32 and under bf16 autocast."""
    x = torch.rand(input_shape).contiguous(memory_format=torch.channels_last)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        for precision in ("fp32", "bf16"):
            placement = Placement("cpu", precision)
            best = float("inf")
            for _ in range(repeats + 1):  # the first pass warms up oneDNN's kernels and is not counted
                start = time.perf_counter()
                with placement.autocast():
                    model(x)
                best = min(best, time.perf_counter() - start)
            timings[precision] = best
    return timings


def faster_precision(timings: dict[str, float], *, margin: float = 1.1) -> str:
    """bf16 only when it is clearly faster (by ``margin``): its rounding is not worth a tie."""
    return "bf16" if timings["bf16"] * margin < timings["fp32"] else "fp32"
