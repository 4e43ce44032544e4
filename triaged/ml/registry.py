"""Model directories: ``model.json`` + ``model.safetensors``, verified by sha256 before anything is loaded.

A model directory is the unit that is trained, evaluated, shipped and loaded by the daemon; ``model.json``
carries everything needed to reproduce inference (architecture, classes, preprocessing, calibration,
thresholds) so no parameter is hard-coded elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from triaged.errors import ModelError
from triaged.ml.extent import MAX_BRAIN_HEIGHT_MM
from triaged.ml.networks import build_network
from triaged.ml.ood import OOD, FeatureOOD, LayeredOOD
from triaged.ml.spec import (
    DEFAULT_CLASSES,
    FORMAT_VERSION,
    MODEL_JSON,
    NO_TUMOUR,
    WEIGHTS_FILE,
    ModelSpec,
    PreprocessingConfig,
    read_spec,
    sha256_file,
    verify_weights,
)

# The spec half of a model directory lives in the torch-free ml.spec; it is re-exported here for existing callers.
__all__ = [
    "DEFAULT_CLASSES",
    "FORMAT_VERSION",
    "MODEL_JSON",
    "NO_TUMOUR",
    "WEIGHTS_FILE",
    "ModelSpec",
    "build_random_model_dir",
    "default_aggregation",
    "load_model",
    "load_ood",
    "read_spec",
    "save_model_dir",
    "sha256_file",
    "write_spec",
]


def load_model(model_dir: Path) -> tuple[ModelSpec, nn.Module]:
    """Load a model directory after checking the weights' sha256 against ``model.json``.

    The network is returned in eval mode on the CPU in float32 (fp16-stored weights are upcast).
    """
    spec = read_spec(model_dir)
    weights = verify_weights(model_dir, spec)
    try:
        model = build_network(spec.arch, num_classes=len(spec.classes))
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load {weights}: {exc}") from exc
    return spec, model.eval()


def load_ood(model_dir: Path, spec: ModelSpec) -> OOD | None:
    """Load the feature-space OOD statistics named in ``model.json`` (sha256-checked), if the model has them.

    ``mahalanobis``: the penultimate layer only (1.2.0); ``mahalanobis-layers``: several layers (2.0.0)."""
    name = spec.ood.get("file")
    method = spec.ood.get("method")
    if method not in ("mahalanobis", "mahalanobis-layers") or not name:
        return None
    path = model_dir / str(name)
    if not path.is_file():
        raise ModelError(f"model directory {model_dir} has no {name} although model.json names it")
    if sha256_file(path) != spec.ood.get("sha256"):
        raise ModelError(f"{path} sha256 does not match model.json; the OOD statistics were modified")
    if method == "mahalanobis":
        return FeatureOOD.load(path)
    ood = LayeredOOD.load(path)
    if list(ood.layers) != list(spec.ood.get("layers", [])):
        raise ModelError(f"{path} scores layers {list(ood.layers)}; model.json names {spec.ood.get('layers')}")
    return ood


def save_model_dir(model_dir: Path, model: nn.Module, spec: ModelSpec, *, half: bool = False) -> ModelSpec:
    """Write ``model.safetensors`` then ``model.json`` with the new sha256; returns the spec as written."""
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    weights = model_dir / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"arch": spec.arch})
    tmp.replace(weights)
    written = ModelSpec(**{**spec.__dict__, "weights_sha256": sha256_file(weights)})
    write_spec(model_dir, written)
    return written


def write_spec(model_dir: Path, spec: ModelSpec) -> None:
    """Rewrite ``model.json`` (e.g. after calibration) without touching the weights."""
    tmp = model_dir / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(spec.to_json(), indent=2, sort_keys=False) + "\n")
    tmp.replace(model_dir / MODEL_JSON)


def default_aggregation(input_size: int | None = None) -> dict[str, Any]:
    """Series-aggregation parameters used until evaluation tunes them (see :mod:`triaged.ml.inference`).

    With ``input_size``, images smaller than the model's input are refused as too coarse
    (:func:`triaged.ml.aggregate.coarse_matrix_reason`); test models made without it keep scoring any size."""
    matrix = {} if input_size is None else {"min_matrix": input_size}
    return {
        **matrix,
        "top_k": 3,
        "neighbour_window": 1,
        "max_corner_fraction": 0.7,
        "min_head_fraction": 0.05,
        "relative_head_fraction": 0.5,
        "min_tissue_of_head": 0.5,
        "min_relative_signal": 0.3,
        "max_brain_height_mm": MAX_BRAIN_HEIGHT_MM,
    }


def build_random_model_dir(path: Path, *, seed: int = 0, arch: str = "smallcnn", input_size: int = 64) -> Path:
    """Write a randomly initialised model directory in the registry format, for tests of other layers.

    Its scores are meaningless; the gate, aggregation and file format are the real ones.
    """
    torch.manual_seed(seed)
    model = build_network(arch, num_classes=len(DEFAULT_CLASSES))
    spec = ModelSpec(
        name=f"random-{arch}",
        version="0.0.0",
        arch=arch,
        classes=DEFAULT_CLASSES,
        preprocessing=PreprocessingConfig(input_size=input_size),
        weights_sha256="",
        temperature=1.0,
        thresholds={"urgency": 0.5},
        aggregation=default_aggregation(),
        ood={},
        provisional=True,
        extra={"description": "randomly initialised test model; not for use on patients"},
    )
    save_model_dir(path, model, spec)
    return path
