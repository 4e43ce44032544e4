"""What a model directory says about itself: ``model.json`` parsed, and its weights file's checksum.

Kept free of torch and MONAI, so commands that only describe a model (``triaged model info``) start fast; the
network itself is built by :mod:`triaged.ml.registry`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from triaged.errors import ModelError

PREPROCESSING_KIND = "percentile-resize-pad-v1"


@dataclass(frozen=True)
class PreprocessingConfig:
    """Parameters of :func:`build_preprocess`, stored verbatim in ``model.json``."""

    input_size: int = 128
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    interpolation: str = "bilinear"
    kind: str = PREPROCESSING_KIND

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessingConfig:
        """Build from ``model.json``; unknown kinds are refused so old code never misreads a new model."""
        kind = str(data.get("kind", PREPROCESSING_KIND))
        if kind != PREPROCESSING_KIND:
            raise ValueError(f"unsupported preprocessing kind {kind!r}")
        return cls(
            input_size=int(data["input_size"]),
            lower_percentile=float(data["lower_percentile"]),
            upper_percentile=float(data["upper_percentile"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            kind=kind,
        )


MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
DEFAULT_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
NO_TUMOUR = "notumor"


@dataclass(frozen=True)
class ModelSpec:
    """The parsed ``model.json``; ``extra`` keeps every other key (metrics, training record, ...)."""

    name: str
    version: str
    arch: str
    classes: tuple[str, ...]
    preprocessing: PreprocessingConfig
    weights_sha256: str
    temperature: float = 1.0
    thresholds: Mapping[str, float] = field(default_factory=dict)
    aggregation: Mapping[str, Any] = field(default_factory=dict)
    ood: Mapping[str, Any] = field(default_factory=dict)
    provisional: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "arch": self.arch,
            "classes": list(self.classes),
            "in_channels": 1,
            "input_size": self.preprocessing.input_size,
            "preprocessing": self.preprocessing.to_dict(),
            "temperature": self.temperature,
            "thresholds": dict(self.thresholds),
            "aggregation": dict(self.aggregation),
            "ood": dict(self.ood),
            "provisional": self.provisional,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": self.weights_sha256,
            **dict(self.extra),
        }


_KNOWN = {
    "format_version",
    "name",
    "version",
    "arch",
    "classes",
    "in_channels",
    "input_size",
    "preprocessing",
    "temperature",
    "thresholds",
    "aggregation",
    "ood",
    "provisional",
    "weights_file",
    "weights_sha256",
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_spec(model_dir: Path) -> ModelSpec:
    """Parse ``model.json``; raises :class:`ModelError` with the reason when it is missing or malformed."""
    path = model_dir / MODEL_JSON
    try:
        data = json.loads(path.read_text())
        return ModelSpec(
            name=str(data["name"]),
            version=str(data["version"]),
            arch=str(data["arch"]),
            classes=tuple(str(c) for c in data["classes"]),
            preprocessing=PreprocessingConfig.from_dict(data["preprocessing"]),
            weights_sha256=str(data["weights_sha256"]),
            temperature=float(data.get("temperature", 1.0)),
            thresholds={str(k): float(v) for k, v in data.get("thresholds", {}).items()},
            aggregation=dict(data.get("aggregation", {})),
            ood=dict(data.get("ood", {})),
            provisional=bool(data.get("provisional", False)),
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )
    except FileNotFoundError as exc:
        raise ModelError(f"model directory {model_dir} has no {MODEL_JSON}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is malformed: {exc}") from exc


def verify_weights(model_dir: Path, spec: ModelSpec) -> Path:
    """The weights file, after checking its sha256 against ``model.json`` (a modified or swapped file is refused)."""
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"model directory {model_dir} has no {WEIGHTS_FILE}")
    actual = sha256_file(weights)
    if actual != spec.weights_sha256:
        raise ModelError(
            f"{weights} sha256 {actual[:12]}… does not match model.json ({spec.weights_sha256[:12]}…); "
            "the weights file was modified or belongs to another model"
        )
    return weights
