"""FuseCap-BLIP: published key layouts load, one batched generate gives the per-image demo's captions."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from captioners.errors import MissingWeightsError, UnknownModelError
from captioners.families.fusecap import ProjectedOnce, RepeatedRows, cross_attention_projected_once
from captioners.registry import available_models, create_captioner, get_spec
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
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(str(folder))
    model = BlipForConditionalGeneration.from_pretrained(str(folder)).eval()
    captions = []
    for image in images:
        inputs = processor(image, PROMPT, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, **generate_args)
        captions.append(processor.decode(out[0], skip_special_tokens=True))
    return captions


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


def test_projections_are_shared_only_by_rows_that_are_copies():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    distinct = torch.randn(6, 5, 8)
    copies = distinct[:2].repeat_interleave(3, dim=0)
    assert RepeatedRows(3).of(copies) == 3 and RepeatedRows(3).of(distinct) == 1
    for states in (distinct, copies):
        projected = ProjectedOnce(linear, RepeatedRows(3))
        first = projected(states)
        assert torch.allclose(first, linear(states), atol=1e-6)
        assert projected(states) is first  # reused while the same tensor comes back


def test_overlapping_calls_leave_the_plain_projections(blip_dirs, models_dir):
    decoder = load_fusecap(blip_dirs["safetensors"], models_dir).model.text_decoder
    keys = [layer.crossattention.self.key for layer in decoder.bert.encoder.layer]
    first, second = cross_attention_projected_once(decoder, 3), cross_attention_projected_once(decoder, 1)
    first.__enter__()
    second.__enter__()  # another thread's call starts while the first runs, and ends after it
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert [layer.crossattention.self.key for layer in decoder.bert.encoder.layer] == keys


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
