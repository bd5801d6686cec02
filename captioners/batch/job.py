"""What a batch run does: the job description, built from code, JSON, the API or the UI.

``BatchJob.from_mapping`` is the one place user input is checked, so the CLI, the WebUI tab and the
HTTP API reject the same bad values with the same messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Mapping

from captioners.batch.sizing import AUTO, auto_workers
from captioners.errors import CaptionerError
from captioners.judging.options import JudgingOptions
from captioners.options import DecodingOptions, checked_number


class ExistingPolicy(str, Enum):
    """What to do with an image whose caption file already exists (and is not empty)."""

    SKIP = "skip"            # leave it alone: a rerun resumes where a stopped run ended
    OVERWRITE = "overwrite"  # replace it (a backup is kept unless ``backup`` is off)
    APPEND = "append"        # old + separator + new
    PREPEND = "prepend"      # new + separator + old


class TriggerMode(str, Enum):
    PREPEND = "prepend"  # "<trigger>, <caption>" unless the caption already holds the trigger
    REPLACE = "replace"  # class words become the trigger; prepended when no class word occurs


class Loader(str, Enum):
    """Where images are decoded and preprocessed while the model runs (see README: Batch captioning)."""

    THREADS = "threads"
    PROCESSES = "processes"  # torch DataLoader worker processes


@dataclass
class TextShaping:
    """Edits applied to every generated caption, in this order: strip_period, lowercase,
    replacements, exclude, trigger, prefix/suffix."""

    prefix: str = ""                 # added verbatim before the caption (include your own ", ")
    suffix: str = ""                 # added verbatim after it
    trigger: str = ""                # e.g. a LoRA trigger word
    trigger_mode: TriggerMode = TriggerMode.PREPEND
    class_words: list[str] = field(default_factory=list)  # replaced by the trigger in replace mode
    exclude: list[str] = field(default_factory=list)      # words / phrases / tags removed (whole words)
    replacements: list[tuple[str, str]] = field(default_factory=list)  # (regex, replacement)
    lowercase: bool = False
    strip_period: bool = False       # drop the trailing " ." of Flickr-style captions
    max_tokens: int = 75             # warn when a caption is longer (CLIP tokens); 0 = no check

    def is_identity(self) -> bool:
        return self == TextShaping(max_tokens=self.max_tokens)


@dataclass
class BatchJob:
    inputs: list[str] = field(default_factory=list)  # folders, image files or glob patterns
    recursive: bool = False
    file_list: str | None = None     # a text file naming one image per line (huge datasets)
    output_dir: str | None = None    # None: caption files beside the images; else a mirrored tree
    extension: str = ".txt"
    existing: ExistingPolicy = ExistingPolicy.SKIP
    separator: str = ", "            # between old and new text in append / prepend
    dedupe_tags: bool = True         # append / prepend: drop comma-separated tags already present
    backup: bool = True              # keep <caption>.bak before changing an existing caption file
    dry_run: bool = False            # write nothing; report what would change
    shaping: TextShaping = field(default_factory=TextShaping)
    batch_size: int | str = 8        # or "auto": the largest that fits (GPU), see sizing.py
    workers: int | str = 2           # image decoding workers; 0 = decode in the main thread; "auto": CPUs - 1
    loader: Loader = Loader.THREADS
    fast_decode: bool = False        # JPEG draft decoding at reduced size (slightly different pixels)
    gpu_decode: bool = False         # local engine on CUDA: JPEGs decoded and preprocessed on the GPU (gpu_decode.py)
    cuda_graphs: bool = False        # local engine on CUDA: greedy/sampled GPT-2 steps as CUDA graphs (cuda_graphs.py)
    jsonl: str | None = None         # combined outputs; None = off
    csv: str | None = None
    kohya_json: str | None = None
    kohya_full_path: bool = False    # kohya metadata keys: absolute paths instead of file stems
    report: str | None = None        # JSON summary with every failure and its reason
    report_html: str | None = None   # the dataset report: one self-contained HTML file
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    judging: JudgingOptions = field(default_factory=JudgingOptions)  # scores, gates, trimming, on_flag
    join: bool = False               # several captions per image: one line joined by separator (default: a line each)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "BatchJob":
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        self.existing = _enum(ExistingPolicy, self.existing, "existing")
        self.loader = _enum(Loader, self.loader, "loader")
        self.shaping.trigger_mode = _enum(TriggerMode, self.shaping.trigger_mode, "trigger_mode")
        self.extension = normalize_extension(self.extension)
        if self.batch_size != AUTO:  # "auto" is settled by the engine, which knows the device and model
            self.batch_size = checked_number("batch_size", self.batch_size)
        self.workers = auto_workers() if self.workers == AUTO else checked_number("workers", self.workers)
        self.shaping.max_tokens = checked_number("max_tokens", self.shaping.max_tokens)  # 0: no check
        if not isinstance(self.judging, JudgingOptions):
            self.judging = JudgingOptions.from_mapping(self.judging)
        if self.judging.max_tokens != self.shaping.max_tokens:  # one budget: the text options' max_tokens
            from dataclasses import replace

            self.judging = replace(self.judging, max_tokens=self.shaping.max_tokens)
        if self.shaping.trigger_mode == TriggerMode.REPLACE and self.shaping.trigger and not self.shaping.class_words:
            raise CaptionerError("trigger_mode 'replace' (--trigger-mode replace) needs class_words (--class-word): "
                                 "the words the trigger replaces.")
        for pattern, _ in self.shaping.replacements:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise CaptionerError(f"Bad regular expression {pattern!r} in replacements: {exc}.") from exc
        outputs = [p for p in (self.jsonl, self.csv, self.kohya_json, self.report, self.report_html) if p]
        if len(set(outputs)) != len(outputs):
            raise CaptionerError("jsonl, csv, kohya_json, report and report_html must be different files.")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "BatchJob":
        """A job from JSON-like input; unknown keys and bad values raise a CaptionerError saying what to fix."""
        if not isinstance(data, Mapping):
            raise CaptionerError(f"A batch job must be an object of options, not {type(data).__name__}.")
        values = _checked(data, cls, _JOB_TYPES, "batch option")
        if "shaping" in values:
            values["shaping"] = _shaping_from_mapping(values["shaping"])
        if "decoding" in values:
            values["decoding"] = DecodingOptions.from_mapping(values["decoding"])
        if "judging" in values:
            judging = values["judging"]
            if isinstance(judging, Mapping) and "max_tokens" in judging:
                raise CaptionerError("In a batch job the token budget is shaping.max_tokens (--max-tokens), "
                                     "not judging.max_tokens.")
            values["judging"] = JudgingOptions.from_mapping(judging)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "shaping":
                value = {s.name: _plain(getattr(value, s.name)) for s in fields(value)}
            elif f.name == "decoding":
                value = value.to_dict()
            elif f.name == "judging":  # its token budget is shaping's max_tokens
                value = {k: v for k, v in value.to_dict().items() if k != "max_tokens"}
            out[f.name] = _plain(value)
        return out


def normalize_extension(extension: str) -> str:
    """'.txt', 'txt' -> '.txt'; refuses separators and image extensions (they would replace images)."""
    from captioners.images import IMAGE_EXTENSIONS

    ext = str(extension).strip()
    ext = ext if ext.startswith(".") else "." + ext
    if len(ext) < 2 or any(c in ext for c in "/\\*?:") or ext in (".", ".."):
        raise CaptionerError(f"Caption extension {extension!r} is not usable; give something like .txt or .caption.")
    if ext.lower() in IMAGE_EXTENSIONS:
        raise CaptionerError(f"Caption extension {ext} is an image extension: captions would replace images.")
    return ext


# ---- validation of JSON-like input ------------------------------------------------------------------
# name -> (kind, description for messages). Kinds: bool, int, str, opt_str, str_list, pairs, enum class,
# mapping.
_JOB_TYPES: dict[str, Any] = {
    "inputs": "str_list", "recursive": "bool", "file_list": "opt_str", "output_dir": "opt_str",
    "extension": "str", "existing": ExistingPolicy, "separator": "str", "dedupe_tags": "bool",
    "backup": "bool", "dry_run": "bool", "shaping": "mapping", "batch_size": "int_or_auto", "workers": "int_or_auto",
    "loader": Loader, "fast_decode": "bool", "gpu_decode": "bool", "cuda_graphs": "bool", "jsonl": "opt_str", "csv": "opt_str", "kohya_json": "opt_str",
    "kohya_full_path": "bool", "report": "opt_str", "report_html": "opt_str", "decoding": "mapping",
    "judging": "mapping", "join": "bool",
}
_SHAPING_TYPES: dict[str, Any] = {
    "prefix": "str", "suffix": "str", "trigger": "str", "trigger_mode": TriggerMode, "class_words": "str_list",
    "exclude": "str_list", "replacements": "pairs", "lowercase": "bool", "strip_period": "bool",
    "max_tokens": "int",
}


def _shaping_from_mapping(data: Any) -> TextShaping:
    if isinstance(data, TextShaping):
        return data
    if not isinstance(data, Mapping):
        raise CaptionerError("shaping must be an object of text options.")
    return TextShaping(**_checked(data, TextShaping, _SHAPING_TYPES, "shaping option"))


def _checked(data: Mapping[str, Any], cls: type, types: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise CaptionerError(f"Unknown {what}(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(types))}.")
    return {name: _coerce(name, value, types[name]) for name, value in data.items() if value is not None
            or types[name] == "opt_str"}


def _coerce(name: str, value: Any, kind: Any) -> Any:
    def bad(expected: str) -> CaptionerError:
        return CaptionerError(f"{name} must be {expected} (got {value!r}).")

    if isinstance(kind, type) and issubclass(kind, Enum):
        return _enum(kind, value, name)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "int_or_auto" and isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if kind in ("int", "int_or_auto"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            raise bad("a whole number" + (" or auto" if kind == "int_or_auto" else ""))
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("text")
        return value
    if kind == "opt_str":
        if value is not None and not isinstance(value, str):
            raise bad("a path (text) or null")
        return value or None
    if kind == "str_list":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of texts")
        return list(value)
    if kind == "pairs":
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in value):
            raise bad('a list of [regex, replacement] pairs, e.g. [["\\\\bman\\\\b", "person"]]')
        return [(str(a), str(b)) for a, b in value]
    if kind == "mapping":
        return value
    raise AssertionError(kind)


def _enum(cls: type[Enum], value: Any, name: str) -> Any:
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise CaptionerError(f"{name} must be one of {choices} (got {value!r}).") from None


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
