"""Sampling inside transformers' ``generate`` whose draws do not depend on the batch.

``generate(do_sample=True)`` draws every row from torch's global generator, so a row's text
changes with whatever else shares its batch. :class:`RowSampler` is a logits processor that draws
each row's token itself, by inverse CDF with one uniform number per row and step from that row's
own ``torch.Generator``, and hands ``generate`` a distribution with all mass on that token, which
greedy decoding then takes. The same seed thus gives the same text alone or in any batch, on any
transformers version. Without a seed the uniforms come from torch's global generator.
"""

from __future__ import annotations

from typing import Sequence

import torch

try:
    from transformers import LogitsProcessor
except ImportError:  # pragma: no cover - transformers is a dependency
    LogitsProcessor = object


def row_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th sample stream of a caption (SBG draws several candidates per image)."""
    return (seed * 1_000_003 + index) % (2**63)


def row_generators(seed: int | None, streams: Sequence[int]) -> list[torch.Generator] | None:
    """One CPU generator per row, row ``i`` using stream ``streams[i]``; ``None`` without a seed."""
    if seed is None:
        return None
    return [torch.Generator().manual_seed(row_seed(seed, stream)) for stream in streams]


def repetition_penalised(scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``repetition_penalty`` (CTRL's) on the scores of already-seen tokens: divided
    by ``penalty`` where positive, multiplied where negative."""
    return torch.where(scores < 0, scores * penalty, scores / penalty)


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, top_k: int | None = None,
                       top_p: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """(rows, vocab) logits and (rows,) numbers in [0, 1) -> (rows,) sampled token ids.

    Temperature, then top-k, then nucleus (top-p) filtering, as transformers orders its warpers;
    then the token whose cumulative probability first exceeds the uniform number.
    """
    logits = logits.float() / temperature
    k = logits.shape[-1] if not top_k else min(top_k, logits.shape[-1])
    values, indices = logits.topk(k, dim=-1)  # sorted, most likely first
    probs = values.softmax(dim=-1)
    if top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
    cumulative = probs.cumsum(dim=-1)
    threshold = uniforms.to(cumulative.device, cumulative.dtype)[:, None] * cumulative[:, -1:]
    pick = (cumulative <= threshold).sum(dim=-1).clamp(max=k - 1)
    return indices.gather(-1, pick[:, None]).squeeze(-1)


class RowSampler(LogitsProcessor):
    """Logits processor for ``generate(do_sample=False)`` that samples each row from its own generator."""

    def __init__(self, generators: list[torch.Generator] | None, top_k: int | None = None,
                 top_p: float = 1.0, temperature: float = 1.0):
        self.generators = generators
        self.top_k, self.top_p, self.temperature = top_k, top_p, temperature

    def uniforms(self, rows: int) -> torch.Tensor:
        if self.generators is None:
            return torch.rand(rows)
        if len(self.generators) != rows:
            raise ValueError(f"RowSampler has {len(self.generators)} generators for {rows} rows")
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = sample_from_logits(scores, self.uniforms(scores.shape[0]), self.top_k, self.top_p, self.temperature)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, tokens[:, None], 0.0)
