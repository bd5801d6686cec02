"""Our own ViT image forwards (captioners/vit_encoder.py) against open_clip's and transformers' BLIP's,
under every pinned open_clip and transformers."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIPVisionCfg

from captioners.clip_backbone import ClipBackbone, ClipSpec
from captioners.vit_encoder import OwnBlipVisionForward, OwnViTForward, blip_unsupported_reason, unsupported_reason

TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
VISION_FIELDS = set(CLIPVisionCfg.__dataclass_fields__)


def tiny_clip(quick_gelu: bool = True, **vision) -> open_clip.CLIP:
    torch.manual_seed(0)
    cfg = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16, **vision}
    return open_clip.CLIP(embed_dim=24, vision_cfg=cfg, text_cfg=TEXT, quick_gelu=quick_gelu).eval()


def average_pooling() -> dict:
    """Average pooling, spelled as this open_clip spells it (3.x: pool_type; 2.20: a flag)."""
    return {"pool_type": "avg"} if "pool_type" in VISION_FIELDS else {"global_average_pool": True}


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["QuickGELU", "GELU"])
@pytest.mark.parametrize("batch", [1, 3])
def test_own_forward_gives_open_clips_embeddings(quick_gelu, batch):
    model = tiny_clip(quick_gelu)
    assert unsupported_reason(model.visual) is None
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = pixels.clone()
    with torch.inference_mode():
        want = model.encode_image(pixels)
        got = OwnViTForward(model.visual)(pixels)
        again = OwnViTForward(model.visual)(pixels)
    assert got.shape == want.shape == (batch, 24) and want.abs().max() > 0.5  # not a model of zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # fp32 rounding, nothing more
    assert torch.equal(got, again)
    assert torch.equal(pixels, kept)  # the in-place work never touches its input ...
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ... or the weights


def test_full_size_vit_l_14_to_fp32_rounding():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True).eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model.encode_image(pixels)
        got = OwnViTForward(model.visual)(pixels)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("vision, reason", [
    ({"ls_init_value": 0.1}, "LayerScale"),
    (average_pooling(), "not class-token pooling"),
    ({"attentional_pool": True}, "attention pooling"),
], ids=["layer-scale", "average-pool", "attention-pool"])
def test_towers_it_does_not_know_keep_open_clips_forward(vision, reason, tmp_path):
    model = tiny_clip(**vision)
    assert unsupported_reason(model.visual) == reason
    with pytest.raises(ValueError, match=reason):
        OwnViTForward(model.visual)
    backbone = ClipBackbone(model, None, None, ClipSpec())
    assert backbone.own_vit is None
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.encode_images(pixels, normalize=False), model.encode_image(pixels))
    resnet = open_clip.CLIP(embed_dim=24, vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
                            text_cfg=TEXT)
    assert unsupported_reason(resnet.visual) == "not a ViT (ModifiedResNet)"


def test_the_backbone_encodes_with_our_forward_on_a_cpu(monkeypatch):
    model = tiny_clip()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want = model.encode_image(pixels)
    backbone = ClipBackbone(model, None, None, ClipSpec())

    def open_clips_forward(*_args, **_kwargs):
        raise AssertionError("open_clip's encode_image ran on a CPU")

    monkeypatch.setattr(model, "encode_image", open_clips_forward)
    got = backbone.encode_images(pixels, normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---- BLIP's vision model (FuseCap) -------------------------------------------------------------------
def tiny_blip_vision():
    from transformers import BlipVisionConfig, BlipVisionModel

    torch.manual_seed(0)
    config = BlipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    vision = BlipVisionModel(config).eval()
    with torch.no_grad():  # explicit weights: some transformers releases leave a bare model's at zero
        for name, parameter in vision.named_parameters():
            norm_scale = "norm" in name and name.endswith("weight")
            parameter.copy_(1 + 0.1 * torch.randn_like(parameter) if norm_scale else 0.2 * torch.randn_like(parameter))
    return vision


@pytest.mark.parametrize("batch", [1, 3])
def test_own_blip_forward_gives_transformers_tokens(batch):
    vision = tiny_blip_vision()
    assert blip_unsupported_reason(vision) is None
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kept = pixels.clone()
    with torch.inference_mode():
        want = vision(pixel_values=pixels)[0]
        got = OwnBlipVisionForward(vision)(pixels)
    assert got.shape == want.shape == (batch, 17, 48) and want.abs().max() > 1  # not a model of zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(pixels, kept)


def test_fusecap_encodes_with_our_forward_on_a_cpu(tmp_path, models_dir, monkeypatch):
    from captioners.registry import create_captioner
    from tests import tiny_blip

    folder = tmp_path / "blip"
    tiny_blip.build_blip(folder, weights="safetensors")
    captioner = create_captioner("fusecap", models_dir, {"weights": str(folder)}).load("cpu")
    vision = captioner.model.vision_model
    pixels = torch.randn(3, 3, vision.config.image_size, vision.config.image_size)
    with torch.inference_mode():
        want = vision(pixel_values=pixels)[0]

    def transformers_forward(*_args, **_kwargs):
        raise AssertionError("transformers' vision forward ran on a CPU")

    monkeypatch.setattr(vision, "forward", transformers_forward)
    with torch.inference_mode():
        got = captioner.encode_images(pixels)
    assert want.abs().max() > 0.1  # the tiny model's tokens are not all zero
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert blip_unsupported_reason(torch.nn.Linear(2, 2)) == "not a BLIP vision model (Linear)"
