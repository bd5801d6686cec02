"""tools/setup.sh installs only what is missing: once per pyproject.toml, test tools only for tests; and
install.py, as Forge Neo's launcher runs it, installs only what Neo lacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
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
    assert [c.split()[-1] for c in pip_calls(calls)] == [f"{ROOT}[test,ray]"]  # Ray: tested with current releases


# ---- install.py as Forge Neo's launcher runs it -----------------------------------------------------
# What Forge Neo (Haoming02/sd-webui-forge-classic, branch neo; requirements.txt of 1e8cfbc) has when
# its launcher runs the extensions' installers: torch and torchvision, gradio 4.40.0 with
# gradio_rangeslider (installed by modules/launch_utils.py), packaging, then requirements.txt. No
# open-clip-torch (and so no timm) among them.
NEO_REQUIREMENTS = (
    "GitPython==3.1.57 Pillow==12.3.0 accelerate==1.14.0 av==19.0.1 comfy-kitchen==0.2.37 diffusers==0.37.1 "
    "diskcache==5.6.3 einops==0.8.2 facexlib==0.3.0 fastapi==0.127.1 httpx==0.28.1 huggingface-hub==0.36.2 "
    "inflection==0.5.1 joblib==1.5.3 kornia==0.6.12 lark==1.3.1 numpy==2.3.5 omegaconf==2.3.1 "
    "opencv-python==5.0.0.93 piexif==1.1.3 pillow-heif==1.5.0 pillow-jxl-plugin==1.3.8 protobuf==4.25.9 "
    "psutil==7.2.2 pydantic-core==2.27.2 pydantic==2.10.6 pyyaml==6.0.3 rich==14.3.4 safetensors==0.8.0 "
    "scikit-image==0.25.2 spandrel-extra-arches==0.2.0 spandrel==0.4.2 torchsde==0.2.6 tqdm==4.70.0 "
    "transformers==4.57.6 torch").split()
NEO_LAUNCHER_PACKAGES = ("torch", "torchvision", "gradio==4.40.0", "gradio_rangeslider==0.0.8", "packaging")
NEO_MODULES = ("torch", "torchvision", "gradio", "gradio_rangeslider", "packaging", "PIL", "numpy", "safetensors",
               "huggingface_hub", "transformers", "pydantic", "fastapi", "yaml", "google.protobuf")
# Neo's modules/launch_utils.py: is_installed() asks importlib.metadata for a distribution of that
# name, else importlib.util.find_spec (so the module name "open_clip" finds open-clip-torch);
# run_pip() runs "python -m pip <command> --prefer-binary". Here it only records the command.
NEO_LAUNCH = '''
import json, os, re

DISTRIBUTIONS = {re.sub(r"[-_.]+", "_", name).lower() for name in json.loads(os.environ["NEO_DISTRIBUTIONS"])}
MODULES = set(json.loads(os.environ["NEO_MODULES"]))


def is_installed(package):
    return re.sub(r"[-_.]+", "_", package).lower() in DISTRIBUTIONS or package in MODULES


def run_pip(command, desc=None, live=False):
    found = re.search(r' -c "([^"]+)"', command)
    if found:  # the constraints file lives only during the call: keep what it held
        with open(os.environ["NEO_PIP_CALLS"] + ".constraints", "a") as kept:
            kept.write(open(found.group(1)).read())
        command = command.replace(found.group(1), "CONSTRAINTS")
    with open(os.environ["NEO_PIP_CALLS"], "a") as calls:
        calls.write(command + "\\n")
    return ""
'''


def _neo_install(tmp_path: Path, installed: tuple[str, str] | None = None) -> list[str]:
    """Run install.py as Neo's run_extension_installer does: a subprocess, the WebUI root on PYTHONPATH.
    ``installed``: one more (distribution, module) that Neo then has."""
    root = tmp_path / "forge-neo"
    root.mkdir(parents=True, exist_ok=True)
    (root / "launch.py").write_text(NEO_LAUNCH)
    calls = tmp_path / "neo-pip-calls.txt"
    distributions = [re.split(r"[=<>;]", line)[0] for line in [*NEO_REQUIREMENTS, *NEO_LAUNCHER_PACKAGES]]
    modules = list(NEO_MODULES)
    if installed is not None:
        distributions.append(installed[0])
        modules.append(installed[1])
    env = {**os.environ, "PYTHONPATH": str(root), "NEO_PIP_CALLS": str(calls),
           "NEO_DISTRIBUTIONS": json.dumps(distributions), "NEO_MODULES": json.dumps(modules)}
    result = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=root, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return calls.read_text().splitlines() if calls.exists() else []


def test_install_py_adds_open_clip_to_forge_neo_and_nothing_neo_pins(tmp_path):
    commands = _neo_install(tmp_path)
    assert commands == ['install "open_clip_torch" -c "CONSTRAINTS"']  # safetensors and huggingface-hub: Neo's own
    # pip holds the host's installed packages where they are (here: this interpreter's torch, numpy...)
    held = set((tmp_path / "neo-pip-calls.txt.constraints").read_text().split())
    assert {f"torch=={version('torch')}", f"numpy=={version('numpy')}", f"transformers=={version('transformers')}"} <= held
    pinned = {re.split(r"[=<>;]", line)[0].lower().replace("_", "-") for line in NEO_REQUIREMENTS}
    for command in commands:
        requirement = command.split('"')[1]
        assert re.split(r"[<>=!~ ]", requirement)[0].lower().replace("_", "-") not in pinned
        assert "==" not in command and "-U" not in command and "--upgrade" not in command
    # Once open_clip is there (the next start), nothing more.
    assert _neo_install(tmp_path / "again", installed=("open-clip-torch", "open_clip")) == []
