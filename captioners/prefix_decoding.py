"""Batched decoding for a GPT-2 that continues from a prefix of embeddings, reusing its KV cache.

The algorithms are those of the ClipCap reference (``generate2`` and ``generate_beam``), which
recompute the whole sequence for every new token and handle one image at a time. Here the prefix
is run once, each step feeds only the new token, all images of a batch decode together, and
images whose captions are finished leave the batch. The chosen tokens are the same.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from captioners.sampling import row_generators, sample_from_logits

Cache = Any  # a tuple of (key, value) per layer (transformers < 4.36) or a transformers Cache object


def max_steps(max_new_tokens: int, prefix_length: int, n_positions: int) -> int:
    """New tokens allowed: the last one chosen is never fed back, so it needs no position."""
    return max(0, min(max_new_tokens, n_positions - prefix_length + 1))


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The forward() argument that takes the cache: ``cache`` from transformers 5.2x, where passing
    ``past_key_values`` prints a FutureWarning at every step (it goes away in 5.40); before, the old name.
    Looked up once per class: _step runs at every token."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _step(gpt: torch.nn.Module, past: Cache, **inputs: torch.Tensor) -> tuple[torch.Tensor, Cache]:
    out = gpt(**{_cache_argument(type(gpt)): past}, use_cache=True, return_dict=True, **inputs)
    # Read by its own name: output.past_key_values warns too where the field is called cache.
    cache = out["cache"] if "cache" in out.keys() else out.past_key_values
    return out.logits[:, -1].float(), cache


def select_rows(past: Cache, index: torch.Tensor) -> Cache:
    """Keep (or repeat) the cache rows given by ``index``, for either cache format."""
    if hasattr(past, "reorder_cache"):
        past.reorder_cache(index)
        return past
    return tuple(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in past)


Chooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, active row ids) -> tokens


def greedy_chooser() -> Chooser:
    return lambda logits, rows: logits.argmax(dim=-1)


def sampling_chooser(temperature: float, top_p: float, top_k: int | None, seed: int | None,
                     batch: int) -> Chooser:
    """Nucleus / top-k sampling. With a seed, every image draws from its own generator seeded alike,
    so an image's caption does not depend on which other images share its batch (nor on the device)."""
    generators = row_generators(seed, [0] * batch)

    def choose(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if generators is None:
            uniforms = torch.rand(logits.shape[0])
        else:
            uniforms = torch.cat([torch.rand(1, generator=generators[row]) for row in rows.tolist()])
        return sample_from_logits(logits, uniforms, top_k, top_p, temperature)

    return choose


@torch.inference_mode()
def decode_tokens(gpt: torch.nn.Module, prefix: torch.Tensor, stop_token: int, steps: int,
                  choose: Chooser) -> list[list[int]]:
    """Token-by-token decoding (greedy or sampled); each caption ends after ``stop_token``."""
    batch = prefix.shape[0]
    results: list[list[int]] = [[] for _ in range(batch)]
    if steps <= 0:
        return results
    logits, past = _step(gpt, None, inputs_embeds=prefix)
    rows = torch.arange(batch, device=prefix.device)
    tokens = torch.empty(batch, 0, dtype=torch.long, device=prefix.device)
    for step in range(steps):
        next_tokens = choose(logits, rows)
        tokens = torch.cat((tokens, next_tokens[:, None]), dim=1)
        done = next_tokens == stop_token
        if step == steps - 1:
            done[:] = True
        if bool(done.any()):
            for i in done.nonzero().flatten().tolist():
                results[int(rows[i])] = tokens[i].tolist()
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            tokens, next_tokens, rows = tokens[keep], next_tokens[keep], rows[keep]
            past = select_rows(past, keep)
        logits, past = _step(gpt, past, input_ids=next_tokens[:, None])
    return results


@torch.inference_mode()
def beam_search(gpt: torch.nn.Module, prefix: torch.Tensor, stop_token: int, steps: int,
                beam_size: int, temperature: float = 1.0) -> list[list[int]]:
    """Beam search with length-averaged scores, as ClipCap's ``generate_beam``; best beam per image.

    A finished beam may only be extended by token 0 at no cost and its length stops growing, so it
    keeps its average score; candidates are ranked by sum of log-probs / length.
    """
    batch, k = prefix.shape[0], beam_size
    results: list[list[int]] = [[] for _ in range(batch)]
    if steps <= 0:
        return results
    device = prefix.device
    logits, past = _step(gpt, None, inputs_embeds=prefix)
    log_probs = (logits / temperature).log_softmax(dim=-1)
    scores, next_tokens = log_probs.topk(k, dim=-1)                      # (B, K)
    past = select_rows(past, torch.arange(batch, device=device).repeat_interleave(k))
    tokens = next_tokens[..., None]                                      # (B, K, T)
    lengths = torch.ones(batch, k, device=device)
    stopped = next_tokens == stop_token
    images = torch.arange(batch, device=device)

    for _ in range(1, steps):
        finished = stopped.all(dim=1)
        if bool(finished.any()):
            _collect(results, images, finished, tokens, scores, lengths)
            keep = (~finished).nonzero().flatten()
            if keep.numel() == 0:
                return results
            rows = (keep[:, None] * k + torch.arange(k, device=device)).flatten()
            past = select_rows(past, rows)
            images, tokens, scores, lengths, stopped, next_tokens = (
                images[keep], tokens[keep], scores[keep], lengths[keep], stopped[keep], next_tokens[keep])
        active = images.shape[0]
        logits, past = _step(gpt, past, input_ids=next_tokens.reshape(-1, 1))
        log_probs = (logits / temperature).log_softmax(dim=-1).view(active, k, -1)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.masked_fill(stopped[..., None], float("-inf"))
        log_probs[..., 0] = log_probs[..., 0].masked_fill(stopped, 0.0)
        lengths = lengths + (~stopped).float()
        average = (scores[..., None] + log_probs) / lengths[..., None]
        best, flat = average.view(active, -1).topk(k, dim=-1)
        source = torch.div(flat, vocab, rounding_mode="floor")
        next_tokens = flat % vocab
        lengths = lengths.gather(1, source)
        tokens = torch.cat((tokens.gather(1, source[..., None].expand_as(tokens)), next_tokens[..., None]), dim=2)
        scores = best * lengths
        stopped = stopped.gather(1, source) | (next_tokens == stop_token)
        past = select_rows(past, (torch.arange(active, device=device)[:, None] * k + source).flatten())
    _collect(results, images, torch.ones_like(images, dtype=torch.bool), tokens, scores, lengths)
    return results


def _collect(results: list[list[int]], images: torch.Tensor, which: torch.Tensor, tokens: torch.Tensor,
             scores: torch.Tensor, lengths: torch.Tensor) -> None:
    """Store the best beam (highest average log-prob) of each image in ``which``."""
    for i in which.nonzero().flatten().tolist():
        best = int((scores[i] / lengths[i]).argsort(descending=True)[0])
        results[int(images[i])] = tokens[i, best, : int(lengths[i, best])].tolist()

