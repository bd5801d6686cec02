"""Tiny models with the real checkpoints' key layouts, built without any download.

The networks here are written from the published descriptions (checkpoint-formats.md, section 2)
independently of ``captioners``, so loading their state dicts through the package's loader checks
the loader against the real layouts rather than against itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CAPTION_WORDS = (
    "a dog runs through the grass . two children play on the beach . a man in a red shirt rides a bike . "
    "a woman is sitting on a bench in the park . the black cat sleeps near the window . people walk down "
    "a busy city street . a brown horse stands in a field . a boy jumps into the blue water . a group of "
    "people are standing in front of a building . a little girl holds a white ball ."
)

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,  # as OpenAI's CLIPs, which the captioners' presets use
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE GPT-2 tokenizer trained on a few captions; '.' is one token."""
    from tokenizers import ByteLevelBPETokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator([CAPTION_WORDS] * 20, vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=["<|endoftext|>"])
    tokenizer.save_model(str(folder))
    return folder


def build_clip(folder: Path, name: str = "tiny-test-clip", seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip model: its config JSON and a safetensors state dict."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


# ---- reference ClipCap networks (from the description of rmokady's train.py) ------------------
class RefMLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q = self.to_queries(x).reshape(b, n, self.heads, c // self.heads)
        kv = self.to_keys_values(x).reshape(b, n, 2, self.heads, c // self.heads)
        k, v = kv[:, :, 0], kv[:, :, 1]
        att = torch.einsum("bnhd,bmhd->bnmh", q, k) * (c // self.heads) ** -0.5
        att = att.softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, n, c))


class RefMlpTransformer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class RefLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlpTransformer(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.layers = nn.ModuleList([RefLayer(dim, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class RefTransformerMapper(nn.Module):
    def __init__(self, dim_clip: int, dim_embedding: int, prefix_length: int, clip_length: int, num_layers: int):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = RefTransformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length:]


class RefClipCaption(nn.Module):
    """``gpt`` + ``clip_project``, like ClipCaptionModel."""

    def __init__(self, gpt: nn.Module, clip_project: nn.Module, prefix_length: int):
        super().__init__()
        self.gpt = gpt
        self.clip_project = clip_project
        self.prefix_length = prefix_length

    def prefix(self, clip_embedding: torch.Tensor) -> torch.Tensor:
        n_embd = self.gpt.transformer.wte.weight.shape[1]
        return self.clip_project(clip_embedding).view(-1, self.prefix_length, n_embd)


@dataclass
class TinyCheckpoint:
    path: Path
    model: RefClipCaption
    stop_token: int


def build_gpt(vocab_size: int, n_embd: int = 64, n_layer: int = 2, n_positions: int = 128,
              init_std: float = 0.3, stop_token: int | None = None, stop_scale: float = 1.0):
    """A random GPT-2 whose logits are spread wide enough that argmax has clear winners.

    ``stop_scale`` makes the '.' embedding row larger, so some captions end early and others run
    to the length limit: decoding tests then cover captions of different lengths.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=max(1, n_embd // 64),
                        n_positions=n_positions, initializer_range=init_std,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    gpt = GPT2LMHeadModel(config).eval()
    if stop_token is not None and stop_scale != 1.0:
        with torch.no_grad():
            gpt.transformer.wte.weight[stop_token] *= stop_scale
    return gpt


def build_checkpoint(folder: Path, tokenizer_dir: Path, layout: str = "icg", prefix_size: int = 32,
                     prefix_length: int = 4, seed: int = 0, stop_scale: float = 1.0, n_positions: int = 128,
                     legacy_buffers: bool = False, drop_lm_head: bool = False, name: str | None = None,
                     n_embd: int = 64, n_layer: int = 2) -> TinyCheckpoint:
    """Save a tiny ClipCap-family ``.pt`` in one of the published layouts.

    layout: ``icg`` / ``mlp`` (MLP mapper), ``linear`` (prefix_length > 10 variant), ``transformer``.
    """
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    stop = tokenizer.encode(".")[0]
    torch.manual_seed(seed)
    gpt = build_gpt(len(tokenizer), n_embd, n_layer, n_positions, stop_token=stop, stop_scale=stop_scale)
    out = n_embd * prefix_length
    if layout in ("icg", "mlp"):
        project: nn.Module = RefMLP((prefix_size, out // 2, out))
    elif layout == "linear":
        project = nn.Linear(prefix_size, out)
    elif layout == "transformer":
        project = RefTransformerMapper(prefix_size, n_embd, prefix_length, prefix_length, num_layers=2)
    else:
        raise ValueError(layout)
    # Wider mapping weights make prefixes differ clearly between images.
    with torch.no_grad():
        for p in project.parameters():
            p.normal_(0, 0.5)
    model = RefClipCaption(gpt, project, prefix_length).eval()
    state = model.state_dict()
    if legacy_buffers:  # what transformers ~4.10 saved (rmokady's files)
        for i in range(n_layer):
            state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(
                torch.ones(n_positions, n_positions, dtype=torch.uint8)).view(1, 1, n_positions, n_positions)
            state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if drop_lm_head:
        state.pop("gpt.lm_head.weight")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"tiny_{layout}{'_legacy' if legacy_buffers else ''}.pt")
    torch.save(state, path)
    return TinyCheckpoint(path, model, stop)


def generate_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (gradients, shapes, noise) of mixed sizes, for checkouts without ../shared."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = rng.choice([(640, 480), (500, 375), (480, 640), (612, 612)])
        image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(width), rng.randrange(height)
            color = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)), fill=color)
        path = folder / f"photo_{i:02d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths
