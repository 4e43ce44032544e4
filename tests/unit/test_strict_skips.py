"""CI must fail on skips and xfails (TRIAGED_STRICT_SKIPS=1); a user's clone without ../shared just skips.

Every way a test can end without running is a probe file below, collected by a real pytest run in a
subprocess with this suite's ``tests/conftest.py`` as a plugin: once lenient, once strict.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# probe file -> source; every probe's tests skip or xfail when lenient and must fail when strict
PROBES: dict[str, str] = {
    "test_imperative_skip.py": """
        import pytest
        def test_it():
            pytest.skip("needs something this probe pretends is missing")
    """,
    "test_skip_marker.py": """
        import pytest
        @pytest.mark.skip(reason="marker")
        def test_it():
            pass
    """,
    "test_skipif_marker.py": """
        import pytest
        @pytest.mark.skipif(True, reason="condition")
        def test_it():
            pass
    """,
    "test_fixture_skip.py": """
        import pytest
        @pytest.fixture
        def peer():
            pytest.skip("peer missing")
        def test_it(peer):
            pass
    """,
    "test_module_level_skip.py": """
        import pytest
        pytest.skip("whole module skipped", allow_module_level=True)
        def test_it():
            pass
    """,
    "test_module_importorskip.py": """
        import pytest
        pytest.importorskip("triaged_no_such_module_probe")
        def test_it():
            pass
    """,
    "test_importorskip_in_test.py": """
        import pytest
        def test_it():
            pytest.importorskip("triaged_no_such_module_probe")
    """,
    "test_imperative_xfail.py": """
        import pytest
        def test_it():
            pytest.xfail("imperative xfail")
    """,
    "test_xfail_marker.py": """
        import pytest
        @pytest.mark.xfail(reason="known bug")
        def test_it():
            assert False
    """,
    "test_unittest_skip.py": """
        import unittest
        class Case(unittest.TestCase):
            def test_it(self):
                self.skipTest("unittest skip")
    """,
    "skipped_package/conftest.py": """
        import pytest
        pytest.skip("conftest skips its directory", allow_module_level=True)
    """,
    "skipped_package/test_inside.py": """
        def test_it():
            pass
    """,
}
# a GPU test may skip where CUDA is missing, even in CI
GPU_PROBE = """
    import pytest
    @pytest.mark.gpu
    def test_it():
        pytest.skip("no CUDA here")
"""
# probe file -> what a lenient run reports for it in the JUnit XML
LENIENT = {name: "skipped" for name in PROBES if name.startswith("test_")}
LENIENT["skipped_package/conftest.py"] = "skipped"


def _outcomes(root: Path, strict: str) -> tuple[int, str, dict[str, str]]:
    """Run pytest on the probes; ``{probe file: passed | skipped | failure | error}`` from its JUnit XML."""
    xml = root / f"junit-{strict}.xml"
    env = {**os.environ, "TRIAGED_STRICT_SKIPS": strict}
    env.pop("PYTEST_ADDOPTS", None)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-o",
            "xfail_strict=true",
            "-o",
            "markers=gpu: needs CUDA",
            "--rootdir",
            str(root),
            "-c",
            os.devnull,
            "--continue-on-collection-errors",
            "-rA",
            f"--junitxml={xml}",
            str(root / "probes"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    outcomes: dict[str, str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        # classname is the dotted module path under probes/ ("skipped_package.test_inside" or "test_x")
        name = str(case.get("classname") or case.get("name") or "")
        key = name.replace("probes.", "")
        outcomes[key] = kinds[0] if kinds else "passed"
    return completed.returncode, completed.stdout + completed.stderr, outcomes


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("strict")
    for name, source in {**PROBES, "test_gpu_skip.py": GPU_PROBE}.items():
        path = root / "probes" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return {strict: _outcomes(root, strict) for strict in ("0", "1")}


def _find(outcomes: dict[str, str], probe: str) -> str:
    stem = Path(probe).with_suffix("").as_posix().replace("/", ".")
    if probe.endswith("conftest.py"):  # the directory's collection report, or its test's, when it is reported
        stem = Path(probe).parent.as_posix()
    found = [outcome for key, outcome in outcomes.items() if key == stem or key.startswith(stem + ".")]
    assert found, f"{probe} not in the JUnit report: {sorted(outcomes)}"
    return found[0]


@pytest.mark.parametrize("probe", sorted(LENIENT))
def test_lenient_run_skips(probe: str, probe_runs: dict[str, tuple[int, str, dict[str, str]]]) -> None:
    rc, output, outcomes = probe_runs["0"]
    assert rc == 0, output
    assert _find(outcomes, probe) == LENIENT[probe], output


@pytest.mark.parametrize("probe", sorted(LENIENT))
def test_strict_run_fails_every_form(probe: str, probe_runs: dict[str, tuple[int, str, dict[str, str]]]) -> None:
    rc, output, outcomes = probe_runs["1"]
    assert rc != 0, output
    assert _find(outcomes, probe) in ("failure", "error"), output


def test_strict_failures_say_why(probe_runs: dict[str, tuple[int, str, dict[str, str]]]) -> None:
    _, output, _ = probe_runs["1"]
    assert "skip not allowed in CI (TRIAGED_STRICT_SKIPS=1): whole module skipped" in output
    assert "xfail not allowed in CI (TRIAGED_STRICT_SKIPS=1): imperative xfail" in output
    assert "xfail not allowed in CI (TRIAGED_STRICT_SKIPS=1): known bug" in output
    assert "skip not allowed in CI (TRIAGED_STRICT_SKIPS=1): conftest skips its directory" in output
    _, lenient, _ = probe_runs["0"]
    assert "not allowed in CI" not in lenient


def test_gpu_tests_may_skip_even_when_strict(probe_runs: dict[str, tuple[int, str, dict[str, str]]]) -> None:
    for strict in ("0", "1"):
        assert _find(probe_runs[strict][2], "test_gpu_skip.py") == "skipped", probe_runs[strict][1]
