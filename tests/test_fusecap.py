"""FuseCap-BLIP: published key layouts load, one batched decoding gives the per-image demo's captions."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from captioners.errors import MissingWeightsError, UnknownModelError
from captioners.families.fusecap import strip_prompt
from captioners.registry import available_models, create_captioner, get_spec, model_rows
from tests import tiny_blip
from captioners.cli import main as cli_main

PROMPT = "a picture of "


@pytest.fixture(scope="session")
def blip_dirs(assets_dir):
    """Tiny FuseCap-like folders, one per weight-file variant."""
    folders = {}
    for variant in ("safetensors", "legacy", "bin"):
        folders[variant] = assets_dir / f"blip-{variant}"
        tiny_blip.build_blip(folders[variant], weights=variant)
    return folders


@pytest.fixture(scope="session")
def blip_images(photos):
    return [Image.open(p).convert("RGB") for p in photos[:4]]


SHORT = {"max_new_tokens": 10}  # enough to tell models apart; keeps the suite fast


def load_fusecap(folder, models_dir):
    return create_captioner("fusecap", models_dir, {"weights": str(folder)}).load("cpu")


def demo_loop(folder, images, **generate_args):
    """The model card's code, one image at a time: processor + generate + decode."""
    return [group[0] for group in demo_loop_n_best(folder, images, 1, strip=False, **generate_args)]


def demo_loop_n_best(folder, images, count, strip=True, **generate_args):
    """The model card's code asking generate for its ``count`` best beams, one image at a time."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(str(folder))
    model = BlipForConditionalGeneration.from_pretrained(str(folder)).eval()
    if count > 1:
        generate_args["num_return_sequences"] = count
    groups = []
    for image in images:
        inputs = processor(image, PROMPT, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, **generate_args)
        texts = [processor.decode(row, skip_special_tokens=True) for row in out]
        groups.append([text.strip() for text in texts] if strip else texts)
    return groups


def test_saved_keys_have_the_published_prefixes(blip_dirs):
    from safetensors.torch import load_file

    keys = set(load_file(str(blip_dirs["safetensors"] / "model.safetensors")))
    assert {"vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
            "vision_model.encoder.layers.0.self_attn.qkv.weight", "vision_model.post_layernorm.weight",
            "text_decoder.bert.embeddings.word_embeddings.weight",
            "text_decoder.bert.encoder.layer.1.crossattention.self.query.weight",
            "text_decoder.cls.predictions.bias", "text_decoder.cls.predictions.transform.dense.weight"} <= keys
    prefixes = ("vision_model.", "text_decoder.bert.", "text_decoder.cls.predictions.")
    assert all(k.startswith(prefixes) for k in keys), sorted(k for k in keys if not k.startswith(prefixes))
    legacy = load_file(str(blip_dirs["legacy"] / "model.safetensors"))
    assert tiny_blip.LEGACY_POSITION_IDS in legacy


def test_batched_captions_equal_the_per_image_demo(blip_dirs, blip_images, models_dir):
    folder = blip_dirs["safetensors"]
    images = blip_images[:3]
    expected = demo_loop(folder, images, num_beams=3, max_length=60)
    captioner = load_fusecap(folder, models_dir)
    with_prompt = captioner.caption(images, {"keep_prompt": True})  # the preset: 3 beams, 60 tokens
    assert with_prompt == [c.strip() for c in expected]
    assert all(c.startswith(PROMPT.strip()) for c in with_prompt)
    assert len(set(with_prompt)) > 1, "different photos should get different captions"
    stripped = captioner.caption(images)  # the default strips the prompt
    assert stripped == [c[len(PROMPT.strip()):].strip() for c in with_prompt]
    assert all(not c.startswith("[") for c in stripped), "the [DEC] id must not decode to [UNK]"


def test_greedy_and_length_options_match_generate(blip_dirs, blip_images, models_dir):
    folder = blip_dirs["safetensors"]
    expected = demo_loop(folder, blip_images[:3], num_beams=1, do_sample=False, max_new_tokens=6,
                         repetition_penalty=1.3)
    captioner = load_fusecap(folder, models_dir)
    got = captioner.caption(blip_images[:3], {"strategy": "greedy", "max_new_tokens": 6, "repetition_penalty": 1.3,
                                              "keep_prompt": True})
    assert got == [c.strip() for c in expected]


@pytest.mark.parametrize("variant", ["legacy", "bin"])
def test_legacy_files_give_the_same_captions(variant, blip_dirs, blip_images, models_dir, tmp_path):
    reference = load_fusecap(blip_dirs["safetensors"], models_dir).caption(blip_images, SHORT)
    assert len(set(reference)) > 1
    assert load_fusecap(blip_dirs[variant], models_dir).caption(blip_images, SHORT) == reference


def test_a_file_with_one_of_the_tied_matrices_loads(blip_dirs, blip_images, models_dir, tmp_path):
    """transformers 4.x does not re-tie BLIP's decoder; the loader must (safetensors may drop a twin)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "no-decoder"
    shutil.copytree(blip_dirs["safetensors"], folder)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("text_decoder.cls.predictions.decoder.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    reference = load_fusecap(blip_dirs["safetensors"], models_dir).caption(blip_images, SHORT)
    assert load_fusecap(folder, models_dir).caption(blip_images, SHORT) == reference


def test_seeded_sampling_does_not_depend_on_the_batch(blip_dirs, blip_images, models_dir):
    captioner = load_fusecap(blip_dirs["safetensors"], models_dir)
    options = {"strategy": "sample", "seed": 11, "max_new_tokens": 12}
    together = captioner.caption(blip_images[:4], options)
    alone = [captioner.caption([image], options)[0] for image in blip_images[:4]]
    assert together == alone
    assert captioner.caption(blip_images[:4], options) == together
    others = [captioner.caption(blip_images[:4], {**options, "seed": s}) for s in (12, 13)]
    assert any(o != together for o in others), "another seed should change some caption"


def test_fusecap_is_listed_and_runs_from_the_command_line(blip_dirs, photos, tmp_path, capsys):
    models = tmp_path / "models"
    assert cli_main(["models", "--json", "--models-dir", str(models)]) == 0
    row = {r["id"]: r for r in json.loads(capsys.readouterr().out)["models"]}["fusecap"]
    assert row["files"][0]["path"] == str(models / "fusecap" / "FuseCap")
    assert "huggingface.co/noamrot/FuseCap" in row["files"][0]["source"] and not row["ready"]

    assert cli_main(["caption", str(photos[0]), str(photos[1]), "--model", "fusecap", "--weights",
                     str(blip_dirs["safetensors"]), "--num-beams", "2", "--max-new-tokens", "8", "--keep-prompt",
                     "--quiet", "--models-dir", str(models)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[1].startswith("a picture of") for line in lines)


def test_missing_files_name_the_folder_and_the_source(models_dir):
    with pytest.raises(MissingWeightsError) as error:
        create_captioner("fusecap", models_dir).load("cpu")
    message = str(error.value)
    assert str(models_dir / "fusecap" / "FuseCap") in message and "huggingface.co/noamrot/FuseCap" in message
    assert "model.safetensors or pytorch_model.bin" in message


def test_a_blip_folder_is_a_model_path(blip_dirs, models_dir, tmp_path, blip_images):
    spec = get_spec(str(blip_dirs["bin"]), models_dir)
    assert spec.family == "fusecap" and spec.decoding.prompt == PROMPT
    captioner = create_captioner(spec, models_dir).load("cpu")
    assert captioner.caption(blip_images[:2], SHORT) == load_fusecap(blip_dirs["bin"], models_dir).caption(
        blip_images[:2], SHORT)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnknownModelError):
        get_spec(str(other), models_dir)


def test_both_hub_ids_share_one_folder(models_dir):
    spec = available_models(models_dir)["fusecap"]
    other = create_captioner(spec, models_dir, {"weights": "noamrot/FuseCap_Image_Captioning"}).spec
    assert other.config.weights.repo_id == "noamrot/FuseCap_Image_Captioning"
    assert other.config.weights.local == spec.config.weights.local == "fusecap/FuseCap"


@pytest.fixture(scope="session")
def word_piece_blip(assets_dir):
    """A tiny BLIP whose likeliest token is the WordPiece continuation ``##s``: its first new token
    always continues the prompt's last word ("a picture of" + "##s" is printed "a picture ofs")."""
    folder = assets_dir / "blip-word-piece"
    tiny_blip.build_blip(folder, biased={"##s": 30.0, "##ing": 0.0})
    return folder


@pytest.mark.parametrize("options, generate_args", [
    # A repetition penalty lets ##s win the first step only: ordinary words follow the merged one.
    ({"strategy": "greedy", "max_new_tokens": 8, "repetition_penalty": 100.0},
     {"num_beams": 1, "do_sample": False, "max_new_tokens": 8, "repetition_penalty": 100.0}),
    ({}, {"num_beams": 3, "max_length": 60}),  # the preset: ##s all along
])
def test_a_caption_that_continues_the_prompt_keeps_its_first_word(word_piece_blip, blip_images, models_dir,
                                                                   options, generate_args):
    card = [c.strip() for c in demo_loop(word_piece_blip, blip_images, **generate_args)]
    assert all(c.startswith("a picture ofs") for c in card), card  # the case under test did happen
    captioner = load_fusecap(word_piece_blip, models_dir)
    assert captioner.caption(blip_images, {**options, "keep_prompt": True}) == card
    stripped = captioner.caption(blip_images, options)
    # The card's text less the prompt's words; the last one merged with the caption's first token.
    assert stripped == [c[len("a picture "):] for c in card]
    assert all(c.startswith("ofs") and "##" not in c for c in stripped)


@pytest.mark.parametrize("text, prompt, caption", [
    ("a picture of a dog runs", "a picture of", "a dog runs"),
    ("a picture of. a dog", "a picture of", ". a dog"),  # punctuation is no continuation
    ("a picture ofs beach", "a picture of", "ofs beach"),  # "##s" continued "of"
    ("a picture of", "a picture of", ""),
    ("a dog's ball", "a dog '", "dog's ball"),  # decoding joined "' s" across the boundary
    ("a dog runs", "", "a dog runs"),
])
def test_the_prompt_is_stripped_at_a_word_boundary(text, prompt, caption):
    assert strip_prompt(text, prompt) == caption


def save_like_transformers_5(source, folder):
    """``source`` as transformers 5's save_pretrained writes it: tokenizer.json and no vocab.txt."""
    import shutil

    from transformers import BlipProcessor

    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, folder / name)
    processor = BlipProcessor.from_pretrained(str(source))
    assert processor.tokenizer.is_fast  # so that every version writes tokenizer.json
    processor.save_pretrained(str(folder))
    for name in ("vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file()
    return folder


def test_a_folder_with_tokenizer_json_and_no_vocab_txt_loads(blip_dirs, blip_images, models_dir, tmp_path):
    folder = save_like_transformers_5(blip_dirs["safetensors"], tmp_path / "saved-by-5")
    spec = get_spec(str(folder), models_dir)
    [row] = model_rows(models_dir, [spec])
    assert row.files[0].present and spec.config.weights.is_present(models_dir)
    captioner = create_captioner(str(folder), models_dir).load("cpu")
    reference = create_captioner(str(blip_dirs["safetensors"]), models_dir).load("cpu")
    for options in (SHORT, {**SHORT, "keep_prompt": True}):
        assert captioner.caption(blip_images, options) == reference.caption(blip_images, options)


DOWNLOAD_AND_CAPTION = """
import json, sys
from pathlib import Path
import torch
from PIL import Image
from captioners.registry import create_captioner, get_spec, model_rows
torch.set_num_threads(1)
models, reference, *photos = sys.argv[1:]
images = [Image.open(p).convert("RGB") for p in photos]
downloaded = create_captioner("fusecap", Path(models)).load("cpu")
local = create_captioner(reference, Path(models)).load("cpu")
print(json.dumps({"present": model_rows(Path(models), [get_spec("fusecap", Path(models))])[0].files[0].present,
                  "downloaded": downloaded.caption(images, {"max_new_tokens": 10}),
                  "local": local.caption(images, {"max_new_tokens": 10})}))
"""


def test_a_hub_repo_with_tokenizer_json_and_no_vocab_txt_downloads(blip_dirs, photos, tmp_path):
    """The real download code against a loopback hub holding a BLIP repo saved by transformers 5."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.fake_hub import FakeHub

    repo = save_like_transformers_5(blip_dirs["safetensors"], tmp_path / "hub")
    models = tmp_path / "models"
    models.mkdir()
    with FakeHub() as hub:
        for file in repo.iterdir():
            hub.add("noamrot/FuseCap", file.name, file)
        # huggingface_hub reads HF_ENDPOINT when it is imported: a fresh interpreter.
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", DOWNLOAD_AND_CAPTION, str(models), str(blip_dirs["safetensors"]),
                               *map(str, photos[:3])], capture_output=True, text=True, env=env, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])
        asked = {request.rsplit("/", 1)[-1] for request in hub.requests}
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"vocab.txt", "tokenizer.json"} <= asked  # vocab.txt first (noamrot/FuseCap has it), then the other
    assert (models / "fusecap" / "FuseCap" / "tokenizer.json").is_file()
    assert result["present"] and len(set(result["local"])) > 1
    assert result["downloaded"] == result["local"]


def test_n_best_beams_equal_generate_with_num_return_sequences(blip_dirs, blip_images, models_dir):
    folder = blip_dirs["safetensors"]
    images = blip_images[:3]
    expected = demo_loop_n_best(folder, images, 3, num_beams=4, max_length=60)  # the preset's length
    captioner = load_fusecap(folder, models_dir)
    options = captioner.decoding_options({"keep_prompt": True, "num_beams": 4, "captions_per_image": 3,
                                          "num_candidates": 3})
    made = captioner.caption_candidates(torch.stack([captioner.preprocessor()(i) for i in images]),
                                        options.replace(max_new_tokens=None))
    assert made.texts == expected
    assert made.image_features is None  # FuseCap has no CLIP of its own: scoring needs a score CLIP


def test_sampled_candidates_are_seeded_per_image(blip_dirs, blip_images, models_dir):
    captioner = load_fusecap(blip_dirs["safetensors"], models_dir)
    options = captioner.decoding_options({"strategy": "sample", "seed": 4, "max_new_tokens": 12,
                                          "captions_per_image": 3, "num_candidates": 3})
    pixels = torch.stack([captioner.preprocessor()(i) for i in blip_images[:3]])
    together = captioner.caption_candidates(pixels, options).texts
    alone = [captioner.caption_candidates(pixels[i:i + 1], options).texts[0] for i in range(3)]
    assert together == alone
    plain = captioner.caption(blip_images[:3], {"strategy": "sample", "seed": 4, "max_new_tokens": 12})
    assert [group[0] for group in together] == plain  # candidate 0 is the plain seeded sample
    assert any(len(set(group)) > 1 for group in together)


def test_fusecap_scores_with_a_named_clip(blip_dirs, blip_images, models_dir, tiny_clip):
    from captioners.judging.judge import Judge
    from captioners.judging.options import JudgingOptions

    config, weights = tiny_clip  # registered with open_clip by the fixture, as tiny-test-clip
    captioner = load_fusecap(blip_dirs["safetensors"], models_dir)
    judge = Judge([captioner], {"max_new_tokens": 12}, JudgingOptions(score=True, score_clip=f"tiny-test-clip:{weights}"))
    judge.load(torch.device("cpu"), torch.float32)
    results = judge.judge_images(blip_images[:2])
    clip = judge.scorer.backbone
    for image, result in zip(blip_images[:2], results):
        with torch.no_grad():
            picture = clip.model.encode_image(clip.preprocess(image)[None]).float()
            words = clip.model.encode_text(clip.tokenizer(result.captions)).float()
        cosine = (words / words.norm(dim=-1, keepdim=True)) @ (picture / picture.norm(dim=-1, keepdim=True))[0]
        assert result.scores == pytest.approx([2.5 * max(float(c), 0.0) for c in cosine], abs=2e-4)


def test_the_settings_scoring_clip_serves_models_without_their_own(blip_dirs, models_dir, tiny_clip):
    from captioners.judging.judge import Judge
    from captioners.judging.options import JudgingOptions
    from captioners.service import Settings, _with_default_score_clip

    _, weights = tiny_clip
    settings = Settings(models_dir=models_dir, model="fusecap", score_clip=f"tiny-test-clip:{weights}")
    judging = _with_default_score_clip(JudgingOptions(score=True), settings)
    assert judging.fallback_score_clip == settings.score_clip and judging.score_clip is None
    named = _with_default_score_clip(JudgingOptions(score=True, score_clip="ViT-B-32"), settings)
    assert named.fallback_score_clip is None  # a request's own choice wins
    captioner = load_fusecap(blip_dirs["safetensors"], models_dir)
    judge = Judge([captioner], {}, judging)
    assert judge.scorer.spec.arch == "tiny-test-clip" and judge.scorer.spec.weights == str(weights)
    with pytest.raises(Exception, match="Unknown judging option"):
        JudgingOptions.from_mapping({"fallback_score_clip": "ViT-B-32"})
