"""The whole path: photos -> CLIP -> mapping -> GPT-2 -> text, in-process and on the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioners.errors import CaptionerError
from captioners.registry import available_models, create_captioner
from tests.reference_decoding import reference_greedy

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env_models_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if env_models_dir:
        env["CAPTIONERS_MODELS_DIR"] = str(env_models_dir)
    return subprocess.run([sys.executable, "-m", "captioners", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def reference_captions(checkpoint, tiny_clip, tokenizer_dir, photos):
    """Per-image pipeline as the ICG extension runs it, with the test's own reference networks."""
    import open_clip
    from safetensors.torch import load_file
    from transformers import GPT2TokenizerFast

    config, weights = tiny_clip
    open_clip.add_model_config(str(config))
    clip, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=None, force_quick_gelu=True)
    clip.load_state_dict(load_file(str(weights)))
    clip.eval()
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    captions = []
    for photo in photos:
        with torch.no_grad():
            features = clip.encode_image(preprocess(Image.open(photo).convert("RGB")).unsqueeze(0)).float()
            features /= features.norm(dim=-1, keepdim=True)
            prefix = checkpoint.model.prefix(features)[0]
        text = tokenizer.decode(reference_greedy(checkpoint.model.gpt, prefix, checkpoint.stop_token))
        captions.append(text.split(".")[0].strip() + " .")
    return captions


def test_captions_match_per_image_reference(icg_checkpoint, tiny_clip, tokenizer_dir, photos, load_tiny):
    captioner = load_tiny(icg_checkpoint.path)
    images = [Image.open(p) for p in photos]
    got = captioner.caption(images, {"strategy": "greedy"})
    assert got == reference_captions(icg_checkpoint, tiny_clip, tokenizer_dir, photos)
    assert all(c.endswith(" .") and c == c.strip() for c in got)
    assert len(set(got)) > 3, "different photos should get different captions"


def test_caption_accepts_any_image_mode(icg_checkpoint, load_tiny):
    captioner = load_tiny(icg_checkpoint.path)
    images = [Image.new("RGBA", (40, 30), (255, 0, 0, 128)), Image.new("L", (50, 50), 128),
              Image.new("P", (33, 33)), Image.new("CMYK", (64, 48))]
    assert len(captioner.caption(images)) == 4


def test_unload_frees_the_model(icg_checkpoint, load_tiny):
    captioner = load_tiny(icg_checkpoint.path)
    captioner.unload()
    assert not captioner.loaded and captioner.model is None and captioner.clip is None
    with pytest.raises(CaptionerError, match="Load .* before asking for its preprocessing"):
        captioner.preprocessor()  # the batch engine asks for it before any caption; it needs the model


def test_cli_captions_a_folder(icg_checkpoint, tiny_clip, tokenizer_dir, photos, load_tiny, tmp_path):
    config, weights = tiny_clip
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:5]:
        shutil.copy(photo, folder / photo.name)
    (folder / "notes.txt").write_text("not an image")
    common = ["--model", str(icg_checkpoint.path), "--clip-config", str(config), "--clip-weights", str(weights),
              "--tokenizer", str(tokenizer_dir), "--device", "cpu", "--batch-size", "2", "--quiet"]
    result = run_cli("caption", str(folder), *common)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [Path(path).name for path, _ in lines] == sorted(p.name for p in photos[:5])
    expected = load_tiny(icg_checkpoint.path).caption([Image.open(folder / Path(p).name) for p, _ in lines])
    assert [caption for _, caption in lines] == [" ".join(c.replace("\t", " ").splitlines()) for c in expected]

    result = run_cli("caption", str(folder / photos[0].name), *common, "--jsonl", "--strategy", "beam")
    record = json.loads(result.stdout)
    assert record["path"].endswith(photos[0].name) and record["caption"].endswith(" .")


def test_cli_reports_a_bad_image_and_goes_on(icg_checkpoint, tiny_clip, tokenizer_dir, photos, tmp_path):
    config, weights = tiny_clip
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is text, not a jpeg")
    result = run_cli("caption", str(bad), str(photos[0]), "--model", str(icg_checkpoint.path),
                     "--clip-config", str(config), "--clip-weights", str(weights), "--tokenizer", str(tokenizer_dir),
                     "--quiet")
    assert result.returncode == 1
    assert photos[0].name in result.stdout
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr


def test_cli_errors_are_one_line(tmp_path, photos):
    result = run_cli("caption", str(photos[0]), "--model", "no-such-model", env_models_dir=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: Unknown model 'no-such-model'")
    assert "Traceback" not in result.stderr

    result = run_cli("caption", str(photos[0]), "--model", "clip-prefix-flickr8k", "--quiet", env_models_dir=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    # A headline, then one line per missing file (weights, tokenizer, CLIP) with its source.
    headline, *files = message.splitlines()
    assert headline.startswith("error: Missing model files (3) of clip-prefix-flickr8k") and len(files) == 3
    assert str(tmp_path / "clip_prefix" / "flickr8k.pt") in files[0]
    assert "huggingface.co/Anshler/clip-prefix" in files[0]


def test_models_lists_presets_local_files_and_custom_presets(icg_checkpoint, tmp_path, tiny_clip, tokenizer_dir):
    models_dir = tmp_path / "models"
    (models_dir / "clip_prefix").mkdir(parents=True)
    shutil.copy(icg_checkpoint.path, models_dir / "clip_prefix" / "my_model.pt")
    shutil.copy(icg_checkpoint.path, models_dir / "clip_prefix" / "flickr8k.pt")  # a preset's own file
    config, weights = tiny_clip
    (models_dir / "presets.json").write_text(json.dumps({
        "tiny-custom": {"family": "clip-prefix", "weights": "clip_prefix/my_model.pt", "clip_config": str(config),
                        "clip_weights": str(weights), "tokenizer": str(tokenizer_dir),
                        "decoding": {"strategy": "beam", "num_beams": 3}, "description": "my tiny model"}}))
    result = run_cli("models", "--json", env_models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    listing = {row["id"]: row for row in json.loads(result.stdout)["models"]}
    for model_id in ("clip-prefix-flickr8k", "clip-prefix-flickr8k-gradient", "clip-prefix-flickr30k",
                     "clip-prefix-flickr30k-gradient", "clipcap-coco", "clipcap-conceptual",
                     "clipcap-coco-transformer", "local:my_model", "tiny-custom"):
        assert model_id in listing
    assert "local:flickr8k" not in listing
    assert listing["clip-prefix-flickr8k"]["files"][0]["present"] is True
    assert listing["clip-prefix-flickr30k"]["files"][0]["present"] is False
    assert "Anshler/clip-prefix" in listing["clip-prefix-flickr30k"]["files"][0]["source"]

    assert str(config) in [f["path"] for f in listing["tiny-custom"]["files"]]  # its CLIP config is a file it needs
    assert listing["tiny-custom"]["ready"]
    spec = available_models(models_dir)["tiny-custom"]
    assert spec.decoding.strategy == "beam" and spec.decoding.num_beams == 3
    captioner = create_captioner("tiny-custom", models_dir).load("cpu")
    assert captioner.caption([Image.new("RGB", (64, 64), "white")])[0].endswith(" .")

    text = run_cli("models", env_models_dir=models_dir).stdout
    assert "clipcap-coco-transformer" in text and "drive.google.com" in text


def test_convert_writes_safetensors_that_give_the_same_captions(icg_checkpoint, tmp_path, load_tiny, photos):
    legacy = tmp_path / "legacy.pt"
    state = torch.load(icg_checkpoint.path, weights_only=True)
    state["gpt.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, legacy)
    result = run_cli("convert", str(legacy))
    assert result.returncode == 0, result.stderr
    converted = legacy.with_suffix(".safetensors")
    assert converted.is_file()
    images = [Image.open(p) for p in photos[:3]]
    assert load_tiny(converted).caption(images) == load_tiny(icg_checkpoint.path).caption(images)
