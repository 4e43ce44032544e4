"""Write ``MODEL_CARD.md`` for a model directory from its ``model.json`` and evaluation report."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from triaged.ml.networks import build_network, count_parameters
from triaged.ml.registry import read_spec
from triaged.training.contrast_read import card_lines as contrast_read_lines
from triaged.training.data import read_manifest
from triaged.training.evaluate_outputs import ci
from triaged.training.lgg import UNSEEN_SITE
from triaged.training.model_card_levers import lever_sections
from triaged.training.model_card_volumes import lgg_data_lines, reformat_data_lines, volume_sections
from triaged.training.mpr_eval import card_lines as mpr_eval_lines
from triaged.training.plane_probe import card_lines as plane_probe_lines
from triaged.training.specificity import card_lines as specificity_lines
from triaged.training.strip_eval import card_lines as strip_eval_lines
from triaged.training.strip_series import card_lines as strip_series_lines

REPRODUCE = """\
```bash
# 1.0.0 - train from scratch (leak-free split, manifest written to the run folder), two invocations:
#    epochs 1-2 (then stopped: 2 threads thrashed on the shared CPU)
python -m triaged.training.train --out-dir RUN --cache-dir CACHE --arch densenet121 --input-size 128 --epochs 28 \\
    --batch-size 32 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 1 --label-smoothing 0.1 --workers 1 --threads 2 \\
    --max-minutes 118
#    epochs 3-22: resumed from RUN/last.pt with a wall-clock cosine schedule
OMP_WAIT_POLICY=PASSIVE python -m triaged.training.train --out-dir RUN --cache-dir CACHE --arch densenet121 \\
    --input-size 128 --epochs 200 --batch-size 32 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 1 \\
    --label-smoothing 0.1 --workers 1 --threads 1 --resume --time-budget-minutes 86
python -m triaged.training.export RUN/best.pt models/densenet121-brainmri-v1 --final
# 1.1.0 - continue from 1.0.0 (git history of models/densenet121-brainmri-v1) with a second, lower cosine cycle
python -m triaged.training.train --out-dir RUN2 --cache-dir CACHE --arch densenet121 --input-size 128 --epochs 200 \\
    --batch-size 32 --lr 3e-4 --weight-decay 0.05 --warmup-epochs 0.3 --label-smoothing 0.1 --workers 1 \\
    --threads 1 --time-budget-minutes 95 --init model:models/densenet121-brainmri-v1 \\
    --manifest models/densenet121-brainmri-v1/manifest.csv --model-version 1.1.0 --seed 20261
python -m triaged.training.export RUN2/best.pt models/densenet121-brainmri-v1 --final
# 1.2.0 - continue from 1.1.0 with the mask-guided attention loss; epochs 1-3 with --threads 1, then stopped and
#    resumed (same command plus --resume, --threads 2; the wall-clock cosine continues where it stopped)
python -m triaged.training.train --out-dir RUN3 --cache-dir CACHE --arch densenet121 --input-size 128 --epochs 100 \\
    --batch-size 32 --lr 2e-4 --weight-decay 0.05 --warmup-epochs 0.3 --label-smoothing 0.1 --workers 1 \\
    --threads 1 --time-budget-minutes 85 --init model:models/densenet121-brainmri-v1 --cam-loss-weight 0.3 \\
    --manifest models/densenet121-brainmri-v1/manifest.csv --model-version 1.2.0 --seed 20262
python -m triaged.training.export RUN3/best.pt models/densenet121-brainmri-v1 --final
# calibrate on validation (with flip TTA, recorded in model.json for the daemon), evaluate, write this card
triaged evaluate models/densenet121-brainmri-v1 --data-root ../shared/data --calibrate --tta --cache-dir CACHE
# 2.0.0 - the 1.2.0 manifest plus every tcga_lgg slice (split by patient and site), continued from 1.2.0 with the
#    attention loss on Cheng and tcga_lgg masks (directory models/densenet121-brainmri-v2)
python -m triaged.training.lgg --base models/densenet121-brainmri-v1/manifest.csv --out MANIFEST2
python -m triaged.training.train --out-dir RUN4 --cache-dir CACHE --manifest MANIFEST2 \\
    --init model:models/densenet121-brainmri-v1 --cam-loss-weight 0.3 --epochs 100 --time-budget-minutes 100 \\
    --lr 3e-4 --warmup-epochs 0.3 --seed 20300 --model-version 2.0.0 --resume
python -m triaged.training.export RUN4/best.pt models/densenet121-brainmri-v2 --final
triaged evaluate models/densenet121-brainmri-v2 --data-root ../shared/data --calibrate --tta --cache-dir CACHE
# 2.1.0 - 2.0.0's manifest (git history of models/densenet121-brainmri-v2) plus the sagittal/coronal reformats of
#    the tcga_lgg training patients, continued from 2.0.0; stopped after epoch 2 (epoch 3 ran at lr < 4e-6)
python -m triaged.training.mpr --out DERIVED --base MANIFEST2 --manifest-out MANIFEST3
python -m triaged.training.train --out-dir RUN5 --cache-dir CACHE --manifest MANIFEST3 --data-root DERIVED \\
    --init model:models/densenet121-brainmri-v2 --cam-loss-weight 0.3 --cam-mask-sources cheng,tcga_lgg,tcga_lgg_mpr \\
    --epochs 100 --time-budget-minutes 55 --lr 1e-4 --warmup-epochs 0.3 --seed 20402 --model-version 2.1.0 --resume
python -m triaged.training.export RUN5/best.pt models/densenet121-brainmri-v2 --final   # then "scoring_plane": "axial"
triaged evaluate models/densenet121-brainmri-v2 --data-root DERIVED --calibrate --tta --cache-dir CACHE
# MixStyle lever (not shipped; table "Full-budget runs"): 300 steps from 2.1.0 on its recipe, with and without
for arm in control mixstyle; do
    python -m triaged.training.train --out-dir LEVER/$arm --cache-dir CACHE --data-root DERIVED \\
        --manifest models/densenet121-brainmri-v2/manifest.csv --init model:models/densenet121-brainmri-v2 \\
        --cam-loss-weight 0.3 --cam-mask-sources cheng,tcga_lgg,tcga_lgg_mpr --lr 1e-4 --warmup-epochs 0.05 \\
        --epochs 1 --max-steps 300 --seed 20500 --model-version 0.0.0-lever \\
        $([ $arm = mixstyle ] && echo --mixstyle-prob 0.5)
done
python -m triaged.training.levers --data-root DERIVED --out-dir CMP --compare control=LEVER/control/model \\
    mixstyle=LEVER/mixstyle/model
# contrast-aware Kaggle sampling lever (not shipped): estimate every Kaggle image's contrast from the read sample,
#    then the control's command above with --sampling kaggle_contrast --contrast-estimates ESTIMATES.csv
python -m triaged.training.contrast_probe models/densenet121-brainmri-v2 --out ESTIMATES.csv
# skull-stripped test volumes as series (section "Skull-stripped test series through the daemon path")
python -m triaged.training.strip_series models/densenet121-brainmri-v2 --data-root ../shared/data
# contrast of the Kaggle test images (section "Contrast of the Kaggle test images"): 480 images on 12 numbered
#    sheets, read by eye into evaluation/kaggle_contrast_reads.csv (index,path,contrast), then counted by the card
python -m triaged.training.contrast_read sheets models/densenet121-brainmri-v2 --out SHEETS --count 480
python -m triaged.training.contrast_read summary models/densenet121-brainmri-v2
# comparison models (same split, manifest and evaluation; budgets in the table)
python -m triaged.training.train --out-dir R50 --cache-dir CACHE --arch resnet50 --input-size 128 --epochs 200 \\
    --lr 1e-3 --warmup-epochs 1 --workers 1 --threads 1 --time-budget-minutes 30 \\
    --manifest models/densenet121-brainmri-v1/manifest.csv --model-name resnet50-brainmri
python -m triaged.training.train --out-dir SMALL --cache-dir CACHE --arch smallcnn --input-size 128 --epochs 200 \\
    --lr 3e-3 --warmup-epochs 1 --workers 1 --threads 1 --time-budget-minutes 20 \\
    --manifest models/densenet121-brainmri-v1/manifest.csv --model-name smallcnn-brainmri
triaged evaluate R50/model --no-release --cache-dir CACHE
triaged evaluate SMALL/model --no-release --cache-dir CACHE
```"""


def _parity_sentence(parity: Mapping[str, Any]) -> str:
    """The reduced-precision check of evaluation, or why there was none (a CPU without bf16 runs fp32 only)."""
    if parity.get("precision") in (None, "fp32"):
        return (
            "The evaluating machine ran fp32 only (no native bf16), so no reduced-precision comparison is recorded"
            " here; `tests/ml/test_decision_parity.py` compares every CPU backend's series decisions with torch fp32."
        )
    return (
        f"Measured {parity.get('precision')} vs fp32 on {parity.get('n')} test images: argmax agreement"
        f" {parity.get('argmax_agreement', float('nan')):.4f}, max |Δp|"
        f" {parity.get('max_abs_probability_difference', float('nan')):.4f}."
    )


#: Sentences for the card's series-urgency line, each shown only when model.json sets its aggregation key.
_AGGREGATION_SENTENCES = {
    "max_brain_height_mm": (
        " Where the headers place the slices (axial series, axial reformats), a slice more than {:.0f} mm below the"
        " series' highest such slice is not brain whatever it looks like: the neck of a whole-head volume"
        " (triaged.ml.extent)."
    ),
    "min_matrix": (
        " A series whose images are smaller than {} px on their longer side is refused as too coarse"
        " (it would be upsampled; every training image was reduced): diffusion/EPI matrices whose headers were"
        " stripped."
    ),
}


def _aggregation_sentence(aggregation: Mapping[str, Any], key: str) -> str:
    value = aggregation.get(key)
    return "" if value is None else _AGGREGATION_SENTENCES[key].format(value)


def _ood_line(ood: Mapping[str, Any]) -> str:
    """The card's OOD line: 1.2.0's penultimate-layer check or the multi-layer one (see triaged.ml.ood)."""
    threshold = float(ood.get("threshold", float("nan")))
    if ood.get("method") != "mahalanobis-layers":
        return (
            f"- OOD: {ood.get('method')} distance in the penultimate feature space, threshold {threshold:.3f} "
            f"(validation quantile {ood.get('quantile')})."
        )
    layers = ", ".join(f"`{name}`" for name in ood.get("layers", []))
    return (
        f"- OOD: Mahalanobis distance to the nearest class centroid, PCA-whitened ({ood.get('components')} "
        f"components, fitted on {ood.get('fitted_on')}), in each of {layers} (pooled layers: channel mean and "
        "standard deviation); each distance is divided by its median on the validation images, a slice scores the "
        f"largest, a series the median over its in-brain slices. Threshold {threshold:.3f}: "
        f"{ood.get('threshold_rule', 'validation quantile ' + str(ood.get('quantile')))}."
    )


def _split_table(spec_extra: dict[str, Any]) -> list[str]:
    summary = spec_extra.get("data_split", {})
    if not summary:
        return []
    classes = sorted({c for counts in summary.values() for c in counts})
    lines = ["| split | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for split, counts in summary.items():
        lines.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in classes) + " |")
    return lines


COMPARISON_FILE = "comparison.json"


def _comparison_row(path: Path, rep: dict[str, Any]) -> dict[str, Any]:
    spec = read_spec(path)
    training = dict(spec.extra.get("training", {}))
    compute = dict(training.get("total_compute") or training.get("compute") or {})
    t, c = rep["sets"]["test"], rep["sets"].get("clean_test")
    return {
        "arch": spec.arch,
        "name": spec.name,
        "version": spec.version,
        "params": count_parameters(build_network(spec.arch, len(spec.classes))),
        "input_size": spec.preprocessing.input_size,
        "epochs": compute.get("epochs"),
        "train_minutes": float(compute.get("wall_seconds", 0)) / 60,
        "test_accuracy": t["accuracy"],
        "test_macro_auc": t["macro_auc"],
        "tumour_auc": t["tumour_vs_notumour"]["auc"],
        "clean_test_accuracy": c["accuracy"] if c else None,
    }


def comparison_rows(model_dir: Path, report: dict[str, Any], others: Sequence[Path]) -> list[str]:
    """Markdown rows comparing this model with other evaluated model directories (their evaluation.json).

    The other models' rows are kept in ``evaluation/comparison.json``: re-evaluating the product model without
    ``--compare`` keeps the comparison from the last time the other models were evaluated instead of dropping it.
    """
    stored = model_dir / "evaluation" / COMPARISON_FILE
    if others:
        rows = [_comparison_row(o, json.loads((o / "evaluation" / "evaluation.json").read_text())) for o in others]
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({"models": rows}, indent=1) + "\n")
    else:
        rows = json.loads(stored.read_text())["models"] if stored.is_file() else []
    lines = [
        "| model | params | input | epochs | train minutes | test accuracy | test macro AUC | tumour AUC | "
        "clean_test accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in [_comparison_row(model_dir, report), *rows]:
        clean = row["clean_test_accuracy"]
        lines.append(
            f"| {row['arch']} | {row['params'] / 1e6:.2f} M | {row['input_size']} | {row['epochs']} | "
            f"{row['train_minutes']:.0f} | {ci(row['test_accuracy'])} | {ci(row['test_macro_auc'], False)} | "
            f"{ci(row['tumour_auc'], False)} | {ci(clean) if clean else '–'} |"
        )
    return lines


def _continued_from(training: dict[str, Any], cfg: dict[str, Any], compute: dict[str, Any]) -> list[str]:
    prior = training.get("init_from")
    if not prior:
        return []
    return [
        f"- This run continued from {prior['name']} {prior['version']} (weights sha256 "
        f"{str(prior['weights_sha256'])[:12]}…, `--init model:DIR`) for {compute.get('epochs')} epochs / "
        f"{float(compute.get('wall_seconds', 0)) / 60:.1f} min with peak lr {cfg.get('lr')}, seed {cfg.get('seed')}.",
    ]


def _attention_lines(cfg: dict[str, Any]) -> list[str]:
    weight = float(cfg.get("cam_loss_weight") or 0.0)
    if weight <= 0:
        return []
    return [
        f"- Mask-guided attention (`--cam-loss-weight {weight:g}`): on Cheng training slices (the only ones with tumour"
        " masks, about a third of the training images) the loss adds the cross-entropy between the share of tumour "
        "area in each cell of the final 4×4 feature grid and the softmax of the true class's activation map over "
        "those cells, so the map that Grad-CAM shows is trained to sit on the lesion; masks follow every geometric "
        "augmentation of their image.",
    ]


def _localisation_limits(classes: Sequence[str], report: dict[str, Any]) -> list[str]:
    scores = {m: g["pointing_game"]["value"] for m, g in report.get("gradcam", {}).items()}
    if not scores:
        return []
    best = max(scores, key=lambda m: scores[m])
    by_class = report["gradcam"][best].get("pointing_game_by_class_index", {})
    weakest = min(by_class, key=lambda k: by_class[k]) if by_class else None
    weak = f" (weakest: {classes[int(weakest)]} {by_class[weakest] * 100:.0f} %)" if weakest is not None else ""
    if scores[best] >= 0.85:
        return [
            f"- Grad-CAM pointing game {scores[best] * 100:.1f} % on test Cheng slices (T1 post-contrast){weak}. Maps"
            " show where the model looked; they are not lesion segmentations, and on other sequences and on"
            " real volumes they are unmeasured.",
        ]
    return [
        f"- Grad-CAM localisation is below target: pointing game {scores[best] * 100:.1f} % vs ≥ 85 %{weak}. Where"
        " the map misses, it peaks on anatomy typical of the class (midline, sella, ventricles) rather than on the",
        "  lesion: the classifier partly relies on anatomy and context. Maps show where the model looked and must",
        "  not be read as lesion segmentations.",
    ]


def _unseen_val_series(report: dict[str, Any]) -> int:
    return sum(1 for o in report["volumes"]["val"]["series"] if o["site"] == UNSEEN_SITE)


def write_model_card(model_dir: Path, report: dict[str, Any], compare: Sequence[Path] = ()) -> Path:
    """Render the card; every number comes from ``report`` (evaluation.json) or ``model.json``."""
    spec = read_spec(model_dir)
    training = dict(spec.extra.get("training", {}))
    compute = dict(training.get("compute", {}))
    total = dict(training.get("total_compute", compute))
    cfg = dict(training.get("config", {}))
    history = list(training.get("history", []))
    manifest = read_manifest(model_dir / "manifest.csv") if (model_dir / "manifest.csv").is_file() else []
    sets = report["sets"]
    parity = dict(report.get("precision_parity", {}))
    test, clean = sets["test"], sets.get("clean_test")
    hs = test["tumour_vs_notumour"]["high_sensitivity"]
    status = "PROVISIONAL" if spec.provisional else "release candidate"
    lines = [
        f"# Model card: {spec.name} {spec.version} ({status})",
        "",
        "**AI triage aid — NOT FOR DIAGNOSTIC USE.** It re-orders a reading worklist; it never replaces a read.",
        "",
        "## Intended use",
        "",
        "- Prioritise brain MR series that may show a tumour (glioma, meningioma, pituitary) so a radiologist",
        "  sees them earlier.",
        "  Every study is still read by a human; a 'not urgent' result means nothing clinically.",
        "- In scope: 2-D slices of anatomical brain MR (T1, T1 post-contrast, T2, FLAIR) of adults. T2 series are",
        "  assessed, but the shared data hold no T2 tumour image that we know of (tcga_lgg has no T2, and a read",
        "  sample of Kaggle found none): T2 tumour sensitivity is unknown.",
        "- Out of scope (the metadata gate returns `not_assessable`): DWI/ADC, EPI (fMRI, perfusion), localizers,",
        "  derived maps, non-brain series. Series unlike the training data are also `not_assessable` (feature OOD).",
        "",
        "## Model",
        "",
        f"- MONAI `DenseNet121(spatial_dims=2, in_channels=1, out_channels={len(spec.classes)})`, trained from scratch;"
        f" classes in order: {', '.join(spec.classes)}.",
        f"- Input {spec.preprocessing.input_size} px: percentile scaling ({spec.preprocessing.lower_percentile} – "
        f"{spec.preprocessing.upper_percentile} %) to [0, 1], longest side resized, centred zero padding.",
        f"- Temperature {spec.temperature:.4f} (fitted on validation). Urgency threshold "
        f"{spec.thresholds.get('urgency', float('nan')):.4f} on the series urgency "
        + (
            f"({report['volumes']['rule']}); "
            if report.get("volumes")
            else "(highest threshold with validation sensitivity ≥ 99.5 %); "
        )
        + f"slice-level Youden threshold {spec.thresholds.get('youden', float('nan')):.4f}.",
        f"- Series urgency: mean of the top-{spec.aggregation.get('top_k')} slice tumour probabilities, each capped by"
        " its"
        " strongest neighbour (a lesion spans adjacent slices), over slices that show brain, judged relative to the"
        " head: raw signal ≥ "
        f"{float(spec.aggregation.get('min_relative_signal', 0.3)):.0%} of the series' median slice, field not filled"
        f" to the corners, head ≥ {float(spec.aggregation.get('relative_head_fraction', 0.5)):.0%} of the series'"
        f" typical head and tissue ≥ {float(spec.aggregation.get('min_tissue_of_head', 0.5)):.0%} of the head"
        " (any field of view, skull-stripped volumes included)."
        + _aggregation_sentence(spec.aggregation, "max_brain_height_mm")
        + " Key images and Grad-CAM come from those slices only."
        + _aggregation_sentence(spec.aggregation, "min_matrix"),
        _ood_line(spec.ood),
        f"- Weights sha256 `{spec.weights_sha256}`; data manifest sha256 `{spec.extra.get('data_manifest_sha256')}`.",
        "- Inference: device/precision `auto` (CUDA AMP; on CPUs with native bf16, bf16 autocast only where timing the"
        " model at load shows it faster than fp32; else fp32),"
        " channels-last, batched. "
        + _parity_sentence(parity)
        + (
            " Left-right flip averaging (TTA) is on: evaluated, calibrated and used by the daemon alike."
            if dict(spec.extra.get("inference", {})).get("flip_tta")
            else ""
        ),
        *[f"- {note}" for note in spec.extra.get("card_notes", [])],
        "",
        "## Training data",
        "",
        "- Kaggle *Brain Tumor MRI Dataset* (M. Nickparvar; merges figshare, SARTAJ and Br35H): 7023 images. Licence",
        "  **unknown** here (reported CC0-1.0 on Kaggle, unconfirmed). Check before redistribution.",
        "- Cheng et al. figshare brain tumour dataset: 3064 T1 post-contrast slices, **CC BY 4.0**;",
        "  cite Cheng et al., PLoS ONE 10(10): e0140381 (2015) and 11(6): e0157112 (2016).",
        "- Leak-free split (`manifest.csv`): union-find groups over Kaggle `dup_group`, Kaggle→Cheng matches",
        "  and blocks of 12 consecutive Cheng indices (patient proxy: no patient ids); whole groups go to one side,",
        "  stratified",
        "  70/15/15 with seed 20260; every group holding a Kaggle `clean_test` row is pinned to test.",
        "  Label conflicts (`dup_group_label_conflict`, Kaggle/Cheng label mismatches) are excluded and listed in the",
        "  manifest (`excluded`, `exclude_reason`). Kaggle copies of Cheng slices are dropped from training only.",
        *(lgg_data_lines() if report.get("volumes") else []),
        *reformat_data_lines(manifest),
        *(["", *_split_table(dict(spec.extra))] if spec.extra.get("data_split") else []),
        "",
        "## Training procedure and compute",
        "",
        f"- AdamW (lr {cfg.get('lr')}, weight decay {cfg.get('weight_decay')}), label smoothing "
        f"{cfg.get('label_smoothing')}, class-balanced loss weights, batch {cfg.get('batch_size')}, "
        f"{cfg.get('warmup_epochs')} warm-up epoch(s) then cosine decay over a wall-clock budget (the machine was "
        "shared, so the schedule was tied to time, not epochs).",
        "- MONAI augmentation: affine (±15°, zoom ±15 % up to 1.2.0, ±25 % from 2.0.0, shifts), left-right flip,",
        "  resolution loss, blur, bias field,  gamma, histogram shift, intensity scaling, Gaussian noise.",
        *_attention_lines(cfg),
        f"- Compute (every run behind these weights): {total.get('epochs')} epochs, "
        f"{total.get('images_seen')} training images seen, {float(total.get('wall_seconds', 0)) / 60:.1f} min wall "
        "clock on shared 2-core CPUs (which ones: the notes under Model), "
        f"precision {total.get('precision')}, threads {total.get('threads')}; epoch fragments "
        "interrupted to change settings are not counted. No GPU.",
        *_continued_from(training, cfg, compute),
        f"- Best checkpoint by validation accuracy: epoch {training.get('epoch')}"
        + (f" (validation accuracy {history[int(training.get('epoch', 1)) - 1]['val_acc']:.4f})" if history else "")
        + ".",
        "",
        "## Results (bootstrap 95 % CIs over images; optimistic because slices of one patient are correlated)",
        "",
        "| set | n | accuracy | macro AUC | tumour AUC | tumour sensitivity @urgency thr. | specificity | "
        "ECE after scaling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in sets.items():
        b = s["tumour_vs_notumour"]
        lines.append(
            f"| {name} | {s['n']} | {ci(s['accuracy'])} | {ci(s['macro_auc'], False)} | {ci(b['auc'], False)} | "
            f"{ci(b['high_sensitivity']['sensitivity'])} | {ci(b['high_sensitivity']['specificity'])} | "
            f"{ci(s['ece'])} |"
        )
    lines += [
        "",
        f"Targets from the issue: test accuracy ≥ 99 % (reached: {test['accuracy']['value'] * 100:.2f} %), "
        f"tumour sensitivity ≥ 99.5 % at specificity ≥ 95 % (reached: {hs['sensitivity']['value'] * 100:.2f} % at "
        f"{hs['specificity']['value'] * 100:.2f} %), macro AUC ≥ 0.998 (reached: {test['macro_auc']['value']:.4f}), "
        f"ECE ≤ 2 % (reached: {test['ece']['value'] * 100:.2f} %). Kaggle clean_test accuracy "
        f"{ci(clean['accuracy']) if clean else 'not available'}.",
        "",
        "Grad-CAM localisation on test Cheng slices (true class; pointing game = map maximum within 15 px at 224 px,"
        " i.e. 9 px here, of the tumour mask; layer and method chosen on validation Cheng and tcga_lgg FLAIR slices):",
        "",
        "| method | layer (map density) | n | pointing game | mean IoU (map ≥ 0.5) |",
        "|---|---|---|---|---|",
    ]
    for method, g in report["gradcam"].items():
        by_class = ", ".join(
            f"{spec.classes[int(k)]} {v * 100:.0f} %" for k, v in g.get("pointing_game_by_class_index", {}).items()
        )
        density = f"à trous ×{g['atrous']}" if int(g.get("atrous", 1)) > 1 else "as trained"
        lines.append(
            f"| {method} | {g.get('target_layer', '?')} ({density}) | {g['n']} | {ci(g['pointing_game'])} ({by_class}) "
            f"| {ci(g['mean_iou'], False)} |"
        )
    lines += volume_sections(report)
    lines += [
        "",
        "## Comparison (same split and evaluation; each trained from scratch on the shared CPU)",
        "",
        *comparison_rows(model_dir, report, compare),
        "",
        "Budgets differ (see the minutes column, wall-clock on a 2-core CPU shared with other work, one torch",
        "thread each); read accordingly. The product model's minutes include every run it was continued from.",
        *lever_sections(model_dir),
        *mpr_eval_lines(model_dir),
        *strip_eval_lines(model_dir),
        *strip_series_lines(model_dir),
        *specificity_lines(model_dir),
        *plane_probe_lines(model_dir),
        *contrast_read_lines(model_dir),
    ]
    if "release" in report:
        lines += [
            "",
            "## Release criteria on real DICOM series (`../shared/data/dicom`, evaluation only)",
            "",
            f"Overall: **{'PASS' if report['release']['passed'] else 'FAIL'}**",
            "",
            "| series | expected | result | urgency | "
            "classifier alone, gate bypassed (label / urgency / slices > 0.5) |",
            "|---|---|---|---|---|",
        ]
        for s in report["release"]["series"]:
            r, u = s["result"], s["classifier_without_metadata_gate"]
            res = ("urgent" if r["urgent"] else "not urgent") if r["assessable"] else f"not assessable ({r['reason']})"
            if r.get("reformat"):
                res += f", scored on its {r['reformat']}"
            alone = (
                f"{u['label']} / {u['urgency']:.3f} / {u['slices_tumour_over_0.5']} of {u['in_brain']}"
                if u["assessable"]
                else f"not assessable ({u['reason']})"
            )
            urg = f"{r['urgency']:.3f}" if r["urgency"] is not None else "–"
            lines.append(f"| {s['name']} | {s['expect']} | {res} | {urg} | {alone} |")
        for contrast, row in report["release"].get("volumes", {}).get("contrasts", {}).items():
            verdict = "pass" if row["passed"] else "FAIL"
            lines.append(
                f"| tcga_lgg test {contrast} series | ≥ 95 % urgent | {row['urgent']} of {row['series']} urgent "
                f"({verdict}) | – | – |"
            )
    lines += [
        "",
        "## Limitations",
        "",
        *(
            [
                "- 2-D slice classifier with a heuristic series aggregation. Real tumour volumes are one disease",
                "  (lower-grade glioma) from one public collection; meningioma, pituitary, T2 and normal volumes",
                "  beyond two T1 series are not in the shared data, so series specificity is barely measured.",
                f"- The threshold was chosen on {_unseen_val_series(report)} validation series of one unseen site:",
                "  a site-specific check before use is still required.",
            ]
            if report.get("volumes")
            else [
                "- 2-D slice classifier; the series score is a heuristic aggregation, never validated on real tumour",
                "  volumes (no such data here). Real-scan evidence: two normal T1 volumes, five DWI/EPI series.",
                "- The urgency threshold is high (the calibrated model is very confident on these sources); confidence",
                "  on unfamiliar scanners or sequences can shift, so the threshold needs checking on local data.",
            ]
        ),
        *_localisation_limits(spec.classes, report),
        "- Training images are 8-bit JPEG exports of mixed sequences and planes; the no-tumour class comes mostly from",
        "  Br35H, whose acquisition differs from the tumour sources, so the model can learn source shortcuts.",
        "- Cheng has no patient ids: blocks of consecutive slices approximate patients, so some leakage may remain and",
        "  the CIs (image-level bootstrap) are too narrow. Labels are noisy (conflicts found and excluded).",
        "- Calibration, thresholds and the OOD threshold were fitted on the validation split of the same sources.",
        "- The release series were looked at during development (the tissue-fraction slice rule was motivated by",
        "  their lateral slices, though its value is fitted on training images), so they are not a blind test.",
        "",
        "## Reproduce",
        "",
        REPRODUCE,
        "",
        "Full evaluation tables, confusion matrices and plots: `evaluation/evaluation.md` and `evaluation/*.png`.",
    ]
    path = model_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines) + "\n")
    return path
