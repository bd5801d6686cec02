"""Caption on save: a caption file ``<image stem>.txt`` beside every final image the WebUI saves.

For people who generate synthetic datasets. Registered with ``script_callbacks.on_image_saved`` by
``scripts/captioners_save_captions.py``; the WebUI calls it after writing each image (txt2img and
img2img samples, Extras, the gallery's Save button...) with ``params.image``, ``params.filename``,
``params.p`` (None outside a generation) and ``params.pnginfo`` (the infotext under "parameters").

- Off unless Settings → Captioners → "Caption on save" is on; the model is the Settings' model.
- Only final images get one: grids (a caption of a contact sheet is no dataset caption) and the
  intermediate copies the WebUI can save (before highres fix / face restoration / color correction,
  inpainting masks and composites, img2img init images) are left out (``is_final``).
- ``params.filename`` is the name the WebUI meant; with Settings → Saving → "Saving the image to an
  existing file: Add number suffix" A1111 writes ``<name>-1.png`` instead without telling the
  callback, so the written file is found again (``saved_file``).
- It runs inside the generation, which holds the WebUI's queue lock: the service is called with
  ``in_current_job=True`` so it never waits for that lock.
- An existing caption file is kept unless the setting says overwrite (then a ``.bak`` copy is kept
  first). Note the WebUI's own "Create a text file next to every image with generation parameters"
  writes that same name just before this runs.
- Writing goes through the batch writer's atomic helpers (a crash never leaves half a file).
- Any failure is one log line: saving images never breaks because of a caption.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from captioners.batch.job import ExistingPolicy
from captioners.batch.writing import decide, read_existing, write_caption
from captioners.webui.settings import SAVE_EXISTING

log = logging.getLogger(__name__)

ENABLED = "captioners_save_captions"
WITH_PROMPT = "captioners_save_captions_prompt"
EXISTING = "captioners_save_captions_existing"
SEPARATOR = ", "  # between the prompt and the caption
# What A1111 (and Forge, which keeps its processing.py) appends to a sample's name for the intermediate
# copies it saves during a generation (processing.py's save_image(..., suffix=...) calls).
INTERMEDIATE_SUFFIXES = ("-before-highres-fix", "-before-face-restoration", "-before-color-correction",
                         "-mask", "-mask-composite")
GRID_PREFIX = "grid-"  # a generation's grids are saved with basename "grid": grid-0001...
# A key: value pair of an infotext's last line; three or more make it the parameters line (as the
# WebUI's own parser decides).
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def on_image_saved(params: Any) -> None:
    """The ``on_image_saved`` callback: never raises."""
    from modules import shared

    opts = shared.opts
    if not getattr(opts, ENABLED, False):
        return
    from captioners.webui.extension import Extension

    filename = getattr(params, "filename", None)
    try:
        save_caption(params, opts, Extension.running().service)
    except Exception as exc:  # one line; the traceback only at debug level
        log.warning("Captioners: no caption file for %s: %s", filename, _one_line(exc))
        log.debug("Captioners: caption on save failed", exc_info=True)


def save_caption(params: Any, opts: Any, service: Any) -> Path | None:
    """Write the caption file of the saved image; returns it (None when nothing was written)."""
    meant = Path(params.filename)
    if not is_final(meant, getattr(params, "p", None), opts):
        log.debug("Captioners: no caption file for %s (a grid or an intermediate image)", meant)
        return None
    target = saved_file(meant, opts).with_suffix(".txt")
    policy = _policy(opts)
    if policy == ExistingPolicy.SKIP and _has_text(target):  # checked first: no caption is made for nothing
        log.info("Captioners: kept the existing %s", target)
        return None
    _, captions = service.caption([_rgb(params.image)], in_current_job=True)
    text = captions[0].strip()
    prompt = image_prompt(params) if getattr(opts, WITH_PROMPT, False) else ""
    if prompt:
        text = f"{prompt}{SEPARATOR}{text}" if text else prompt
    old_bytes, old = read_existing(target)  # as it is now: it may have appeared while captioning
    decision = decide(old, text, policy, SEPARATOR, dedupe_tags=False)
    if decision.action in ("skip", "unchanged"):
        log.info("Captioners: kept the existing %s", target)
        return None
    backup = write_caption(target, decision.text, old_bytes, backup=True)
    log.info("Captioners: wrote %s%s", target, f" (the old one kept as {backup.name})" if backup else "")
    return target


def saved_file(meant: Path, opts: Any) -> Path:
    """The file the WebUI wrote for ``params.filename``. With "Add number suffix" A1111 writes
    ``<name>-1.png`` (``-2``...) when ``<name>.png`` exists, counting up from 1 to the first free name,
    and the callback still gets ``<name>.png``. This image is the newest file of that unbroken run
    (not simply its last name: ``<name>.png`` may have been free again, with older numbered copies left)."""
    if getattr(opts, "save_images_replace_action", "Replace") == "Replace":
        return meant
    run, number = [meant], 1
    while (numbered := meant.with_name(f"{meant.stem}-{number}{meant.suffix}")).exists():
        run, number = [*run, numbered], number + 1
    return max(run, key=_modified)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def is_final(meant: Path, p: Any, opts: Any) -> bool:
    """Whether the image is a final output (a sample, an Extras result, a gallery Save), not a grid
    or an intermediate copy. The callback is not told which; the names and folders the WebUI uses tell."""
    if p is None:  # Extras; img2img's init images, saved without p, named by their hash, in their own folder
        return not _in_folder(meant, getattr(opts, "outdir_init_images", None))
    return not (is_grid(meant, p) or meant.stem.endswith(INTERMEDIATE_SUFFIXES))


def is_grid(image_file: Path, p: Any) -> bool:
    """Whether the WebUI saved a grid: the gallery's Save of a grid (its p, rebuilt from the generation,
    has ``index_of_first_image``: the images before it are grids), a ``grid-...`` name of a generation,
    or a file in the generation's grids folder when that is not its samples folder too."""
    if p is None:
        return False
    first_image, index = getattr(p, "index_of_first_image", None), getattr(p, "batch_index", None)
    if isinstance(first_image, int) and isinstance(index, int):
        return index + 1 < first_image  # the gallery's Save sets batch_index to the image's index - 1
    if image_file.stem.startswith(GRID_PREFIX):
        return True
    grids = getattr(p, "outpath_grids", None)
    samples = getattr(p, "outpath_samples", None)
    if not grids or (samples and os.path.abspath(samples) == os.path.abspath(grids)):
        return False
    return _in_folder(image_file, grids)


def _in_folder(image_file: Path, folder: str | None) -> bool:
    return bool(folder) and Path(os.path.abspath(image_file)).is_relative_to(os.path.abspath(folder))


def image_prompt(params: Any) -> str:
    """The prompt of this very image (its infotext's; batches can give each image its own), on one
    line; else ``p.prompt``; else nothing (Extras has no prompt)."""
    info = (getattr(params, "pnginfo", None) or {}).get("parameters")
    if isinstance(info, str) and info.strip():
        return prompt_of_infotext(info)
    prompt = getattr(getattr(params, "p", None), "prompt", None)
    return " ".join(prompt.split()) if isinstance(prompt, str) else ""


def prompt_of_infotext(infotext: str) -> str:
    """The prompt part of an infotext: the lines before "Negative prompt:" and the parameters line,
    joined on one line (training tools read a caption file's first line)."""
    *lines, last = infotext.strip().split("\n")
    if len(PARAM.findall(last)) < 3:
        lines.append(last)
    prompt = []
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            break
        prompt.append(line.strip())
    return " ".join(part for part in prompt if part)


def _policy(opts: Any) -> ExistingPolicy:
    value = getattr(opts, EXISTING, "skip")
    return ExistingPolicy(value if value in SAVE_EXISTING else "skip")


def _has_text(target: Path) -> bool:
    """A non-empty file (a link or an unreadable file counts too: it is never replaced blindly)."""
    try:
        _, text = read_existing(target)
    except (OSError, UnicodeDecodeError):
        return True
    return bool(text and text.strip())


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
