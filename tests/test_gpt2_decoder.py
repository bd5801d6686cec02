"""Our KV-cached GPT-2 loop (captioners.gpt2_decoder) computes what transformers' GPT-2 computes,
without its forward() or cache API, under every installed transformers version."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captioners.gpt2_decoder import GPT2Decoder, UnsupportedModelError
from captioners.prefix_decoding import (beam_candidates, decode_prompts, decode_tokens, greedy_chooser,
                                        sampling_chooser)
from tests import tiny_models

VOCAB, STOP = 120, 7

CONFIGS = {
    "default": {},
    "inverse-layer-scale": {"scale_attn_by_inverse_layer_idx": True},
    "unscaled": {"scale_attn_weights": False},
    "upcast": {"reorder_and_upcast_attn": True},
    "relu-eps": {"activation_function": "relu", "layer_norm_epsilon": 1e-2},
}


def random_gpt2(seed: int = 0, **flags):
    """A tiny GPT-2 with 4 heads and weights large enough that every part of the math matters.

    transformers' eager attention is the reference: 4.46's SDPA attention (its default) ignores
    scale_attn_weights, scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=48, initializer_range=0.3,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_implementation="eager", **flags)
    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if name.endswith("bias") or ".ln_" in name:  # transformers starts them at 0 and 1
                param.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    return gpt


def full_logits(gpt, embeds: torch.Tensor) -> torch.Tensor:
    """transformers' own forward over the whole sequence, no cache."""
    with torch.inference_mode():
        return gpt(inputs_embeds=embeds).logits.float()


@pytest.mark.parametrize("flags", CONFIGS.values(), ids=CONFIGS.keys())
def test_prefix_and_steps_give_the_full_forward_logits(flags):
    gpt = random_gpt2(**flags)
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randn(3, 5, 32, generator=generator)
    tokens = torch.randint(0, VOCAB, (3, 8), generator=generator)
    decoder = GPT2Decoder(gpt)
    with torch.inference_mode():
        logits, cache = decoder.start(prefix, room=8)
        got = [logits] + [decoder.step(cache, tokens[:, t]) for t in range(8)]
        expected = full_logits(gpt, torch.cat((prefix, gpt.transformer.wte(tokens)), dim=1))[:, 4:]
    assert cache.length == cache.capacity == 13
    torch.testing.assert_close(torch.stack(got, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_the_layer_scale_flag_changes_the_logits():
    """Guards the test above: the flags it covers really change GPT-2's output."""
    prefix = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    plain = full_logits(random_gpt2(), prefix)
    for flags in ({"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}):
        assert (full_logits(random_gpt2(**flags), prefix) - plain).abs().max() > 1e-2


def test_left_padded_rows_decode_as_if_alone():
    gpt = random_gpt2()
    generator = torch.Generator().manual_seed(3)
    lengths, width = [2, 6, 4], 6
    prompts = [torch.randn(n, 32, generator=generator) for n in lengths]
    tokens = torch.randint(0, VOCAB, (3, 5), generator=generator)
    padded = torch.stack([torch.cat((torch.randn(width - n, 32), p)) for n, p in zip(lengths, prompts)])
    valid = torch.tensor([[False] * (width - n) + [True] * n for n in lengths])
    decoder = GPT2Decoder(gpt)
    with torch.inference_mode():
        logits, cache = decoder.start(padded, room=5, valid=valid)
        got = torch.stack([logits] + [decoder.step(cache, tokens[:, t]) for t in range(5)], dim=1)
        for row, prompt in enumerate(prompts):
            alone = full_logits(gpt, torch.cat((prompt, gpt.transformer.wte(tokens[row])))[None])
            torch.testing.assert_close(got[row], alone[0, len(prompt) - 1:], rtol=1e-5, atol=1e-5)


def test_selected_rows_keep_their_own_keys_and_values():
    """Compaction and repetition (beams, guidance twins): after select([2, 0, 0]) the rows continue
    the sequences of rows 2, 0 and 0, and later steps write where they should."""
    gpt = random_gpt2()
    generator = torch.Generator().manual_seed(4)
    prefix = torch.randn(3, 4, 32, generator=generator)
    first = torch.randint(0, VOCAB, (3,), generator=generator)
    later = torch.randint(0, VOCAB, (3, 3), generator=generator)
    decoder = GPT2Decoder(gpt)
    index = torch.tensor([2, 0, 0])
    with torch.inference_mode():
        _, cache = decoder.start(prefix, room=4)
        decoder.step(cache, first)
        cache.select(index)
        got = torch.stack([decoder.step(cache, later[:, t]) for t in range(3)], dim=1)
        sequences = torch.cat((prefix[index], gpt.transformer.wte(first[index])[:, None],
                               gpt.transformer.wte(later)), dim=1)
        expected = full_logits(gpt, sequences)[:, 5:]
        assert cache.rows == 3 and cache.length == 8
        cache.select(torch.tensor([1]))
        assert cache.rows == 1 and cache.keys[0].shape == (1, 4, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_loaded_weights_are_used_not_a_copy():
    gpt = random_gpt2()
    decoder = GPT2Decoder(gpt)
    with torch.no_grad():
        gpt.transformer.ln_f.weight.zero_()
        gpt.transformer.ln_f.bias.zero_()
    with torch.inference_mode():
        logits, _ = decoder.start(torch.randn(2, 3, 32), room=0)
    assert torch.count_nonzero(logits) == 0


def test_cache_room_and_positions_are_enforced():
    gpt = random_gpt2()  # n_positions 48
    decoder = GPT2Decoder(gpt)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="exceed"):
            decoder.start(torch.randn(1, 40, 32), room=9)
        _, cache = decoder.start(torch.randn(1, 40, 32), room=1)
        decoder.step(cache, torch.tensor([1]))
        with pytest.raises(ValueError, match="full"):
            decoder.step(cache, torch.tensor([1]))


def test_other_models_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="not a GPT-2"):
        GPT2Decoder(nn.Linear(3, 3))
    gpt = random_gpt2()
    gpt.transformer.h[1].attn.c_attn = nn.Linear(32, 96)  # weight [out, in], not Conv1D's [in, out]
    with pytest.raises(UnsupportedModelError, match="block 1.*Conv1D"):
        GPT2Decoder(gpt)


def decode_everything(gpt) -> list:
    """Every decoding path of the package on ``gpt``: greedy, sampling, beams, N best, guidance,
    token prompts with a repetition penalty."""
    prefix = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(5))
    null = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(6))
    return [
        decode_tokens(gpt, prefix, STOP, 12, greedy_chooser()),
        decode_tokens(gpt, prefix, STOP, 12, sampling_chooser(1.0, 0.9, 20, 1, 3)),
        decode_tokens(gpt, prefix, STOP, 12, greedy_chooser(), guidance=1.5, null_prefix=null),
        beam_candidates(gpt, prefix, STOP, 12, 4, 2),
        beam_candidates(gpt, prefix, STOP, 12, 3, 3, guidance=0.5, null_prefix=null),
        decode_prompts(gpt, [[5, 6, 9], [11, 3]], 2, STOP, [8, 6], sampling_chooser(1.0, 1.0, 10, 3, 4, [0, 1, 0, 1]),
                       repetition_penalty=1.3),
    ]


def test_decoding_raises_no_warning():
    gpt = random_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_everything(gpt)


def test_decoding_never_calls_the_transformers_forward(monkeypatch):
    """No forward() of transformers' GPT-2 classes runs, so no cache argument (past_key_values or
    cache) is ever passed, whatever the installed version calls it."""
    from transformers.models.gpt2 import modeling_gpt2

    gpt = random_gpt2()
    calls = []

    def refuse(self, *args, **kwargs):
        calls.append((type(self).__name__, sorted(kwargs)))
        raise AssertionError(f"{type(self).__name__}.forward was called")

    for name in ("GPT2LMHeadModel", "GPT2Model", "GPT2Block", "GPT2Attention", "GPT2MLP"):
        monkeypatch.setattr(getattr(modeling_gpt2, name), "forward", refuse)
    decode_everything(gpt)
    assert calls == []


def hf_greedy_with_penalty(gpt, prompt: list[int], penalty: float, new_tokens: int, stop: int) -> list[int]:
    """transformers' greedy generate with repetition_penalty, one unpadded prompt at a time."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation notices are not ours
        out = gpt.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, num_beams=1, repetition_penalty=penalty, max_new_tokens=new_tokens,
                           pad_token_id=stop, eos_token_id=stop)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(stop) + 1] if stop in new else new


def test_prompt_decoding_with_a_repetition_penalty_equals_transformers_generate():
    gpt = tiny_models.build_gpt(VOCAB, n_embd=32, n_layer=2, n_positions=64, stop_token=STOP, stop_scale=2.0)
    prompts = [[5, 6, 9, 5], [11, 3], [40, 41, 42, 43, 44, 45], [STOP, 8]]
    limits = [20, 9, 14, 20]
    for penalty in (1.0, 1.6):
        got = decode_prompts(gpt, prompts, 2, STOP, limits, greedy_chooser(), repetition_penalty=penalty)
        expected = [hf_greedy_with_penalty(gpt, p, penalty, n, STOP) for p, n in zip(prompts, limits)]
        assert got == [tokens for tokens in expected for _ in range(2)]
    unpenalised = decode_prompts(gpt, prompts, 1, STOP, limits, greedy_chooser())
    assert unpenalised != decode_prompts(gpt, prompts, 1, STOP, limits, greedy_chooser(), repetition_penalty=1.6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_the_models_dtype(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("float16 GPT-2 is for CUDA")
    gpt = random_gpt2().to(device, dtype)
    prefix = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    decoder = GPT2Decoder(gpt)
    with torch.inference_mode():
        logits, cache = decoder.start(prefix, room=1)
        assert cache.keys[0].dtype == dtype and logits.dtype == torch.float32
        expected = full_logits(gpt, prefix)[:, -1]
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.1)
    tokens = decode_tokens(gpt, prefix, STOP, 6, greedy_chooser())
    assert len(tokens) == 2 and all(1 <= len(t) <= 6 for t in tokens)
