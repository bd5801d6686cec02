"""Model ids -> specs -> captioners.

Ids come from three places: the built-in presets of each family, checkpoints dropped into the
models folder, and custom presets in ``<models folder>/presets.json``::

    {
      "my-coco": {"base": "clipcap-coco", "weights": "clip_prefix/my_coco.pt",
                  "decoding": {"strategy": "beam"}},
      "tiny":    {"family": "clip-prefix", "weights": "/data/tiny.pt", "clip_arch": "ViT-B-32",
                  "clip_weights": "openai", "tokenizer": "gpt2-tokenizer", "normalize": false}
    }

Relative paths in a preset are relative to the models folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from captioners.base import Captioner, ModelSpec
from captioners.errors import CaptionerError, UnknownModelError
from captioners.families.clip_prefix import ClipPrefixCaptioner
from captioners.families.fusecap import FuseCapCaptioner
from captioners.families.sbg import SbgCaptioner
from captioners.options import DecodingOptions

log = logging.getLogger(__name__)

PRESETS_FILE = "presets.json"
# Preset keys that name files; resolved against the models folder when relative.
PATH_KEYS = ("weights", "tokenizer", "clip_weights", "clip_config", "vocabulary")

FAMILIES: dict[str, type[Captioner]] = {cls.family: cls for cls in (ClipPrefixCaptioner, SbgCaptioner, FuseCapCaptioner)}


def builtin_specs() -> dict[str, ModelSpec]:
    return {spec.id: spec for cls in FAMILIES.values() for spec in cls.presets()}


def available_models(models_dir: Path) -> dict[str, ModelSpec]:
    """Every model id usable with this models folder, built-in ones first."""
    specs = builtin_specs()
    known = {asset.path(models_dir).resolve() for spec in specs.values()
             for asset in FAMILIES[spec.family].assets(spec)}
    for cls in FAMILIES.values():
        for spec in cls.discover(models_dir, known):
            specs.setdefault(spec.id, spec)
    for spec in _read_presets_file(models_dir, specs):
        specs[spec.id] = spec
    return specs


@dataclass
class FileRow:
    path: str
    present: bool
    source: str


@dataclass
class ModelRow:
    """A model id and the state of its files, as the CLI, the Models tab and the API list them."""

    id: str
    family: str
    origin: str
    description: str
    files: list[FileRow]
    loaded: bool = False

    @property
    def ready(self) -> bool:
        return all(f.present for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "origin": self.origin, "description": self.description,
                "ready": self.ready, "loaded": self.loaded, "files": [vars(f) for f in self.files]}


def model_rows(models_dir: Path, specs: Iterable[ModelSpec] | None = None, loaded: str | None = None) -> list[ModelRow]:
    """One row per model (all available ones by default), ``loaded`` naming the one in memory."""
    rows = []
    for spec in available_models(models_dir).values() if specs is None else specs:
        files = [FileRow(str(a.path(models_dir)), a.is_present(models_dir), a.source())
                 for a in FAMILIES[spec.family].assets(spec)]
        rows.append(ModelRow(spec.id, spec.family, spec.origin, spec.description, files, spec.id == loaded))
    return rows


def get_spec(model: str, models_dir: Path) -> ModelSpec:
    """A spec from a model id, or from a path to a checkpoint file or folder."""
    specs = available_models(models_dir)
    if model in specs:
        return specs[model]
    path = Path(model).expanduser()
    if path.exists():
        for cls in FAMILIES.values():
            if cls.handles_path(path):
                return cls.spec_for_path(path)
        raise UnknownModelError(f"{path} is not a checkpoint of any known model family ({', '.join(FAMILIES)}).")
    raise UnknownModelError(f"Unknown model {model!r}. Known ids: {', '.join(specs)}. "
                            "Run 'python -m captioners models' to see them with their files.")


def create_captioner(model: str | ModelSpec, models_dir: Path,
                     overrides: Mapping[str, Any] | None = None) -> Captioner:
    spec = model if isinstance(model, ModelSpec) else get_spec(model, models_dir)
    cls = FAMILIES[spec.family]
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return cls(cls.apply_overrides(spec, overrides), models_dir)


def _read_presets_file(models_dir: Path, base_specs: Mapping[str, ModelSpec]) -> list[ModelSpec]:
    path = models_dir / PRESETS_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("Ignoring %s: %s", path, exc)
        return []
    specs = []
    for model_id, entry in (entries.items() if isinstance(entries, dict) else []):
        try:
            specs.append(spec_from_preset(model_id, entry, models_dir, base_specs))
        except (CaptionerError, TypeError, ValueError) as exc:
            log.warning("Ignoring preset %r in %s: %s", model_id, path, exc)
    return specs


def spec_from_preset(model_id: str, entry: Mapping[str, Any], models_dir: Path,
                     base_specs: Mapping[str, ModelSpec]) -> ModelSpec:
    entry = dict(entry)
    base, family = entry.pop("base", None), entry.pop("family", None)
    decoding = DecodingOptions.from_mapping(entry.pop("decoding", None))
    description = entry.pop("description", "")
    for key in PATH_KEYS:
        if isinstance(entry.get(key), str) and (models_dir / entry[key]).exists():
            entry[key] = str(models_dir / entry[key])
    if base:
        if base not in base_specs:
            raise CaptionerError(f"unknown base model {base!r}")
        spec = base_specs[base]
    elif family in FAMILIES:
        if "weights" not in entry:
            raise CaptionerError("a preset without 'base' needs 'weights'")
        spec = FAMILIES[family].spec_for_path(Path(entry["weights"]), model_id)
    else:
        raise CaptionerError(f"give 'base' (a model id) or 'family' (one of {', '.join(FAMILIES)})")
    spec = FAMILIES[spec.family].apply_overrides(spec, entry)
    return replace(spec, id=model_id, decoding=decoding.merged(spec.decoding),
                   description=description or spec.description, origin="presets file")
