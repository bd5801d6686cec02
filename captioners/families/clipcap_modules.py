"""ClipCap networks and checkpoint layout detection.

Module attribute names mirror the published checkpoints exactly (``clip_project.model.0``,
``clip_project.transformer.layers.N.attn.to_keys_values`` ...), so their state dicts load as they are.
Sizes are read from tensor shapes; nothing is downloaded to build the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from captioners.errors import CheckpointLayoutError

LEGACY_BUFFER = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class MLP(nn.Module):
    """Linear - Tanh - Linear (keys ``model.0`` and ``model.2``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MultiHeadAttention(nn.Module):
    """Self-attention with fused key/value projection laid out as [keys; values]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        queries = self.to_queries(x).view(batch, length, heads, head_dim)
        keys_values = self.to_keys_values(x).view(batch, length, 2, heads, head_dim)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        weights = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale
        weights = weights.softmax(dim=2)  # over the keys
        out = torch.einsum("bnmh,bmhd->bnhd", weights, values).reshape(batch, length, dim)
        return self.project(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm residual block: attention, then feed-forward."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads, hidden) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """CLIP vector -> ``clip_length`` tokens, joined by learned constants, mapped to a prefix."""

    def __init__(self, prefix_size: int, embed_dim: int, prefix_length: int, clip_length: int,
                 num_layers: int, hidden: int, num_heads: int = 8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(embed_dim, num_heads, num_layers, hidden)
        self.linear = nn.Linear(prefix_size, clip_length * embed_dim)
        self.prefix_const = nn.Parameter(torch.zeros(prefix_length, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        constants = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat((x, constants), dim=1))[:, self.clip_length:]


@dataclass(frozen=True)
class ClipPrefixLayout:
    """Everything about a checkpoint that its tensor shapes tell."""

    mapping: str  # mlp | linear | transformer
    vocab_size: int
    n_embd: int
    n_positions: int
    n_layer: int
    n_inner: int
    prefix_size: int
    prefix_length: int
    clip_length: int = 0
    mapper_layers: int = 0
    mapper_hidden: int = 0
    mlp_hidden: int = 0
    has_legacy_buffers: bool = False
    has_lm_head: bool = True

    @property
    def family_guess(self) -> str:
        """Which publisher's conventions the file most likely follows."""
        if self.mapping == "transformer":
            return "clipcap-transformer"
        # rmokady's MLP files use ViT-B/32 (512-d) and were saved with old GPT-2 buffers; ICG's were not.
        return "clipcap-mlp" if self.has_legacy_buffers or self.prefix_size == 512 else "icg"


def inspect_state_dict(state: Mapping[str, torch.Tensor]) -> ClipPrefixLayout:
    def shape(key: str) -> torch.Size:
        if key not in state:
            raise CheckpointLayoutError(
                f"Not a CLIP-prefix (ClipCap) checkpoint: key {key!r} is missing. Expected keys "
                "'gpt.transformer.*' and 'clip_project.*'.")
        return state[key].shape

    vocab_size, n_embd = shape("gpt.transformer.wte.weight")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.", k))}
    if not layers:
        raise CheckpointLayoutError("Not a CLIP-prefix checkpoint: no GPT-2 blocks 'gpt.transformer.h.N.*'.")
    common = dict(
        vocab_size=vocab_size, n_embd=n_embd, n_positions=shape("gpt.transformer.wpe.weight")[0],
        n_layer=max(layers) + 1, n_inner=shape("gpt.transformer.h.0.mlp.c_fc.weight")[1],
        has_legacy_buffers=any(LEGACY_BUFFER.match(k) for k in state),
        has_lm_head="gpt.lm_head.weight" in state)

    if "clip_project.model.0.weight" in state:
        hidden, prefix_size = shape("clip_project.model.0.weight")
        out = shape("clip_project.model.2.weight")[0]
        return ClipPrefixLayout("mlp", prefix_size=prefix_size, prefix_length=_div(out, n_embd),
                                mlp_hidden=hidden, **common)
    if "clip_project.weight" in state:
        out, prefix_size = shape("clip_project.weight")
        return ClipPrefixLayout("linear", prefix_size=prefix_size, prefix_length=_div(out, n_embd), **common)
    if "clip_project.prefix_const" in state:
        out, prefix_size = shape("clip_project.linear.weight")
        mapper_layers = {int(m.group(1)) for k in state
                         if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))}
        return ClipPrefixLayout(
            "transformer", prefix_size=prefix_size, prefix_length=shape("clip_project.prefix_const")[0],
            clip_length=_div(out, n_embd), mapper_layers=max(mapper_layers, default=-1) + 1,
            mapper_hidden=shape("clip_project.transformer.layers.0.mlp.fc1.weight")[0], **common)
    raise CheckpointLayoutError(
        "Unknown mapping network: expected 'clip_project.model.0.weight' (MLP), 'clip_project.weight' "
        "(Linear) or 'clip_project.prefix_const' (transformer mapper).")


def _div(total: int, part: int) -> int:
    if total % part:
        raise CheckpointLayoutError(f"Mapping output size {total} is not a multiple of GPT-2 width {part}.")
    return total // part


def build_mapping(layout: ClipPrefixLayout, mapper_heads: int) -> nn.Module:
    out = layout.n_embd * layout.prefix_length
    if layout.mapping == "mlp":
        return MLP(layout.prefix_size, layout.mlp_hidden, out)
    if layout.mapping == "linear":
        return nn.Linear(layout.prefix_size, out)
    return TransformerMapper(layout.prefix_size, layout.n_embd, layout.prefix_length, layout.clip_length,
                             layout.mapper_layers, layout.mapper_hidden, mapper_heads)


class ClipPrefixModel(nn.Module):
    """``gpt`` (GPT2LMHeadModel) + ``clip_project`` (mapping network), as in the checkpoints."""

    def __init__(self, layout: ClipPrefixLayout, gpt_heads: int | None = None, mapper_heads: int = 8):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        heads = gpt_heads or max(1, layout.n_embd // 64)
        if layout.n_embd % heads:
            raise CheckpointLayoutError(f"GPT-2 width {layout.n_embd} is not divisible by {heads} heads; set gpt_heads.")
        config = GPT2Config(vocab_size=layout.vocab_size, n_positions=layout.n_positions, n_embd=layout.n_embd,
                            n_layer=layout.n_layer, n_head=heads, n_inner=layout.n_inner,
                            bos_token_id=layout.vocab_size - 1, eos_token_id=layout.vocab_size - 1)
        self.layout = layout
        self.gpt = GPT2LMHeadModel(config)
        self.clip_project = build_mapping(layout, mapper_heads)

    def load_checkpoint(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict load after the two known benign differences: legacy buffers and a tied lm_head."""
        state = {k: v for k, v in state.items() if not LEGACY_BUFFER.match(k)}
        if "gpt.lm_head.weight" not in state:
            state["gpt.lm_head.weight"] = state["gpt.transformer.wte.weight"]
        expected = set(self.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise CheckpointLayoutError(
                f"Checkpoint does not match the detected {self.layout.mapping} layout: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
        self.load_state_dict(state, strict=True)
        self.gpt.tie_weights()

    def prefix(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, prefix_size) float32 -> (B, prefix_length, n_embd) in the model's dtype."""
        dtype = self.clip_project_dtype
        prefix = self.clip_project(clip_embeddings.to(dtype))
        return prefix.view(clip_embeddings.shape[0], self.layout.prefix_length, self.layout.n_embd)

    @property
    def clip_project_dtype(self) -> torch.dtype:
        return next(self.clip_project.parameters()).dtype
