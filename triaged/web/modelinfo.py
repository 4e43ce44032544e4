"""The configured model as the console shows it: identity from ``model.json``, the card, its figures.

Read from the model directory without loading torch: a web request never needs the network itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from triaged.errors import ModelError, NotFoundError

CARD_FILE = "MODEL_CARD.md"
FIGURE_DIR = "evaluation"


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    name: str
    version: str
    sha256: str
    arch: str
    classes: list[str]
    urgency_threshold: float | None
    provisional: bool
    card_url: str | None  # the card as Markdown, from this API


def read_model_info(model_dir: Path) -> ModelInfo:
    try:
        data = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        thresholds = data.get("thresholds") or {}
        return ModelInfo(
            name=str(data["name"]),
            version=str(data["version"]),
            sha256=str(data["weights_sha256"]),
            arch=str(data.get("arch", "")),
            classes=[str(c) for c in data.get("classes", [])],
            urgency_threshold=float(thresholds["urgency"]) if "urgency" in thresholds else None,
            provisional=bool(data.get("provisional", False)),
            card_url="/api/v1/model/card" if (model_dir / CARD_FILE).is_file() else None,
        )
    except FileNotFoundError as exc:
        raise ModelError(f"model directory {model_dir} has no model.json") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{model_dir / 'model.json'} is malformed: {exc}") from exc


def read_card(model_dir: Path) -> str:
    path = model_dir / CARD_FILE
    if not path.is_file():
        raise NotFoundError(f"the model has no {CARD_FILE}")
    return path.read_text(encoding="utf-8")


def figure_path(model_dir: Path, name: str) -> Path:
    """A PNG of the evaluation report the card links to; nothing outside that folder is ever served."""
    folder = (model_dir / FIGURE_DIR).resolve()
    path = (folder / name).resolve()
    if path.parent != folder or path.suffix != ".png" or not path.is_file():
        raise NotFoundError(f"no figure {name!r}")
    return path
