"""`triaged demo` as a user runs it: a subprocess that must exit 0, print the table and write PNG files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import shared_data
from tests.support.pipeline_support import SHIPPED_MODEL, shipped_model_available


def _demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triaged", "demo", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _check_pngs(out: Path, expected_min: int) -> list[Path]:
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= expected_min
    for path in pngs:
        with Image.open(path) as image:
            image.load()
            assert image.mode == "RGB" and image.width >= 512
    return pngs


@pytest.fixture
def random_model(tmp_path: Path) -> Path:
    from triaged.ml.registry import build_random_model_dir

    return build_random_model_dir(tmp_path / "model", seed=1)


def test_demo_with_a_random_model(tmp_path: Path, random_model: Path) -> None:
    out = tmp_path / "out"
    run = _demo("--model", str(random_model), "--out", str(out), "--slices", "6")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SYNTHETIC brain phantom" in run.stdout
    assert "SERIES" in run.stdout and "URGENT?" in run.stdout and "P(glioma)" in run.stdout
    assert "1 T1 AX POST GD PHANTOM" in run.stdout and "2 T1 AX POST GD PHANTOM WITH LESION" in run.stdout
    assert "Traceback" not in run.stderr
    pngs = _check_pngs(out, 2)
    assert {p.name.split("_")[0] for p in pngs} == {"series1", "series2"}


def test_demo_from_a_folder_of_images(tmp_path: Path, random_model: Path) -> None:
    images = shared_data() / "cheng_figshare" / "images"
    out = tmp_path / "out"
    run = _demo("--model", str(random_model), "--out", str(out), "--images", str(images), "--limit", "6", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    import json

    report = json.loads(run.stdout)
    assert "6 images from" in report["study"]
    [series] = report["series"]
    assert series["slices"] == 6 and series["export_state"] == "done"
    assert set(series["probabilities"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    _check_pngs(out, 1)


def test_demo_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    run = _demo("--images", str(tmp_path / "missing"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    run = _demo("--images", str(empty), "--model", str(tmp_path / "no-model"))
    assert run.returncode == 1 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr


@pytest.mark.slow
def test_demo_with_the_shipped_model(tmp_path: Path) -> None:
    if not shipped_model_available():
        pytest.skip(f"needs the shipped model in {SHIPPED_MODEL}")
    import json

    out = tmp_path / "out"
    run = _demo("--out", str(out), "--json", timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert "densenet121" in report["model"] and "RANDOMLY" not in run.stderr
    by_description = {s["description"]: s for s in report["series"]}
    plain, lesion = by_description["T1 AX POST GD PHANTOM"], by_description["T1 AX POST GD PHANTOM WITH LESION"]
    # what the demo is for: the series with a lesion is flagged and ranks clearly above the same phantom without it.
    # The lesion-free phantom is synthetic: 2.0.0 scores it 0.69-0.71 against its 0.691 threshold (torch bf16 vs
    # OpenVINO), so whether it is flagged is rounding, not a property of the product; its urgency is asserted instead.
    assert plain["status"] == "assessed" and lesion["status"] == "assessed", (plain["reason"], lesion["reason"])
    assert lesion["urgent"] is True, (lesion["urgency"], lesion["threshold"], lesion["probabilities"])
    assert plain["urgency"] < 0.9, (plain["urgency"], plain["threshold"], plain["probabilities"])
    assert lesion["urgency"] - plain["urgency"] > 0.2
    _check_pngs(out, 2)
