"""Helpers shared by the batch tests: folder snapshots, reference captions, CLI arguments."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from captioners.batch.shaping import one_line
from captioners.batch.writing import TEMP_SUFFIX
from captioners.images import load_image


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder``: content and modification time (readable files only)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and os.access(path, os.R_OK):
            state[str(path.relative_to(folder))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return state


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def reference_caption(captioner, image: Path) -> str:
    """What captioning this one image on its own gives (the batch must write exactly this)."""
    return one_line(captioner.caption([load_image(image)])[0])


def copy_photos(photos: list[Path], folder: Path, count: int, size: tuple[int, int] | None = None) -> list[Path]:
    """``count`` photos (cycling through the given ones) as ``img_NNN.jpg`` in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        target = folder / f"img_{i:03d}.jpg"
        if size:
            Image.open(photos[i % len(photos)]).convert("RGB").resize(size).save(target, quality=85)
        else:
            shutil.copy(photos[i % len(photos)], target)
        out.append(target)
    return out


def model_args(checkpoint: Path, tiny_clip: tuple[Path, Path], tokenizer_dir: Path, models_dir: Path) -> list[str]:
    config, weights = tiny_clip
    return ["--model", str(checkpoint), "--clip-config", str(config), "--clip-weights", str(weights),
            "--tokenizer", str(tokenizer_dir), "--models-dir", str(models_dir), "--device", "cpu"]
