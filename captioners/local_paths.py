"""Local copies of a model's files, saved as an entry of ``<models folder>/presets.json``.

The Models tab's path fields write here, so the choice also holds for the command line and the API.
A built-in model gets ``{"<id>": {"base": "<id>", "weights": "/my/copy.pt"}}``, which replaces it
under the same id; a presets-file model has its own entry updated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from captioners.base import ModelSpec
from captioners.errors import CaptionerError
from captioners.registry import FAMILIES, PATH_KEYS, PRESETS_FILE, builtin_specs, read_presets_entries, spec_from_preset


def path_keys(spec: ModelSpec) -> list[str]:
    """The file-naming options this model's family accepts."""
    return [key for key in PATH_KEYS if key in FAMILIES[spec.family].override_keys]


def read_entries(models_dir: Path) -> dict[str, dict]:
    try:
        return read_presets_entries(models_dir)
    except CaptionerError as exc:
        raise CaptionerError(f"{exc} Nothing was saved: fix or remove it first.") from None


def current_paths(models_dir: Path, spec: ModelSpec) -> dict[str, str]:
    entry = read_entries(models_dir).get(spec.id) or {}
    return {key: str(entry[key]) for key in path_keys(spec) if isinstance(entry.get(key), str)}


def save_local_paths(models_dir: Path, spec: ModelSpec, paths: Mapping[str, str | None]) -> Path:
    """Set (non-empty) or clear (empty) the given path options of ``spec``; returns the presets file."""
    allowed = path_keys(spec)
    unknown = sorted(set(paths) - set(allowed))
    if unknown:
        raise CaptionerError(f"Model {spec.id} has no path option(s) {', '.join(unknown)}; it has {', '.join(allowed)}.")
    entries = read_entries(models_dir)
    builtin = spec.id in builtin_specs()
    if spec.id in entries:
        entry = dict(entries[spec.id])
    elif builtin:
        entry = {"base": spec.id}
    else:
        raise CaptionerError(f"{spec.id} is a checkpoint file found in the models folder: it has no separate files "
                             f"to point elsewhere. Write a preset for it in {models_dir / PRESETS_FILE} instead.")
    for key, value in paths.items():
        value = (value or "").strip()
        if not value:
            entry.pop(key, None)
            continue
        if not Path(value).expanduser().exists() and not (models_dir / value).exists():
            raise CaptionerError(f"{key}: {value} does not exist.")
        entry[key] = value
    if builtin and entry == {"base": spec.id}:
        entries.pop(spec.id, None)  # nothing left to override
    else:
        base_specs = builtin_specs()
        spec_from_preset(spec.id, entry, models_dir, base_specs)  # refuse what the registry would ignore
        entries[spec.id] = entry
    return _write(models_dir / PRESETS_FILE, entries)


def _write(path: Path, entries: dict) -> Path:
    """Atomic: a crash never leaves a half-written presets file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
