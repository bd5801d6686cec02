"""BLIP captioning without transformers' ``generate``: our own decoding loop over the loaded model.

``BlipForConditionalGeneration.generate`` repeats every image's vision tokens once per beam (or per
sampled candidate) and projects them into cross-attention keys and values for each copy (transformers
4.x at every step). Here the loaded model's own modules run step by step, and each image's
cross-attention keys and values are computed once and shared by all of that image's rows: the rows
of one image attend to them in one batched product, nothing is repeated. Images whose captions are
settled leave the batch, so a batch costs what its live images need.

What comes out is ``generate``'s output token for token (tests/test_blip_decoder.py checks it under
every pinned transformers): greedy decoding, seeded per-row sampling (the draws of
:class:`captioners.sampling.RowSampler`) and beam search with ``generate``'s defaults (length penalty
1.0, ``early_stopping=False``), ``num_return_sequences``, ``min_new_tokens`` and the repetition penalty.
Beam search is the one part whose rules changed between transformers releases (see :class:`BeamRules`);
the rules of the installed release are followed.

The text decoder's arithmetic is the same in the pinned releases (4.30.2, 4.46.1, 4.57.6, 5.24.0):
word + absolute position embeddings and a LayerNorm, then per layer causal self-attention,
cross-attention over the image tokens and a feed-forward block, each closed by the model's own
``output`` module (dense, residual, LayerNorm), then ``cls``. Those modules are called as they are;
only the attention products are written here, in transformers' order of operations (scores, the
division by sqrt(head size), softmax, values) and with the operand layouts its matmuls end up with.
Not SDPA: its fused kernel rounds differently from those products (by ~1e-7 on a CPU), and beam
search turns a last-bit difference into another caption now and then.

Nothing is patched or swapped in the model, and no cache object or ``past_key_values`` is handed to
transformers (their API changed from release to release): the keys and values live here.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from captioners.sampling import repetition_penalised, row_generators, sample_from_logits

log = logging.getLogger(__name__)

# The scores transformers gives beams that must never be chosen (all beams but the first at the
# start, finished candidates among the running ones). The same constant, so that sums round alike.
NEVER = -1.0e9
FIRST_CACHE_CHUNK = 16  # self-attention positions reserved beyond the prompt before the cache first grows


class BeamRules(enum.Enum):
    """How the installed transformers keeps and ranks finished beams (candidate selection, top 2 *
    beams of the summed log-probabilities, is the same in all).

    - ``PROMPT_COUNTED`` (4.30.2; before 4.36): ``BeamSearchScorer``; a finished caption's
      log-probability is divided by its whole length, prompt included, its [SEP] not included; "can a
      running beam still win" divides the best candidate's by that length plus one.
    - ``CAPTION_COUNTED`` (4.46.1; 4.36 to 4.49, transformers PR #27351): as above, divided by the
      number of generated tokens, [SEP] included.
    - ``VECTORIZED`` (4.57.6, 5.24.0; 4.50 on, PR #35802): lengths as ``CAPTION_COUNTED``, but
      finished beams are kept with tensor top-k, the last step's best beams count as finished like
      those that end with [SEP], and "can a running beam still win" looks at running beams only.
      (4.50 to 4.52 stopped that check batch-wide, PR #38778: their captions may differ from these.)
    """

    PROMPT_COUNTED = "prompt-counted"
    CAPTION_COUNTED = "caption-counted"
    VECTORIZED = "vectorized"


def installed_beam_rules() -> BeamRules:
    import transformers

    return beam_rules_for(transformers.__version__)


def beam_rules_for(version: str) -> BeamRules:
    major_minor = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if major_minor < (4, 36):
        return BeamRules.PROMPT_COUNTED
    if major_minor < (4, 50):
        return BeamRules.CAPTION_COUNTED
    return BeamRules.VECTORIZED


@dataclass(frozen=True)
class Sampling:
    """Per-row sampling as :class:`captioners.sampling.RowSampler` draws it (row j of an image: stream j)."""

    seed: int | None
    top_k: int | None = None
    top_p: float = 1.0
    temperature: float = 1.0


@dataclass(frozen=True)
class DecodeSettings:
    """What one ``generate`` call would have been told. ``per_image``: the best beams returned per
    image (``num_return_sequences``), or without beams the rows decoded per image (samples)."""

    max_length: int  # tokens including the prompt
    eos: int
    pad: int
    num_beams: int = 1
    per_image: int = 1
    min_new_tokens: int = 0
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    sampling: Sampling | None = None

    def __post_init__(self) -> None:
        if self.num_beams > 1 and self.sampling is not None:
            raise ValueError("beam search does not sample here")
        if self.num_beams > 1 and self.per_image > self.num_beams:
            raise ValueError(f"{self.per_image} captions per image need at least as many beams")
        if self.num_beams == 1 and self.per_image > 1 and self.sampling is None:
            raise ValueError("several rows per image without beams only make sense when sampling")


def check_text_decoder(decoder: nn.Module) -> None:
    """Refuse a text decoder whose arithmetic differs from what :class:`DecoderRun` computes."""
    config = decoder.config
    position_type = getattr(config, "position_embedding_type", None) or "absolute"
    if position_type != "absolute" or not getattr(config, "is_decoder", False):
        raise ValueError(f"unsupported BLIP text decoder (position embeddings {position_type!r}, "
                         f"decoder {getattr(config, 'is_decoder', None)})")


def decode_captions(decoder: nn.Module, image_embeds: Tensor, prompt: Tensor, settings: DecodeSettings,
                    rules: BeamRules | None = None) -> list[list[list[int]]]:
    """Per image, ``settings.per_image`` token lists (prompt included, [SEP] included when reached),
    best first: what ``generate`` returns, without its padding.

    ``decoder`` is a loaded ``BlipTextLMHeadModel`` in eval mode, ``image_embeds`` the vision tower's
    output (images, tokens, width), ``prompt`` the decoder prompt, [DEC] first (1-D).
    """
    log.debug("Decoding %d images: %d beams, %d captions each, up to %d tokens%s", image_embeds.shape[0],
              settings.num_beams, settings.per_image, settings.max_length, ", sampled" if settings.sampling else "")
    run = DecoderRun(decoder, image_embeds, settings.max_length)
    if settings.num_beams > 1:
        return beam_search(run, prompt, settings, rules or installed_beam_rules())
    return row_search(run, prompt, settings)


# ---- the model, a step at a time ---------------------------------------------------------------------
class DecoderRun:
    """A batch of images going through BLIP's text decoder, one token position at a time.

    Rows are grouped by image: rows ``i * group`` to ``i * group + group - 1`` belong to image ``i``.

    The self-attention cache is one preallocated tensor, (2 * layers, rows, heads, capacity, head
    size): keys of layer i at 2i, values at 2i + 1. It grows by doubling. Each step writes its keys
    and values in place, where concatenating would copy the whole cache at every step; the copies
    left are beam search's reordering (in place, of the rows that change parent, filled positions
    only) and a smaller cache when images leave. Greedy decoding and sampling reorder nothing.
    """

    def __init__(self, decoder: nn.Module, image_embeds: Tensor, max_length: int):
        check_text_decoder(decoder)
        config = decoder.config
        self.embeddings = decoder.bert.embeddings
        self.layers = list(decoder.bert.encoder.layer)
        self.head = decoder.cls
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.scale = math.sqrt(self.head_size)  # as transformers divides: by a Python float
        self.max_length = max_length
        # Once per image, shared by its rows: keys transposed, (layers, images, heads, head size,
        # tokens), and values, (layers, images, heads, tokens, head size), contiguous: the layouts
        # torch.matmul copies transformers' per-row views into at every step.
        images, tokens = image_embeds.shape[:2]
        shape = (len(self.layers), images, self.heads, self.head_size, tokens)
        self.image_keys = image_embeds.new_empty(shape)
        self.image_values = image_embeds.new_empty(shape[:3] + (tokens, self.head_size))
        for index, layer in enumerate(self.layers):
            cross = layer.crossattention.self
            self.image_keys[index] = self._split_heads(cross.key(image_embeds)).transpose(-1, -2)
            self.image_values[index] = self._split_heads(cross.value(image_embeds))
        self.cache: Tensor | None = None
        self.length = 0  # positions in the self-attention cache
        self.group = 1

    @property
    def images(self) -> int:
        return self.image_keys.shape[1]

    def start(self, prompt: Tensor, group: int) -> Tensor:
        """Run the prompt once per image, then give each image ``group`` rows: (rows, vocab) logits."""
        hidden = self._forward(self._embed(prompt.expand(self.images, -1)))
        if group > 1:
            self.select(torch.arange(self.images, device=prompt.device).repeat_interleave(group))
        self.group = group
        return self.head(hidden[:, -1:])[:, 0].repeat_interleave(group, dim=0)

    def step(self, tokens: Tensor) -> Tensor:
        """One new token per row -> (rows, vocab) logits of the next one."""
        return self.head(self._forward(self._embed(tokens[:, None])))[:, 0]

    def select(self, rows: Tensor, images: Tensor | None = None) -> None:
        """Keep the cache rows ``rows``, in that order, and, when ``images`` is given, only those
        images (``rows`` must then be theirs)."""
        if images is not None:
            self.image_keys = self.image_keys.index_select(1, images)
            self.image_values = self.image_values.index_select(1, images)
        picked = self.cache.new_empty((self.cache.shape[0], len(rows), *self.cache.shape[2:]))
        filled = slice(0, self.length)
        picked[:, :, :, filled] = self.cache[:, :, :, filled].index_select(1, rows)
        self.cache = picked

    def reorder(self, parents: list[int]) -> None:
        """Row r continues row ``parents[r]`` (beam search), in place. Most beams keep their parent at
        most steps, so only the rows that change parent are copied, and of their sources only those
        that are overwritten too are saved first: cheaper than copying the whole cache."""
        moved = [row for row, parent in enumerate(parents) if parent != row]
        filled = slice(0, self.length)
        saved = {parents[row]: self.cache[:, parents[row], :, filled].clone() for row in moved
                 if parents[parents[row]] != parents[row]}
        for row in moved:
            parent = parents[row]
            source = saved[parent] if parent in saved else self.cache[:, parent, :, filled]
            self.cache[:, row, :, filled] = source

    def _embed(self, ids: Tensor) -> Tensor:
        positions = torch.arange(self.length, self.length + ids.shape[1], device=ids.device)
        hidden = self.embeddings.word_embeddings(ids) + self.embeddings.position_embeddings(positions)
        return self.embeddings.LayerNorm(hidden)  # (dropout: the model is in eval mode)

    def _forward(self, hidden: Tensor) -> Tensor:
        start, count = self.length, hidden.shape[1]
        self._reserve(hidden, start + count)
        # A prompt sees itself causally; a single new token sees the whole cache.
        future = None
        if count > 1:
            future = torch.ones(count, start + count, dtype=torch.bool, device=hidden.device).triu(start + 1)
        for index, layer in enumerate(self.layers):
            hidden = self._layer(index, layer, hidden, future)
        self.length = start + count
        return hidden

    def _layer(self, index: int, layer: nn.Module, hidden: Tensor, future: Tensor | None) -> Tensor:
        own = layer.attention.self
        end = self.length + hidden.shape[1]
        keys, values = self.cache[2 * index], self.cache[2 * index + 1]
        keys[:, :, self.length:end] = self._split_heads(own.key(hidden))
        values[:, :, self.length:end] = self._split_heads(own.value(hidden))
        context = self._attend(self._split_heads(own.query(hidden)), keys[:, :, :end].transpose(-1, -2),
                               values[:, :, :end], future)
        attended = layer.attention.output(self._merge_heads(context), hidden)
        context = self._attend_image(index, layer.crossattention.self.query(attended))
        attended = layer.crossattention.output(context, attended)
        return layer.output(layer.intermediate(attended), attended)

    def _attend_image(self, index: int, query: Tensor) -> Tensor:
        """Cross-attention of (rows, n, width) queries: an image's rows are one (group * n)-long query."""
        rows, count, width = query.shape
        grouped = query.view(rows // self.group, self.group * count, self.heads, self.head_size).transpose(1, 2)
        context = self._attend(grouped, self.image_keys[index], self.image_values[index])
        return context.transpose(1, 2).reshape(rows, count, width)

    def _attend(self, query: Tensor, keys_t: Tensor, values: Tensor, future: Tensor | None = None) -> Tensor:
        """Attention with transposed keys (..., head size, positions)."""
        scores = torch.matmul(query, keys_t) / self.scale
        if future is not None:  # transformers adds -10000 (or the dtype's minimum): both give exactly 0
            scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        return torch.matmul(torch.softmax(scores, dim=-1), values)

    def _split_heads(self, states: Tensor) -> Tensor:
        return states.view(*states.shape[:2], self.heads, self.head_size).transpose(1, 2)

    def _merge_heads(self, context: Tensor) -> Tensor:
        return context.transpose(1, 2).reshape(context.shape[0], context.shape[2], -1)

    def _reserve(self, hidden: Tensor, needed: int) -> None:
        """Room for ``needed`` positions: the cache doubles (up to ``max_length``) when full."""
        capacity = self.cache.shape[3] if self.cache is not None else 0
        if needed <= capacity:
            return
        capacity = min(max(needed + FIRST_CACHE_CHUNK, 2 * capacity), max(self.max_length, needed))
        grown = hidden.new_empty((2 * len(self.layers), hidden.shape[0], self.heads, capacity, self.head_size))
        if self.cache is not None:
            grown[:, :, :, :self.length] = self.cache[:, :, :, :self.length]
        self.cache = grown


def adjusted_scores(scores: Tensor, sequences: Tensor, settings: DecodeSettings, prompt_length: int) -> Tensor:
    """``generate``'s logits processors for these settings: repetition penalty, then no [SEP] before
    ``min_new_tokens`` (applied to log-probabilities in beam search and to logits otherwise, as there)."""
    penalty = settings.repetition_penalty
    if penalty is not None and penalty != 1.0:
        seen = scores.gather(1, sequences)
        scores = scores.scatter(1, sequences, repetition_penalised(seen, penalty))
    if sequences.shape[1] - prompt_length < settings.min_new_tokens:
        scores = scores.clone()
        scores[:, settings.eos] = -math.inf
    return scores


# ---- greedy decoding and sampling ------------------------------------------------------------------------
class RowDraws:
    """The uniform numbers :class:`captioners.sampling.RowSampler` would draw: one per row and step
    from that row's generator; without a seed, one per row of the whole batch from torch's global
    generator, finished rows included, so that the global generator advances as it did in ``generate``."""

    def __init__(self, seed: int | None, streams: list[int]):
        self.generators = row_generators(seed, streams)
        self.total = len(streams)

    def uniforms(self, rows: Tensor) -> Tensor:
        if self.generators is None:
            return torch.rand(self.total)[rows.cpu()]
        return torch.cat([torch.rand(1, generator=self.generators[row]) for row in rows.tolist()])


def row_search(run: DecoderRun, prompt: Tensor, settings: DecodeSettings) -> list[list[list[int]]]:
    """Greedy decoding, or sampling (``settings.sampling``) with ``per_image`` rows per image, row j of
    each image on sample stream j. A row that reaches [SEP] continues with [PAD] until its image's
    rows are all done, as in ``generate``; then the image leaves the batch."""
    group, prompt_length = settings.per_image, prompt.shape[0]
    device = prompt.device
    images = run.images
    logits = run.start(prompt, group)
    total = images * group
    out = prompt.new_full((total, settings.max_length), settings.pad)
    out[:, :prompt_length] = prompt
    finished = torch.zeros(total, dtype=torch.bool, device=device)
    rows = torch.arange(total, device=device)  # the rows still decoded, as indices into out
    sampling = settings.sampling
    draws = RowDraws(sampling.seed, [j for _ in range(images) for j in range(group)]) if sampling else None
    length = prompt_length
    while True:
        scores = adjusted_scores(logits.float(), out[rows, :length], settings, prompt_length)
        if draws is None:
            tokens = scores.argmax(dim=-1)
        else:
            tokens = sample_from_logits(scores, draws.uniforms(rows), sampling.top_k, sampling.top_p,
                                        sampling.temperature)
        tokens = torch.where(finished[rows], settings.pad, tokens)
        out[rows, length] = tokens
        finished[rows] |= tokens == settings.eos
        length += 1
        if length >= settings.max_length or bool(finished.all()):
            break
        live = ~finished[rows].view(-1, group).all(dim=1)
        if not bool(live.all()):
            kept = live.nonzero().flatten()
            local = (kept[:, None] * group + torch.arange(group, device=device)).flatten()
            run.select(local, kept)
            rows, tokens = rows[local], tokens[local]
        logits = run.step(tokens)
    return [[_trimmed(out[i * group + j], prompt_length, settings.eos) for j in range(group)]
            for i in range(images)]


def _trimmed(row: Tensor, prompt_length: int, eos: int) -> list[int]:
    """A row up to its first [SEP] after the prompt, included; the whole row when it has none."""
    tokens = row.tolist()
    if eos in tokens[prompt_length:]:
        return tokens[:tokens.index(eos, prompt_length) + 1]
    return tokens


# ---- beam search -----------------------------------------------------------------------------------------
class BeamTracker(Protocol):
    """One image batch's finished hypotheses under one set of :class:`BeamRules`."""

    def step(self, active: Tensor, log_probs: Tensor, scores: Tensor, sequences: Tensor,
             length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Given (images, beams, vocab) processed log-probabilities of the ``active`` images, their
        running scores (images, beams) and sequences (images, beams, max_length), ``length`` tokens
        long: the next running beams' parents, tokens and scores (images, beams), and which of these
        images are settled (images,)."""

    def finish(self, active: Tensor, scores: Tensor, sequences: Tensor, length: int) -> None:
        """The search stopped at ``max_length`` with these running beams."""

    def best(self, count: int) -> list[list[list[int]]]:
        """Per image, its ``count`` best finished hypotheses, best first."""


def beam_search(run: DecoderRun, prompt: Tensor, settings: DecodeSettings, rules: BeamRules) -> list[list[list[int]]]:
    """Beam search over the images of ``run``; settled images leave the batch (their results are final
    in every rule set: transformers only pads them from then on)."""
    beams, prompt_length, device = settings.num_beams, prompt.shape[0], prompt.device
    logits = run.start(prompt, beams)
    sequences = prompt.new_full((run.images * beams, settings.max_length), settings.pad)
    sequences[:, :prompt_length] = prompt
    # Only the first beam starts alive: the others hold the same tokens.
    scores = torch.zeros(run.images, beams, dtype=torch.float32, device=device)
    scores[:, 1:] = NEVER
    tracker: BeamTracker
    if rules is BeamRules.VECTORIZED:
        tracker = VectorizedBeams(run.images, settings, prompt_length, sequences)
    else:
        tracker = ScorerBeams(run.images, settings, prompt_length, rules is BeamRules.PROMPT_COUNTED)
    active = torch.arange(run.images, device=device)
    offsets = torch.arange(beams, device=device)
    length = prompt_length
    while True:
        log_probs = adjusted_scores(torch.log_softmax(logits.float(), dim=-1), sequences[:, :length], settings,
                                    prompt_length)
        parents, tokens, scores, settled = tracker.step(active, log_probs.view(len(active), beams, -1), scores,
                                                        sequences.view(len(active), beams, -1), length)
        rows = (parents + beams * torch.arange(len(active), device=device)[:, None]).flatten()
        sequences = sequences.index_select(0, rows)
        sequences[:, length] = tokens.flatten()
        length += 1
        if length >= settings.max_length or bool(settled.all()):
            break
        if bool(settled.any()):
            images = (~settled).nonzero().flatten()
            kept = (images[:, None] * beams + offsets).flatten()
            active, scores, rows, sequences = active[images], scores[images], rows[kept], sequences[kept]
            tokens = tokens[images]
            run.select(rows, images)
        else:
            run.reorder(rows.tolist())
        logits = run.step(tokens.flatten())
    tracker.finish(active, scores, sequences.view(len(active), beams, -1), length)
    return tracker.best(settings.per_image)


def _candidates(log_probs: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The 2 * beams best (beam, token) continuations per image: scores, beam indices, tokens."""
    images, beams, vocab = log_probs.shape
    totals = (log_probs + scores[:, :, None]).reshape(images, beams * vocab)
    top_scores, top_ids = torch.topk(totals, 2 * beams, dim=1, largest=True, sorted=True)
    return top_scores, torch.div(top_ids, vocab, rounding_mode="floor"), top_ids % vocab


class Hypotheses:
    """One image's finished captions under the ``BeamSearchScorer`` rules (transformers before 4.50)."""

    def __init__(self, size: int, length_penalty: float):
        self.size, self.length_penalty = size, length_penalty
        self.kept: list[tuple[float, list[int]]] = []
        self.worst = 1e9
        self.settled = False

    def add(self, tokens: list[int], total: float, length: int) -> None:
        score = total / (length ** self.length_penalty)  # Python floats, as there
        if len(self.kept) < self.size or score > self.worst:
            self.kept.append((score, tokens))
            if len(self.kept) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.kept))
                del self.kept[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def cannot_improve(self, best_total: float, length: int) -> bool:
        return len(self.kept) >= self.size and self.worst >= best_total / length ** self.length_penalty

    def best(self, count: int) -> list[list[int]]:
        ranked = sorted(self.kept, key=lambda kept: kept[0])  # stable: of equal scores the later wins
        return [ranked.pop()[1] for _ in range(count)]


class ScorerBeams:
    """Finished beams as transformers' ``BeamSearchScorer`` keeps them, image by image in Python.

    Of the 2 * beams candidates, best first, one ending in [SEP] becomes a hypothesis if it ranks
    among the first ``beams``; the first ``beams`` others run on. ``prompt_counted``: lengths include
    the prompt and exclude [SEP] (before transformers 4.36), else they count the generated tokens.
    """

    def __init__(self, images: int, settings: DecodeSettings, prompt_length: int, prompt_counted: bool):
        self.settings, self.prompt_length, self.prompt_counted = settings, prompt_length, prompt_counted
        self.images = [Hypotheses(settings.num_beams, settings.length_penalty) for _ in range(images)]

    def step(self, active: Tensor, log_probs: Tensor, scores: Tensor, sequences: Tensor,
             length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        beams, eos = self.settings.num_beams, self.settings.eos
        top_scores, top_beams, top_tokens = _candidates(log_probs, scores)
        # The length a [SEP] candidate is scored with, and the one "can a running beam win" uses.
        ended = length if self.prompt_counted else length + 1 - self.prompt_length
        running = length + 1 if self.prompt_counted else length + 1 - self.prompt_length
        chosen: list[list[tuple[int, int, float]]] = []
        settled = []
        for image, totals, parents, tokens in zip(active.tolist(), top_scores.tolist(), top_beams.tolist(),
                                                  top_tokens.tolist()):
            hypotheses, picks = self.images[image], []
            for rank, (total, parent, token) in enumerate(zip(totals, parents, tokens)):
                if token == eos:
                    if rank < beams:
                        hypotheses.add(sequences[len(chosen), parent, :length].tolist() + [eos], total, ended)
                else:
                    picks.append((parent, token, total))
                if len(picks) == beams:
                    break
            hypotheses.settled = hypotheses.settled or hypotheses.cannot_improve(max(totals), running)
            chosen.append(picks)
            settled.append(hypotheses.settled)
        device = scores.device
        parents_t = torch.tensor([[p for p, _, _ in picks] for picks in chosen], device=device)
        tokens_t = torch.tensor([[t for _, t, _ in picks] for picks in chosen], device=device)
        scores_t = torch.tensor([[s for _, _, s in picks] for picks in chosen], dtype=torch.float32, device=device)
        return parents_t, tokens_t, scores_t, torch.tensor(settled, device=device)

    def finish(self, active: Tensor, scores: Tensor, sequences: Tensor, length: int) -> None:
        """Every running beam of an unsettled image becomes a hypothesis, as in the scorer's ``finalize``."""
        final = length if self.prompt_counted else length - self.prompt_length
        for row, image in enumerate(active.tolist()):
            hypotheses = self.images[image]
            if hypotheses.settled:
                continue
            for beam in range(self.settings.num_beams):
                hypotheses.add(sequences[row, beam, :length].tolist(), scores[row, beam].item(), final)

    def best(self, count: int) -> list[list[list[int]]]:
        return [hypotheses.best(count) for hypotheses in self.images]


class VectorizedBeams:
    """Finished beams as transformers 4.50 and later keep them: per image a tensor of ``beams`` slots,
    refilled at every step with top-k over the old slots and the step's finished candidates (those
    among the first ``beams`` that end with [SEP] or reach ``max_length``), with the same tensor
    operations, so that ties and roundings fall alike."""

    def __init__(self, images: int, settings: DecodeSettings, prompt_length: int, sequences: Tensor):
        beams = settings.num_beams
        self.settings, self.prompt_length = settings, prompt_length
        self.sequences = sequences.view(images, beams, -1).clone()
        self.scores = torch.full((images, beams), NEVER, dtype=torch.float32, device=sequences.device)
        self.finished = torch.zeros((images, beams), dtype=torch.bool, device=sequences.device)
        self.first_beams = torch.arange(2 * beams, device=sequences.device) < beams

    def step(self, active: Tensor, log_probs: Tensor, scores: Tensor, sequences: Tensor,
             length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        beams, lp = self.settings.num_beams, self.settings.length_penalty
        top_scores, top_beams, top_tokens = _candidates(log_probs, scores)
        candidates = _gather_beams(sequences, top_beams).clone()
        candidates[:, :, length] = top_tokens
        ends = (top_tokens == self.settings.eos) | (length + 1 >= self.settings.max_length)
        # The next running beams: the best candidates that do not end here.
        running_scores = top_scores + ends.to(torch.float32) * NEVER
        next_beams = torch.topk(running_scores, k=beams)[1]
        parents = _gather_beams(top_beams, next_beams)
        # The finished slots: the best of the old ones and of this step's finished candidates.
        just_finished = ends & self.first_beams[None, :]
        finished_scores = top_scores / ((length + 1 - self.prompt_length) ** lp)
        finished_scores += (~just_finished) * NEVER
        merged_scores = torch.cat((self.scores[active], finished_scores), dim=1)
        keep = torch.topk(merged_scores, k=beams)[1]
        self.sequences[active] = _gather_beams(torch.cat((self.sequences[active], candidates), dim=1), keep)
        self.scores[active] = _gather_beams(merged_scores, keep)
        self.finished[active] = _gather_beams(torch.cat((self.finished[active], just_finished), dim=1), keep)
        # Settled: no running beam can beat the worst finished one any more (all slots full).
        new_running = _gather_beams(running_scores, next_beams)
        best_possible = new_running[:, :1] / ((length + 1 - self.prompt_length) ** lp)
        finished = self.finished[active]
        worst = torch.where(finished, torch.min(self.scores[active], dim=1, keepdim=True)[0], NEVER)
        settled = ~torch.any(best_possible > worst, dim=-1)
        return parents, _gather_beams(top_tokens, next_beams), new_running, settled

    def finish(self, active: Tensor, scores: Tensor, sequences: Tensor, length: int) -> None:
        """Nothing to do: at ``max_length`` every candidate finished in the last step."""

    def best(self, count: int) -> list[list[list[int]]]:
        eos, prompt_length = self.settings.eos, self.prompt_length
        return [[_trimmed(row, prompt_length, eos) for row in image[:count]] for image in self.sequences]


def _gather_beams(tensor: Tensor, indices: Tensor) -> Tensor:
    """``tensor[i, indices[i, j], ...]`` for (images, beams, ...) tensors."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)

