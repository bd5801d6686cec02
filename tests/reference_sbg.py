"""A per-image, straightforward SBG, written from the description (checkpoint-formats.md, 1b).

One image at a time, text features computed on the fly for every label list (as the ICG extension
does), ``{label: prob}`` dicts sorted by probability, GPT-2 run one candidate at a time without a
cache. Shares no code with ``captioners`` so the tests compare two independent implementations.
"""

from __future__ import annotations

from itertools import combinations

import torch

PRIME = ["landscape", "people", "animal", "plant", "some object"]
MAPPING = {"landscape": "scenery", "people": "human", "animal": "animal", "plant": "plant", "some object": "object"}


class ReferenceSBG:
    """``memoize`` keeps label-list features for later images: ``"fixed"`` only the lists the ICG
    extension encoded once at load (keywords, prime and secondary labels), as the original does;
    ``"all"`` every list (the same numbers, computed once: tests use it for speed)."""

    def __init__(self, clip, clip_tokenizer, all_labels, encyclopedia, memoize: str = "fixed"):
        self.clip, self.clip_tokenizer, self.enc = clip, clip_tokenizer, encyclopedia
        self.memoize, self.memo = memoize, {}
        self.labels = [k for k, pos, _ in all_labels if pos in ("NOUN", "ADV", "ADJ")][:1000]
        self.prime_labels = ["picture of " + a + "." for a in PRIME]
        self.prime_labels += ["picture of " + a + " and " + b + "." for a, b in combinations(PRIME, 2)]
        self.prime_labels += ["picture of " + a + " and " + b + " and " + c + "." for a, b, c in combinations(PRIME, 3)]
        people = ["a man", "a woman", "a boy", "a girl", "an old man", "an old woman"]
        for count in ["two", "three", "four"]:
            for group in ["men", "women", "boys", "girls", "old men", "old women"]:
                people.append(count + " " + group)
        people += [count + " people" for count in ["two", "three", "four"]] + ["a crowd of people"]
        self.secondary = {"human": ["picture of " + p + "." for p in people]}
        for mode in ["scenery", "animal", "plant", "object"]:
            self.secondary[mode] = ["picture of " + k + "." for k in encyclopedia[mode] if k != "clothing and fashion"]
        self.occupation = ["picture of " + w + "." for w in encyclopedia["human"]]
        colours = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black"]
        self.clothing = ["wearing " + c + " " + g + "." for g in ["shirt", "suit", "cloth", "jacket"] for c in colours]
        self.activity = ["activity is " + k + "." for k in encyclopedia["activity"]]
        self.during = {check: ["picture during " + k + "." for k in encyclopedia[check]] for check in ["time", "weather"]}

    def fixed_lists(self):
        """The lists the ICG extension encodes when the model loads."""
        return [self.labels, self.prime_labels, *self.secondary.values(), self.occupation, self.clothing,
                self.activity, *self.during.values()]

    def text_features(self, labels, fixed: bool = False):
        key = tuple(labels)
        if key in self.memo:
            return self.memo[key]
        device = next(self.clip.parameters()).device
        with torch.no_grad():
            features = self.clip.encode_text(self.clip_tokenizer(labels).to(device)).float()
        features = features / features.norm(dim=-1, keepdim=True)
        if self.memoize == "all" or (self.memoize == "fixed" and fixed):
            self.memo[key] = features
        return features

    def prob_dict(self, image, labels, fixed: bool = False):
        probs = (100.0 * image @ self.text_features(labels, fixed).T).softmax(dim=-1).tolist()[0]
        table = {}
        for label, prob in zip(labels, probs):
            table[label] = prob
        return dict(sorted(table.items(), key=lambda item: item[1], reverse=True))

    def top(self, image, labels, fixed: bool = False):
        return list(self.prob_dict(image, labels, fixed).keys()) if labels else []

    def keywords(self, image):
        """image: (1, D) normalised CLIP embedding -> the sorted final keywords."""
        main = []
        total = 0.0
        for label, prob in self.prob_dict(image, self.labels, fixed=True).items():
            total += prob
            main.append(label)
            if total > 0.5:
                break
        prime = self.top(image, self.prime_labels, fixed=True)[0] + " landscape some object"
        for subject in PRIME:
            if subject not in prime:
                continue
            ranked = self.top(image, self.secondary[MAPPING[subject]], fixed=True)
            if subject == "people":
                main.append(ranked[0].split("picture of")[1].strip()[:-1])
                occupation = self.top(image, self.occupation, fixed=True)
                main.append(occupation[0].split("picture of")[1].strip()[:-1])
                main.append(self.top(image, self.clothing, fixed=True)[0].split("wearing")[1].strip()[:-1])
                continue
            key = ranked[0].split("picture of")[1].strip()[:-1]
            main.append(key)
            words = ["picture of " + w + "." for w in self.enc[MAPPING[subject]][key]][:100]
            tertiary = self.top(image, words)
            keep = 1 if subject == "animal" else 3
            main += [label.split("picture of")[1].strip()[:-1] for label in tertiary[:keep]]
        for check in ["time", "weather", "activity"]:
            if check == "weather" and "indoor" in main:
                continue
            if check == "activity" and "people" not in prime and "animal" not in prime:
                continue
            if check == "activity":
                key = self.top(image, self.activity, fixed=True)[0].split("activity is")[1].strip()[:-1]
                words = ["activity is " + w + "." for w in self.enc["activity"][key]][:100]
                tertiary = self.top(image, words)
                if tertiary:
                    main.append(tertiary[0].split("activity is")[1].strip()[:-1])
            else:
                label = self.top(image, self.during[check], fixed=True)[0]
                main.append(label.split("picture during")[1].strip()[:-1])
        return list(self.prob_dict(image, main).keys())

    def choose(self, image, captions):
        if len(captions) == 1:
            return captions[0]
        return list(self.prob_dict(image, captions).keys())[0]


def parse(generated_text: str) -> str:
    return generated_text.split("###")[1].strip().split(".")[0].strip() + " ."


def sample_seeded(gpt, tokenizer, prompt: str, seed: int, candidate: int, max_length: int = 256, top_k: int = 50):
    """One guess, token by token, with the package's documented seeding: candidate j draws one
    uniform number per step from a generator seeded with (seed * 1000003 + j) mod 2**63, and takes
    the top-k token whose cumulative probability first exceeds it."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + candidate) % 2**63)
    ids = tokenizer.encode(prompt)
    eos = tokenizer.eos_token_id
    for _ in range(max_length - len(ids)):
        with torch.no_grad():
            logits = gpt(torch.tensor([ids])).logits[0, -1].float()
        values, indices = logits.topk(min(top_k, logits.shape[-1]))
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)
        u = torch.rand(1, generator=generator)
        token = int(indices[min(int((cumulative <= u * cumulative[-1]).sum()), len(indices) - 1)])
        if token == eos:
            break
        ids.append(token)
    # The pipeline's clean-up, which transformers 5 no longer applies to GPT-2 tokenizers by itself.
    return tokenizer.clean_up_tokenization(tokenizer.decode(ids, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False))
