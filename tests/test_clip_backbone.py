"""CLIP from local files: safetensors, a plain state dict, and OpenAI-style TorchScript archives."""

from __future__ import annotations

import open_clip
import pytest
import torch

from captioners.clip_backbone import ClipSpec, load_clip
from captioners.errors import CaptionerError, MissingWeightsError


@pytest.fixture(scope="module")
def reference_clip(tiny_clip):
    config, weights = tiny_clip
    from safetensors.torch import load_file

    open_clip.add_model_config(str(config))
    model = open_clip.create_model(config.stem, pretrained=None, force_quick_gelu=True).eval()
    model.load_state_dict(load_file(str(weights)))
    return model


def encode(backbone, pixels):
    return backbone.encode_images(pixels, normalize=False)


@pytest.mark.parametrize("kind", ["safetensors", "state-dict-pt", "torchscript"])
def test_local_clip_files_load_the_same_weights(kind, tiny_clip, reference_clip, tmp_path, models_dir):
    config, weights = tiny_clip
    path = weights
    if kind == "state-dict-pt":
        path = tmp_path / "clip.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference_clip.state_dict().items()}}, path)
    elif kind == "torchscript":
        path = tmp_path / "clip-jit.pt"
        image = torch.randn(1, 3, 32, 32)
        text = open_clip.get_tokenizer(config.stem)(["a photo"])
        torch.jit.trace(reference_clip, (image, text), strict=False, check_trace=False).save(str(path))
    backbone = load_clip(ClipSpec(config.stem, str(path), str(config)), models_dir, torch.device("cpu"), torch.float32)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encode(backbone, pixels), reference_clip.encode_image(pixels).float())
    texts = backbone.encode_texts(["a dog", "a cat", "a city street"])
    assert texts.shape == (3, 32)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))


def test_missing_clip_file_and_unknown_arch_are_clear(tiny_clip, models_dir):
    config, _ = tiny_clip
    with pytest.raises(MissingWeightsError, match="not found"):
        load_clip(ClipSpec(config.stem, "/nonexistent/clip.safetensors", str(config)), models_dir,
                  torch.device("cpu"), torch.float32)
    with pytest.raises(CaptionerError, match="no CLIP architecture"):
        load_clip(ClipSpec("No-Such-Arch", "openai"), models_dir, torch.device("cpu"), torch.float32)


def test_pretrained_tag_offline_is_a_clear_error(models_dir):
    with pytest.raises(MissingWeightsError) as info:
        load_clip(ClipSpec("ViT-B-32", "openai"), models_dir, torch.device("cpu"), torch.float32)
    assert "--clip-weights" in str(info.value) and str(models_dir / "clip") in str(info.value)


def test_a_torchscript_clip_is_read_without_torch_jit(tiny_clip, reference_clip, tmp_path, models_dir, monkeypatch):
    config, _ = tiny_clip
    path = tmp_path / "clip-jit.pt"
    text = open_clip.get_tokenizer(config.stem)(["a photo"])
    torch.jit.trace(reference_clip, (torch.randn(1, 3, 32, 32), text), strict=False, check_trace=False).save(str(path))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    backbone = load_clip(ClipSpec(config.stem, str(path), str(config)), models_dir, torch.device("cpu"), torch.float32)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encode(backbone, pixels), reference_clip.encode_image(pixels).float())


def test_a_torchscript_clip_whose_code_writes_a_file_never_runs(tiny_clip, icg_checkpoint, tokenizer_dir, photos,
                                                                tmp_path, capsys):
    from captioners import cli
    from tests.test_torch_archive import _EvilParent

    marker = tmp_path / "pwned"
    evil = tmp_path / "ViT-L-14.pt"
    torch.jit.script(_EvilParent(str(marker))).save(str(evil))
    config, _ = tiny_clip
    code = cli.main(["caption", str(photos[0]), "--model", str(icg_checkpoint.path), "--clip-config", str(config),
                     "--clip-weights", str(evil), "--tokenizer", str(tokenizer_dir), "--models-dir",
                     str(tmp_path / "models"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and str(evil) in err


def test_quick_gelu_follows_the_config_and_openai_presets_keep_it(tiny_clip, tmp_path, models_dir):
    """QuickGELU was forced for every CLIP; now a custom config's own value holds, and only OpenAI's
    weights (the presets) force it."""
    import json

    from captioners.clip_backbone import resolved_quick_gelu
    from captioners.registry import get_spec

    config, weights = tiny_clip
    plain = tmp_path / "tiny-gelu-clip.json"  # the same network without "quick_gelu": plain GELU
    plain.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "quick_gelu"}))
    open_clip.add_model_config(str(plain))
    from safetensors.torch import load_file

    references = {}
    for forced in (False, True):
        model = open_clip.create_model(plain.stem, pretrained=None, force_quick_gelu=forced).eval()
        model.load_state_dict(load_file(str(weights)))
        references[forced] = model
    backbone = load_clip(ClipSpec(plain.stem, str(weights), str(plain)), models_dir, torch.device("cpu"), torch.float32)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = encode(backbone, pixels)
        torch.testing.assert_close(got, references[False].encode_image(pixels).float())
        assert not torch.allclose(got, references[True].encode_image(pixels).float(), atol=1e-4)

    icg = get_spec("clip-prefix-flickr8k", models_dir).config.clip
    assert resolved_quick_gelu(icg) is True  # OpenAI's ViT-L-14
    assert resolved_quick_gelu(icg.with_overrides({"clip_weights": str(weights)})) is True  # a copy of it
    assert resolved_quick_gelu(icg.with_overrides({"clip_config": str(plain)})) is False  # its own config
    assert resolved_quick_gelu(get_spec("sbg-flickr8k", models_dir).config.clip) is True
