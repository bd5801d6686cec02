"""Straightforward per-image decoding, written from the description of ClipCap's reference
``generate2`` and ``generate_beam``: no KV cache (the whole sequence is recomputed at every step),
one image at a time. The package's batched, cached decoding must choose the same tokens.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_greedy(gpt, prefix: torch.Tensor, stop_token: int, entry_length: int = 67,
                     top_p: float = 0.8, temperature: float = 1.0) -> list[int]:
    """generate2: filter by top-p, then take the argmax; stop after the '.' token."""
    generated = prefix.unsqueeze(0) if prefix.dim() == 2 else prefix
    tokens: list[int] = []
    for _ in range(entry_length):
        logits = gpt(inputs_embeds=generated).logits[:, -1, :] / temperature
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        logits[:, sorted_indices[remove]] = float("-inf")
        next_token = torch.argmax(logits, -1).unsqueeze(0)
        tokens.append(int(next_token))
        embedding = gpt.transformer.wte(next_token)
        generated = torch.cat((generated, embedding), dim=1)
        if int(next_token) == stop_token:
            break
    return tokens


@torch.no_grad()
def reference_beam(gpt, prefix: torch.Tensor, stop_token: int, beam_size: int = 5, entry_length: int = 67,
                   temperature: float = 1.0) -> list[int]:
    """generate_beam: length-averaged log-prob beams; finished beams only take token 0 at no cost."""
    return reference_beams(gpt, prefix, stop_token, beam_size, 1, entry_length, temperature)[0]


@torch.no_grad()
def reference_beams(gpt, prefix: torch.Tensor, stop_token: int, beam_size: int = 5, count: int = 1,
                    entry_length: int = 67, temperature: float = 1.0) -> list[list[int]]:
    """generate_beam's final beams, best first: the ``count`` best (its caption is the first)."""
    generated = prefix.unsqueeze(0) if prefix.dim() == 2 else prefix
    tokens = scores = None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    for _ in range(entry_length):
        logits = gpt(inputs_embeds=generated).logits[:, -1, :] / temperature
        logits = logits.float().log_softmax(-1)
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = float("-inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            scores_sum_average = scores_sum / seq_lengths[:, None]
            scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
            next_tokens_source = torch.div(next_tokens, scores_sum.shape[1], rounding_mode="floor")
            seq_lengths = seq_lengths[next_tokens_source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[next_tokens_source], next_tokens), dim=1)
            generated = generated[next_tokens_source]
            scores = scores_sum_average * seq_lengths
            is_stopped = is_stopped[next_tokens_source]
        embedding = gpt.transformer.wte(next_tokens.squeeze(1)).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, embedding), dim=1)
        is_stopped = is_stopped | next_tokens.eq(stop_token).squeeze(1)
        if is_stopped.all():
            break
    order = (scores / seq_lengths).argsort(descending=True)[:count].tolist()
    return [tokens[i, : int(seq_lengths[i])].tolist() for i in order]
