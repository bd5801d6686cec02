"""Our BLIP decoding loop (captioners/blip_decoder.py) against ``BlipForConditionalGeneration.generate``.

Every case runs the tiny BLIP through FuseCapCaptioner (so the options -> settings mapping is
covered too) and compares the token lists our loop returns with what ``generate`` returns for the
arguments FuseCap passed it before the loop existed, token for token, under whichever transformers
is installed (each pinned venv has its own beam-search rules).
"""

from __future__ import annotations

import inspect
import logging
import threading
import warnings

import pytest
import torch
from PIL import Image

from captioners import blip_decoder
from captioners.blip_decoder import BeamRules, DecodeSettings, beam_rules_for, decode_captions, installed_beam_rules
from captioners.registry import create_captioner
from captioners.sampling import RowSampler, row_generators
from tests import tiny_blip

PROMPT = "a picture of "


# [SEP] biases: "long" captions all run to the length limit, "mixed" ones end anywhere from the
# first token to the limit (so beams finish, images settle at different steps and leave the batch).
SEP_SCALES = {"long": 3.0, "mixed": 6.0}


@pytest.fixture(scope="session")
def eight_images(photos):
    return [Image.open(p).convert("RGB") for p in photos[:8]]


@pytest.fixture(scope="session", params=list(SEP_SCALES))
def captioner(request, assets_dir, tmp_path_factory):
    folder = assets_dir / f"blip-decoder-{request.param}"
    tiny_blip.build_blip(folder, sep_scale=SEP_SCALES[request.param])
    models = tmp_path_factory.mktemp("decoder-models")
    return create_captioner("fusecap", models, {"weights": str(folder)}).load("cpu")


@pytest.fixture(scope="session")
def mixed_captioner(assets_dir, tmp_path_factory):
    folder = assets_dir / "blip-decoder-mixed"
    if not (folder / "config.json").is_file():
        tiny_blip.build_blip(folder, sep_scale=SEP_SCALES["mixed"])
    models = tmp_path_factory.mktemp("decoder-models")
    return create_captioner("fusecap", models, {"weights": str(folder)}).load("cpu")


def pixels_of(captioner, images):
    return torch.stack([captioner.preprocessor()(image) for image in images])


def generated(captioner, pixels, count=1, streams=None, sampling=None, **generate_args):
    """``model.generate`` as FuseCap called it: the prompt's ids per row, [SEP]-cut token lists per image."""
    from transformers import LogitsProcessorList

    model, tokenizer = captioner.model, captioner.processor.tokenizer
    rows = count if streams is not None else 1  # samples: each image's row repeated, one stream per copy
    input_ids = tokenizer([PROMPT] * pixels.shape[0] * rows, return_tensors="pt")["input_ids"]
    if streams is not None:
        pixels = pixels.repeat_interleave(rows, dim=0)
        seed, top_k, top_p, temperature = sampling
        generate_args["logits_processor"] = LogitsProcessorList(
            [RowSampler(row_generators(seed, streams), top_k, top_p, temperature)])
    with torch.inference_mode():
        out = model.generate(pixel_values=pixels, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             **generate_args)
    prompt_length = input_ids.shape[1] - 1  # generate drops the trailing [SEP]
    eos = model.config.text_config.sep_token_id
    texts = [row[:row.index(eos, prompt_length) + 1] if eos in row[prompt_length:] else row for row in out.tolist()]
    return [texts[i:i + count] for i in range(0, len(texts), count)]


def ours(captioner, pixels, options, monkeypatch):
    """Our loop's token lists for FuseCap's options (caught on their way out of decode_captions)."""
    from captioners.families import fusecap

    caught = []

    def catching(*args, **kwargs):
        caught.append(decode_captions(*args, **kwargs))
        return caught[-1]

    monkeypatch.setattr(fusecap, "decode_captions", catching)
    merged = captioner.decoding_options({"keep_prompt": True, **options})
    texts = captioner.caption_candidates(pixels, merged).texts
    assert len(caught) == 1 and len(texts) == pixels.shape[0]
    return caught[0], texts


# FuseCap options, and the generate() arguments FuseCap used to pass for them.
CASES = {
    "preset beams": ({}, dict(num_beams=3, max_length=60)),
    "beams to the length limit": ({"num_beams": 2, "max_new_tokens": 6}, dict(num_beams=2, max_new_tokens=6)),
    "beams, penalties": ({"num_beams": 5, "max_new_tokens": 20, "repetition_penalty": 1.5, "min_new_tokens": 3},
                         dict(num_beams=5, max_new_tokens=20, repetition_penalty=1.5, min_new_tokens=3)),
    "n best beams": ({"num_beams": 4, "captions_per_image": 3, "num_candidates": 3},
                     dict(num_beams=4, num_return_sequences=3, max_length=60)),
    "greedy": ({"strategy": "greedy", "max_new_tokens": 12, "repetition_penalty": 1.3, "min_new_tokens": 4},
               dict(num_beams=1, do_sample=False, max_new_tokens=12, repetition_penalty=1.3, min_new_tokens=4)),
}


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_beams_and_greedy_equal_generate_token_for_token(case, batch, captioner, eight_images, monkeypatch):
    options, generate_args = CASES[case]
    pixels = pixels_of(captioner, eight_images[:batch])
    count = generate_args.get("num_return_sequences", 1)
    tokens, texts = ours(captioner, pixels, options, monkeypatch)
    expected = generated(captioner, pixels, count, **generate_args)
    assert tokens == expected
    decode = captioner.processor.tokenizer.batch_decode
    assert texts == [[t.strip() for t in decode(group, skip_special_tokens=True)] for group in expected]


def test_n_best_beams_follow_the_installed_rules(assets_dir, tmp_path, eight_images, monkeypatch):
    """A model on which the rule sets of transformers 4.46 and 4.50+ part: one image's third-best
    beam is a caption that one of them ends a token earlier."""
    folder = assets_dir / "blip-decoder-rules"
    if not (folder / "config.json").is_file():
        tiny_blip.build_blip(folder, seed=1, sep_scale=1.0)
    captioner = create_captioner("fusecap", tmp_path, {"weights": str(folder)}).load("cpu")
    pixels = pixels_of(captioner, eight_images)
    options, generate_args = CASES["n best beams"]
    tokens, _ = ours(captioner, pixels, options, monkeypatch)
    assert tokens == generated(captioner, pixels, 3, **generate_args)


SAMPLED = {"strategy": "sample", "seed": 7, "max_new_tokens": 12, "top_k": 20, "top_p": 0.9, "temperature": 1.3}


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("count", [1, 3])
def test_seeded_samples_equal_generate_with_row_samplers(count, batch, captioner, eight_images, monkeypatch):
    pixels = pixels_of(captioner, eight_images[:batch])
    options = dict(SAMPLED, repetition_penalty=1.2)
    if count > 1:
        options.update(captions_per_image=count, num_candidates=count)
    tokens, _ = ours(captioner, pixels, options, monkeypatch)
    streams = [j for _ in range(batch) for j in range(count)]
    expected = generated(captioner, pixels, count, streams=streams, sampling=(7, 20, 0.9, 1.3), num_beams=1,
                         do_sample=False, max_new_tokens=12, repetition_penalty=1.2)
    assert tokens == expected
    if count > 1:
        assert any(len({tuple(t) for t in group}) > 1 for group in tokens)


def test_unseeded_samples_advance_the_global_generator_as_generate_did(captioner, eight_images, monkeypatch):
    pixels = pixels_of(captioner, eight_images[:3])
    options = {"strategy": "sample", "max_new_tokens": 12}
    torch.manual_seed(5)
    tokens, _ = ours(captioner, pixels, options, monkeypatch)
    after = torch.rand(1)
    torch.manual_seed(5)
    expected = generated(captioner, pixels, 1, streams=[0, 0, 0], sampling=(None, None, 1.0, 1.0), num_beams=1,
                         do_sample=False, max_new_tokens=12)
    assert tokens == expected and torch.equal(torch.rand(1), after)


def test_captioning_calls_no_generate_and_warns_nothing(captioner, eight_images, monkeypatch):
    from transformers import GenerationMixin

    def refuse(*args, **kwargs):
        raise AssertionError("generate() was called")

    monkeypatch.setattr(GenerationMixin, "generate", refuse)
    monkeypatch.setattr(type(captioner.model), "generate", refuse)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")  # transformers does not propagate to the root
    library_logger.addHandler(handler)
    pixels = pixels_of(captioner, eight_images[:3])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for options in ({}, {"strategy": "greedy"}, {"strategy": "sample", "seed": 1},
                            {"captions_per_image": 2, "num_candidates": 3},
                            {"strategy": "sample", "seed": 1, "captions_per_image": 2, "num_candidates": 2}):
                captioner.caption_candidates(pixels, captioner.decoding_options({"max_new_tokens": 8, **options}))
            captioner.caption(eight_images[:2])
    finally:
        library_logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]


# transformers' BLIP text modules whose forward our loop replaces (it calls only their submodules:
# embeddings' tables and LayerNorm, the q/k/v Linears, the *Output blocks, the intermediate, cls).
TEXT_MODEL_CLASSES = ("BlipTextLMHeadModel", "BlipTextModel", "BlipTextEncoder", "BlipTextLayer",
                      "BlipTextAttention", "BlipTextSelfAttention", "BlipTextEmbeddings")


def test_decoding_never_runs_transformers_text_model_forward(captioner, eight_images, monkeypatch):
    """Captions come out unchanged with every forward of transformers' BLIP text model refusing to run."""
    from transformers.models.blip import modeling_blip_text

    pixels = pixels_of(captioner, eight_images[:3])
    all_options = ({}, {"strategy": "greedy"}, {"strategy": "sample", "seed": 1},
                   {"captions_per_image": 2, "num_candidates": 3})
    before = [captioner.caption_candidates(pixels, captioner.decoding_options({"max_new_tokens": 8, **options})).texts
              for options in all_options]

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' BLIP text model forward was called")

    for name in TEXT_MODEL_CLASSES:
        monkeypatch.setattr(getattr(modeling_blip_text, name), "forward", refuse)
    after = [captioner.caption_candidates(pixels, captioner.decoding_options({"max_new_tokens": 8, **options})).texts
             for options in all_options]
    assert after == before


def test_image_states_are_projected_once_per_image(captioner, eight_images):
    """Cross-attention keys and values come from one row per image, once per batch, whatever the beams."""
    calls = []
    hooks = [layer.crossattention.self.key.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
             for layer in captioner.model.text_decoder.bert.encoder.layer]
    try:
        captioner.caption(eight_images[:3], {"num_beams": 4, "max_new_tokens": 10})
    finally:
        for hook in hooks:
            hook.remove()
    layers = len(captioner.model.text_decoder.bert.encoder.layer)
    assert len(calls) == layers and all(shape[0] == 3 for shape in calls)


@pytest.mark.parametrize("options, first", [({}, 8 * 3), ({"strategy": "greedy"}, 8)])
def test_settled_images_leave_the_batch(options, first, mixed_captioner, eight_images, monkeypatch):
    """Images whose captions are settled stop costing decoder rows (the captions are those of generate)."""
    rows = []
    original = blip_decoder.DecoderRun.step

    def counting(self, tokens):
        rows.append(tokens.shape[0])
        return original(self, tokens)

    monkeypatch.setattr(blip_decoder.DecoderRun, "step", counting)
    mixed_captioner.caption(eight_images, options)
    assert rows[0] <= first and rows[-1] < first and rows == sorted(rows, reverse=True)


@pytest.mark.parametrize("parents", [[0, 0, 1, 3, 3, 3], [1, 0, 2, 5, 3, 4], [2, 2, 2, 4, 4, 4], [0, 1, 2, 3, 4, 5]])
def test_in_place_reordering_equals_a_copy(parents, captioner, eight_images):
    """Beam search's in-place reorder (swaps and cycles included) leaves what a fresh copy would."""
    model = captioner.model
    with torch.inference_mode():
        embeds = model.vision_model(pixel_values=pixels_of(captioner, eight_images[:2]))[0]
        runs = [blip_decoder.DecoderRun(model.text_decoder, embeds, 12) for _ in range(2)]
        for run in runs:
            run.start(torch.tensor([model.config.text_config.bos_token_id, 5, 6]), 3)
            run.step(torch.arange(6) + 7)
        runs[0].reorder(parents)
        runs[1].select(torch.tensor(parents))
        filled = slice(0, runs[0].length)
        assert torch.equal(runs[0].cache[:, :, :, filled], runs[1].cache[:, :, :, filled])


def test_concurrent_captioning_leaves_the_model_alone(captioner, eight_images):
    """Nothing is swapped into the model: threads captioning at once get what each gets alone."""
    modules = dict(captioner.model.named_modules())
    alone = [captioner.caption(eight_images[i:i + 2], {"max_new_tokens": 10}) for i in (0, 2)]
    results = {}

    def caption(index):
        results[index] = captioner.caption(eight_images[2 * index:2 * index + 2], {"max_new_tokens": 10})

    threads = [threading.Thread(target=caption, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[0], results[1]] == alone
    assert dict(captioner.model.named_modules()) == modules


@pytest.mark.parametrize("rules", list(BeamRules))
def test_every_rule_set_decodes(rules, captioner, eight_images):
    """The rule sets of other transformers releases run here too (each venv checks its own against generate)."""
    model = captioner.model
    config = model.config.text_config
    with torch.inference_mode():
        embeds = model.vision_model(pixel_values=pixels_of(captioner, eight_images[:3]))[0]
    prompt = torch.tensor([config.bos_token_id, 5, 6])
    settings = DecodeSettings(max_length=12, eos=config.sep_token_id, pad=config.pad_token_id, num_beams=3,
                              per_image=2)
    with torch.inference_mode():
        groups = decode_captions(model.text_decoder, embeds, prompt, settings, rules)
    assert [len(group) for group in groups] == [2, 2, 2]
    for tokens in (t for group in groups for t in group):
        assert tokens[:3] == prompt.tolist() and 3 < len(tokens) <= 12
        assert tokens[-1] == config.sep_token_id or len(tokens) == 12


def test_the_beam_rules_are_the_installed_transformers_ones():
    from transformers import GenerationMixin

    assert beam_rules_for("4.30.2") is BeamRules.PROMPT_COUNTED
    assert beam_rules_for("4.46.1") is BeamRules.CAPTION_COUNTED
    assert beam_rules_for("4.57.6") is beam_rules_for("5.24.0") is beam_rules_for("5.0.0rc1") is BeamRules.VECTORIZED
    installed = installed_beam_rules()
    vectorized = hasattr(GenerationMixin, "_get_top_k_continuations")
    assert (installed is BeamRules.VECTORIZED) == vectorized
    if not vectorized:
        from transformers import BeamSearchScorer

        prompt_aware = "decoder_prompt_len" in inspect.signature(BeamSearchScorer.process).parameters
        assert (installed is BeamRules.CAPTION_COUNTED) == prompt_aware


def test_settings_refuse_what_generate_would_not_do():
    with pytest.raises(ValueError):
        DecodeSettings(max_length=10, eos=3, pad=0, num_beams=2, per_image=3)
    with pytest.raises(ValueError):
        DecodeSettings(max_length=10, eos=3, pad=0, per_image=2)
