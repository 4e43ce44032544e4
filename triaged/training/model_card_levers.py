"""Model-card section for the lever study (``python -m triaged.training.levers``): the table of arms and, per
lever, what its paired CI on the unseen site says. Every number comes from ``evaluation/levers.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from triaged.training.levers import arms, markdown_table

LEVERS_FILE = "levers.json"


def lever_verdict(row: dict[str, Any]) -> str:
    """ "helped", "hurt" or "no measurable change" on the unseen site, from the paired 95 % CI against baseline."""
    delta = row.get("delta_unseen_auc")
    if not delta:
        return "baseline"
    if delta["lo"] > 0:
        return "helped"
    if delta["hi"] < 0:
        return "hurt"
    return "no measurable change"


def lever_sections(model_dir: Path) -> list[str]:
    """The lever table with its method and verdicts, or nothing when the study has not been run for this model."""
    path = model_dir / "evaluation" / LEVERS_FILE
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    steps = max((int(r["steps"]) for r in rows), default=0)
    lines = [
        "",
        "## Generalisation levers (equal-budget study on validation)",
        "",
        f"`python -m triaged.training.levers --steps {steps}`: one short run per lever, each {steps} optimiser",
        f"steps of 32 images ({steps * 32} images) on this model's split, evaluated on the validation split only",
        "(probabilities at temperature 1, torch fp32). Each arm changes one thing against `baseline` (2.0.0's",
        "recipe, continued from 2.0.0 at lr 1e-4); `from_1.2.0` repeats 2.0.0's own start at the same budget, and",
        "`shipped_2.0.0` is the shipped model itself, not trained further.",
        "Unseen site = tcga_lgg HT validation patients, a site no arm trains on. Δ is the arm's unseen-site slice",
        "AUC minus the baseline's, with a paired bootstrap over patients. The budget is about one epoch, so this",
        "ranks how far each lever moves a trained model in that budget, not what it would give in a full run.",
        "",
        *markdown_table(rows).splitlines(),
        "",
    ]
    for row in rows:
        delta = row.get("delta_unseen_auc")
        if delta:
            lines.append(
                f"- `{row['arm']}` ({row['change']}): {lever_verdict(row)} on the unseen site "
                f"(Δ AUC {delta['value']:+.3f}, 95 % CI {delta['lo']:+.3f} to {delta['hi']:+.3f}, "
                f"{delta['patients']} patients)."
            )
    verdicts = [lever_verdict(r) for r in rows if r.get("delta_unseen_auc") and r.get("steps")]
    if verdicts and "helped" not in verdicts:
        lines.append("- No lever helped measurably on the unseen site at this budget.")
    missing = [a.name for a in arms() if a.name not in {r["arm"] for r in rows}]
    if missing:
        lines.append(f"- Not run (no compute left in that session): {', '.join(f'`{m}`' for m in missing)}.")
    return lines
