"""SBG: the batched, cached pipeline gives the per-image reference's keywords, prompts and captions."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioners.errors import MissingWeightsError, UnsafeCheckpointError
from captioners.families.sbg import decode_like_the_pipeline, load_gpt2, parse_caption
from captioners.families.sbg_keywords import prompt_for, select_keywords
from captioners.registry import available_models, create_captioner
from captioners.weights import Asset, ensure_asset, load_plain_pickle
from tests import tiny_sbg
from tests.reference_sbg import ReferenceSBG, parse, sample_seeded
from captioners.cli import main as cli_main

SEED = 3


@pytest.fixture(scope="session")
def sbg_files(assets_dir, tokenizer_dir, tiny_clip):
    """Overrides that run the sbg-flickr8k preset on tiny local files, offline."""
    tiny_sbg.build_gpt2(assets_dir / "sbg-gpt2", tokenizer_dir)
    tiny_sbg.build_vocabulary(assets_dir / "sbg-vocabulary")
    config, weights = tiny_clip
    return {"weights": str(assets_dir / "sbg-gpt2"), "tokenizer": str(tokenizer_dir),
            "vocabulary": str(assets_dir / "sbg-vocabulary"), "clip_config": str(config), "clip_weights": str(weights)}


@pytest.fixture(scope="session")
def sbg(sbg_files, tmp_path_factory):
    return create_captioner("sbg-flickr8k", tmp_path_factory.mktemp("sbg-models"), sbg_files).load("cpu")


@pytest.fixture(scope="session")
def reference(sbg_files, tiny_clip, tokenizer_dir):
    import open_clip
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    config, weights = tiny_clip
    open_clip.add_model_config(str(config))
    clip, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=None, force_quick_gelu=True)
    clip.load_state_dict(load_file(str(weights)))
    vocabulary = Path(sbg_files["vocabulary"])
    labels, encyclopedia = (load_plain_pickle(vocabulary / name) for name in ("all_labels.pkl", "encyclopedia.pkl"))
    ref = ReferenceSBG(clip.eval(), open_clip.get_tokenizer(config.stem), labels, encyclopedia, memoize="all")
    gpt = GPT2LMHeadModel.from_pretrained(sbg_files["weights"]).eval()
    return ref, preprocess, gpt, GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def sbg_images(photos):
    return [Image.open(p).convert("RGB") for p in photos[:4]]


def reference_embedding(reference, image):
    ref, preprocess = reference[:2]
    with torch.no_grad():
        features = ref.clip.encode_image(preprocess(image).unsqueeze(0)).float()
    return features / features.norm(dim=-1, keepdim=True)


def test_published_layout_of_the_tiny_files(sbg_files):
    from safetensors.torch import load_file

    folder = Path(sbg_files["weights"])
    keys = set(load_file(str(folder / "model.safetensors")))
    assert "lm_head.weight" not in keys and not any(k.startswith("gpt.") for k in keys)
    assert len(keys) == 2 + 12 * 2 + 2  # 148 for the 12 blocks of GPT-2 small
    config = json.loads((folder / "config.json").read_text())
    assert config["task_specific_params"]["text-generation"] == {"do_sample": True, "max_length": 50}
    encyclopedia = load_plain_pickle(Path(sbg_files["vocabulary"]) / "encyclopedia.pkl")
    assert len(encyclopedia) == 11 and encyclopedia["scenery"]["grassland"] == []


def test_prompts_match_the_reference(sbg, reference, sbg_images):
    pixels = torch.stack([sbg.preprocessor()(image) for image in sbg_images])
    embeddings = sbg.clip.encode_images(pixels, normalize=True)
    for image, embedding in zip(sbg_images, embeddings):
        expected = reference[0].keywords(reference_embedding(reference, image))
        got = select_keywords(embedding, sbg.sets, sbg.store.features)
        assert got == expected
        assert prompt_for(got) == ", ".join(expected) + " ###"


def test_every_branch_and_empty_lists_match_the_reference(sbg, reference):
    """Many image embeddings, so that every prime branch, the activity and weather checks and
    empty encyclopedia lists (grassland, reptile, mollusc: nothing added after them) are reached."""
    ref = reference[0]
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(48):
        image = torch.randn(1, sbg.clip.embed_dim, generator=generator)
        image = image / image.norm(dim=-1, keepdim=True)
        got = select_keywords(image[0], sbg.sets, sbg.store.features)
        assert got == ref.keywords(image)
        seen.update(got)
    assert {"grassland", "indoor"} <= seen and seen & {"reptile", "mollusc"}
    assert seen & {"a man", "a woman", "two women", "a crowd of people"}, "the people branch should run"


def test_captions_match_the_reference_for_a_seed(sbg, reference, sbg_images):
    ref, _, gpt, tokenizer = reference
    got = sbg.caption(sbg_images, {"seed": SEED})
    for image, caption in zip(sbg_images, got):
        embedding = reference_embedding(reference, image)
        prompt = ", ".join(ref.keywords(embedding)) + " ###"
        candidates = [parse(sample_seeded(gpt, tokenizer, prompt, SEED, j)) for j in range(5)]
        assert caption == ref.choose(embedding, candidates)
    assert all(c.endswith(" .") for c in got)


def test_guesses_are_cleaned_up_as_the_pipeline_did_in_every_transformers_version(reference):
    tokenizer = reference[3]
    ids = tokenizer.encode("dog , grass ### a dog 's ball , it is n't red .")
    assert decode_like_the_pipeline(tokenizer, ids) == "dog, grass ### a dog's ball, it isn't red."
    assert parse_caption(decode_like_the_pipeline(tokenizer, ids)) == "a dog's ball, it isn't red ."


def test_a_seeded_caption_does_not_depend_on_the_batch(sbg, sbg_images):
    together = sbg.caption(sbg_images, {"seed": SEED})
    assert [sbg.caption([image], {"seed": SEED})[0] for image in sbg_images[:2]] == together[:2]
    assert sbg.caption(sbg_images, {"seed": SEED}) == together
    assert sbg.caption(sbg_images, {"seed": SEED + 1}) != together


def test_without_a_seed_it_samples(sbg, sbg_images):
    torch.manual_seed(0)
    first = sbg.caption(sbg_images)
    torch.manual_seed(0)
    assert sbg.caption(sbg_images) == first  # torch's global generator drives it
    torch.manual_seed(1)
    assert sbg.caption(sbg_images) != first


def test_greedy_raw_and_candidate_options(sbg, sbg_images, reference):
    greedy = sbg.caption(sbg_images[:2], {"strategy": "greedy"})
    assert greedy == sbg.caption(sbg_images[:2], {"strategy": "greedy", "seed": 5})
    raw = sbg.caption(sbg_images[:2], {"seed": SEED, "postprocess": False})
    assert [parse_caption("###" + text) for text in raw] == sbg.caption(sbg_images[:2], {"seed": SEED})
    one = sbg.caption(sbg_images[:2], {"seed": SEED, "num_candidates": 1})
    assert len(one) == 2
    prompts = [prompt_for(["dog"]), prompt_for(["a crowd of people", "street", "red shirt"])]
    texts = sbg.generate(prompts, 2, sbg.decoding_options({"seed": SEED, "max_new_tokens": 3}))
    gpt, tokenizer = reference[2:]
    assert texts == [sample_seeded(gpt, tokenizer, p, SEED, j, max_length=len(tokenizer.encode(p)) + 3)
                     for p in prompts for j in range(2)]
    with pytest.raises(Exception, match="sample"):
        sbg.caption(sbg_images[:1], {"strategy": "beam"})


def test_label_features_are_cached_on_disk(sbg_files, sbg_images, tmp_path, monkeypatch):
    models = tmp_path / "models"
    first = create_captioner("sbg-flickr8k", models, sbg_files).load("cpu")
    captions = first.caption(sbg_images[:2], {"seed": SEED})
    first.unload()
    cached = list((models / "sbg" / "text_features").glob("*.safetensors"))
    assert len(cached) == 1

    second = create_captioner("sbg-flickr8k", models, sbg_files).load("cpu")
    calls = []
    encode = second.clip.encode_texts
    monkeypatch.setattr(second.clip, "encode_texts", lambda texts: calls.append(list(texts)) or encode(texts))
    assert second.caption(sbg_images[:2], {"seed": SEED}) == captions
    assert len(calls) == 1 and len(calls[0]) == 2 * 5, "only the sampled candidates need encoding"

    cached[0].write_bytes(b"not safetensors")  # a damaged cache is rebuilt, not fatal
    third = create_captioner("sbg-flickr8k", models, sbg_files).load("cpu")
    assert third.caption(sbg_images[:2], {"seed": SEED}) == captions


def test_vocabulary_pickles_are_converted_once_in_the_models_folder(sbg_files, sbg_images, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(sbg_files["vocabulary"], models / "sbg")
    overrides = {k: v for k, v in sbg_files.items() if k != "vocabulary"}
    captioner = create_captioner("sbg-flickr8k", models, overrides).load("cpu")
    assert (models / "sbg" / "all_labels.json").is_file() and (models / "sbg" / "encyclopedia.json").is_file()
    captions = captioner.caption(sbg_images[:1], {"seed": SEED})
    for name in ("all_labels.pkl", "encyclopedia.pkl"):
        (models / "sbg" / name).unlink()
    again = create_captioner("sbg-flickr8k", models, overrides).load("cpu")
    assert again.caption(sbg_images[:1], {"seed": SEED}) == captions


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_naming_other_globals_is_refused_without_running(tmp_path, sbg_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "vocab"
    shutil.copytree(sbg_files["vocabulary"], evil)
    (evil / "all_labels.pkl").write_bytes(pickle.dumps([("dog", "NOUN", 1), RunsCode()]))
    with pytest.raises(UnsafeCheckpointError, match="os|posix|system"):
        load_plain_pickle(evil / "all_labels.pkl")
    (evil / "encyclopedia.pkl").write_bytes(pickle.dumps({"x": eval}))  # builtins, but not plain data
    with pytest.raises(UnsafeCheckpointError):
        load_plain_pickle(evil / "encyclopedia.pkl")
    with pytest.raises(UnsafeCheckpointError):
        create_captioner("sbg-flickr8k", tmp_path / "models", {**sbg_files, "vocabulary": str(evil)}).load("cpu")
    assert not (tmp_path / "pwned").exists()


def test_gpt2_folders_without_config_and_legacy_bin_files(sbg_files, tmp_path):
    from safetensors.torch import load_file

    reference = load_gpt2(Path(sbg_files["weights"]))
    assert reference.lm_head.weight.data_ptr() == reference.transformer.wte.weight.data_ptr()
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(Path(sbg_files["weights"]) / "model.safetensors", bare)
    state = load_file(str(bare / "model.safetensors"))
    legacy = {**state, "lm_head.weight": state["transformer.wte.weight"],
              "transformer.h.0.attn.bias": torch.ones(1, 1, 4, 4, dtype=torch.uint8),
              "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    ids = torch.tensor([[5, 9, 2, 7]])
    expected = reference(ids).logits
    for location in (bare, bare / "model.safetensors", tmp_path / "pytorch_model.bin"):
        assert torch.allclose(load_gpt2(location).eval()(ids).logits, expected, atol=1e-5), location


def test_vocabulary_download_goes_through_one_atomic_path(tmp_path, sbg_files, monkeypatch):
    source = Path(sbg_files["vocabulary"]) / "all_labels.pkl"
    asset = Asset("sbg/all_labels.pkl", file_url=source.as_uri(), converted_suffix=".json", option="--vocabulary")
    with pytest.raises(MissingWeightsError) as error:  # tests run offline: no download is tried
        ensure_asset(asset, tmp_path)
    message = str(error.value)
    assert str(tmp_path / "sbg" / "all_labels.pkl") in message and source.as_uri() in message
    assert "--vocabulary" in message and "HF_HUB_OFFLINE" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a file:// URL: the real download code, no network
    path = ensure_asset(asset, tmp_path)
    assert path.read_bytes() == source.read_bytes()
    assert not list(path.parent.glob("*.part"))


def test_sbg_is_listed_and_runs_from_the_command_line(sbg, sbg_files, photos, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "presets.json").write_text(json.dumps({"my-sbg": {"family": "sbg", **sbg_files}}))
    assert cli_main(["models", "--json", "--models-dir", str(models)]) == 0
    listing = {r["id"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert listing["my-sbg"]["family"] == "sbg" and listing["my-sbg"]["ready"]
    mine = available_models(models)["my-sbg"].config
    assert mine.weights.path(models) == Path(sbg_files["weights"]) and mine.clip.config == sbg_files["clip_config"]
    files = {Path(f["path"]).name: f for f in listing["sbg-flickr8k"]["files"]}
    assert set(files) == {"selective-blind-guessing", "gpt2-tokenizer", "all_labels.pkl", "encyclopedia.pkl",
                          "timm--vit_large_patch14_clip_224.openai"}  # CLIP too: "ready" means every file
    assert "huggingface.co/Anshler/selective-blind-guessing" in files["selective-blind-guessing"]["source"]
    assert files["all_labels.pkl"]["source"].startswith("https://raw.githubusercontent.com/Anshler/ICG_sd_extension/")
    assert {"sbg-flickr8k", "fusecap"} <= set(available_models(models))

    args = [f"--{key.replace('_', '-')}={value}" for key, value in sbg_files.items()]
    assert cli_main(["caption", str(photos[0]), str(photos[1]), "--model", "sbg-flickr8k", *args, "--seed", str(SEED),
                     "--device", "cpu", "--quiet", "--models-dir", str(models)]) == 0
    captions = [line.split("\t")[1] for line in capsys.readouterr().out.strip().splitlines()]
    images = [Image.open(p).convert("RGB") for p in photos[:2]]
    assert captions == [" ".join(c.splitlines()) for c in sbg.caption(images, {"seed": SEED})]


def test_several_captions_are_its_guesses_in_clip_order(sbg, reference, sbg_images):
    """Candidates are the pool of guesses (num_candidates, 5 in the preset) in the order the original's
    'validation' ranks them; the Judge keeps the first captions_per_image."""
    ref, _, gpt, tokenizer = reference
    results = sbg.caption_candidates(torch.stack([sbg.preprocessor()(i) for i in sbg_images[:2]]),
                                     sbg.decoding_options({"seed": SEED, "captions_per_image": 3}))
    for image, got in zip(sbg_images[:2], results.texts):
        embedding = reference_embedding(reference, image)
        prompt = ", ".join(ref.keywords(embedding)) + " ###"
        guesses = [parse(sample_seeded(gpt, tokenizer, prompt, SEED, j)) for j in range(5)]
        probs = ref.prob_dict(embedding, guesses)
        expected = sorted(probs, key=lambda text: probs[text], reverse=True)
        assert got == expected and got[0] == ref.choose(embedding, guesses)
    assert results.image_features is not None  # CLIPScore reuses SBG's own image embedding
    with pytest.raises(Exception, match="sample"):
        sbg.caption_candidates(torch.stack([sbg.preprocessor()(sbg_images[0])]),
                               sbg.decoding_options({"captions_per_image": 2, "candidates": "beam"}))
