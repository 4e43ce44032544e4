"""Human-readable outputs of an evaluation: Markdown tables and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from triaged.ml.inference import Predictor
from triaged.training.plots import confusion_plot, image_grid, line_plot, overlay

SET_TITLES = {
    "val": "validation split (used for calibration and thresholds)",
    "test": "grouped test split (Kaggle ∪ Cheng)",
    "clean_test": "Kaggle Testing rows with clean_test == true",
    "clean_test_not_cheng": "clean_test rows that are not Cheng slices",
}


def ci(m: dict[str, Any], pct: bool = True) -> str:
    f = 100.0 if pct else 1.0
    lo, hi = m["ci95"]
    unit, d = (" %", 2) if pct else ("", 4)
    return f"{m['value'] * f:.{d}f}{unit} [{lo * f:.{d}f}, {hi * f:.{d}f}]"


def markdown(report: dict[str, Any], classes: tuple[str, ...]) -> str:
    """The evaluation report as Markdown (numbers with bootstrap 95 % CIs)."""
    lines = [
        f"# Evaluation of {report['model']['name']} {report['model']['version']}",
        "",
        f"- weights sha256 `{report['model']['weights_sha256']}`",
        f"- data manifest sha256 `{report['model']['data_manifest_sha256']}`",
        f"- device {report['device']['device']}, precision {report['device']['precision']}, flip TTA {report['tta']}",
        f"- temperature (fitted on validation): {report['temperature']:.4f}",
        f"- {report['precision_parity']['precision']} vs fp32 on {report['precision_parity']['n']} test images: "
        f"argmax agreement {report['precision_parity']['argmax_agreement']:.4f}, max |Δp| "
        f"{report['precision_parity']['max_abs_probability_difference']:.4f}",
        "- thresholds on tumour probability 1 − p(notumor), chosen on validation: "
        + ", ".join(f"{k} {v:.4f}" for k, v in report["thresholds"].items()),
        f"- OOD: {report['ood']['method']} (fitted on {report['ood']['fitted_on']}), threshold "
        f"{report['ood']['threshold']:.3f} = "
        + str(report["ood"].get("threshold_rule", f"validation quantile {report['ood']['quantile']}"))
        + (f"; test median {report['ood']['test_score_median']:.3f}" if "test_score_median" in report["ood"] else ""),
        "",
        "| set | n | accuracy | macro AUC | tumour AUC | sens @high-sens | spec @high-sens | sens @Youden | "
        "spec @Youden | ECE before → after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["sets"].items():
        b = s["tumour_vs_notumour"]
        lines.append(
            f"| {name} | {s['n']} | {ci(s['accuracy'])} | {ci(s['macro_auc'], False)} | {ci(b['auc'], False)} | "
            f"{ci(b['high_sensitivity']['sensitivity'])} | {ci(b['high_sensitivity']['specificity'])} | "
            f"{ci(b['youden']['sensitivity'])} | {ci(b['youden']['specificity'])} | "
            f"{s['ece_before_scaling'] * 100:.2f} % → {ci(s['ece'])} |"
        )
    for name, s in report["sets"].items():
        lines += [
            "",
            f"## {name}: {SET_TITLES.get(name, name)}",
            "",
            "| class | support | precision | recall | F1 | specificity | AUC (one-vs-rest) |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in classes:
            pc = s["per_class"][c]
            lines.append(
                f"| {c} | {int(pc['support'])} | {pc['precision']:.4f} | {pc['recall']:.4f} | {pc['f1']:.4f} | "
                f"{pc['specificity']:.4f} | {ci(s['auc_ovr'][c], False)} |"
            )
        lines += ["", "Confusion matrix (rows true, columns predicted: " + ", ".join(classes) + "):", "", "```"]
        lines += [" ".join(f"{v:5d}" for v in row) for row in s["confusion_matrix"]] + ["```"]
    lines += [
        "",
        "## Grad-CAM localisation on test Cheng slices (true class, map ≥ 0.5 vs tumour mask)",
        "",
        "| method | layer | à trous | n | pointing game | mean IoU |",
        "|---|---|---|---|---|---|",
    ]
    for method, g in report["gradcam"].items():
        lines.append(
            f"| {method} | {g.get('target_layer', '?')} | ×{g.get('atrous', 1)} | {g['n']} | {ci(g['pointing_game'])} "
            f"| {ci(g['mean_iou'], False)} |"
        )
    if "release" in report:
        lines += [
            "",
            "## Release criteria on real DICOM series",
            "",
            f"Overall: **{'PASS' if report['release']['passed'] else 'FAIL'}**",
            "",
            "| series | expected | result | pass | urgency | in-brain slices | "
            "classifier alone (no metadata gate): label / urgency / slices > 0.5 |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in report["release"]["series"]:
            r, u = s["result"], s["classifier_without_metadata_gate"]
            result = (
                ("urgent" if r["urgent"] else "not urgent") if r["assessable"] else f"not assessable: {r['reason']}"
            )
            urg = f"{r['urgency']:.3f}" if r["urgency"] is not None else "–"
            alone = (
                f"{u['label']} / {u['urgency']:.3f} / {u['slices_tumour_over_0.5']} of {u['in_brain']}"
                if u["assessable"]
                else f"not assessable: {u['reason']}"
            )
            lines.append(
                f"| {s['name']} | {s['expect']} | {result} | {'yes' if s['passed'] else 'NO'} | {urg} | "
                f"{r['in_brain']} of {r['slices']} | {alone} |"
            )
    return "\n".join(lines) + "\n"


def example_grid(
    predictor: Predictor,
    images: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    *,
    per_kind: int = 6,
) -> list[tuple[Any, str]]:
    """Grad-CAM overlays of true positives, false positives and false negatives (tumour vs no tumour)."""
    classes = predictor.spec.classes
    nt = list(classes).index("notumor")
    flagged = 1.0 - probs[:, nt] >= threshold
    tumour = labels != nt
    tiles: list[tuple[Any, str]] = []
    for kind, sel in (("TP", flagged & tumour), ("FP", flagged & ~tumour), ("FN", ~flagged & tumour)):
        for i in np.flatnonzero(sel)[:per_kind]:
            pred = int(probs[i].argmax())
            cam = predictor.cams(torch.from_numpy(images[i : i + 1].astype(np.float32)), pred)[0]
            caption = f"{kind} {classes[int(labels[i])][:4]}->{classes[pred][:4]} {1 - probs[i, nt]:.2f}"
            tiles.append((overlay(images[i, 0].astype(np.float32), cam).resize((160, 160)), caption))
    return tiles


def write_outputs(
    out_dir: Path,
    report: dict[str, Any],
    classes: tuple[str, ...],
    cam_examples: dict[str, Any],
    tiles: list[tuple[Any, str]],
) -> None:
    """Write ``evaluation.md`` and the PNG plots next to ``evaluation.json``."""
    roc = report["roc"]
    line_plot(
        out_dir / "roc_test.png",
        [
            (
                f"{k} AUC {report['sets']['test']['tumour_vs_notumour']['auc']['value']:.4f}"
                if k == "tumour_vs_notumour"
                else f"{k} AUC {report['sets']['test']['auc_ovr'][k]['value']:.4f}",
                np.asarray(v["fpr"]),
                np.asarray(v["tpr"]),
            )
            for k, v in roc.items()
        ],
        title="ROC on the test split",
        xlabel="false positive rate",
        ylabel="sensitivity",
        diagonal=True,
    )
    for name in ("test", "clean_test"):
        if name not in report["sets"]:
            continue
        s = report["sets"][name]
        curves = []
        for label, bins in (("before scaling", s["reliability_before_scaling"]), ("after scaling", s["reliability"])):
            curves.append((label, np.array([b["confidence"] for b in bins]), np.array([b["accuracy"] for b in bins])))
        line_plot(
            out_dir / f"reliability_{name}.png",
            curves,
            title=f"Reliability diagram ({name})",
            xlabel="confidence",
            ylabel="accuracy",
        )
        confusion_plot(
            out_dir / f"confusion_{name}.png",
            np.asarray(s["confusion_matrix"]),
            classes,
            title=f"Confusion matrix ({name})",
        )
    loc_tiles = []
    for k in range(min(24, len(cam_examples["labels"]))):
        img = overlay(cam_examples["images"][k], cam_examples["cams"][k], cam_examples["masks"][k])
        loc_tiles.append((img.resize((160, 160)), f"{classes[int(cam_examples['labels'][k])]}"))
    image_grid(out_dir / "gradcam_localisation.png", loc_tiles, title="Grad-CAM (true class), white = tumour mask")
    image_grid(
        out_dir / "gradcam_tp_fp_fn.png", tiles, title="Grad-CAM of predicted class: TP / FP / FN at urgency threshold"
    )
    (out_dir / "evaluation.md").write_text(markdown(report, classes))
