"""Batched decoding for a GPT-2 that continues from a prefix of embeddings, reusing its KV cache.

The algorithms are those of the ClipCap reference (``generate2`` and ``generate_beam``), which
recompute the whole sequence for every new token and handle one image at a time. Here the prefix
is run once, each step feeds only the new token, all images of a batch decode together, and
images whose captions are finished leave the batch. The chosen tokens are the same.

SBG's token prompts decode through the same loop (:func:`decode_prompts`). The forward passes
are :mod:`captioners.gpt2_decoder`'s (the model's own modules, our own KV cache), so decoding does
not depend on the cache API of the installed transformers.

``static=True`` (greedy and sampled decoding, ``--cuda-graphs``): finished rows stay in the batch
instead of leaving it and every step has the same shapes, so on CUDA it replays as a CUDA graph
(:class:`captioners.gpt2_decoder.StaticSteps`); the chosen tokens are the same.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from captioners.gpt2_decoder import GPT2Decoder, KVCache, StaticSteps
from captioners.sampling import repetition_penalised, row_generators, sample_from_logits


def max_steps(max_new_tokens: int, prefix_length: int, n_positions: int) -> int:
    """New tokens allowed: the last one chosen is never fed back, so it needs no position."""
    return max(0, min(max_new_tokens, n_positions - prefix_length + 1))


class PrefixRows:
    """GPT-2 over the active rows of a decoding, each step feeding only the new tokens (KV cache).

    With ``guidance`` G > 0 (specificity guidance, Kornblith et al. 2023) every row has a twin that
    starts from ``null_prefix`` instead of the image's prefix, run in the same forward pass; a step
    then returns log q = log_softmax((1 + G) log p(y|x) - G log p(y|null)), the renormalised
    ``log p(y|x) + G (log p(y|x) - log p(y|null))``. Without guidance it returns the plain logits,
    exactly as before (G = 0 never builds the twins, so its tokens cannot change).
    """

    def __init__(self, gpt: Any, guidance: float = 0.0, null_prefix: torch.Tensor | None = None,
                 static: bool = False):
        if guidance and null_prefix is None:
            raise ValueError("guidance needs a null prefix")
        self.decoder = GPT2Decoder(gpt)
        self.guidance, self.null_prefix = float(guidance or 0.0), null_prefix
        self.cache: KVCache | None = None
        self.rows = 0
        self.static = static  # steps through StaticSteps: the rows never change once stepping began
        self.static_steps: StaticSteps | None = None

    def start(self, prefix: torch.Tensor, room: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Run the (rows, length, width) prefix, leaving cache room for ``room`` steps.
        ``valid``: (rows, length) bool, False at left padding (prompts of different lengths)."""
        rows = self.rows = prefix.shape[0]
        if not self.guidance:
            logits, self.cache = self.decoder.start(prefix, room, valid)
            return logits
        if valid is not None:
            raise ValueError("guidance runs on unpadded prefixes")
        # The null prefix is the same for every row: run it once, then give each row its copy.
        null = self.null_prefix.to(prefix.device, prefix.dtype)
        logits, self.cache = self.decoder.start(torch.cat((prefix, null)), room)
        twins = torch.cat((torch.arange(rows, device=prefix.device),
                           torch.full((rows,), rows, dtype=torch.long, device=prefix.device)))
        self.cache.select(twins)
        return self._combined(logits[twins])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(rows,) new tokens -> (rows, vocab) scores of the token after them."""
        ids = torch.cat((tokens, tokens)) if self.guidance else tokens
        if not self.static:
            return self._combined(self.decoder.step(self.cache, ids))
        if self.static_steps is None:
            self.static_steps = StaticSteps(self.decoder, self.cache)
        return self._combined(self.static_steps(ids))

    def keep(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the rows given by ``index``; their null twins follow them."""
        if self.static_steps is not None:
            raise ValueError("the rows of static steps cannot change")
        rows = index.shape[0]
        if self.guidance:
            index = torch.cat((index, index + self.rows))
        self.cache.select(index)
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


class RepetitionPenalty:
    """transformers' ``repetition_penalty`` (CTRL's): the score of a token a row has already seen is
    divided by ``penalty`` where positive and multiplied where negative. A row has seen its own
    prompt (never its padding) and the tokens it chose."""

    def __init__(self, penalty: float, seen: torch.Tensor):
        self.penalty, self.seen = penalty, seen  # seen: (rows, vocab) bool

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.where(self.seen, repetition_penalised(logits, self.penalty), logits)

    def add(self, tokens: torch.Tensor) -> None:
        self.seen.scatter_(1, tokens[:, None], True)

    def keep(self, index: torch.Tensor) -> None:
        self.seen = self.seen.index_select(0, index)


@torch.inference_mode()
def decode_tokens(gpt: torch.nn.Module, prefix: torch.Tensor, stop_token: int, steps: int,
                  choose: Chooser, guidance: float = 0.0, null_prefix: torch.Tensor | None = None,
                  static: bool = False) -> list[list[int]]:
    """Token-by-token decoding (greedy or sampled); each caption ends after ``stop_token``.
    ``guidance``: see :class:`PrefixRows` (the chooser then sees guided log-probs).
    ``static``: same-shaped steps, CUDA graphs on CUDA (see the module's docstring)."""
    batch = prefix.shape[0]
    if steps <= 0:
        return [[] for _ in range(batch)]
    model = PrefixRows(gpt, guidance, null_prefix, static)
    logits = model.start(prefix, steps - 1)  # the last token chosen is never fed back
    limits = torch.full((batch,), steps, device=prefix.device)
    return _token_loop(model, logits, stop_token, limits, choose)


@torch.inference_mode()
def decode_prompts(gpt: Any, prompts: Sequence[Sequence[int]], count: int, stop_token: int, limits: Sequence[int],
                   choose: Chooser, repetition_penalty: float | None = None, static: bool = False) -> list[list[int]]:
    """``count`` continuations of every token prompt, prompt-major (rows p * count ... p * count + count - 1
    continue prompt p); a row ends after ``stop_token`` or after ``limits[p]`` new tokens.

    The prompts are left-padded to one width and run once each; their rows are then repeated
    ``count`` times in the cache. Each row sees positions 0, 1, ... from its first real token, as
    if alone, so its tokens do not depend on the other prompts of the batch.
    """
    if not prompts or min(len(ids) for ids in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    if len(limits) != len(prompts) or min(limits) < 1:
        raise ValueError("every prompt needs a limit of at least one new token")
    wte = gpt.transformer.wte
    device, width = wte.weight.device, max(len(ids) for ids in prompts)
    # The padding id is never attended to (valid is False there); 0 is just a valid index.
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    model = PrefixRows(gpt, static=static)
    logits = model.start(wte(ids), max(limits) - 1, valid)
    repeat = torch.arange(len(prompts), device=device).repeat_interleave(count)
    model.keep(repeat)
    penalty = None
    if repetition_penalty:
        seen = _seen_tokens(ids, valid, logits.shape[-1]).index_select(0, repeat)
        penalty = RepetitionPenalty(float(repetition_penalty), seen)
    rows_limits = torch.tensor(list(limits), device=device).index_select(0, repeat)
    return _token_loop(model, logits.index_select(0, repeat), stop_token, rows_limits, choose, penalty)


def _seen_tokens(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) bool: the ids each row holds where ``valid``."""
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids.masked_fill(~valid, vocab), True)  # padding goes to an extra column, dropped
    return seen[:, :vocab]


def _token_loop(model: PrefixRows, logits: torch.Tensor, stop_token: int, limits: torch.Tensor, choose: Chooser,
                penalty: RepetitionPenalty | None = None) -> list[list[int]]:
    """Choose a token per active row until each row chose ``stop_token`` or ``limits[row]`` tokens;
    finished rows leave the batch (and the cache), or with static steps stay and are ignored."""
    batch = logits.shape[0]
    results: list[list[int]] = [[] for _ in range(batch)]
    rows = torch.arange(batch, device=logits.device)
    tokens = torch.empty(batch, 0, dtype=torch.long, device=logits.device)
    running = torch.ones(batch, dtype=torch.bool, device=logits.device)  # static steps: rows not finished
    for step in range(int(limits.max())):
        next_tokens = choose(logits if penalty is None else penalty(logits), rows)
        tokens = torch.cat((tokens, next_tokens[:, None]), dim=1)
        if penalty is not None:
            penalty.add(next_tokens)
        done = (next_tokens == stop_token) | (limits <= step + 1)
        if model.static:
            done &= running
        if bool(done.any()):
            finished = done.nonzero().flatten()  # one copy to the host for all finished rows, not one per row
            for row, row_tokens in zip(rows[finished].tolist(), tokens[finished].tolist()):
                results[row] = row_tokens
            if model.static:
                running &= ~done
                if not bool(running.any()):
                    break
            else:
                keep = (~done).nonzero().flatten()
                if keep.numel() == 0:
                    break
                tokens, next_tokens, rows, limits = tokens[keep], next_tokens[keep], rows[keep], limits[keep]
                model.keep(keep)
                if penalty is not None:
                    penalty.keep(keep)
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
    logits = model.start(prefix, steps - 1)
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
    """Store the ``count`` best beams (highest average log-prob first) of each image in ``which``.
    The beams are ordered on the device, image by image as ever, and copied to the host at once."""
    rows = which.nonzero().flatten()
    if rows.numel() == 0:
        return
    orders = torch.stack([(scores[i] / lengths[i]).argsort(descending=True)[:count] for i in rows.unbind()])
    picked = rows[:, None].expand_as(orders)
    for image, beams, beam_lengths in zip(images[rows].tolist(), tokens[picked, orders].tolist(),
                                          lengths[picked, orders].long().tolist()):
        results[image] = [beam[:length] for beam, length in zip(beams, beam_lengths)]

