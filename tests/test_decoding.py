"""Batched, KV-cached decoding chooses the same tokens as the per-image reference algorithms."""

from __future__ import annotations

import pytest
import torch

from captioners.options import DecodingOptions
from captioners.prefix_decoding import max_steps
from captioners.sampling import sample_from_logits
from tests import tiny_models
from tests.reference_decoding import reference_beam, reference_greedy


def random_embeddings(count: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(count, 32, generator=generator)
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def mapper_checkpoint(assets_dir, tokenizer_dir):
    return tiny_models.build_checkpoint(assets_dir / "dec", tokenizer_dir, "transformer", stop_scale=3.0,
                                        legacy_buffers=True, name="mapper.pt")


@pytest.mark.parametrize("batch_size", [1, 3, 12])
def test_greedy_matches_reference(icg_checkpoint, load_tiny, batch_size):
    captioner = load_tiny(icg_checkpoint.path)
    embeddings = random_embeddings(12)
    with torch.no_grad():
        prefixes = icg_checkpoint.model.prefix(embeddings)
    expected = [reference_greedy(icg_checkpoint.model.gpt, p, icg_checkpoint.stop_token) for p in prefixes]
    assert len({len(tokens) for tokens in expected}) >= 4, "fixture should give captions of different lengths"
    got = []
    for start in range(0, 12, batch_size):
        got += captioner.decode(captioner.model.prefix(embeddings[start:start + batch_size]),
                                DecodingOptions(strategy="greedy", max_new_tokens=67))
    assert got == expected


@pytest.mark.parametrize("batch_size", [1, 4, 12])
def test_beam_matches_reference(icg_checkpoint, load_tiny, batch_size):
    captioner = load_tiny(icg_checkpoint.path)
    embeddings = random_embeddings(12, seed=2)
    with torch.no_grad():
        prefixes = icg_checkpoint.model.prefix(embeddings)
    expected = [reference_beam(icg_checkpoint.model.gpt, p, icg_checkpoint.stop_token) for p in prefixes]
    assert len({len(tokens) for tokens in expected}) >= 4
    got = []
    for start in range(0, 12, batch_size):
        got += captioner.decode(captioner.model.prefix(embeddings[start:start + batch_size]),
                                DecodingOptions(strategy="beam", num_beams=5, max_new_tokens=67))
    assert got == expected


def test_transformer_mapper_checkpoint_decodes_like_reference(mapper_checkpoint, load_tiny):
    captioner = load_tiny(mapper_checkpoint.path)
    embeddings = random_embeddings(6, seed=5)
    with torch.no_grad():
        prefixes = mapper_checkpoint.model.prefix(embeddings)
    stop = mapper_checkpoint.stop_token
    batched_prefix = captioner.model.prefix(embeddings)
    assert captioner.decode(batched_prefix, DecodingOptions(strategy="greedy", max_new_tokens=67)) == [
        reference_greedy(mapper_checkpoint.model.gpt, p, stop) for p in prefixes]
    assert captioner.decode(batched_prefix, DecodingOptions(strategy="beam", num_beams=3, max_new_tokens=20)) == [
        reference_beam(mapper_checkpoint.model.gpt, p, stop, beam_size=3, entry_length=20) for p in prefixes]


def test_decoding_never_runs_past_n_positions(assets_dir, tokenizer_dir, load_tiny):
    ckpt = tiny_models.build_checkpoint(assets_dir / "short", tokenizer_dir, "icg", n_positions=12, name="short.pt")
    captioner = load_tiny(ckpt.path)
    prefix = captioner.model.prefix(random_embeddings(3))
    assert max_steps(67, 4, 12) == 9
    for strategy in ("greedy", "beam", "sample"):
        tokens = captioner.decode(prefix, DecodingOptions(strategy=strategy, max_new_tokens=67, num_beams=2, seed=0))
        assert all(1 <= len(t) <= 9 for t in tokens)


def test_max_new_tokens_limits_length(icg_checkpoint, load_tiny):
    captioner = load_tiny(icg_checkpoint.path)
    prefix = captioner.model.prefix(random_embeddings(8))
    tokens = captioner.decode(prefix, DecodingOptions(strategy="greedy", max_new_tokens=3))
    assert all(len(t) <= 3 for t in tokens)
    assert any(len(t) == 3 for t in tokens)


def test_seeded_sampling_is_reproducible_and_independent_of_batch(icg_checkpoint, load_tiny):
    captioner = load_tiny(icg_checkpoint.path)
    embeddings = random_embeddings(6, seed=7)
    options = DecodingOptions(strategy="sample", temperature=1.5, top_p=0.95, seed=42, max_new_tokens=20)
    whole = captioner.decode(captioner.model.prefix(embeddings), options)
    again = captioner.decode(captioner.model.prefix(embeddings), options)
    alone = [captioner.decode(captioner.model.prefix(embeddings[i:i + 1]), options)[0] for i in range(6)]
    assert whole == again == alone
    other_seed = captioner.decode(captioner.model.prefix(embeddings), options.replace(seed=43))
    assert other_seed != whole


def test_sampling_with_tiny_top_p_is_greedy(icg_checkpoint, load_tiny):
    captioner = load_tiny(icg_checkpoint.path)
    prefix = captioner.model.prefix(random_embeddings(5, seed=9))
    sampled = captioner.decode(prefix, DecodingOptions(strategy="sample", top_p=1e-6, seed=1, max_new_tokens=30))
    greedy = captioner.decode(prefix, DecodingOptions(strategy="greedy", max_new_tokens=30))
    assert sampled == greedy


def test_sampling_keeps_the_smallest_set_reaching_top_p_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(3, 1)
    uniforms = torch.tensor([0.0, 0.7, 0.999])  # low, middle and top of the kept mass

    def picks(**kwargs) -> list[int]:
        return sample_from_logits(logits, uniforms, **kwargs).tolist()

    assert picks() == [0, 1, 3]
    assert picks(top_p=0.7) == [0, 1, 1]  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are cut
    assert picks(top_p=0.1) == [0, 0, 0]  # the most likely token always stays
    assert picks(top_k=3) == [0, 1, 2]
    assert picks(temperature=1e-4) == [0, 0, 0]
