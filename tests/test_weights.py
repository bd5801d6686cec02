"""Finding and downloading model files: the real huggingface_hub code against a loopback hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

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


CLIP_REPO = "timm/vit_large_patch14_clip_224.openai"


def serve_model_files(hub: FakeHub, checkpoint: Path, tokenizer_dir: Path, clip_weights: Path | None) -> None:
    """What the hub holds for clip-prefix-flickr8k: its checkpoint, GPT-2's tokenizer, CLIP ViT-L-14."""
    hub.add("Anshler/clip-prefix", "flickr8k.pt", checkpoint)
    for name in ("vocab.json", "merges.txt"):
        hub.add("openai-community/gpt2", name, tokenizer_dir / name)
    if clip_weights is not None:
        hub.add(CLIP_REPO, "open_clip_model.safetensors", clip_weights)


def test_download_fetches_every_file_then_the_model_runs_offline(tmp_path, icg_checkpoint, tokenizer_dir, tiny_clip):
    """`download ID` fetches the weights, the tokenizer and the CLIP weights; offline, the model then runs
    with no option naming a local file. (The tiny CLIP stands in for ViT-L-14 through a config of that
    name in a preset, so the real CLIP download code runs on a tiny file.)"""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    config, weights = tiny_clip
    stand_in = tmp_path / "ViT-L-14.json"
    stand_in.write_text(config.read_text())
    (models_dir / "presets.json").write_text(json.dumps(
        {"tiny-hub": {"base": "clip-prefix-flickr8k", "clip_config": str(stand_in)}}))
    listing = run("", "http://127.0.0.1:9", models_dir, "-m", "captioners", "models", "--json", offline=True)
    row = {r["id"]: r for r in json.loads(listing.stdout)["models"]}["clip-prefix-flickr8k"]
    assert not row["ready"] and any(CLIP_REPO in f["source"] for f in row["files"])  # CLIP is listed

    with FakeHub() as hub:
        serve_model_files(hub, icg_checkpoint.path, tokenizer_dir, weights)
        result = run("", hub.endpoint, models_dir, "-m", "captioners", "download", "tiny-hub")
        assert result.returncode == 0, result.stderr
        assert (models_dir / "clip_prefix" / "flickr8k.pt").read_bytes() == icg_checkpoint.path.read_bytes()
        assert (models_dir / "gpt2-tokenizer" / "vocab.json").is_file()
        clip_file = models_dir / "clip" / CLIP_REPO.replace("/", "--") / "open_clip_model.safetensors"
        assert clip_file.read_bytes() == weights.read_bytes()
        listing = run("", hub.endpoint, models_dir, "-m", "captioners", "models", "--json", offline=True)
        rows = {r["id"]: r for r in json.loads(listing.stdout)["models"]}
        assert rows["tiny-hub"]["ready"] and rows["clip-prefix-flickr8k"]["ready"]

        # Once present, nothing more is asked of the hub and it runs offline.
        hub.requests.clear()
        image = tmp_path / "probe.png"
        Image.new("RGB", (48, 40), "blue").save(image)
        result = run("", hub.endpoint, models_dir, "-m", "captioners", "caption", str(image), "--model", "tiny-hub",
                     "--quiet", offline=True)
        assert result.returncode == 0, result.stderr
        noise = [line for line in result.stderr.splitlines() if not line.startswith("flagged: ")]  # gate findings
        assert result.stdout.strip().endswith(" .") and noise == []
        assert hub.requests == []


def test_without_a_network_every_missing_file_is_named_at_once_without_retries(tmp_path):
    models_dir = tmp_path / "models"
    closed = "http://127.0.0.1:9"  # nothing listens there: connection refused, as with no network
    image = tmp_path / "probe.png"
    Image.new("RGB", (48, 40), "blue").save(image)
    for command in (["download", "clip-prefix-flickr8k"], ["caption", str(image), "--model", "clip-prefix-flickr8k"]):
        result = run("", closed, models_dir, "-m", "captioners", *command)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("error: Missing model files (3) of clip-prefix-flickr8k") and len(lines) == 4
        for line, name in zip(lines[1:], ("flickr8k.pt", "gpt2-tokenizer", CLIP_REPO.replace("/", "--"))):
            assert name in line and "127.0.0.1:9 cannot be reached" in line and "<- https://" in line
        assert "Retry" not in result.stderr and "Traceback" not in result.stderr


def test_earlier_caches_of_the_clip_weights_still_count(tmp_path, tiny_clip):
    """open_clip cached ViT-L-14 under <models>/clip before: hub layout (open_clip 3) or OpenAI's URL name (2.20)."""
    from captioners.clip_backbone import ClipSpec, clip_weights_asset

    _, weights = tiny_clip
    asset = clip_weights_asset(ClipSpec("ViT-L-14", "openai", quick_gelu=True))
    for cached in (f"clip/models--timm--vit_large_patch14_clip_224.openai/snapshots/{'a' * 40}/open_clip_model.safetensors",
                   "clip/ViT-L-14.pt"):
        models_dir = tmp_path / cached.replace("/", "_")
        assert not asset.is_present(models_dir)
        (models_dir / cached).parent.mkdir(parents=True)
        (models_dir / cached).write_bytes(weights.read_bytes())
        assert asset.locate(models_dir) == models_dir / cached


def test_file_missing_on_hub_is_a_clear_error(tmp_path):
    models_dir = tmp_path / "models"
    code = ("from pathlib import Path; from captioners.weights import Asset, ensure_asset\n"
            "ensure_asset(Asset('clip_prefix/x.pt', repo_id='someone/repo', repo_files=('x.pt',)), "
            f"Path({str(models_dir)!r}))")
    with FakeHub() as hub:
        result = run(code, hub.endpoint, models_dir)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "MissingWeightsError" in result.stderr and "someone/repo" in last
    assert str(models_dir / "clip_prefix" / "x.pt") in last and "not in the repository someone/repo" in last
    assert not (models_dir / "clip_prefix" / "x.pt").exists()
