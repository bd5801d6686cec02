"""FuseCap and SBG speed: the original per-image loops vs the package's batched paths, side by side.

Full-size models with random weights, no download:

- FuseCap: BLIP-base (ViT-B/16 at 384 px + BERT-base decoder), saved to a folder like the hub
  repo's. The per-image loop is the model card's demo (``from_pretrained`` of that folder, processor
  + ``generate(num_beams=3, max_length=60)`` per image); the batched path is a ``FuseCapCaptioner``
  loaded from the same folder the way users' models load, one batch at a time. Random weights give
  near-uniform next-token distributions, on which beam search either stops at once or never: the output
  embeddings are scaled up (peaked distributions, like a trained model's) and [SEP] gets a bias, so
  captions end after a realistic number of tokens instead of at 0 or 56. ``--repeats`` rounds each
  time the demo loop and then the batched path, and the best time of each counts (on a shared
  machine, load changes then hit both).
- SBG: open_clip ViT-L-14 + GPT-2 small. The per-image path is the ICG extension's: label lists
  it encoded at load are encoded once ("setup"), the tertiary lists, final keywords and the 5
  candidates are encoded per image, and the 5 candidates are sampled one ``generate`` call each
  (top-k 50, max_length 256). The batched path is ``SbgCaptioner.caption``: label features from
  the on-disk cache, images encoded per batch, all candidates of a batch in one ``generate``.
  "cold" is its first pass (cache empty), "warm" a later run reading the cache. The end-of-text
  embedding is scaled so random guesses end at realistic lengths. Without ``--vocabulary`` a
  synthetic vocabulary with the real sizes is used; ``--tertiary-cap`` shortens the encyclopedia
  lists (100 = the original), which makes the per-image path cheaper.

    .venv/bin/python bench/bench_fusecap_sbg.py --part fusecap --images 8 --batch-size 8
    .venv/bin/python bench/bench_fusecap_sbg.py --part sbg --images 4 --batch-size 4 --vocabulary DIR
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_results_argument, append_rows, encoder_figures, environment, photos, timed  # noqa: E402
from captioners.clip_backbone import ClipBackbone, ClipSpec  # noqa: E402
from captioners.families import fusecap, sbg  # noqa: E402
from captioners.families.sbg_keywords import LabelSets, TextFeatureStore, Vocabulary, read_vocabulary_file  # noqa: E402
from tests.reference_sbg import ReferenceSBG, parse  # noqa: E402
from tests.tiny_models import CAPTION_WORDS  # noqa: E402

PROMPT = "a picture of "


# ---- FuseCap ---------------------------------------------------------------------------------------
def bert_tokenizer(folder: Path):
    """A 30522-entry WordPiece vocabulary with BERT's special-token ids ([SEP] = 102)."""
    from transformers import BertTokenizerFast

    words = sorted(set(CAPTION_WORDS.replace(".", " ").split()) | {"picture", "of"})
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += [f"w{i}" for i in range(30522 - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(str(folder / "vocab.txt"))


def build_fusecap_folder(folder: Path, logit_scale: float, sep_bias: float) -> Path:
    """BLIP-base with random weights saved in the hub repo's layout (vocab.txt included): output
    embeddings scaled by ``logit_scale``, [SEP] biased by ``sep_bias`` (see the module docstring)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    processor = BlipProcessor(BlipImageProcessor(), bert_tokenizer(folder))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig()).eval()
    predictions = model.text_decoder.cls.predictions
    with torch.no_grad():
        predictions.decoder.weight.mul_(logit_scale)  # (tied to the word embeddings in transformers 5)
        predictions.bias[102] += sep_bias
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def bench_fusecap(args, device, dtype, workdir: Path) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = build_fusecap_folder(workdir / "FuseCap", args.logit_scale, args.sep_bias)
    # The batched side loads the folder the way users' models load (safetensors, the package's setup).
    captioner = fusecap.FuseCapCaptioner(fusecap.FuseCapCaptioner.spec_for_path(folder), workdir)
    captioner.load(device, dtype)
    # The demo's model and processor: transformers' own, read from the same folder as on the model card.
    model = BlipForConditionalGeneration.from_pretrained(str(folder)).eval().to(device, dtype)
    processor = BlipProcessor.from_pretrained(str(folder))
    images = photos(args.images)

    def demo_loop():
        out = []
        for image in images:
            inputs = processor(image, PROMPT, return_tensors="pt").to(device)
            ids = model.generate(pixel_values=inputs["pixel_values"].to(dtype), input_ids=inputs["input_ids"],
                                 attention_mask=inputs["attention_mask"], num_beams=3, max_length=60)
            out.append(processor.decode(ids[0], skip_special_tokens=True))
        return out

    def batched():
        out = []
        for start in range(0, len(images), args.batch_size):
            out += captioner.caption(images[start:start + args.batch_size], {"keep_prompt": True})
        return out

    ref_times, got_times = [], []
    with torch.inference_mode():
        captioner.caption(images[:1], {"keep_prompt": True, "max_new_tokens": 2})  # warm-up
        for _ in range(max(1, args.repeats)):
            ref, ref_s = timed(demo_loop)
            got, got_s = timed(batched)
            ref_times.append(ref_s)
            got_times.append(got_s)
    ref_s, got_s = min(ref_times), min(got_times)
    lengths = [len(processor.tokenizer.tokenize(c)) for c in ref]
    same = sum(a == b.strip() for a, b in zip(got, ref))
    print(f"\nFuseCap BLIP-base, beam 3, max_length 60, {args.images} images, caption tokens "
          f"mean {statistics.mean(lengths):.1f} min {min(lengths)} max {max(lengths)}, best of {len(ref_times)}")
    print(f"{'':<10} {'per-image demo img/s':>21} {'batched img/s':>14} {'speed-up':>9} {'same captions':>14}")
    print(f"{'batch ' + str(args.batch_size):<10} {args.images / ref_s:>21.3f} {args.images / got_s:>14.3f} "
          f"{ref_s / got_s:>8.2f}x {same:>9}/{len(ref)}")
    preprocess = captioner.preprocessor()
    pixels = torch.stack([preprocess(i) for i in images[:args.batch_size]]).to(device, dtype)
    encoder = encoder_figures("BLIP ViT-B/16 384px", captioner.encode_images, pixels)
    print(encoder.line())
    env = {**environment(device, dtype), "batch": args.batch_size, "images": args.images, **encoder.columns()}
    append_rows("bench_fusecap_sbg", [
        {**env, "measure": f"FuseCap {who}", "images_per_s": round(args.images / s, 4),
         "note": f"same captions {same}/{len(ref)}"}
        for who, s in (("per-image demo loop", ref_s), ("batched", got_s))], args.results)


# ---- SBG -------------------------------------------------------------------------------------------
SIZES = {"scenery": 15, "animal": 7, "plant": 12, "object": 14, "activity": 11, "weather": 13, "time": 5}


def synthetic_vocabulary(seed: int = 0):
    """Pseudo-words with the real pickles' sizes (5346 labels; list lengths drawn like the real ones)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word():
        return "".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))

    pos = ["NOUN"] * 3260 + ["ADJ"] * 931 + ["VERB"] * 910 + ["ADV"] * 209 + ["NUM"] * 36
    rng.shuffle(pos)
    labels = [(word(), p, 10000 - i) for i, p in enumerate(pos)]
    encyclopedia = {name: {f"{name} {k}": [word() for _ in range(rng.choice([0, 5, 20, 50, 120, 300]))]
                           for k in range(size)} for name, size in SIZES.items()}
    encyclopedia["human"] = [word() for _ in range(195)]
    for name, size in (("number", 36), ("adverb", 209), ("adjective", 931)):
        encyclopedia[name] = [word() for _ in range(size)]
    return labels, encyclopedia


def capped(encyclopedia, cap: int):
    return {name: ({k: words[:cap] for k, words in value.items()} if isinstance(value, dict) else value)
            for name, value in encyclopedia.items()}


def gpt2_tokenizer(folder: Path, texts: list[str]):
    """A byte-level BPE trained on the vocabulary, so keywords are mostly single tokens as in GPT-2's."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=8000, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    return GPT2TokenizerFast.from_pretrained(str(folder))


def bench_sbg(args, device, dtype, workdir: Path) -> None:
    import open_clip
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.vocabulary:
        folder = Path(args.vocabulary)
        data = [read_vocabulary_file(next(folder.glob(f"{stem}.*")), convert=False)
                for stem in ("all_labels", "encyclopedia")]
        labels, encyclopedia = data
    else:
        labels, encyclopedia = synthetic_vocabulary()
    encyclopedia = capped(encyclopedia, args.tertiary_cap)
    words = [k for k, _, _ in labels] + [w for v in encyclopedia.values() for w in (
        [x for ws in v.values() for x in ws] + list(v) if isinstance(v, dict) else v)]
    tokenizer = gpt2_tokenizer(workdir / "gpt2-tokenizer", [" ".join(words), CAPTION_WORDS] * 3)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos)).eval()
    with torch.no_grad():
        gpt.transformer.wte.weight[eos] *= args.eos_scale
    gpt = gpt.to(device, dtype)
    clip_model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained=None, force_quick_gelu=True)
    clip_model = clip_model.eval().requires_grad_(False).to(device, dtype)
    clip_tokenizer = open_clip.get_tokenizer("ViT-L-14")
    images = photos(args.images)
    count = 5

    # -- per image, as the ICG extension
    ref = ReferenceSBG(clip_model, clip_tokenizer, labels, encyclopedia, memoize="fixed")
    _, setup_s = timed(lambda: [ref.text_features(lst, fixed=True) for lst in ref.fixed_lists()])

    def reference():
        out, new_tokens = [], []
        for image in images:
            with torch.no_grad():
                features = clip_model.encode_image(preprocess(image).unsqueeze(0).to(device, dtype)).float()
            features = features / features.norm(dim=-1, keepdim=True)
            prompt = ", ".join(ref.keywords(features)) + " ###"
            ids = torch.tensor([tokenizer.encode(prompt)], device=device)
            candidates = []
            for _ in range(count):
                with torch.no_grad():
                    seq = gpt.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50,
                                       max_length=256, pad_token_id=eos)
                new_tokens.append(seq.shape[1] - ids.shape[1])
                candidates.append(parse(tokenizer.decode(seq[0], skip_special_tokens=True,
                                                         clean_up_tokenization_spaces=True)))
            out.append(ref.choose(features, candidates))
        return out, new_tokens

    # -- batched, cached
    spec = sbg.PRESETS[0]
    vocabulary = Vocabulary(labels, encyclopedia)
    cache = workdir / "sbg" / "text_features" / "bench.safetensors"

    def captioner():
        cap = sbg.SbgCaptioner(spec, workdir)
        cap.gpt, cap.tokenizer, cap.device, cap.dtype = gpt, tokenizer, device, dtype
        cap.clip = ClipBackbone(clip_model, preprocess, clip_tokenizer, ClipSpec("ViT-L-14", "random"))
        cap.sets = LabelSets(vocabulary)
        cap.store = TextFeatureStore(cap.clip.encode_texts, cache, "bench")
        cap.store.to(device)
        return cap

    def batched(cap):
        out = []
        for start in range(0, len(images), args.batch_size):
            out += cap.caption(images[start:start + args.batch_size])
        return out

    torch.manual_seed(1)
    (_, new_tokens), ref_s = timed(reference)
    cold_cap, load_cold_s = timed(captioner)
    _, cold_s = timed(lambda: batched(cold_cap))
    warm_cap, load_warm_s = timed(captioner)  # a later run: reads the cache file
    _, warm_s = timed(lambda: batched(warm_cap))
    prompts = [len(tokenizer.encode(", ".join(ref.keywords(
        torch.nn.functional.normalize(clip_model.encode_image(preprocess(i)[None].to(device, dtype)).float(), dim=-1)))))
        for i in images[:2]]
    n = args.images
    print(f"\nSBG (ViT-L-14 + GPT-2 small), {n} images, batch {args.batch_size}, {count} candidates, "
          f"{len(vocabulary.keywords)} keywords, tertiary lists <= {args.tertiary_cap} words, "
          f"cache {len(warm_cap.store.index)} labels; guesses: mean {statistics.mean(new_tokens):.1f} new tokens "
          f"(min {min(new_tokens)}, max {max(new_tokens)}); prompts ~{statistics.mean(prompts):.0f} tokens")
    print(f"{'':<28} {'seconds':>9} {'img/s':>8} {'speed-up vs per-image':>22}")
    print(f"{'per-image setup (at load)':<28} {setup_s:>9.2f}")
    print(f"{'per-image captioning':<28} {ref_s:>9.2f} {n / ref_s:>8.3f}")
    print(f"{'batched, cold cache':<28} {cold_s:>9.2f} {n / cold_s:>8.3f} {ref_s / cold_s:>21.2f}x")
    print(f"{'batched, warm cache':<28} {warm_s:>9.2f} {n / warm_s:>8.3f} {ref_s / warm_s:>21.2f}x")
    print(f"{'cache load (later runs)':<28} {load_warm_s:>9.2f}")
    pixels = torch.stack([preprocess(i) for i in images[:args.batch_size]]).to(device, dtype)
    encoder = encoder_figures("ViT-L-14", clip_model.encode_image, pixels)
    print(encoder.line())
    env = {**environment(device, dtype), "batch": args.batch_size, "images": n, **encoder.columns()}
    append_rows("bench_fusecap_sbg", [
        {**env, "measure": f"SBG {who}", "images_per_s": round(n / s, 4)}
        for who, s in (("per-image captioning", ref_s), ("batched, cold cache", cold_s),
                       ("batched, warm cache", warm_s))], args.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("fusecap", "sbg", "both"), default="both")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="FuseCap: rounds; the best time of each side counts")
    parser.add_argument("--logit-scale", type=float, default=10.0, help="FuseCap: peaks the random next-token odds")
    parser.add_argument("--sep-bias", type=float, default=16.0, help="FuseCap: makes random captions end earlier")
    parser.add_argument("--eos-scale", type=float, default=6.0, help="SBG: makes random guesses end earlier")
    parser.add_argument("--vocabulary", help="SBG: folder with all_labels and encyclopedia (.pkl or .json)")
    parser.add_argument("--tertiary-cap", type=int, default=100, help="SBG: words kept per encyclopedia list")
    add_results_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"device {device} ({dtype}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("fusecap", "both"):
            bench_fusecap(args, device, dtype, Path(tmp))
        if args.part in ("sbg", "both"):
            bench_sbg(args, device, dtype, Path(tmp))


if __name__ == "__main__":
    main()
