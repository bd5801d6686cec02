"""Static decoding steps (--cuda-graphs) choose the tokens the compacting loop chooses, and the
graph protocol (run once, record, replay) does each step's work exactly once.

The CUDA graph itself needs a GPU; here its recording is stood in for by a capture that, like CUDA's,
runs nothing while recording and runs the recorded work at each replay."""

from __future__ import annotations

import logging

import pytest
import torch

from captioners import prefix_decoding
from captioners.base import Captioner
from captioners.batch import BatchJob, local_engine, run_batch
from captioners.cuda_graphs import GraphedCall
from captioners.gpt2_decoder import GPT2Decoder, StaticSteps
from captioners.prefix_decoding import PrefixRows, decode_prompts, decode_tokens, greedy_chooser, sampling_chooser
from tests import tiny_models
from tests.batch_helpers import copy_photos
from tests.test_gpt2_decoder import CONFIGS, STOP, VOCAB, random_gpt2
from tests.test_sbg import sbg, sbg_files, sbg_images  # noqa: F401  (fixtures)


def stopping_gpt2():
    """A tiny GPT-2 whose greedy captions stop after different numbers of tokens (1 to the limit of 30)."""
    torch.manual_seed(4)
    return tiny_models.build_gpt(VOCAB, n_embd=32, n_layer=2, n_positions=64, stop_token=STOP, stop_scale=2.0)


def prefixes(rows: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randn(rows, 4, 32, generator=torch.Generator().manual_seed(seed))


def both_ways(decode, **kwargs) -> tuple[list, list]:
    return decode(**kwargs), decode(static=True, **kwargs)


def test_static_greedy_decoding_chooses_the_same_tokens():
    gpt = stopping_gpt2()
    compacting, static = both_ways(lambda **kw: decode_tokens(gpt, prefixes(), STOP, 30, greedy_chooser(), **kw))
    assert len({len(tokens) for tokens in compacting}) >= 3, "fixture should stop rows at different steps"
    assert static == compacting


def test_static_sampling_and_guidance_choose_the_same_tokens():
    gpt, null = stopping_gpt2(), torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(9))
    sampled = both_ways(lambda **kw: decode_tokens(gpt, prefixes(), STOP, 30, sampling_chooser(1.0, 0.9, 20, 4, 6), **kw))
    assert sampled[1] == sampled[0]
    guided = both_ways(lambda **kw: decode_tokens(gpt, prefixes(), STOP, 30, greedy_chooser(), guidance=1.5,
                                                  null_prefix=null, **kw))
    assert guided[1] == guided[0]


def test_static_prompt_decoding_with_padding_and_a_penalty_chooses_the_same_tokens():
    gpt = stopping_gpt2()
    prompts, limits = [[5, 6, 9, 5], [11, 3], [40, 41, 42, 43, 44, 45], [STOP, 8]], [20, 9, 14, 20]
    for choose in (greedy_chooser, lambda: sampling_chooser(1.0, 1.0, 10, 3, 8, [0, 1] * 4)):
        compacting, static = both_ways(lambda **kw: decode_prompts(gpt, prompts, 2, STOP, limits, choose(),
                                                                   repetition_penalty=1.3, **kw))
        assert static == compacting


@pytest.mark.parametrize("flags", CONFIGS.values(), ids=CONFIGS.keys())
def test_static_steps_give_the_logits_of_the_cache_steps(flags):
    """Over the whole buffer, masked, each step's logits are those of the sliced step (to rounding),
    also when the buffer's unwritten part holds NaN, as fresh memory may."""
    gpt = random_gpt2(**flags)
    decoder = GPT2Decoder(gpt)
    tokens = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    valid = torch.tensor([[True] * 5, [False, False, True, True, True], [False] + [True] * 4])
    prefix = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        _, cache = decoder.start(prefix, room=6, valid=valid)
        _, static_cache = decoder.start(prefix, room=6, valid=valid)
        for buffer in static_cache.keys + static_cache.values:
            buffer[:, :, static_cache.length:] = float("nan")
        steps = StaticSteps(decoder, static_cache)
        for column in tokens.unbind(dim=1):
            expected = decoder.step(cache, column)
            got = steps(column)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="cache is full"):
            steps(tokens[:, 0])


class RecordingCapture:
    """CUDA's capture semantics on a CPU: recording runs nothing, each replay runs the recorded work."""

    def __init__(self):
        self.recordings = 0

    def __call__(self, function):
        self.recordings += 1
        return function


def test_a_graphed_step_does_each_steps_work_once_and_records_once():
    gpt = stopping_gpt2()
    capture, runs = RecordingCapture(), []

    def graphed(step):
        def counted():
            runs.append(1)
            return step()
        return GraphedCall(counted, capture)

    expected = decode_tokens(gpt, prefixes(), STOP, 30, greedy_chooser())
    with torch.inference_mode():
        rows = PrefixRows(gpt, static=True)
        logits = rows.start(prefixes(), 29)
        rows.static_steps = StaticSteps(rows.decoder, rows.cache, graphed)
        got, running, calls = [[] for _ in expected], [True] * len(expected), 0
        for step in range(30):
            chosen = logits.argmax(dim=-1)
            for row, token in enumerate(chosen.tolist()):
                if running[row]:
                    got[row].append(token)
                    running[row] = token != STOP and step + 1 < 30
            if not any(running):
                break
            logits, calls = rows.step(chosen), calls + 1
    assert got == expected
    assert calls > 2 and capture.recordings == 1 and len(runs) == calls


def test_static_rows_cannot_be_reordered():
    gpt = stopping_gpt2()
    with torch.inference_mode():
        rows = PrefixRows(gpt, static=True)
        rows.step(rows.start(prefixes(2), 5).argmax(dim=-1))
        with pytest.raises(ValueError, match="cannot change"):
            rows.keep(torch.tensor([0]))


# ---- the option: job, engine, families ----------------------------------------------------------
@pytest.fixture()
def static_steps_on_a_cpu(monkeypatch):
    """--cuda-graphs honoured on a CPU (its steps run as they are, no graph); counts the decodings
    that took static steps."""
    made = []

    class Counted(StaticSteps):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(prefix_decoding, "StaticSteps", Counted)
    monkeypatch.setattr(Captioner, "static_decoding", lambda self, on: self.cuda_graphs)
    monkeypatch.setattr(local_engine.LocalEngine, "_cuda_graphs", staticmethod(lambda job, captioner: job.cuda_graphs))
    return made


def test_without_a_cuda_gpu_the_option_says_so_and_decodes_as_usual(load_tiny, icg_checkpoint, photos, tmp_path,
                                                                    caplog):
    assert BatchJob.from_mapping({"cuda_graphs": True}).cuda_graphs
    captioner = load_tiny(icg_checkpoint.path)
    copy_photos(photos, tmp_path / "in", 2)
    with caplog.at_level(logging.WARNING):
        summary = run_batch(captioner, BatchJob(inputs=[str(tmp_path / "in")], cuda_graphs=True))
    assert summary.captioned == 2 and "--cuda-graphs needs a CUDA device" in caplog.text
    assert captioner.cuda_graphs is False


def test_a_run_with_cuda_graphs_captions_what_the_usual_steps_do(load_tiny, icg_checkpoint, photos, tmp_path,
                                                                 static_steps_on_a_cpu):
    captioner = load_tiny(icg_checkpoint.path)
    copy_photos(photos, tmp_path / "in", 5)
    captions = {}
    for graphs in (False, True):
        out = tmp_path / f"out-{graphs}"
        summary = run_batch(captioner, BatchJob(inputs=[str(tmp_path / "in")], output_dir=str(out), batch_size=3,
                                                cuda_graphs=graphs))
        assert summary.captioned == 5
        captions[graphs] = {p.name: p.read_text(encoding="utf-8") for p in sorted(out.glob("*.txt"))}
        assert len(static_steps_on_a_cpu) == (2 if graphs else 0)  # one per batch, only when asked
    assert captions[True] == captions[False] and len(captions[True]) == 5
    assert captioner.cuda_graphs is False  # for that run only


def test_clip_prefix_samples_and_sbg_decode_in_static_steps_when_asked(load_tiny, icg_checkpoint, sbg, sbg_images,  # noqa: F811
                                                                       static_steps_on_a_cpu):
    captioner = load_tiny(icg_checkpoint.path)
    for model, options in ((captioner, {"strategy": "sample", "seed": 3}),
                           (captioner, {"strategy": "greedy"}), (sbg, {"seed": 5})):
        usual = model.caption(sbg_images, options)
        model.cuda_graphs = True
        try:
            static = model.caption(sbg_images, options)
        finally:
            model.cuda_graphs = False
        assert static == usual
    assert len(static_steps_on_a_cpu) >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_a_gpu_graphed_steps_choose_the_tokens_of_the_usual_steps(dtype):
    gpt = stopping_gpt2().to("cuda", dtype)
    prefix = prefixes(8).to("cuda", dtype)
    usual = decode_tokens(gpt, prefix, STOP, 30, greedy_chooser())
    graphed = decode_tokens(gpt, prefix, STOP, 30, greedy_chooser(), static=True)
    assert graphed == usual and len({len(tokens) for tokens in usual}) >= 2
