"""Batched decoding for a GPT-2 that continues from a prefix of embeddings, reusing its KV cache.

The algorithms are those of the ClipCap reference (``generate2`` and ``generate_beam``), which
recompute the whole sequence for every new token and handle one image at a time. Here the prefix
is run once, each step feeds only the new token, all images of a batch decode together, and
images whose captions are finished leave the batch. The chosen tokens are the same.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

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


class PrefixRows:
    """GPT-2 over the active rows of a decoding, each step feeding only the new tokens (KV cache).

    With ``guidance`` G > 0 (specificity guidance, Kornblith et al. 2023) every row has a twin that
    starts from ``null_prefix`` instead of the image's prefix, run in the same forward pass; a step
    then returns log q = log_softmax((1 + G) log p(y|x) - G log p(y|null)), the renormalised
    ``log p(y|x) + G (log p(y|x) - log p(y|null))``. Without guidance it returns the plain logits,
    exactly as before (G = 0 never builds the twins, so its tokens cannot change).
    """

    def __init__(self, gpt: torch.nn.Module, guidance: float = 0.0, null_prefix: torch.Tensor | None = None):
        if guidance and null_prefix is None:
            raise ValueError("guidance needs a null prefix")
        self.gpt, self.guidance, self.null_prefix = gpt, float(guidance or 0.0), null_prefix
        self.past: Cache = None
        self.rows = 0

    def start(self, prefix: torch.Tensor) -> torch.Tensor:
        rows = self.rows = prefix.shape[0]
        if not self.guidance:
            logits, self.past = _step(self.gpt, None, inputs_embeds=prefix)
            return logits
        # The null prefix is the same for every row: run it once, then give each row its copy.
        null = self.null_prefix.to(prefix.device, prefix.dtype)
        logits, self.past = _step(self.gpt, None, inputs_embeds=torch.cat((prefix, null)))
        twins = torch.cat((torch.arange(rows, device=prefix.device),
                           torch.full((rows,), rows, dtype=torch.long, device=prefix.device)))
        self.past = select_rows(self.past, twins)
        return self._combined(logits[twins])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(rows,) new tokens -> (rows, vocab) scores of the token after them."""
        ids = torch.cat((tokens, tokens)) if self.guidance else tokens
        logits, self.past = _step(self.gpt, self.past, input_ids=ids[:, None])
        return self._combined(logits)

    def keep(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the rows given by ``index``; their null twins follow them."""
        rows = index.shape[0]
        if self.guidance:
            index = torch.cat((index, index + self.rows))
        self.past = select_rows(self.past, index)
        self.rows = rows

    def _combined(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.guidance:
            return logits
        conditional = logits[: self.rows].log_softmax(dim=-1)
        null = logits[self.rows:].log_softmax(dim=-1)
        return ((1 + self.guidance) * conditional - self.guidance * null).log_softmax(dim=-1)


Chooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, active row ids) -> tokens


def greedy_chooser() -> Chooser:
    return lambda logits, rows: logits.argmax(dim=-1)


def sampling_chooser(temperature: float, top_p: float, top_k: int | None, seed: int | None,
                     batch: int, streams: Sequence[int] | None = None) -> Chooser:
    """Nucleus / top-k sampling. With a seed, every image draws from its own generator seeded alike,
    so an image's caption does not depend on which other images share its batch (nor on the device).
    ``streams``: row i draws from stream ``streams[i]`` of the seed (default 0: several candidates of
    one image use streams 0, 1, 2...)."""
    generators = row_generators(seed, list(streams) if streams is not None else [0] * batch)

    def choose(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if generators is None:
            uniforms = torch.rand(logits.shape[0])
        else:
            uniforms = torch.cat([torch.rand(1, generator=generators[row]) for row in rows.tolist()])
        return sample_from_logits(logits, uniforms, top_k, top_p, temperature)

    return choose


@torch.inference_mode()
def decode_tokens(gpt: torch.nn.Module, prefix: torch.Tensor, stop_token: int, steps: int,
                  choose: Chooser, guidance: float = 0.0, null_prefix: torch.Tensor | None = None) -> list[list[int]]:
    """Token-by-token decoding (greedy or sampled); each caption ends after ``stop_token``.
    ``guidance``: see :class:`PrefixRows` (the chooser then sees guided log-probs)."""
    batch = prefix.shape[0]
    results: list[list[int]] = [[] for _ in range(batch)]
    if steps <= 0:
        return results
    model = PrefixRows(gpt, guidance, null_prefix)
    logits = model.start(prefix)
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
            model.keep(keep)
        logits = model.step(next_tokens)
    return results


def beam_search(gpt: torch.nn.Module, prefix: torch.Tensor, stop_token: int, steps: int,
                beam_size: int, temperature: float = 1.0, guidance: float = 0.0,
                null_prefix: torch.Tensor | None = None) -> list[list[int]]:
    """Beam search with length-averaged scores, as ClipCap's ``generate_beam``; best beam per image."""
    return [beams[0] for beams in beam_candidates(gpt, prefix, stop_token, steps, beam_size, 1, temperature,
                                                  guidance, null_prefix)]


@torch.inference_mode()
def beam_candidates(gpt: torch.nn.Module, prefix: torch.Tensor, stop_token: int, steps: int, beam_size: int,
                    count: int, temperature: float = 1.0, guidance: float = 0.0,
                    null_prefix: torch.Tensor | None = None) -> list[list[list[int]]]:
    """The ``count`` best final beams of each image (``count`` <= ``beam_size``), best first.

    A finished beam may only be extended by token 0 at no cost and its length stops growing, so it
    keeps its average score; beams are ranked by sum of log-probs / length. The first of each image
    is what ``beam_search`` returns; the others are the runners-up of the same search.
    """
    batch, k = prefix.shape[0], beam_size
    count = min(count, k)
    results: list[list[list[int]]] = [[[]] for _ in range(batch)]
    if steps <= 0:
        return results
    device = prefix.device
    model = PrefixRows(gpt, guidance, null_prefix)
    logits = model.start(prefix)
    log_probs = (logits / temperature).log_softmax(dim=-1)
    scores, next_tokens = log_probs.topk(k, dim=-1)                      # (B, K)
    model.keep(torch.arange(batch, device=device).repeat_interleave(k))
    tokens = next_tokens[..., None]                                      # (B, K, T)
    lengths = torch.ones(batch, k, device=device)
    stopped = next_tokens == stop_token
    images = torch.arange(batch, device=device)

    for _ in range(1, steps):
        finished = stopped.all(dim=1)
        if bool(finished.any()):
            _collect(results, images, finished, tokens, scores, lengths, count)
            keep = (~finished).nonzero().flatten()
            if keep.numel() == 0:
                return results
            model.keep((keep[:, None] * k + torch.arange(k, device=device)).flatten())
            images, tokens, scores, lengths, stopped, next_tokens = (
                images[keep], tokens[keep], scores[keep], lengths[keep], stopped[keep], next_tokens[keep])
        active = images.shape[0]
        logits = model.step(next_tokens.reshape(-1))
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
        model.keep((torch.arange(active, device=device)[:, None] * k + source).flatten())
    _collect(results, images, torch.ones_like(images, dtype=torch.bool), tokens, scores, lengths, count)
    return results


def _collect(results: list[list[list[int]]], images: torch.Tensor, which: torch.Tensor, tokens: torch.Tensor,
             scores: torch.Tensor, lengths: torch.Tensor, count: int) -> None:
    """Store the ``count`` best beams (highest average log-prob first) of each image in ``which``."""
    for i in which.nonzero().flatten().tolist():
        order = (scores[i] / lengths[i]).argsort(descending=True)[:count].tolist()
        results[int(images[i])] = [tokens[i, beam, : int(lengths[i, beam])].tolist() for beam in order]

