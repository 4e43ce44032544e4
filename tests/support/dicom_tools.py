"""External DICOM tools for tests: find them or skip with the reason (CI's strict skips make that a failure).

A check that quietly passes when its tool is missing proves nothing, so every caller goes through
:func:`tool`; :func:`dciodvfy_errors` is the one reading of dciodvfy's output the suite uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def tool(name: str, package: str) -> str:
    """Path of executable ``name``, or skip naming the Debian ``package`` that provides it.

    The virtual environment's own ``bin`` is left out: pynetdicom installs apps named like dcmtk's (``storescu``,
    ``echoscu``) with other options, and an activated venv would put them first on ``PATH``."""
    venv_bin = Path(sys.prefix, "bin").resolve()
    search = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d and Path(d).resolve() != venv_bin]
    found = shutil.which(name, path=os.pathsep.join(search))
    if found is None:
        pytest.skip(f"needs {name} (Debian package {package})")
    return found


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy (dicom3tools) reports for one file; warnings are not errors."""
    run = subprocess.run([tool("dciodvfy", "dicom3tools"), str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
