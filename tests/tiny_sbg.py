"""Tiny SBG assets with the published layouts (checkpoint-formats.md, sections 1b and 5B).

- a GPT-2 folder written by ``save_pretrained``: ``config.json`` (with gpt2's
  ``task_specific_params``) and ``model.safetensors`` with unprefixed keys and no ``lm_head``;
- ``all_labels.pkl`` (``(keyword, POS, frequency)`` tuples, most frequent first) and
  ``encyclopedia.pkl`` (all 11 keys, some lists empty), pickled with builtins only.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

LABELS = [
    ("a", "NOUN", 900), ("in", "ADV", 800), ("be", "VERB", 700), ("dog", "NOUN", 650), ("man", "NOUN", 600),
    ("two", "NUM", 550), ("white", "ADJ", 500), ("run", "VERB", 480), ("grass", "NOUN", 470),
    ("black", "ADJ", 460), ("down", "ADV", 450), ("beach", "NOUN", 440), ("young", "ADJ", 430),
    ("water", "NOUN", 420), ("street", "NOUN", 410), ("red", "ADJ", 400), ("ball", "NOUN", 390),
    ("over", "ADV", 380), ("bike", "NOUN", 370), ("little", "ADJ", 360), ("child", "NOUN", 350),
    ("play", "VERB", 340), ("park", "NOUN", 330), ("brown", "ADJ", 320), ("up", "ADV", 310),
    ("field", "NOUN", 300), ("snow", "NOUN", 290), ("indoor", "ADJ", 280), ("crowd", "NOUN", 270),
    ("top", "NOUN", 260), ("top", "ADJ", 250), ("rock", "NOUN", 240), ("blue", "ADJ", 230),
]

ENCYCLOPEDIA = {
    "scenery": {"sky": ["cloud", "blue sky", "sun"], "mountain": ["peak", "hill", "cliff", "rock"],
                "beach": ["sand", "wave", "shore"], "forest": ["tree", "wood"], "desert": ["dune"],
                "grassland": [], "tundra": ["ice"], "wetland": ["swamp", "marsh"],
                "city landscape": ["street", "building", "sidewalk", "bridge"], "rural landscape": ["farm", "barn"],
                "volcanic": [], "cave": ["tunnel"], "arctic": ["glacier"], "ocean": ["sea", "wave", "boat"],
                "indoor": ["room", "kitchen", "stage", "hall"]},
    "human": ["man", "boy", "girl", "woman", "people", "player", "biker", "child"],
    "animal": {"mammal": ["dog", "cat", "horse", "cow"], "fish": ["salmon"], "bird": ["duck", "pigeon"],
               "reptile": [], "worm": ["worm"], "arthropod": ["spider"], "mollusc": []},
    "plant": {"fungi": [], "seed": ["nut"], "sprout": [], "flower": ["rose", "tulip", "daisy"], "fruit": ["apple"],
              "vegetable": ["carrot"], "leaf": ["leaf"], "root": ["root"], "tree": ["oak", "pine"],
              "grass": ["lawn", "grass"], "moss": [], "algae": []},
    "object": {"tool": ["hammer"], "decoration": ["flag", "balloon"], "appliance": [], "utensil": ["cup"],
               "furniture": ["bench", "chair"], "vehicle": ["bike", "car", "bus", "boat"],
               "clothing and fashion": ["hat", "shirt"], "instrument": ["guitar"], "artifact": ["statue"],
               "mechanicals": [], "device": ["camera", "phone"], "fire": [], "liquid": ["water"],
               "food": ["pizza", "cake"]},
    "activity": {"looking": ["watch", "look"], "socializing": ["talk"], "eating": ["eat", "drink"],
                 "sleeping": ["sleep"], "standing": [], "wearing": ["wear"], "holding": ["hold", "carry"],
                 "moving": ["run", "jump", "walk", "ride"], "working": ["work"],
                 "leisure activity": ["play", "swim"], "sport activity": ["climb", "skate", "surf"]},
    "weather": {"rainy": ["rain"], "snowy": ["snow"], "foggy": ["fog"], "stormy": [], "sunny": ["sun"],
                "overcast": [], "rainbow": [], "cloudy": ["cloud"], "thunder": [], "lightning": [],
                "autumn": ["leaf"], "sunset": [], "starry": ["star"]},
    "time": {"morning": ["dawn"], "mid day": ["noon"], "afternoon": [], "evening": ["dusk"], "night": ["dark"]},
    "number": ["two", "one", "three"],
    "adverb": ["in", "down", "over", "up"],
    "adjective": ["white", "black", "young", "red"],
}


def build_vocabulary(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("all_labels.pkl", LABELS), ("encyclopedia.pkl", ENCYCLOPEDIA)):
        (folder / name).write_bytes(pickle.dumps(data, protocol=4))
    return folder


def build_gpt2(folder: Path, tokenizer_dir: Path, seed: int = 0, eos_scale: float = 3.0, std: float = 0.3):
    """A tiny GPT-2 saved like the SBG upload. ``eos_scale`` makes end-of-text likely enough that
    guesses end at different lengths, well before the 256-token limit."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=1, n_positions=512,
                        bos_token_id=eos, eos_token_id=eos,
                        task_specific_params={"text-generation": {"do_sample": True, "max_length": 50}})
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # our own seeded weights: the same tiny model under every transformers version
        for name, param in sorted(model.named_parameters()):
            if ".ln_" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        model.transformer.wte.weight[eos] *= eos_scale
    model.save_pretrained(str(folder), safe_serialization=True)
    return model
