"""Every published CLIP-prefix layout loads through the public loader and computes what the
reference networks compute."""

from __future__ import annotations

import pickle

import pytest
import torch

from captioners.errors import CheckpointLayoutError, UnsafeCheckpointError
from captioners.families.clipcap_modules import inspect_state_dict
from captioners.weights import load_state_dict
from tests import tiny_models

VARIANTS = {
    "icg": dict(layout="icg"),
    "rmokady-legacy": dict(layout="mlp", legacy_buffers=True),
    "no-lm-head": dict(layout="icg", drop_lm_head=True),
    "linear": dict(layout="linear", prefix_length=12),
    "transformer": dict(layout="transformer", prefix_length=4, legacy_buffers=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, assets_dir, tokenizer_dir):
    kwargs = VARIANTS[request.param]
    return request.param, tiny_models.build_checkpoint(
        assets_dir / "variants", tokenizer_dir, name=f"{request.param}.pt", stop_scale=3.0, **kwargs)


def test_key_layout_matches_published_files(assets_dir, tokenizer_dir):
    ckpt = tiny_models.build_checkpoint(assets_dir / "layout", tokenizer_dir, "icg")
    keys = set(load_state_dict(ckpt.path))
    assert {"gpt.transformer.wte.weight", "gpt.transformer.wpe.weight", "gpt.lm_head.weight",
            "gpt.transformer.h.0.attn.c_attn.weight", "gpt.transformer.h.1.mlp.c_proj.bias",
            "gpt.transformer.ln_f.weight", "clip_project.model.0.weight", "clip_project.model.2.bias"} <= keys
    # 2 embeddings + 12 tensors per block + ln_f (2) + lm_head + 4 mapping tensors, as in ICG's 153 for 12 blocks
    assert len(keys) == 2 + 12 * 2 + 2 + 1 + 4
    assert load_state_dict(ckpt.path)["gpt.transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D (in, out)


def test_layout_is_inferred_from_shapes(variant):
    name, ckpt = variant
    layout = inspect_state_dict(load_state_dict(ckpt.path))
    expected_mapping = {"icg": "mlp", "rmokady-legacy": "mlp", "no-lm-head": "mlp",
                        "linear": "linear", "transformer": "transformer"}[name]
    assert layout.mapping == expected_mapping
    assert (layout.n_embd, layout.n_layer, layout.n_positions, layout.prefix_size) == (64, 2, 128, 32)
    assert layout.prefix_length == ckpt.model.prefix_length
    assert layout.has_legacy_buffers == VARIANTS[name].get("legacy_buffers", False)
    if name == "transformer":
        assert (layout.clip_length, layout.mapper_layers, layout.mapper_hidden) == (4, 2, 128)


def test_loaded_model_computes_like_the_reference(variant, load_tiny):
    name, ckpt = variant
    captioner = load_tiny(ckpt.path)
    model = captioner.model
    torch.manual_seed(3)
    embedding = torch.randn(5, 32)
    with torch.no_grad():
        expected_prefix = ckpt.model.prefix(embedding)
        torch.testing.assert_close(model.prefix(embedding), expected_prefix, rtol=1e-5, atol=1e-5)
        tokens = torch.tensor([[1, 2, 3, 4]])
        torch.testing.assert_close(model.gpt(tokens).logits, ckpt.model.gpt(tokens).logits, rtol=1e-5, atol=1e-5)
    assert model.gpt.lm_head.weight.data_ptr() == model.gpt.transformer.wte.weight.data_ptr()


def test_conventions_follow_the_layout(assets_dir, tokenizer_dir, load_tiny):
    icg = tiny_models.build_checkpoint(assets_dir / "conv", tokenizer_dir, "icg", prefix_size=32, name="a.pt")
    legacy = tiny_models.build_checkpoint(assets_dir / "conv", tokenizer_dir, "mlp", legacy_buffers=True, name="b.pt")
    mapper = tiny_models.build_checkpoint(assets_dir / "conv", tokenizer_dir, "transformer", name="c.pt")
    assert load_tiny(icg.path).normalize is True
    assert load_tiny(legacy.path).normalize is False          # rmokady MLP: raw CLIP embedding
    assert load_tiny(mapper.path).normalize is True           # rmokady transformer: normalised
    assert load_tiny(legacy.path, normalize=True).normalize is True  # an explicit setting wins


def test_unknown_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointLayoutError, match="gpt.transformer"):
        inspect_state_dict(load_state_dict(path))


class RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_without_running(tmp_path, models_dir, clip_overrides):
    from captioners.registry import create_captioner

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"gpt.transformer.wte.weight": torch.zeros(2, 2), "payload": RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="Refused"):
        load_state_dict(evil)
    with pytest.raises(UnsafeCheckpointError):
        create_captioner(str(evil), models_dir, clip_overrides).load("cpu")  # every other file present
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    marker = tmp_path / "pwned2"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    assert not marker.exists()


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "epoch": 3}, path)
    assert set(load_state_dict(path)) == {"a"}
