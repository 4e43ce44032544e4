"""The ML CLI commands: one-line errors for user mistakes, model info on a real model directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from typer.testing import CliRunner

from triaged.cli.ml_commands import evaluate_command, model_info_command, train_command

app = typer.Typer()
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("info")(model_info_command)
runner = CliRunner()


def test_model_info(random_model_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(random_model_dir)])
    assert result.exit_code == 0, result.output
    assert "random-smallcnn" in result.output and "provisional" in result.output
    as_json = runner.invoke(app, ["info", str(random_model_dir), "--json"])
    assert '"weights_sha256"' in as_json.output


def test_model_info_defaults_to_the_configured_model(random_model_dir: Path) -> None:
    result = runner.invoke(app, ["info"], env={"TRIAGED_MODEL__DIRECTORY": str(random_model_dir)})
    assert result.exit_code == 0, result.output
    assert "random-smallcnn" in result.output and str(random_model_dir) in result.output


def test_model_info_refuses_modified_weights(random_model_dir: Path, tmp_path: Path) -> None:
    model_dir = shutil.copytree(random_model_dir, tmp_path / "model")  # the fixture is shared by the session
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    result = runner.invoke(app, ["info", str(model_dir)])
    assert result.exit_code == 1 and "does not match model.json" in result.output
    assert "Traceback" not in result.output


def test_bad_paths_give_one_line_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "not a model directory" in result.output
    result = runner.invoke(app, ["train", "--out-dir", str(tmp_path / "o"), "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "not the shared data folder" in result.output
    assert "Traceback" not in result.output


def test_unknown_arch_is_rejected(tiny_data_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", "--out-dir", str(tmp_path / "o"), "--data-root", str(tiny_data_root), "--arch", "vgg"]
    )
    assert result.exit_code == 2 and "unknown --arch" in result.output


def test_attention_loss_needs_densenet(tiny_data_root: Path, tmp_path: Path) -> None:
    args = ["train", "--out-dir", str(tmp_path / "o"), "--data-root", str(tiny_data_root), "--arch", "smallcnn"]
    result = runner.invoke(app, [*args, "--cam-loss-weight", "0.3"])
    assert result.exit_code == 2 and "--cam-loss-weight" in result.output
    assert "Traceback" not in result.output


def test_unknown_sampling_or_augment_is_one_line(tiny_data_root: Path, tmp_path: Path) -> None:
    args = ["train", "--out-dir", str(tmp_path / "o"), "--data-root", str(tiny_data_root), "--arch", "smallcnn"]
    for extra in (["--sampling", "oversample"], ["--augment", "invert"]):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2 and "--sampling must be one of uniform, balanced" in result.output
        assert "Traceback" not in result.output


def test_a_strip_probability_outside_zero_to_one_is_one_line(tiny_data_root: Path, tmp_path: Path) -> None:
    args = ["train", "--out-dir", str(tmp_path / "o"), "--data-root", str(tiny_data_root), "--arch", "smallcnn"]
    result = runner.invoke(app, [*args, "--augment", "strip", "--strip-prob", "1.5"])
    assert result.exit_code == 2 and "--strip-prob must be between 0 and 1" in result.output
    assert "Traceback" not in result.output
