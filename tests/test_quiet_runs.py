"""A normal run prints captions and a few INFO lines: no library warning reaches the user.

Run as a user runs it: a fresh interpreter, Python's default warning filters, no --quiet. Every pin
set runs this (CI), so a warning that only one transformers / open_clip version prints is caught.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny_blip, tiny_sbg

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8",
       "OMP_NUM_THREADS": "1"}
# Several command lines in one interpreter (each start imports torch); one "exit status" line after each.
DRIVER = ("import json, sys\nfrom captioners.cli import main\n"
          "for args in json.loads(sys.argv[1]):\n    print('exit status', main(args), flush=True)")


@pytest.fixture(scope="module")
def runs(assets_dir, tokenizer_dir, tiny_clip, icg_checkpoint, photos, tmp_path_factory):
    config, weights = tiny_clip
    models = tmp_path_factory.mktemp("quiet-models")
    clip = ["--clip-config", str(config), "--clip-weights", str(weights), "--tokenizer", str(tokenizer_dir)]
    prefix = ["caption", str(photos[0]), str(photos[1]), "--model", str(icg_checkpoint.path), *clip,
              "--models-dir", str(models), "--device", "cpu"]
    sbg_gpt2, vocabulary = assets_dir / "quiet-sbg-gpt2", assets_dir / "quiet-sbg-vocabulary"
    tiny_sbg.build_gpt2(sbg_gpt2, tokenizer_dir)
    tiny_sbg.build_vocabulary(vocabulary)
    folder = assets_dir / "quiet-blip"
    tiny_blip.build_blip(folder)
    commands = [
        prefix,
        [*prefix, "--strategy", "beam"],
        [*prefix, "--strategy", "sample", "--seed", "1"],
        ["caption", str(photos[0]), "--model", "sbg-flickr8k", "--weights", str(sbg_gpt2), "--vocabulary",
         str(vocabulary), *clip, "--models-dir", str(models), "--device", "cpu", "--seed", "3"],
        ["caption", str(photos[0]), "--model", str(folder), "--models-dir", str(models), "--device", "cpu"],
        ["models", "--models-dir", str(models)],
    ]
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], capture_output=True, text=True,
                            cwd=ROOT, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def test_every_run_succeeds_and_prints_its_captions(runs):
    statuses = [line for line in runs.stdout.splitlines() if line.startswith("exit status")]
    assert statuses == ["exit status 0"] * 6, runs.stdout + runs.stderr


def test_no_warning_reaches_the_user(runs):
    # "flagged:" lines are the quality gates' findings about a caption (tiny models write loops).
    noisy = [line for line in runs.stderr.splitlines() if not line.startswith(("INFO: ", "flagged: "))]
    assert noisy == [], "\n".join(noisy)
    assert "arning" not in runs.stderr and "deprecated" not in runs.stderr


def test_the_log_names_the_clip_the_config_chose(runs):
    loaded = [line for line in runs.stderr.splitlines() if line.startswith("INFO: Loaded ")]
    assert loaded and all("CLIP tiny-test-clip" in line and "ViT-L-14" not in line for line in loaded), loaded
