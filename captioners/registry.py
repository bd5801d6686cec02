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
        files = []
        for asset in FAMILIES[spec.family].assets(spec):
            found = asset.locate(models_dir)  # where it is (an earlier cache, a converted copy), else where it goes
            files.append(FileRow(str(found or asset.path(models_dir)), found is not None, asset.source()))
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


def read_presets_entries(models_dir: Path) -> dict[str, Any]:
    """The raw entries of ``<models>/presets.json`` ({} when there is none); a CaptionerError saying
    what is wrong with a file that is not a JSON object of presets."""
    path = models_dir / PRESETS_FILE
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        raise CaptionerError(f"Cannot read {path} ({exc.strerror or exc}).") from None
    except UnicodeDecodeError as exc:
        raise CaptionerError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except RecursionError:
        raise CaptionerError(f"{path} is nested too deeply to be a presets file.") from None
    except ValueError as exc:  # JSONDecodeError, and Python's limit on huge integers
        raise CaptionerError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}).") from None
    if not isinstance(entries, dict):
        raise CaptionerError(f"{path} must hold a JSON object of presets {{\"id\": {{...}}}}, "
                             f"not a {type(entries).__name__}.")
    return entries


def _read_presets_file(models_dir: Path, base_specs: Mapping[str, ModelSpec]) -> list[ModelSpec]:
    """Presets from the file; a broken file or entry is skipped with a warning, never an error, so that
    every command (``models`` above all) still works and says what to fix."""
    try:
        entries = read_presets_entries(models_dir)
    except CaptionerError as exc:
        log.warning("Ignoring the presets file: %s", exc)
        return []
    specs = []
    for model_id, entry in entries.items():
        try:
            specs.append(spec_from_preset(model_id, entry, models_dir, base_specs))
        except (CaptionerError, TypeError, ValueError, OSError) as exc:
            log.warning("Ignoring preset %r in %s: %s", model_id, models_dir / PRESETS_FILE, exc)
    return specs


# Every key a preset may have and its JSON type; the family then checks which overrides it takes.
PRESET_FIELDS: dict[str, type] = {
    "base": str, "family": str, "description": str, "decoding": dict,
    "weights": str, "tokenizer": str, "clip_weights": str, "clip_config": str, "vocabulary": str, "clip_arch": str,
    "postprocess": str, "normalize": bool, "gpt_heads": int, "mapper_heads": int,
}
JSON_TYPE_NAMES = {str: "text", dict: "an object", bool: "true or false", int: "a whole number"}


def _checked_preset(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise CaptionerError(f"a preset must be an object of settings, not {json.dumps(entry)[:40]}")
    unknown = sorted(set(entry) - set(PRESET_FIELDS))
    if unknown:
        raise CaptionerError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(PRESET_FIELDS)}")
    for key, value in entry.items():
        kind = PRESET_FIELDS[key]
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CaptionerError(f"{key!r} must be {JSON_TYPE_NAMES[kind]} (got {json.dumps(value)[:40]})")
        if kind is int and value is not None and not 1 <= value <= 1024:
            raise CaptionerError(f"{key!r} must be between 1 and 1024 (got {value})")
    return {k: v for k, v in entry.items() if v is not None}


def spec_from_preset(model_id: str, entry: Mapping[str, Any], models_dir: Path,
                     base_specs: Mapping[str, ModelSpec]) -> ModelSpec:
    entry = _checked_preset(entry)
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
