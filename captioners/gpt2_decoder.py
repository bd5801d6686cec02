"""GPT-2 forward passes with a preallocated KV cache, run on a loaded GPT2LMHeadModel's own modules.

Why not ``model(..., past_key_values=...)``: transformers changes its cache API from release to
release (tuple caches are gone in 5.x, ``past_key_values`` became ``cache`` in 5.2x with a
FutureWarning at every step, and the old name goes away in 5.40), while the WebUIs pin 4.30.2,
4.46.1 and 4.57.6. This module calls only the model's submodules (embeddings, layer norms, the
Conv1D projections, the MLP's activation, the LM head), whose behaviour has not changed across
those releases, and keeps the keys and values itself. No weight is copied.

Cache layout: per layer one key and one value buffer of shape (rows, heads, capacity, head_dim),
capacity = prefix length + the number of tokens that will be fed later. Every row writes its
next key/value at the same cache index (``KVCache.length``); rows whose prompts are shorter are
left-padded, and ``KVCache.valid`` masks their padding. Finished rows leave, and beams or guidance
twins are repeated, with :meth:`KVCache.select` (``index_select`` over the rows).

:class:`StaticSteps` is the same step for CUDA graphs: the rows stay, the cache index lives on the
device, and attention runs over the whole buffer with the unwritten part masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn import functional as F

from captioners.cuda_graphs import GraphedCall
from captioners.errors import CaptionerError


class UnsupportedModelError(CaptionerError):
    """The language model is not a GPT-2 whose blocks this decoder knows how to run."""


@dataclass
class KVCache:
    """Keys and values of every row, written up to cache index ``length`` (the same for all rows)."""

    keys: list[torch.Tensor]      # per layer: (rows, heads, capacity, head_dim)
    values: list[torch.Tensor]    # per layer: (rows, heads, capacity, head_dim)
    length: int                   # cache positions written so far
    positions: torch.Tensor       # (rows,) position id of each row's next token
    valid: torch.Tensor | None    # (rows, capacity) False at left padding; None when no row is padded
    # The buffers a select() left, reused by the next select() of as many rows: beam search
    # reorders its rows at every step, and allocating fresh buffers each time cost as much as
    # the copy on a CPU. Old and new buffers coexist during a copy anyway, so peak memory is the same.
    spare: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.positions.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def select(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the rows given by ``index``, in that order. Only the written part of
        each buffer is copied."""
        index = index.to(self.positions.device)
        rows, layers = index.shape[0], len(self.keys)
        old = self.keys + self.values
        targets = self.spare if self.spare and self.spare[0].shape[0] == rows else [None] * len(old)
        new = [_select_rows(buffer, index, self.length, out) for buffer, out in zip(old, targets)]
        self.keys, self.values = new[:layers], new[layers:]
        self.spare = old if self.positions.shape[0] == rows else []
        self.positions = self.positions.index_select(0, index)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, index)


def _select_rows(buffer: torch.Tensor, index: torch.Tensor, length: int, out: torch.Tensor | None) -> torch.Tensor:
    """Rows ``index`` of ``buffer``'s first ``length`` cache positions, written into ``out`` (or a new buffer)."""
    selected = buffer.new_empty((index.shape[0], *buffer.shape[1:])) if out is None else out
    torch.index_select(buffer[:, :, :length], 0, index, out=selected[:, :, :length])
    return selected


class GPT2Decoder:
    """Prefix and single-token steps of a transformers GPT2LMHeadModel (eval mode: no dropout).

    Honours the config flags that change the math: ``scale_attn_weights``,
    ``scale_attn_by_inverse_layer_idx`` and ``reorder_and_upcast_attn`` (attention computed in
    float32); ``layer_norm_epsilon`` and ``activation_function`` live in the modules it calls.
    """

    def __init__(self, gpt: Any):
        check_gpt2(gpt)
        config = gpt.config
        self.transformer, self.lm_head = gpt.transformer, gpt.lm_head
        self.width = int(config.n_embd)
        self.heads = int(config.n_head)
        self.head_dim = self.width // self.heads
        self.n_positions = int(config.n_positions)
        self.upcast = bool(getattr(config, "reorder_and_upcast_attn", False))
        self.query_scales = [_query_scale(config, self.head_dim, i) for i in range(len(self.transformer.h))]

    def start(self, embeds: torch.Tensor, room: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Run the (rows, length, width) prefix; the cache gets room for ``room`` more tokens.

        ``valid``: (rows, length) bool, False at each row's left padding; None when there is none.
        Returns the float32 logits of the token after the prefix, (rows, vocab), and the cache.
        """
        rows, length, _ = embeds.shape
        capacity = length + max(0, room)
        if capacity > self.n_positions:  # a cache index is never smaller than its row's position
            raise ValueError(f"{length} prefix positions + {room} new tokens exceed GPT-2's {self.n_positions}")
        device = embeds.device
        shape = (rows, self.heads, capacity, self.head_dim)
        cache = KVCache(keys=[embeds.new_empty(shape) for _ in self.transformer.h],
                        values=[embeds.new_empty(shape) for _ in self.transformer.h],
                        length=0, positions=torch.full((rows,), length, dtype=torch.long, device=device), valid=None)
        if valid is None:
            positions = torch.arange(length, device=device)[None]
            mask = None
        else:
            valid = valid.to(device=device, dtype=torch.bool)
            positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            cache.positions = valid.long().sum(dim=1)
            cache.valid = torch.cat((valid, valid.new_ones((rows, capacity - length))), dim=1)
            mask = _padded_causal_mask(valid)
        hidden = embeds + self.transformer.wpe(positions)
        return self._forward(hidden, cache, mask, causal=valid is None), cache

    def step(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (rows,); returns the float32 logits of the next, (rows, vocab)."""
        if cache.length >= cache.capacity:
            raise ValueError(f"the KV cache is full ({cache.capacity} positions)")
        hidden = self.transformer.wte(tokens) + self.transformer.wpe(cache.positions)
        mask = None if cache.valid is None else cache.valid[:, None, None, : cache.length + 1]
        logits = self._forward(hidden[:, None], cache, mask, causal=False)
        cache.positions = cache.positions + 1
        return logits

    def _forward(self, hidden: torch.Tensor, cache: KVCache, mask: torch.Tensor | None, causal: bool,
                 at: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks and the LM head. ``at`` (static steps): the (1,) cache index to write, on the
        device; attention then spans the whole buffer and ``cache.length`` is left alone."""
        for index, block in enumerate(self.transformer.h):
            hidden = self._block(index, block, hidden, cache, mask, causal, at)
        if at is None:
            cache.length += hidden.shape[1]
        # Only the last position's logits are needed: the LM head is the largest matmul of a step.
        return self.lm_head(self.transformer.ln_f(hidden[:, -1])).float()

    def _block(self, index: int, block: Any, hidden: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
               causal: bool, at: torch.Tensor | None) -> torch.Tensor:
        query, key, value = block.attn.c_attn(block.ln_1(hidden)).split(self.width, dim=2)
        keys, values = cache.keys[index], cache.values[index]
        if at is None:
            start, end = cache.length, cache.length + hidden.shape[1]
            keys[:, :, start:end] = self._split_heads(key)
            values[:, :, start:end] = self._split_heads(value)
            keys, values = keys[:, :, :end], values[:, :, :end]
        else:
            keys.index_copy_(2, at, self._split_heads(key))
            values.index_copy_(2, at, self._split_heads(value))
        attended = self._attend(index, self._split_heads(query), keys, values, mask, causal)
        hidden = block.attn.c_proj(attended) + hidden
        return block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(hidden)))) + hidden

    def _attend(self, index: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        dtype = query.dtype
        if self.upcast:  # reorder_and_upcast_attn: scores and softmax in float32, as transformers does
            query, keys, values = query.float(), keys.float(), values.float()
        scale = self.query_scales[index]
        if scale != 1.0:  # scaling the query keeps SDPA's default scale, so any torch >= 2.0 runs it
            query = query * scale
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal)
        rows, _, length, _ = out.shape
        return out.to(dtype).transpose(1, 2).reshape(rows, length, self.width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, _ = x.shape
        return x.view(rows, length, self.heads, self.head_dim).transpose(1, 2)


class StaticSteps:
    """Single-token steps over a fixed set of rows, whose every input and piece of state is a tensor
    on the device: nothing is read back to the host and no shape changes from step to step, so on
    CUDA the step is recorded once as a CUDA graph and replayed (``--cuda-graphs``); elsewhere it
    runs as it is (what the tests compare with :meth:`GPT2Decoder.step`).

    The cache index and the positions advance inside the step; the keys and values are written at
    the index with ``index_copy_`` and every step attends over the whole buffer, its unwritten part
    (and any row's left padding) masked. The cache belongs to this object from then on (no
    ``select``: finished rows stay and are ignored).
    """

    def __init__(self, decoder: GPT2Decoder, cache: KVCache,
                 graphed: Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]] | None = None):
        device = cache.positions.device
        self.decoder, self.cache = decoder, cache
        for buffer in cache.keys + cache.values:  # masked, but a masked NaN still gives 0 * NaN = NaN
            buffer[:, :, cache.length:].zero_()
        self.tokens = torch.zeros(cache.rows, dtype=torch.long, device=device)
        self.length = torch.tensor([cache.length], device=device)
        self.positions = cache.positions.clone()
        self.valid = cache.valid if cache.valid is not None else \
            torch.ones(cache.rows, cache.capacity, dtype=torch.bool, device=device)
        self.slots = torch.arange(cache.capacity, device=device)
        self.room = cache.capacity - cache.length
        if graphed is None:
            graphed = GraphedCall if device.type == "cuda" else (lambda step: step)
        self.run = graphed(self._step)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (rows,); returns the float32 logits of the next, (rows, vocab),
        in a buffer that the next call overwrites."""
        if self.room <= 0:
            raise ValueError(f"the KV cache is full ({self.cache.capacity} positions)")
        self.room -= 1
        self.tokens.copy_(tokens)
        return self.run()

    def _step(self) -> torch.Tensor:
        transformer = self.decoder.transformer
        hidden = transformer.wte(self.tokens) + transformer.wpe(self.positions)
        mask = (self.valid & (self.slots <= self.length))[:, None, None]
        logits = self.decoder._forward(hidden[:, None], self.cache, mask, causal=False, at=self.length)
        self.positions += 1
        self.length += 1
        return logits


def _query_scale(config: Any, head_dim: int, layer: int) -> float:
    """Factor on the query that turns SDPA's 1/sqrt(head_dim) into GPT-2's attention scale."""
    scale = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    return 1.0 if scale == head_dim ** -0.5 else scale * math.sqrt(head_dim)


def _padded_causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """(rows, 1, length, length) bool: causal, padding keys hidden. A padding query still sees
    itself, so its softmax has one key and stays finite (an all-masked row would give NaN)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, :] | itself)[:, None]


def check_gpt2(gpt: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless ``gpt`` is a GPT-2 LM with the modules and shapes used here."""
    transformer, config = getattr(gpt, "transformer", None), getattr(gpt, "config", None)
    parts = ("wte", "wpe", "h", "ln_f")
    if config is None or transformer is None or not hasattr(gpt, "lm_head") or \
            not all(hasattr(transformer, part) for part in parts):
        raise UnsupportedModelError(f"{type(gpt).__name__} is not a GPT-2 language model (GPT2LMHeadModel): "
                                    "no transformer.wte/wpe/h/ln_f and lm_head.")
    width, heads = int(config.n_embd), int(config.n_head)
    if width % heads:
        raise UnsupportedModelError(f"GPT-2 width {width} is not divisible by its {heads} heads.")
    for index, block in enumerate(transformer.h):
        _check_block(index, block, width)


def _check_block(index: int, block: Any, width: int) -> None:
    try:
        attn, mlp = block.attn, block.mlp
        # Conv1D stores its weight as [in, out]; a Linear ([out, in]) would silently compute garbage.
        shapes = {"attn.c_attn": tuple(attn.c_attn.weight.shape), "attn.c_proj": tuple(attn.c_proj.weight.shape),
                  "mlp.c_fc": tuple(mlp.c_fc.weight.shape), "mlp.c_proj": tuple(mlp.c_proj.weight.shape)}
        modules = (block.ln_1, block.ln_2, mlp.act)
    except AttributeError as error:
        raise UnsupportedModelError(f"GPT-2 block {index} lacks a module this decoder runs: {error}") from None
    inner = shapes["mlp.c_fc"][-1]
    expected = {"attn.c_attn": (width, 3 * width), "attn.c_proj": (width, width), "mlp.c_fc": (width, inner),
                "mlp.c_proj": (inner, width)}
    wrong = [f"{name} {shapes[name]}" for name in expected if shapes[name] != expected[name]]
    if wrong:
        raise UnsupportedModelError(f"GPT-2 block {index} has unexpected weight shapes ({', '.join(wrong)}): "
                                    f"expected GPT-2's Conv1D layout, weight [in, out], width {width}.")
    if not all(callable(module) for module in modules):
        raise UnsupportedModelError(f"GPT-2 block {index}: ln_1, ln_2 or mlp.act cannot be called.")
