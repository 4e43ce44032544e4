"""Model-card section for the lever study (``python -m triaged.training.levers``): the table of arms and, per
lever, what its paired CI on the unseen site says. Every number comes from ``evaluation/levers.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from triaged.training.levers import arms, format_delta, markdown_table

LEVERS_FILE = "levers.json"
FULL_RUNS_FILE = "full_runs.json"  # `levers --compare` output for full-budget runs (copied from its out-dir)


def lever_verdict(delta: dict[str, float] | None) -> str:
    """ "helped", "hurt" or "no measurable change" on the unseen site, from the paired 95 % CI of a Δ AUC
    (``baseline`` when there is none: the row everything else is compared with)."""
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
        "`shipped_2.0.0` is 2.0.0 itself (the model shipped when the study ran), not trained further.",
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
                f"- `{row['arm']}` ({row['change']}): {lever_verdict(delta)} on the unseen site "
                f"(Δ AUC {delta['value']:+.3f}, 95 % CI {delta['lo']:+.3f} to {delta['hi']:+.3f}, "
                f"{delta['patients']} patients)."
            )
    verdicts = [lever_verdict(r["delta_unseen_auc"]) for r in rows if r.get("delta_unseen_auc") and r.get("steps")]
    if verdicts and "helped" not in verdicts:
        lines.append("- No lever helped measurably on the unseen site at this budget.")
    missing = [a.name for a in arms() if a.name not in {r["arm"] for r in rows}]
    if missing:
        lines.append(f"- Not run (no compute left in that session): {', '.join(f'`{m}`' for m in missing)}.")
    return lines + full_run_lines(model_dir)


def full_run_lines(model_dir: Path) -> list[str]:
    """Full-budget runs compared with this model on validation (``levers --compare``), when any were kept."""
    path = model_dir / "evaluation" / FULL_RUNS_FILE
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    lines = [
        "",
        "### Full-budget runs of the levers",
        "",
        "`python -m triaged.training.levers --compare NAME=MODEL_DIR ...`: finished runs, each continued from 2.0.0,",
        "against 2.0.0 on the same validation images; Δ is the unseen-site slice AUC minus 2.0.0's (paired bootstrap",
        f"over patients). Each run's settings and compute are in `evaluation/{FULL_RUNS_FILE}`.",
        "",
        "| run | levers | epochs | minutes | Kaggle+Cheng acc | seen-site AUC | unseen AUC | unseen sens @95 % spec "
        "| Δ unseen AUC [95 % CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        training = row.get("training", {})
        settings = dict(training)
        if training.get("strip_prob") is not None:
            heads = " of whole heads" if training.get("strip_whole_heads_only") else ""
            settings["augment"] = f"{training['augment']} (p {training['strip_prob']}{heads})"
        if training.get("mixstyle_prob"):
            settings["MixStyle"] = f"p {training['mixstyle_prob']}"
        shown_keys = ("sampling", "augment", "MixStyle", "lr")
        levers = ", ".join(f"{k} {settings[k]}" for k in shown_keys if settings.get(k) is not None)
        if training.get("data"):
            levers = f"{training['data']}, {levers}"
        if training.get("init"):
            levers += f", from {Path(str(training['init']).removeprefix('model:')).name}"
        minutes = float(training.get("compute", {}).get("wall_seconds", 0.0)) / 60
        delta = row.get("delta_unseen_auc_vs_shipped")
        shown = format_delta(delta)
        lines.append(
            f"| {row['model']} | {levers or 'as shipped'} | {training.get('epoch') or '–'} | "
            f"{minutes:.0f} | {100 * row['public_acc']:.1f} % | {row['lgg_seen_auc']:.3f} | "
            f"{row['lgg_unseen_auc']:.3f} | {100 * row['lgg_unseen_sens_at_95spec']:.1f} % | {shown} |"
        )
    judged = [r for r in rows if r.get("delta_unseen_auc_vs_shipped")]
    helped = [r for r in judged if lever_verdict(r["delta_unseen_auc_vs_shipped"]) == "helped"]
    lines.append("")
    if judged and not helped:
        lines.append("- No full run beat 2.0.0 on the unseen site, so none replaced it.")
    for r in helped:
        d = r["delta_unseen_auc_vs_shipped"]
        lines.append(
            f"- `{r['model']}` beat 2.0.0 on the unseen site (Δ AUC {d['value']:+.3f}, 95 % CI {d['lo']:+.3f} to "
            f"{d['hi']:+.3f}, {d['patients']} patients)" + (f": {r['outcome']}." if r.get("outcome") else ".")
        )
    for r in judged:
        if r not in helped and r.get("outcome"):
            lines.append(f"- `{r['model']}` ({r.get('baseline', 'Δ against the model shipped then')}): {r['outcome']}.")
    return lines
