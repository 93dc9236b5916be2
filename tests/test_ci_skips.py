"""Under CI=true a skip in an end-to-end, manifest or alert-rule module is a failure
(tests/conftest.py MUST_NOT_SKIP), and scripts/test.sh runs pytest in workers (pytest-xdist): the
rule must hold in a worker as it does in one process. A nested pytest runs sample modules with
this conftest, in workers and without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SKIPS_ITSELF = "import pytest\n\ndef test_skips():\n    pytest.skip('needs root')\n\ndef test_passes():\n    pass\n"
SKIPS_AS_A_MODULE = "import pytest\n\npytest.skip('no promtool', allow_module_level=True)\n\ndef test_never():\n    pass\n"
MAY_SKIP = "import pytest\n\ndef test_may_skip():\n    pytest.skip('optional')\n"
WORKERS = pytest.mark.parametrize("workers", [[], ["-n", "2", "--dist", "loadfile"]], ids=["one-process", "xdist"])


def run_samples(tmp_path: Path, ci: bool, samples: dict[str, str], *args: str) -> tuple[int, dict[str, str]]:
    """pytest's exit code and the outcome per test (`module.test`; `.module` for a module that
    failed to collect)."""
    root = tmp_path / "samples"
    root.mkdir()
    shutil.copy(TESTS / "conftest.py", root / "conftest.py")
    shutil.copytree(TESTS / "lib", root / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    # The conftest reads this release's version from the workspace's Cargo.toml, one level up.
    shutil.copy(TESTS.parent / "Cargo.toml", tmp_path / "Cargo.toml")
    for name, text in samples.items():
        (root / name).write_text(text)
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(root), "-p", "no:cacheprovider", f"--junitxml={report}", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert report.exists(), f"the nested pytest wrote no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}.{case.get('name')}"] = kinds[0] if kinds else "passed"
    return proc.returncode, outcomes


@WORKERS
def test_a_skipped_test_in_a_must_not_skip_module_fails_under_ci(tmp_path, workers):
    samples = {"test_sample_e2e.py": SKIPS_ITSELF, "test_sample_unit.py": MAY_SKIP}
    code, outcomes = run_samples(tmp_path, True, samples, *workers)
    assert code == 1, outcomes
    assert outcomes == {
        "test_sample_e2e.test_skips": "failure",
        "test_sample_e2e.test_passes": "passed",
        "test_sample_unit.test_may_skip": "skipped",
    }


@WORKERS
def test_a_must_not_skip_module_that_skips_as_a_whole_fails_under_ci(tmp_path, workers):
    code, outcomes = run_samples(tmp_path, True, {"test_sample_e2e.py": SKIPS_AS_A_MODULE}, *workers)
    assert code != 0, outcomes
    assert outcomes == {".test_sample_e2e": "error"}


def test_outside_ci_a_skip_stays_a_skip(tmp_path):
    samples = {"test_sample_e2e.py": SKIPS_ITSELF, "test_sample_unit.py": MAY_SKIP}
    code, outcomes = run_samples(tmp_path, False, samples, "-n", "2", "--dist", "loadfile")
    assert code == 0, outcomes
    assert outcomes["test_sample_e2e.test_skips"] == "skipped", outcomes
