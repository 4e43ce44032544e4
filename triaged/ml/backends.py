"""Forward passes outside torch: OpenVINO and ONNX Runtime (the ``accel`` extra), torch as the fallback.

Why: on a 2-core Xeon with AMX, OpenVINO in bf16 ran DenseNet121 about 3x faster per core than torch's bf16
autocast, closer to fp32 (max |Δp| 1.1e-2 against 2.3e-2, the same argmax on 183 real slices); ONNX
Runtime in fp32 was 2x faster than torch in fp32 but slower than torch in bf16 there, so ``auto`` picks OpenVINO
only (see ``benchmarks/inference.py``). Both read an ONNX file that :func:`onnx_file` exports from the loaded
weights into a cache directory the first time: nothing is downloaded and no binary is shipped. Grad-CAM needs
gradients and stays in torch.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import nn

from triaged.errors import ModelError
from triaged.ml.ood import last_linear, pool_map
from triaged.ml.spec import ModelSpec

log = structlog.get_logger()

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
_OPSET = 17


@dataclass(frozen=True)
class Forward:
    """A compiled network: (N, 1, S, S) float32 inputs to (logits (N, C), penultimate features (N, D)) float32."""

    name: str
    precision: str
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.run(np.ascontiguousarray(x, dtype=np.float32))
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)


class LogitsAndFeatures(nn.Module):
    """The network with its OOD feature vector as a second output: the pooled ``layers`` (channel means and
    standard deviations, :func:`~triaged.ml.ood.pool_map`), then the input of the last linear layer."""

    def __init__(self, model: nn.Module, layers: Sequence[str] = ()) -> None:
        super().__init__()
        self.body = copy.deepcopy(model).eval()
        self._pooled: list[torch.Tensor] = []
        for name in layers:
            self.body.get_submodule(name).register_forward_hook(self._pool)
        head = last_linear(self.body)
        for name, module in self.body.named_modules():
            if module is head:
                parent_name, _, attr = name.rpartition(".")
                setattr(self.body.get_submodule(parent_name) if parent_name else self.body, attr, nn.Identity())
        self.head = head

    def _pool(self, _module: nn.Module, _args: object, output: torch.Tensor) -> None:
        self._pooled.append(pool_map(output))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._pooled.clear()
        features: torch.Tensor = self.body(x)
        logits: torch.Tensor = self.head(features)
        if self._pooled:
            features = torch.cat([*self._pooled, features], dim=1)
            self._pooled.clear()
        return logits, features


def available(backend: str) -> bool:
    """True when ``backend``'s runtime is installed (torch always is)."""
    package = _PACKAGES.get(backend)
    return package is None or importlib.util.find_spec(package) is not None


def resolve_backend(backend: str, device: str) -> str:
    """``auto``: OpenVINO on the CPU when installed, otherwise torch; an explicit runtime must be installed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "openvino" if device == "cpu" and available("openvino") else "torch"
    if backend != "torch" and device != "cpu":
        raise ModelError(f"backend {backend!r} runs on the CPU only; use backend 'torch' with device {device!r}")
    if not available(backend):
        raise ModelError(f"backend {backend!r} needs the {backend} package: pip install 'triaged[accel]'")
    return backend


def onnx_file(model: nn.Module, spec: ModelSpec, cache_dir: Path, layers: Sequence[str] = ()) -> Path:
    """The ONNX export of ``model`` in ``cache_dir``, made now if it is not there yet (atomic: workers may race).

    The name carries the weights' sha256 and the torch version, so new weights or a new exporter never reuse an
    old file; pooled OOD ``layers`` add a tag of their names. The TorchScript exporter is used on purpose: the
    torch.export one took 100 s here, this one 4 s.
    """
    tag = "-ood" + hashlib.sha256("\n".join(layers).encode()).hexdigest()[:8] if layers else ""
    name = f"{spec.name}-{spec.version}-{spec.weights_sha256[:16]}-torch{torch.__version__}-op{_OPSET}{tag}.onnx"
    path = cache_dir / name
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    size = spec.preprocessing.input_size
    wrapper = LogitsAndFeatures(model, layers).cpu().float()
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=Warning)
            warnings.filterwarnings("ignore", message="The feature will be removed", category=Warning)
            torch.onnx.export(
                wrapper,
                (torch.zeros(2, 1, size, size),),
                tmp,
                input_names=["x"],
                output_names=["logits", "features"],
                dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}},
                opset_version=_OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("onnx_exported", file=path.name, bytes=path.stat().st_size)
    return path


def open_onnxruntime(path: Path, threads: int | None) -> Forward:
    """An ONNX Runtime CPU session (fp32: its CPU provider has no bf16 kernels for these layers)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs: no busy waiting
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = session.run(["logits", "features"], {"x": x})
        return logits, features

    return Forward("onnxruntime", "fp32", run)


def open_openvino(path: Path, threads: int | None, precision: str) -> Forward:
    """An OpenVINO CPU model; ``auto`` precision is OpenVINO's own (bf16 where the CPU has AMX or AVX-512 BF16)."""
    import openvino as ov

    # Unpinned: several worker processes share a host's cores. CACHE_DIR keeps compiled blobs: later starts are faster.
    config: dict[str, object] = {
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
        "CACHE_DIR": str(path.parent / "openvino"),
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if precision in ("fp32", "bf16"):
        config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    chosen = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    request = compiled.create_infer_request()
    logits_port, features_port = compiled.output("logits"), compiled.output("features")

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = request.infer({0: x})
        return np.array(result[logits_port]), np.array(result[features_port])

    return Forward("openvino", "bf16" if "bf16" in chosen or "bfloat16" in chosen else "fp32", run)


def build_forward(
    backend: str,
    model: nn.Module,
    spec: ModelSpec,
    *,
    precision: str,
    cache_dir: Path,
    threads: int | None,
    layers: Sequence[str] = (),
) -> Forward:
    """Export (or reuse) the ONNX file and open it with ``backend`` (``onnxruntime`` or ``openvino``)."""
    path = onnx_file(model, spec, cache_dir, layers)
    if backend == "onnxruntime":
        return open_onnxruntime(path, threads)
    if backend == "openvino":
        return open_openvino(path, threads, precision)
    raise ValueError(f"no compiled runtime for backend {backend!r}")


def check_against_torch(forward: Forward, model: nn.Module, spec: ModelSpec, *, samples: int = 4) -> float:
    """Max |Δp| (calibrated probabilities) between ``forward`` and torch fp32 on seeded random inputs.

    A load-time guard against a broken export, not an accuracy claim: the tests compare real slices.
    """
    size = spec.preprocessing.input_size
    x = torch.rand((samples, 1, size, size), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = LogitsAndFeatures(model).cpu().float()(x)[0].numpy()
    logits, _ = forward(x.numpy())
    t = spec.temperature
    return float(np.abs(_softmax(logits / t) - _softmax(reference / t)).max())


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    result: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return result
