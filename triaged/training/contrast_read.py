"""The MR contrast of the Kaggle test images, read by eye, and what it says about their labels (evaluation only).

The Kaggle set carries no sequence information: its images are 8-bit exports without headers. Whether the model
can learn and be measured on T2 (issue: "the Kaggle set holds T2 slices; report per contrast, including T2")
depends on which contrasts each class holds, and no rule on pixels tells T2 from post-contrast T1 reliably
(bright CSF against bright fat and enhancement). So a person reads them: ``sheets`` draws a fixed random sample
of the Kaggle test images that are not Cheng copies (Cheng is all post-contrast T1) and writes numbered contact
sheets; the reader writes one row per image to ``MODEL_DIR/evaluation/kaggle_contrast_reads.csv`` (``index``,
``path``, ``contrast``: t1 (pre- or post-contrast: not told apart reliably at sheet size), t2, flair, ct,
unsure). The card then counts contrasts per label and scores the model per contrast from the evaluation's own
``predictions_test.csv``. A reading by eye is not a radiologist's; it can tell whether a contrast holds tumours
at all, which is what matters here.

Usage: ``python -m triaged.training.contrast_read sheets MODEL_DIR --out DIR [--count 480]`` and
``python -m triaged.training.contrast_read summary MODEL_DIR``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from triaged.training.data import Sample, read_manifest
from triaged.training.series_eval import wilson_interval

READS_FILE = "kaggle_contrast_reads.csv"
PREDICTIONS_FILE = "predictions_test.csv"
CONTRASTS = ("t1", "t2", "flair", "ct", "unsure")
SAMPLE_SEED = 20261204
SHEET_COLUMNS, SHEET_ROWS, TILE_PX = 8, 5, 200  # 40 images a sheet, large enough to see the CSV and fat


@dataclass(frozen=True)
class Read:
    """One image as read: its place in the sample, its manifest path, its label and the contrast seen."""

    index: int
    path: str
    label: str
    contrast: str


def reading_sample(samples: Sequence[Sample], count: int, seed: int = SAMPLE_SEED) -> list[Sample]:
    """The first ``count`` of a seeded shuffle of the Kaggle test images that are not Cheng slices: the same
    images in the same order for a given manifest, so a reads file can be checked against it."""
    pool = [s for s in samples if s.split == "test" and s.source == "kaggle" and not s.in_cheng and not s.excluded]
    random.Random(seed).shuffle(pool)
    return pool[:count]


def write_sheets(sample: Sequence[Sample], data_root: Path, out_dir: Path) -> list[Path]:
    """Contact sheets of the sample, each tile numbered with the image's index in it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_sheet = SHEET_COLUMNS * SHEET_ROWS
    written = []
    for start in tqdm(range(0, len(sample), per_sheet), desc="sheets", unit="sheet"):
        sheet = Image.new("L", (SHEET_COLUMNS * TILE_PX, SHEET_ROWS * TILE_PX))
        draw = ImageDraw.Draw(sheet)
        for offset, s in enumerate(sample[start : start + per_sheet]):
            with Image.open(data_root / s.path) as image:
                tile = image.convert("L")
            tile.thumbnail((TILE_PX - 4, TILE_PX - 4))
            x, y = (offset % SHEET_COLUMNS) * TILE_PX, (offset // SHEET_COLUMNS) * TILE_PX
            sheet.paste(tile, (x, y))
            draw.text((x + 2, y + 2), str(start + offset), fill=255)
        path = out_dir / f"sheet_{start:04d}.png"
        sheet.save(path)
        written.append(path)
    return written


def read_reads(path: Path, samples: Sequence[Sample]) -> list[Read]:
    """The reads file, checked against the sample it claims to read: every index must name the image the
    seeded sample puts there, and every contrast must be one of :data:`CONTRASTS`."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = reading_sample(samples, len(rows))
    reads = []
    for row in rows:
        index, contrast = int(row["index"]), row["contrast"]
        if index >= len(expected) or expected[index].path != row["path"]:
            raise ValueError(f"{path}: row {index} ({row['path']}) is not image {index} of the reading sample")
        if contrast not in CONTRASTS:
            raise ValueError(f"{path}: row {index}: contrast {contrast!r} is not one of {CONTRASTS}")
        reads.append(Read(index, row["path"], expected[index].label, contrast))
    return reads


def _tumour_probabilities(predictions: Path) -> dict[str, float]:
    with predictions.open(newline="") as handle:
        return {r["path"]: 1.0 - float(r["p_notumor"]) for r in csv.DictReader(handle)}


def card_lines(model_dir: Path) -> list[str]:
    """The model-card section, or nothing when no reads file is stored with this model."""
    reads_path = model_dir / "evaluation" / READS_FILE
    predictions_path = model_dir / "evaluation" / PREDICTIONS_FILE
    if not reads_path.is_file() or not predictions_path.is_file():
        return []
    reads = read_reads(reads_path, read_manifest(model_dir / "manifest.csv"))
    tumour_p = _tumour_probabilities(predictions_path)
    threshold = float(json.loads((model_dir / "model.json").read_text())["thresholds"]["urgency"])
    lines = [
        "",
        "## Contrast of the Kaggle test images (read by eye)",
        "",
        f"`python -m triaged.training.contrast_read`: {len(reads)} Kaggle test images that are not Cheng slices,",
        "a seeded random sample, read by eye from contact sheets by a developer (not a radiologist): T1 covers",
        "pre- and post-contrast, which a sheet does not tell apart reliably. Flagged = the image's tumour",
        f"probability (1 - p(notumor)) at or above the urgency threshold {threshold:.4f}.",
        "",
        "| contrast | images | tumour images | flagged | tumour-free images | flagged |",
        "|---|---|---|---|---|---|",
    ]
    for contrast in CONTRASTS:
        group = [r for r in reads if r.contrast == contrast]
        if not group:
            continue
        tumours = [r for r in group if r.label != "notumor"]
        free = [r for r in group if r.label == "notumor"]
        hit = sum(1 for r in tumours if tumour_p[r.path] >= threshold)
        alarm = sum(1 for r in free if tumour_p[r.path] >= threshold)
        lines.append(f"| {contrast} | {len(group)} | {len(tumours)} | {hit} | {len(free)} | {alarm} |")
    tumours = [r for r in reads if r.label != "notumor"]
    fluid = [r for r in tumours if r.contrast in ("t2", "flair")]
    t2 = [r for r in reads if r.contrast == "t2"]
    t2_tumours = sum(1 for r in t2 if r.label != "notumor")
    _, upper = wilson_interval(len(fluid), len(tumours))
    lines += [
        "",
        f"- {len(fluid)} of {len(tumours)} tumour images are T2 or FLAIR (95 % upper bound {upper:.1%}); "
        f"{t2_tumours} of {len(t2)} T2 images hold a tumour.",
    ]
    if t2 and t2_tumours == 0 and not fluid:
        lines += [
            "- So in this set the contrast itself tells whether an image holds a tumour, a shortcut a model can",
            "  learn. tcga_lgg adds tumour FLAIR; nothing in the shared data holds a T2 tumour image, so T2 tumour",
            "  sensitivity can be neither trained nor measured here: a 'not urgent' on a T2 series rests on no T2",
            "  tumour evidence.",
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m triaged.training.contrast_read", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sheets = commands.add_parser("sheets", help="write numbered contact sheets of the reading sample")
    sheets.add_argument("model_dir", type=Path)
    sheets.add_argument("--out", type=Path, required=True)
    sheets.add_argument("--count", type=int, default=480)
    sheets.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    summary = commands.add_parser("summary", help="print the model-card section from the stored reads")
    summary.add_argument("model_dir", type=Path)
    ns = parser.parse_args(argv)
    if not (ns.model_dir / "manifest.csv").is_file():
        parser.error(f"{ns.model_dir} is not a model directory (no manifest.csv)")
    if ns.command == "sheets":
        if not (ns.data_root / "kaggle_4class").is_dir():
            parser.error(f"{ns.data_root / 'kaggle_4class'} does not exist: the sheets need the shared images")
        if ns.count < 1:
            parser.error("--count must be at least 1")
        written = write_sheets(
            reading_sample(read_manifest(ns.model_dir / "manifest.csv"), ns.count), ns.data_root, ns.out
        )
        print(f"wrote {len(written)} sheets to {ns.out}; read them into {ns.model_dir / 'evaluation' / READS_FILE}")
        return
    if not (ns.model_dir / "evaluation" / READS_FILE).is_file():
        parser.error(f"{ns.model_dir / 'evaluation' / READS_FILE} does not exist: read the sheets first")
    try:
        print("\n".join(card_lines(ns.model_dir)))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
