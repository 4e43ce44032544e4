"""The contrast read of the Kaggle test images: a fixed sample, a reads file that must match it, and a card section
whose counts and conclusion follow from the reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from triaged.training.contrast_read import (
    CONTRASTS,
    PREDICTIONS_FILE,
    READS_FILE,
    card_lines,
    read_reads,
    reading_sample,
    write_sheets,
)
from triaged.training.data import Sample, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "densenet121-brainmri-v2"


def _sample(path: str, label: str, *, source: str = "kaggle", split: str = "test", in_cheng: bool = False) -> Sample:
    return Sample(path, source, label, split, path, False, "", False, in_cheng)


def _pool() -> list[Sample]:
    kaggle = [_sample(f"k/{i}.jpg", "glioma" if i % 2 else "notumor") for i in range(12)]
    others = [
        _sample("k/cheng-copy.jpg", "glioma", in_cheng=True),
        _sample("k/train.jpg", "glioma", split="train"),
        _sample("c/1.jpg", "glioma", source="cheng"),
        _sample("t/1.jpg", "notumor", source="tcga_lgg"),
    ]
    return kaggle + others


def test_the_sample_is_fixed_and_holds_only_kaggle_test_images_that_are_not_cheng_slices() -> None:
    first, again = reading_sample(_pool(), 8), reading_sample(_pool(), 8)
    assert [s.path for s in first] == [s.path for s in again]
    assert len(first) == 8 and all(s.path.startswith("k/") and s.path[2:-4].isdigit() for s in first)
    assert [s.path for s in first] != [f"k/{i}.jpg" for i in range(8)]  # shuffled, not the manifest order
    assert len(reading_sample(_pool(), 100)) == 12


def _model_dir(tmp_path: Path, contrasts: dict[str, str], tumour_p: dict[str, float]) -> Path:
    """A model directory with a manifest, a reads file in sample order, predictions and a threshold of 0.5."""
    write_manifest(_pool(), tmp_path / "manifest.csv")
    (tmp_path / "model.json").write_text(json.dumps({"thresholds": {"urgency": 0.5}}))
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    sample = reading_sample(read_manifest(tmp_path / "manifest.csv"), len(contrasts))
    with (evaluation / READS_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "path", "contrast"])
        writer.writerows((i, s.path, contrasts[s.path]) for i, s in enumerate(sample))
    with (evaluation / PREDICTIONS_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "p_notumor"])
        writer.writerows((s.path, s.label, 1.0 - tumour_p[s.path]) for s in sample)
    return tmp_path


def test_the_card_counts_contrasts_per_label_and_names_the_shortcut(tmp_path: Path) -> None:
    # every tumour image T1, every T2/FLAIR image tumour-free: the conclusion the shared Kaggle read reached
    contrasts = {f"k/{i}.jpg": ("t1" if i % 2 else ("t2" if i % 4 == 0 else "flair")) for i in range(12)}
    tumour_p = {f"k/{i}.jpg": (0.9 if i % 2 else 0.1) for i in range(12)}
    tumour_p["k/1.jpg"] = 0.3  # one tumour missed
    tumour_p["k/0.jpg"] = 0.7  # one T2 false alarm
    text = "\n".join(card_lines(_model_dir(tmp_path, contrasts, tumour_p)))
    assert "| t1 | 6 | 6 | 5 | 0 | 0 |" in text
    assert "| t2 | 3 | 0 | 0 | 3 | 1 |" in text
    assert "| flair | 3 | 0 | 0 | 3 | 0 |" in text
    assert "0 of 6 tumour images are T2 or FLAIR" in text and "0 of 3 T2 images hold a tumour" in text
    assert "the contrast itself tells whether an image holds a tumour" in text


def test_no_shortcut_is_claimed_where_a_t2_image_holds_a_tumour(tmp_path: Path) -> None:
    contrasts = {f"k/{i}.jpg": ("t2" if i in (0, 1) else "t1") for i in range(12)}  # k/1 is a glioma
    tumour_p = {f"k/{i}.jpg": 0.9 for i in range(12)}
    text = "\n".join(card_lines(_model_dir(tmp_path, contrasts, tumour_p)))
    assert "1 of 6 tumour images are T2 or FLAIR" in text and "1 of 2 T2 images hold a tumour" in text
    assert "shortcut" not in text


def test_a_reads_file_that_does_not_match_the_sample_is_refused(tmp_path: Path) -> None:
    contrasts = {f"k/{i}.jpg": "t1" for i in range(12)}
    model_dir = _model_dir(tmp_path, contrasts, dict.fromkeys(contrasts, 0.9))
    reads = model_dir / "evaluation" / READS_FILE
    rows = reads.read_text().splitlines()
    (_, first, _), (_, second, _) = (row.split(",") for row in rows[1:3])
    swapped = [f"0,{second},t1", f"1,{first},t1"]  # the first two images' paths swapped, their indices kept
    reads.write_text("\n".join([rows[0], *swapped, *rows[3:]]) + "\n")
    with pytest.raises(ValueError, match="is not image 0 of the reading sample"):
        card_lines(model_dir)
    reads.write_text("\n".join([rows[0], rows[1].replace(",t1", ",pd"), *rows[2:]]) + "\n")
    with pytest.raises(ValueError, match="contrast 'pd'"):
        card_lines(model_dir)


def test_no_card_section_without_reads(tmp_path: Path) -> None:
    assert card_lines(tmp_path) == []


def test_the_sheets_number_every_image_of_the_sample(tmp_path: Path) -> None:
    sample = [_sample(f"img/{i}.png", "notumor") for i in range(45)]
    (tmp_path / "img").mkdir()
    for s in sample:
        Image.new("L", (300, 240), 128).save(tmp_path / s.path)
    sheets = write_sheets(sample, tmp_path, tmp_path / "out")
    assert [p.name for p in sheets] == ["sheet_0000.png", "sheet_0040.png"]  # 40 tiles a sheet
    with Image.open(sheets[0]) as sheet:
        assert sheet.size == (1600, 1000)


def test_the_shipped_reads_name_the_shipped_models_sample_in_order() -> None:
    """The stored read is of the images the shipped manifest's sample puts at each index (no shared data needed)."""
    reads = read_reads(SHIPPED / "evaluation" / READS_FILE, read_manifest(SHIPPED / "manifest.csv"))
    assert [r.index for r in reads] == list(range(len(reads))) and len(reads) >= 400
    assert {r.contrast for r in reads} <= set(CONTRASTS)
    assert card_lines(SHIPPED)[1] == "## Contrast of the Kaggle test images (read by eye)"
