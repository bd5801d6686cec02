"""Shared fixtures: tiny tokenizer, tiny CLIP and tiny checkpoints, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import tiny_models

# Fixtures of the stand-in WebUI (webui, client, tiny_models_dir), shared by several test modules.
pytest_plugins = ("tests.webui_host",)

# Tests never touch the network: any download attempt must fail fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Tiny models gain nothing from several CPU threads, and on a busy 2-core machine OpenMP thread
# teams wait on each other: one thread makes the suite several times faster.
torch.set_num_threads(1)

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-assets")


@pytest.fixture(scope="session")
def tokenizer_dir(assets_dir) -> Path:
    return tiny_models.build_tokenizer(assets_dir / "tokenizer")


@pytest.fixture(scope="session")
def tiny_clip(assets_dir) -> tuple[Path, Path]:
    return tiny_models.build_clip(assets_dir / "clip")


@pytest.fixture(scope="session")
def icg_checkpoint(assets_dir, tokenizer_dir) -> tiny_models.TinyCheckpoint:
    return tiny_models.build_checkpoint(assets_dir / "ckpt", tokenizer_dir, "icg", stop_scale=3.0)


@pytest.fixture()
def models_dir(tmp_path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    """The twelve shared real photos; where a checkout lacks ../shared, twelve generated JPEGs."""
    files = sorted(PHOTOS.glob("*.jpg"))
    return files or tiny_models.generate_photos(tmp_path_factory.mktemp("photos"), 12)


@pytest.fixture(scope="session")
def clip_overrides(tiny_clip, tokenizer_dir) -> dict[str, str]:
    """Overrides that make any CLIP-prefix preset run on the tiny CLIP and tokenizer, offline."""
    config, weights = tiny_clip
    return {"clip_config": str(config), "clip_weights": str(weights), "tokenizer": str(tokenizer_dir)}


@pytest.fixture(scope="session")
def load_tiny(clip_overrides, tmp_path_factory):
    """Load a tiny checkpoint through the public registry path, on the CPU."""
    return tiny_loader(clip_overrides, tmp_path_factory.mktemp("models-for-load"))


def tiny_loader(overrides: dict[str, str], models_dir: Path):
    """checkpoint path (and more overrides) -> the captioner loaded on the CPU with ``overrides``."""
    from captioners.registry import create_captioner

    def load(checkpoint_path: Path, **extra):
        return create_captioner(str(checkpoint_path), models_dir, {**overrides, **extra}).load("cpu")

    return load


@pytest.fixture(scope="session")
def scoring_clip(assets_dir) -> tuple[Path, Path]:
    """A tiny CLIP whose cosines with the photos are often positive (the default tiny CLIP's are
    negative, so every CLIPScore would be 0 and a ranking by score would test nothing)."""
    return tiny_models.build_clip(assets_dir / "judge-clip", name="tiny-judge-clip", seed=3)


@pytest.fixture(scope="session")
def scoring_overrides(scoring_clip, tokenizer_dir) -> dict[str, str]:
    config, weights = scoring_clip
    return {"clip_config": str(config), "clip_weights": str(weights), "tokenizer": str(tokenizer_dir)}


@pytest.fixture(scope="session")
def load_scoring_tiny(scoring_overrides, tmp_path_factory):
    """Load a tiny CLIP-prefix checkpoint on the scoring tiny CLIP, on the CPU."""
    return tiny_loader(scoring_overrides, tmp_path_factory.mktemp("scoring-models"))
