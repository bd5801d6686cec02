"""tools/setup.sh installs only what is missing: once per pyproject.toml, test tools only for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.name != "posix", reason="bash scripts")


@pytest.fixture()
def fake_venv(tmp_path) -> tuple[Path, Path]:
    """A venv whose python is this interpreter and whose pip only records what it was asked."""
    venv, calls = tmp_path / "venv", tmp_path / "pip-calls.txt"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    for name in ("python", "pip"):
        (venv / "bin" / name).chmod(0o755)
    return venv, calls


def setup(venv: Path, mode: str) -> str:
    result = subprocess.run(["bash", str(ROOT / "tools" / "setup.sh"), mode], capture_output=True, text=True,
                            env={**os.environ, "CAPTIONERS_VENV": str(venv)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(venv)
    return result.stderr


def pip_calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_the_main_job_installs_the_package_once_and_no_test_tools(fake_venv):
    venv, calls = fake_venv
    assert "installing -e" in setup(venv, "run")
    assert [c.split()[-1] for c in pip_calls(calls)] == [str(ROOT)]  # no [test] extra
    assert setup(venv, "run") == "" and len(pip_calls(calls)) == 1  # nothing to do the second time


def test_tests_install_their_tools_once_which_also_serves_the_main_job(fake_venv):
    venv, calls = fake_venv
    setup(venv, "current")
    setup(venv, "current")
    setup(venv, "run")
    assert [c.split()[-1] for c in pip_calls(calls)] == [f"{ROOT}[test]"]
