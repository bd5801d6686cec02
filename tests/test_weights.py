"""Finding and downloading model files: the real huggingface_hub code against a loopback hub."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioners.errors import MissingWeightsError
from captioners.weights import Asset, deduplicate_shared, ensure_asset
from tests.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, endpoint: str, models_dir: Path, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
    """Run in a fresh interpreter: huggingface_hub reads HF_ENDPOINT when it is imported."""
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0", "PATH": "/usr/bin:/bin",
           "CAPTIONERS_MODELS_DIR": str(models_dir), "HF_HOME": str(models_dir / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_missing_file_without_source_names_file_and_folder(models_dir):
    asset = Asset("clip_prefix/mine.pt", url="https://example.org/mine")
    with pytest.raises(MissingWeightsError) as info:
        ensure_asset(asset, models_dir)
    message = str(info.value)
    assert str(models_dir / "clip_prefix" / "mine.pt") in message and "https://example.org/mine" in message


def test_converted_safetensors_twin_is_preferred(models_dir):
    (models_dir / "clip_prefix").mkdir()
    (models_dir / "clip_prefix" / "a.safetensors").write_bytes(b"x")
    assert ensure_asset(Asset("clip_prefix/a.pt"), models_dir).name == "a.safetensors"


def test_deduplicate_shared_drops_tied_copy():
    weight = torch.ones(3, 2)
    kept = deduplicate_shared({"wte": weight, "lm_head": weight, "other": torch.zeros(1)}, drop=("lm_head",))
    assert set(kept) == {"wte", "other"}
    untied = deduplicate_shared({"wte": weight, "lm_head": weight.clone()}, drop=("lm_head",))
    assert set(untied) == {"wte", "lm_head"}


def test_download_through_hub_then_offline_reuse(tmp_path, icg_checkpoint, tokenizer_dir, tiny_clip):
    models_dir = tmp_path / "models"
    with FakeHub() as hub:
        hub.add("Anshler/clip-prefix", "flickr8k.pt", icg_checkpoint.path)
        for name in ("vocab.json", "merges.txt"):
            hub.add("openai-community/gpt2", name, tokenizer_dir / name)
        result = run("", hub.endpoint, models_dir, "-m", "captioners", "download", "clip-prefix-flickr8k")
        assert result.returncode == 0, result.stderr
        assert (models_dir / "clip_prefix" / "flickr8k.pt").read_bytes() == icg_checkpoint.path.read_bytes()
        assert (models_dir / "gpt2-tokenizer" / "vocab.json").is_file()
        assert any("flickr8k.pt" in r for r in hub.requests)

        # Once present, nothing more is asked of the hub and it runs offline.
        hub.requests.clear()
        config, weights = tiny_clip
        image = ROOT / "tests" / "_probe.png"
        from PIL import Image

        Image.new("RGB", (48, 40), "blue").save(image)
        try:
            result = run("", hub.endpoint, models_dir, "-m", "captioners", "caption", str(image), "--model",
                         "clip-prefix-flickr8k", "--clip-config", str(config), "--clip-weights", str(weights),
                         "--quiet", offline=True)
        finally:
            image.unlink()
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(" .")
        assert hub.requests == []


def test_file_missing_on_hub_is_a_clear_error(tmp_path):
    models_dir = tmp_path / "models"
    code = ("from pathlib import Path; from captioners.weights import Asset, ensure_asset\n"
            "ensure_asset(Asset('clip_prefix/x.pt', repo_id='someone/repo', repo_files=('x.pt',)), "
            f"Path({str(models_dir)!r}))")
    with FakeHub() as hub:
        result = run(code, hub.endpoint, models_dir)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "MissingWeightsError" in last and "someone/repo" in last and str(models_dir / "clip_prefix" / "x.pt") in last
    assert not (models_dir / "clip_prefix" / "x.pt").exists()
