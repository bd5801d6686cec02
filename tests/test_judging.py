"""Judged captions: CLIPScore, N best beams, seeded samples, guidance, best-of-N across models, gates.

Every claim is checked against an independent computation: the per-image beam search without cache
of tests/reference_decoding.py returning its N best beams, a per-image guided argmax that recomputes both the
image's and the null prefix's sequences at every step, and CLIPScore from open_clip's own calls.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from captioners.judging.judge import Judge, candidate_key
from captioners.judging.options import JudgingOptions
from captioners.judging.scoring import clip_scores, parse_score_clip
from captioners.options import DecodingOptions
from captioners.prefix_decoding import beam_candidates
from tests import tiny_models
from tests.reference_decoding import reference_beams

SHORT = {"max_new_tokens": 20}


@pytest.fixture(scope="module")
def load_tiny(load_scoring_tiny):
    return load_scoring_tiny


@pytest.fixture(scope="module")
def second_checkpoint(assets_dir, tokenizer_dir):
    return tiny_models.build_checkpoint(assets_dir / "judge-second", tokenizer_dir, "icg", seed=7, stop_scale=3.0,
                                        name="second.pt")


@pytest.fixture(scope="module")
def images(photos):
    return [Image.open(p).convert("RGB") for p in photos[:5]]


def random_embeddings(count: int, seed: int) -> torch.Tensor:
    embeddings = torch.randn(count, 32, generator=torch.Generator().manual_seed(seed))
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


# ---- independent computations ------------------------------------------------------------------
def independent_clip_scores(clip, image: Image.Image, texts: list[str]) -> list[float]:
    """CLIPScore by the book: encode, normalise, cosine, 2.5 * max(cos, 0)."""
    with torch.no_grad():
        picture = clip.model.encode_image(clip.preprocess(image)[None]).float()
        words = clip.model.encode_text(clip.tokenizer(texts)).float()
    picture = picture / picture.norm(dim=-1, keepdim=True)
    words = words / words.norm(dim=-1, keepdim=True)
    return [2.5 * max(float(c), 0.0) for c in (words @ picture[0])]


@torch.no_grad()
def reference_guided_greedy(gpt, prefix: torch.Tensor, null: torch.Tensor, stop_token: int, guidance: float,
                            steps: int) -> list[int]:
    """argmax of log p(y|x) + G (log p(y|x) - log p(y|null)), both sequences recomputed every step."""
    conditional, unconditional = prefix[None], null
    tokens: list[int] = []
    for _ in range(steps):
        with_image = gpt(inputs_embeds=conditional).logits[:, -1].float().log_softmax(-1)
        without = gpt(inputs_embeds=unconditional).logits[:, -1].float().log_softmax(-1)
        token = int((with_image + guidance * (with_image - without)).argmax(-1))
        tokens.append(token)
        if token == stop_token:
            break
        embedding = gpt.transformer.wte(torch.tensor([[token]]))
        conditional = torch.cat((conditional, embedding), dim=1)
        unconditional = torch.cat((unconditional, embedding), dim=1)
    return tokens


# ---- CLIPScore -----------------------------------------------------------------------------------
def test_clip_score_equals_an_independent_computation(icg_checkpoint, load_tiny, images):
    captioner = load_tiny(icg_checkpoint.path)
    judge = Judge([captioner], {**SHORT, "captions_per_image": 3, "strategy": "beam"}, JudgingOptions(score=True))
    results = judge.judge_images(images)
    checked = 0
    for image, result in zip(images, results):
        expected = independent_clip_scores(captioner.clip, image, result.captions)
        assert result.scores == pytest.approx(expected, abs=2e-4)
        checked += sum(score > 0 for score in expected)
    assert checked >= 3, "the fixture should give some positive cosines"


def test_scoring_reuses_the_image_embedding(icg_checkpoint, load_tiny, images, monkeypatch):
    captioner = load_tiny(icg_checkpoint.path)
    calls = []
    encode = captioner.clip.encode_images
    monkeypatch.setattr(captioner.clip, "encode_images", lambda x, normalize: calls.append(len(x)) or encode(x, normalize))
    Judge([captioner], SHORT, JudgingOptions(score=True)).judge_images(images)
    assert calls == [len(images)]  # one encode of the batch: the captioner's own


def test_clip_scores_formula():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.8, 0.6]])
    assert clip_scores(a, b).tolist() == pytest.approx([2.5, 0.0, 2.5 * 0.96])


def test_score_clip_names_parse():
    assert parse_score_clip("ViT-L-14").label == parse_score_clip("ViT-L-14:openai").label
    assert parse_score_clip("ViT-B-32:/x/w.safetensors").weights == "/x/w.safetensors"
    assert parse_score_clip("ViT-L-14:openai").quick_gelu is True


# ---- several captions per image ------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_n_best_beams_equal_the_reference_top_n(icg_checkpoint, load_tiny, batch_size):
    captioner = load_tiny(icg_checkpoint.path)
    embeddings = random_embeddings(8, seed=11)
    with torch.no_grad():
        prefixes = icg_checkpoint.model.prefix(embeddings)
    expected = [reference_beams(icg_checkpoint.model.gpt, p, icg_checkpoint.stop_token, 5, 3, 30) for p in prefixes]
    assert len({len(beams[0]) for beams in expected}) >= 3
    got = []
    for start in range(0, 8, batch_size):
        prefix = captioner.model.prefix(embeddings[start:start + batch_size])
        got += beam_candidates(captioner.model.gpt, prefix, captioner.stop_token, 30, 5, 3)
    assert got == expected


def test_the_first_beam_candidate_is_todays_beam_caption(icg_checkpoint, load_tiny, images):
    captioner = load_tiny(icg_checkpoint.path)
    plain = captioner.caption(images, {**SHORT, "strategy": "beam", "num_beams": 5})
    judged = Judge([captioner], {**SHORT, "strategy": "beam", "num_beams": 5, "captions_per_image": 3}).judge_images(images)
    assert [result.captions[0] for result in judged] == plain
    assert all(len(result.captions) >= 2 for result in judged)


def test_seeded_samples_do_not_depend_on_the_batch(icg_checkpoint, load_tiny, images):
    captioner = load_tiny(icg_checkpoint.path)
    options = {**SHORT, "strategy": "sample", "seed": 5, "captions_per_image": 4, "top_p": 0.95}
    together = Judge([captioner], options).judge_images(images)
    alone = [Judge([captioner], options).judge_images([image])[0] for image in reversed(images)][::-1]
    assert [r.captions for r in together] == [r.captions for r in alone]
    again = Judge([captioner], options).judge_images(images)
    assert [r.captions for r in again] == [r.captions for r in together]
    other_seed = Judge([captioner], {**options, "seed": 6}).judge_images(images)
    assert [r.captions for r in other_seed] != [r.captions for r in together]
    # Sample 0 of each image is the plain seeded sample.
    plain = captioner.caption(images, {**SHORT, "strategy": "sample", "seed": 5, "top_p": 0.95})
    assert [r.captions[0] for r in together] == plain


def test_near_identical_candidates_are_not_repeated(icg_checkpoint, load_tiny, images, monkeypatch):
    captioner = load_tiny(icg_checkpoint.path)
    from captioners.base import Candidates

    def fixed(pixels, options):
        return Candidates([["A dog runs.", "a dog runs", "a  dog, runs!", "a cat"] for _ in range(len(pixels))])

    monkeypatch.setattr(captioner, "caption_candidates", fixed)
    results = Judge([captioner], {"captions_per_image": 3}).judge_images(images[:2])
    assert [r.captions for r in results] == [["A dog runs.", "a cat"]] * 2
    assert candidate_key("A  Dog, runs!") == candidate_key("a dog runs")


# ---- specificity guidance ------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_guidance_zero_is_token_identical(icg_checkpoint, load_tiny, strategy):
    captioner = load_tiny(icg_checkpoint.path)
    prefix = captioner.model.prefix(random_embeddings(9, seed=3))
    plain = captioner.decode(prefix, DecodingOptions(strategy=strategy, num_beams=5, max_new_tokens=40))
    zero = captioner.decode(prefix, DecodingOptions(strategy=strategy, num_beams=5, max_new_tokens=40, guidance=0.0))
    assert zero == plain


@pytest.mark.parametrize("batch_size", [1, 4, 9])
@pytest.mark.parametrize("guidance,steps", [(0.5, 40), (2.0, 12)])
def test_guided_greedy_equals_the_per_image_reference(icg_checkpoint, load_tiny, batch_size, guidance, steps):
    captioner = load_tiny(icg_checkpoint.path)
    embeddings = random_embeddings(9, seed=4)
    gpt = icg_checkpoint.model.gpt
    with torch.no_grad():
        prefixes = icg_checkpoint.model.prefix(embeddings)
        null = icg_checkpoint.model.prefix(torch.zeros(1, 32))  # the documented null prefix
    expected = [reference_guided_greedy(gpt, p, null, icg_checkpoint.stop_token, guidance, steps) for p in prefixes]
    unguided = [reference_guided_greedy(gpt, p, null, icg_checkpoint.stop_token, 0.0, steps) for p in prefixes]
    assert expected != unguided, "guidance should change some caption of the fixture"
    got = []
    options = DecodingOptions(strategy="greedy", max_new_tokens=steps, guidance=guidance)
    for start in range(0, 9, batch_size):
        got += captioner.decode(captioner.model.prefix(embeddings[start:start + batch_size]), options)
    assert got == expected


def test_guided_beam_and_sampling_run_and_stay_seeded(icg_checkpoint, load_tiny, images):
    captioner = load_tiny(icg_checkpoint.path)
    beam = captioner.caption(images, {**SHORT, "strategy": "beam", "guidance": 1.5})
    assert len(beam) == len(images) and all(isinstance(text, str) for text in beam)
    options = {**SHORT, "strategy": "sample", "seed": 2, "guidance": 1.5}
    together = captioner.caption(images, options)
    alone = [captioner.caption([image], options)[0] for image in images]
    assert together == alone


# ---- best-of-N across models ---------------------------------------------------------------------
def test_best_of_n_picks_the_highest_scored_candidate_across_two_models(icg_checkpoint, second_checkpoint,
                                                                        load_tiny, images):
    first, second = load_tiny(icg_checkpoint.path), load_tiny(second_checkpoint.path)
    options = {**SHORT, "strategy": "beam", "num_candidates": 4, "select": "clip"}
    judge = Judge([first, second], options, JudgingOptions(score=True))
    assert judge.scorer is None  # both use the same CLIP: its embeddings are reused
    results = judge.judge_images(images)
    winners = set()
    for image, result in zip(images, results):
        pool = []
        for captioner in (first, second):
            made = captioner.caption_candidates(captioner.preprocessor()(image)[None],
                                                captioner.decoding_options(options))
            pool += [(text, captioner.spec.id) for text in made.texts[0]]
        pool = first_of_each_key(pool)
        scores = independent_clip_scores(first.clip, image, [text for text, _ in pool])
        best = max(range(len(pool)), key=lambda i: scores[i])
        assert result.captions == [pool[best][0]]
        assert result.scores[0] == pytest.approx(scores[best], abs=2e-4)
        winners.add(result.models[0])
    assert winners == {first.spec.id, second.spec.id}, "each model should win some image in the fixture"


def first_of_each_key(pool: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Candidates equal after lowercasing and dropping punctuation count once, the first kept."""
    seen, kept = set(), []
    for text, model in pool:
        key = " ".join("".join(ch if ch.isalnum() or ch == "_" or ch.isspace() else " " for ch in text.lower()).split())
        if key not in seen:
            seen.add(key)
            kept.append((text, model))
    return kept


def test_top_n_by_score_are_kept_in_score_order(icg_checkpoint, load_tiny, images):
    captioner = load_tiny(icg_checkpoint.path)
    results = Judge([captioner], {**SHORT, "select": "clip", "captions_per_image": 3, "num_candidates": 6}).judge_images(images)
    for result in results:
        assert result.scores == sorted(result.scores, reverse=True)
        assert len(result.captions) == 3


# ---- gates inside the judge ----------------------------------------------------------------------
def test_flags_skip_and_retry(icg_checkpoint, load_tiny, images, monkeypatch):
    captioner = load_tiny(icg_checkpoint.path)
    from captioners.base import Candidates

    def looping(pixels, options):
        retry = options.strategy == "beam"
        return Candidates([["a dog runs on the grass ." if retry else "a dog dog dog dog dog on the grass ."]
                           for _ in range(len(pixels))])

    monkeypatch.setattr(captioner, "caption_candidates", looping)
    kept = Judge([captioner], {**SHORT, "strategy": "sample"}, JudgingOptions(on_flag="keep")).judge_images(images[:2])
    assert all(r.flag_codes == ["repetition"] and not r.skipped for r in kept)
    skipped = Judge([captioner], {**SHORT, "strategy": "sample"}, JudgingOptions(on_flag="skip")).judge_images(images[:2])
    assert all(r.skipped for r in skipped)
    retried = Judge([captioner], {**SHORT, "strategy": "sample"}, JudgingOptions(on_flag="retry")).judge_images(images[:2])
    assert all(r.retried and r.caption == "a dog runs on the grass ." and r.flag_codes == [] for r in retried)


def test_trim_to_budget_cuts_at_a_boundary(icg_checkpoint, load_tiny, images, monkeypatch):
    captioner = load_tiny(icg_checkpoint.path)
    from captioners.base import Candidates

    long = "a man in a red shirt, a woman in a blue dress, a dog on the grass, two cars in the street"
    monkeypatch.setattr(captioner, "caption_candidates",
                        lambda pixels, options: Candidates([[long] for _ in range(len(pixels))]))
    words = lambda text: len(text.split())  # noqa: E731
    judging = JudgingOptions(max_tokens=12, trim_to_budget=True)
    result = Judge([captioner], {}, judging, count_tokens=words).judge_images(images[:1])[0]
    assert result.caption == "a man in a red shirt, a woman in a blue dress"
    assert result.flag_codes == []
    untrimmed = Judge([captioner], {}, JudgingOptions(max_tokens=12), count_tokens=words).judge_images(images[:1])[0]
    assert untrimmed.caption == long and untrimmed.flag_codes == ["over_budget"]


def test_bad_judging_options_are_one_line_errors():
    from captioners.errors import CaptionerError

    for bad in ({"on_flag": "maybe"}, {"score": "yes"}, {"max_tokens": -1}, {"nope": 1}, {"score_clip": 3}):
        with pytest.raises(CaptionerError):
            JudgingOptions.from_mapping(bad)
    for bad in ({"captions_per_image": 0}, {"candidates": "both"}, {"select": "best"}, {"guidance": -1},
                {"captions_per_image": 33}):
        with pytest.raises(CaptionerError):
            DecodingOptions.from_mapping(bad)


# ---- the T5 budget -------------------------------------------------------------------------------
def word_level_tokenizer_json(path):
    """A T5-like tokenizer.json: one token per known word, the rest one unknown token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "a", "dog", "runs", "on", "the", "grass", "."]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def test_t5_budget_counts_with_the_t5_tokenizer(models_dir, icg_checkpoint, load_tiny, images, monkeypatch):
    from captioners.errors import MissingWeightsError
    from captioners.judging.budgets import t5_token_counter

    with pytest.raises(MissingWeightsError) as info:
        t5_token_counter(models_dir)
    assert "google-t5/t5-base" in str(info.value) and str(models_dir / "t5-tokenizer") in str(info.value)
    word_level_tokenizer_json(models_dir / "t5-tokenizer" / "tokenizer.json")
    count = t5_token_counter(models_dir)
    assert count("a dog runs on the grass .") == 7 and count("zebra quagga") == 2

    captioner = load_tiny(icg_checkpoint.path)
    from captioners.base import Candidates

    monkeypatch.setattr(captioner, "caption_candidates", lambda pixels, options: Candidates(
        [["a dog runs on the grass ."] for _ in range(len(pixels))]))
    judging = JudgingOptions(max_tokens=0, t5_max_tokens=6)
    flagged = Judge([captioner], {}, judging, count_t5_tokens=count).judge_images(images[:1])[0]
    assert flagged.flag_codes == ["over_t5_budget"] and "7 T5 tokens" in flagged.flags[0][0].message
    fits = Judge([captioner], {}, JudgingOptions(max_tokens=0, t5_max_tokens=7), count_t5_tokens=count)
    assert fits.judge_images(images[:1])[0].flag_codes == []


def test_the_t5_tokenizer_downloads_through_the_hub_code(tmp_path, icg_checkpoint, scoring_clip, tokenizer_dir,
                                                          photos):
    from tests.batch_helpers import model_args
    from tests.fake_hub import FakeHub
    from tests.test_weights import run

    models_dir = tmp_path / "models"
    source = word_level_tokenizer_json(tmp_path / "served" / "tokenizer.json")
    with FakeHub() as hub:
        hub.add("google-t5/t5-base", "tokenizer.json", source)
        args = model_args(icg_checkpoint.path, scoring_clip, tokenizer_dir, models_dir)
        result = run("", hub.endpoint, models_dir, "-m", "captioners", "caption", str(photos[0]), *args,
                     "--t5-max-tokens", "1", "--max-new-tokens", "10", "--quiet")
        assert result.returncode == 0, result.stderr
        assert (models_dir / "t5-tokenizer" / "tokenizer.json").read_bytes() == source.read_bytes()
        assert "over_t5_budget" in result.stderr


def test_with_several_models_on_a_gpu_only_the_one_at_work_is_there(icg_checkpoint, second_checkpoint, load_tiny,
                                                                    images, monkeypatch):
    first, second = load_tiny(icg_checkpoint.path), load_tiny(second_checkpoint.path)
    moves = []
    for captioner in (first, second):  # stand-ins for models on cuda: record the moves, keep the weights
        monkeypatch.setattr(captioner, "device", torch.device("cuda"))
        monkeypatch.setattr(captioner, "to", lambda device, c=captioner: moves.append((c.spec.id, str(device))) or c)
    judge = Judge([first, second], SHORT, swap_models=True)
    judge.judge_images(images[:1])
    judge.judge_images(images[:1])
    a, b = first.spec.id, second.spec.id
    assert moves == [(a, "cuda"), (a, "cpu"), (b, "cuda"), (b, "cpu")] * 2


def test_the_scoring_clip_to_load_is_known_before_any_model_loads():
    """FuseCap has no CLIP of its own: --score needs ViT-L-14's files, checked with the model's."""
    from captioners.judging.judge import planned_scoring_clip
    from captioners.registry import builtin_specs

    specs = builtin_specs()
    plain = DecodingOptions()
    fusecap, icg = specs["fusecap"], specs["clip-prefix-flickr8k"]
    assert planned_scoring_clip([icg], plain, JudgingOptions(score=True)) is None  # its own CLIP
    assert planned_scoring_clip([fusecap], plain, JudgingOptions()) is None  # no scoring asked
    assert planned_scoring_clip([fusecap], plain, JudgingOptions(score=True)).label == \
        parse_score_clip("ViT-L-14:openai").label
    assert planned_scoring_clip([icg], DecodingOptions(select="clip"), JudgingOptions(score_clip="ViT-B-32")).arch \
        == "ViT-B-32"
    both = [icg, specs["clipcap-coco"]]  # ViT-L-14 and ViT-B-32: one CLIP must score both
    assert planned_scoring_clip(both, plain, JudgingOptions(score=True)) is not None


def test_the_command_line_names_the_scoring_clip_files_with_the_models(tmp_path, photos, capsys):
    from captioners.cli import main

    status = main(["caption", str(photos[0]), "--model", "fusecap", "--score", "--models-dir", str(tmp_path),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and "fusecap/FuseCap" in err and "vit_large_patch14_clip_224.openai" in err
    assert "--score-clip" in err and "Traceback" not in err
