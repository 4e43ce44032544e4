"""The CLI starts without the heavy libraries: `triaged --help` and commands that run no inference import no torch.

Each case runs the real entry point in a fresh interpreter and reports which heavy modules ended up in
``sys.modules`` — a fact about the code, not a timing, so it holds on a slow or busy machine. Heavy modules belong
inside the commands that need them (see triaged/cli/common.py); ``benchmarks``-style timing is in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

INFERENCE = ("torch", "monai", "torchvision", "safetensors")
EVERYTHING_HEAVY = (*INFERENCE, "numpy", "sqlalchemy", "alembic", "pydicom", "pynetdicom", "highdicom", "PIL")

_PROBE = """
import json, sys
heavy = json.loads(sys.argv[2])
sys.argv = ["triaged", *json.loads(sys.argv[1])]
from triaged.cli.app import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write("\\nPROBE " + json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}) + "\\n")
"""


def _run(args: list[str], data_dir: Path) -> tuple[object, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGED_")}
    env["TRIAGED_DATA_DIR"] = str(data_dir)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args), json.dumps(EVERYTHING_HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("PROBE ")]
    assert lines, f"the probe did not finish:\n{proc.stderr}"
    report = json.loads(lines[-1].removeprefix("PROBE "))
    return report["code"], report["loaded"]


def test_help_imports_nothing_heavy(tmp_path: Path) -> None:
    """`--help` builds every command of the tree (Typer reads all signatures), so this covers each module's imports."""
    code, loaded = _run(["--help"], tmp_path)
    assert code in (0, None)
    assert loaded == [], f"`triaged --help` imported {loaded}: import them inside the command that needs them"


@pytest.mark.parametrize(
    ("args", "expected_code"),
    [
        (["model", "info"], 0),  # the configured (shipped) model: sha256 checked without torch
        (["db", "status"], 1),  # an empty database: "run `triaged db upgrade`"
        (["series", "list"], 1),  # the same refusal, through the schema guard
    ],
)
def test_commands_without_inference_import_no_torch(args: list[str], expected_code: int, tmp_path: Path) -> None:
    code, loaded = _run(args, tmp_path)
    assert code in ((expected_code, None) if expected_code == 0 else (expected_code,))
    assert not set(loaded) & set(INFERENCE), f"`triaged {' '.join(args)}` imported {loaded}"
