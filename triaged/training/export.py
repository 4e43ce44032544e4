"""Export a training checkpoint as a model directory: ``python -m triaged.training.export CHECKPOINT MODEL_DIR``.

Used to ship a provisional model as soon as the first epoch exists; ``triaged evaluate --calibrate`` then
fits temperature, thresholds and the OOD threshold into its ``model.json`` and writes the model card.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from triaged.training.train import export_checkpoint

PROVISIONAL_CARD = """# {name} {version} — PROVISIONAL

**Not for clinical use. Triage prioritisation research model, not a diagnostic device.**

This directory holds a provisional export of training checkpoint epoch {epoch} (architecture `{arch}`,
input {size} px), written while training was still running so other components can be exercised end to end.
It is uncalibrated (temperature 1, urgency threshold 0.5, no OOD threshold) and has not been evaluated.
The final model card replaces this file after `triaged evaluate --calibrate`.

- weights sha256: `{sha}`
- data manifest sha256: `{manifest}`
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m triaged.training.export", description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--final", action="store_true", help="clear the provisional flag")
    parser.add_argument("--half", action="store_true", help="store weights as fp16")
    args = parser.parse_args(argv)
    spec = export_checkpoint(args.checkpoint, args.model_dir, provisional=not args.final, half=args.half)
    card = args.model_dir / "MODEL_CARD.md"
    if spec.provisional:
        training = dict(spec.extra.get("training", {}))
        card.write_text(
            PROVISIONAL_CARD.format(
                name=spec.name,
                version=spec.version,
                epoch=training.get("epoch"),
                arch=spec.arch,
                size=spec.preprocessing.input_size,
                sha=spec.weights_sha256,
                manifest=spec.extra.get("data_manifest_sha256"),
            )
        )
    print(f"exported {args.checkpoint} -> {args.model_dir} (sha256 {spec.weights_sha256})")


if __name__ == "__main__":
    main()
