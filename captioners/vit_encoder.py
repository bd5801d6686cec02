"""ViT image towers run by our own forward on CPUs: open_clip's (CLIP) and transformers' BLIP vision
model (FuseCap), with their own weights and operators but less memory traffic.

On a CPU most of a ViT's time is its linear layers, but the libraries' blocks also allocate a fresh
activation tensor for every operator: at batch 8, ViT-L-14's MLP output is 34 MB, above glibc's
mmap threshold, so each one is a new mapping whose pages fault in and are zeroed, block after block.
:class:`PreNormBlocks` computes the same blocks into a few buffers reused by every block:

- the QKV and MLP projections write into preallocated outputs (``addmm(..., out=)``);
- each residual add is done by the matmul itself (``x.addmm_(h, W.t())``, then the bias), so the
  residual stream is updated in place;
- attention is ``scaled_dot_product_attention`` straight on the QKV buffer's views (CPU flash
  kernel; BLIP's own attention materialises every score matrix, then its softmax);
- the activation runs in place (QuickGELU as ``x * sigmoid(1.702 x)``, GELU through ``gelu_``);
- with class-token pooling (CLIP) the last block works out the class token only: its keys and
  values need every token, but its query, attention output and MLP only the one token pooled.

Outputs equal the libraries' to fp32 rounding (the residual adds its bias after the matmul instead of
inside it; SDPA sums in another order): ``tests/test_vit_encoder.py`` checks it under every pinned
open_clip and transformers, and ``bench/bench_encoder.py`` times both side by side. Towers this
forward does not know (attention pooling, LayerScale, average pooling, ...) keep the library's own
forward (:func:`unsupported_reason`, :func:`blip_unsupported_reason` say why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

QUICK_GELU_SCALE = 1.702


@dataclass(frozen=True)
class Block:
    """One pre-norm transformer block's parts, whichever library built it:
    ``x += out(attention(norm1(x))); x += fc2(act(fc1(norm2(x))))``."""

    norm1: Callable[[torch.Tensor], torch.Tensor]
    qkv_weight: torch.Tensor            # (3 width, width): queries, keys, values
    qkv_bias: torch.Tensor
    out: torch.nn.Linear
    norm2: Callable[[torch.Tensor], torch.Tensor]
    fc1: torch.nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    fc2: torch.nn.Linear
    heads: int


class PreNormBlocks:
    """Pre-norm transformer blocks over (B, N, width) tokens, computed into reused buffers."""

    def __init__(self, blocks: list[Block]):
        self.blocks = blocks

    def __call__(self, tokens: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """The blocks' output tokens (B, N, width), or with ``class_token_only`` the class token's
        (B, width). ``tokens`` must be a fresh contiguous tensor: it is updated in place."""
        batch, length, width = tokens.shape
        rows = batch * length
        mlp_width = self.blocks[0].fc1.out_features
        # One set of buffers for every block: the point of this forward (see the module's docstring).
        qkv = tokens.new_empty(rows, 3 * width)
        hidden = tokens.new_empty(rows, mlp_width)
        scratch = tokens.new_empty(rows, mlp_width)
        x = tokens.view(rows, width)
        every_token = self.blocks[:-1] if class_token_only else self.blocks
        for block in every_token:
            attention = _attention(block, block.norm1(x), qkv, batch, length)
            _add_linear(x, block.out, attention)
            _add_mlp(x, block, hidden, scratch)
        if class_token_only:
            return _last_block_class_token(self.blocks[-1], x, batch, length)
        return tokens


def _attention(block: Block, normed: torch.Tensor, qkv: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Self-attention of every token, before the output projection: (rows, width)."""
    width = normed.shape[-1]
    torch.addmm(block.qkv_bias, normed, block.qkv_weight.t(), out=qkv)
    q, k, v = qkv.view(batch, length, 3, block.heads, width // block.heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch * length, width)


def _add_linear(x: torch.Tensor, linear: torch.nn.Linear, inputs: torch.Tensor) -> None:
    """``x += linear(inputs)``, the matmul accumulating straight into the residual stream."""
    x.addmm_(inputs, linear.weight.t()).add_(linear.bias)


def _add_mlp(x: torch.Tensor, block: Block, hidden: torch.Tensor, scratch: torch.Tensor) -> None:
    """``x += fc2(act(fc1(norm2(x))))``, the hidden activations in ``hidden`` (scratch: QuickGELU's)."""
    torch.addmm(block.fc1.bias, block.norm2(x), block.fc1.weight.t(), out=hidden)
    if _is_quick_gelu(block.act):
        torch.mul(hidden, QUICK_GELU_SCALE, out=scratch).sigmoid_()
        hidden.mul_(scratch)
    elif _is_exact_gelu(block.act):
        torch.ops.aten.gelu_(hidden)
    else:
        hidden = block.act(hidden)
    _add_linear(x, block.fc2, hidden)


def _last_block_class_token(block: Block, x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The last block for the class token alone (the only token pooled): (B, width)."""
    width = x.shape[-1]
    head_dim = width // block.heads
    normed = block.norm1(x)
    keys_values = torch.addmm(block.qkv_bias[width:], normed, block.qkv_weight[width:].t())
    k, v = keys_values.view(batch, length, 2, block.heads, head_dim).permute(2, 0, 3, 1, 4)
    class_normed = normed.view(batch, length, width)[:, 0]
    q = torch.addmm(block.qkv_bias[:width], class_normed, block.qkv_weight[:width].t())
    attention = F.scaled_dot_product_attention(q.view(batch, 1, block.heads, head_dim).transpose(1, 2), k, v)
    cls = x.view(batch, length, width)[:, 0].contiguous()
    _add_linear(cls, block.out, attention.reshape(batch, width))
    hidden = cls.new_empty(batch, block.fc1.out_features)
    _add_mlp(cls, block, hidden, torch.empty_like(hidden))
    return cls


def _is_quick_gelu(module: Any) -> bool:
    return type(module).__name__ == "QuickGELU" and type(module).__module__.startswith("open_clip")


def _is_exact_gelu(module: Any) -> bool:
    """nn.GELU() (open_clip) or transformers' GELUActivation around F.gelu (BLIP's "gelu")."""
    if isinstance(module, torch.nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu


# ---- open_clip's VisionTransformer ----------------------------------------------------------------
def unsupported_reason(visual: torch.nn.Module) -> str | None:
    """Why this open_clip image tower cannot run through :class:`OwnViTForward`, or None if it can."""
    if type(visual).__name__ != "VisionTransformer":
        return f"not a ViT ({type(visual).__name__})"
    if getattr(visual, "attn_pool", None) is not None:
        return "attention pooling"
    if getattr(visual, "input_patchnorm", False):
        return "dual patch norm"
    if getattr(visual, "global_average_pool", False) or getattr(visual, "pool_type", "tok") != "tok":
        return "not class-token pooling"
    if getattr(visual, "output_tokens", False):
        return "returns its tokens too"
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if not blocks:
        return "no transformer blocks"
    return next((reason for reason in map(_open_clip_block_reason, blocks) if reason), None)


def _open_clip_block_reason(block: torch.nn.Module) -> str | None:
    if type(block).__name__ != "ResidualAttentionBlock":
        return f"block {type(block).__name__}"
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention) or getattr(attn, "in_proj_weight", None) is None \
            or attn.in_proj_bias is None or attn.bias_k is not None:
        return "attention without one packed input projection"
    if not all(isinstance(getattr(block, name, None), torch.nn.Identity) for name in ("ls_1", "ls_2")):
        return "LayerScale"
    if list(getattr(block.mlp, "_modules", {})) != ["c_fc", "gelu", "c_proj"]:
        return "an MLP other than c_fc, activation, c_proj"
    return None


class OwnViTForward:
    """``visual(pixels)`` of a supported open_clip ViT tower (see :func:`unsupported_reason`), with its
    own weights (no copy), computed into reused buffers. Call it under ``torch.inference_mode()``."""

    def __init__(self, visual: torch.nn.Module):
        reason = unsupported_reason(visual)
        if reason:
            raise ValueError(f"open_clip's image tower is not supported by our forward: {reason}")
        self.visual = visual
        self.blocks = PreNormBlocks([
            Block(block.ln_1, block.attn.in_proj_weight, block.attn.in_proj_bias, block.attn.out_proj, block.ln_2,
                  block.mlp.c_fc, block.mlp.gelu, block.mlp.c_proj, block.attn.num_heads)
            for block in visual.transformer.resblocks])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        tokens = visual.ln_pre(visual.patch_dropout(x)).contiguous()
        pooled = visual.ln_post(self.blocks(tokens, class_token_only=True))
        return pooled @ visual.proj if visual.proj is not None else pooled


# ---- transformers' BlipVisionModel (FuseCap) ------------------------------------------------------
def blip_unsupported_reason(vision: torch.nn.Module) -> str | None:
    """Why this BLIP vision model cannot run through :class:`OwnBlipVisionForward`, or None if it can."""
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if type(vision).__name__ != "BlipVisionModel" or not layers:
        return f"not a BLIP vision model ({type(vision).__name__})"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(layer).__name__ != "BlipEncoderLayer" or not isinstance(getattr(attn, "qkv", None), torch.nn.Linear) \
                or not isinstance(getattr(attn, "projection", None), torch.nn.Linear) \
                or not all(isinstance(getattr(mlp, name, None), torch.nn.Linear) for name in ("fc1", "fc2")):
            return f"layer {type(layer).__name__} without qkv, projection, fc1, fc2"
        if attn.qkv.bias is None:
            return "attention without biases"
    return None


class OwnBlipVisionForward:
    """``vision_model(pixel_values=pixels).last_hidden_state`` of a BLIP vision model (see
    :func:`blip_unsupported_reason`), with its own weights, computed into reused buffers."""

    def __init__(self, vision: torch.nn.Module):
        reason = blip_unsupported_reason(vision)
        if reason:
            raise ValueError(f"BLIP's vision model is not supported by our forward: {reason}")
        self.vision = vision
        self.blocks = PreNormBlocks([
            Block(layer.layer_norm1, layer.self_attn.qkv.weight, layer.self_attn.qkv.bias, layer.self_attn.projection,
                  layer.layer_norm2, layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2, layer.self_attn.num_heads)
            for layer in vision.encoder.layers])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.vision.embeddings(pixels).contiguous()
        return self.vision.post_layernorm(self.blocks(tokens))
