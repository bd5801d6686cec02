"""Decoding options shared by every model family, and the one table of limits every option obeys.

A field left at ``None`` means "use the model's default"; :meth:`DecodingOptions.merged` fills the
gaps from a preset's defaults. Families read only the fields that apply to them.

:data:`LIMITS` is where every numeric option (decoding, batch size, workers...) gets its type and
range, so the command line, the tab and the API refuse the same values with the same message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from captioners.errors import CaptionerError

STRATEGIES = ("greedy", "beam", "sample")
CANDIDATE_MODES = ("beam", "sample")  # how several candidates per image are made
SELECTIONS = ("model", "clip")        # candidates ranked by the model's own order, or by CLIPScore


@dataclass(frozen=True)
class Limit:
    """A numeric option: whole numbers or not, and its inclusive range (``low_open``: above ``low``)."""

    integer: bool
    low: float
    high: float
    low_open: bool = False

    @property
    def kind(self) -> str:
        return "a whole number" if self.integer else "a number"

    @property
    def range(self) -> str:
        low = f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"{low} and at most {self.high:g}"


# Beyond these no caption gets better and memory or time explode (a million beams is 500 GB of cache).
LIMITS: dict[str, Limit] = {
    "num_beams": Limit(True, 1, 32),
    "max_new_tokens": Limit(True, 1, 1024),
    "min_new_tokens": Limit(True, 0, 1024),
    "temperature": Limit(False, 0, 100, low_open=True),
    "top_p": Limit(False, 0, 1, low_open=True),
    "top_k": Limit(True, 1, 1_000_000),
    "repetition_penalty": Limit(False, 0, 100, low_open=True),
    "seed": Limit(True, 0, 2**63 - 1),
    "num_candidates": Limit(True, 1, 64),
    "batch_size": Limit(True, 1, 1024),
    "workers": Limit(True, 0, 64),
    "max_tokens": Limit(True, 0, 100_000),
    "t5_max_tokens": Limit(True, 0, 100_000),
    "captions_per_image": Limit(True, 1, 32),
    "guidance": Limit(False, 0, 20),
}
TEXT_OPTIONS = {"strategy", "prompt", "candidates", "select"}
FLAG_OPTIONS = {"keep_prompt", "postprocess"}
MAX_PROMPT_CHARS = 1000


def checked_number(name: str, value: Any) -> int | float:
    """``value`` as the number option ``name`` takes, or a CaptionerError saying what it must be."""
    limit = LIMITS[name]
    number = value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        number = None
    elif limit.integer and isinstance(value, float):
        number = int(value) if value.is_integer() else None
    if number is None or number != number:  # not a number, a fraction for a whole-number option, or NaN
        raise CaptionerError(f"{name} must be {limit.kind} (got {value!r}).")
    too_low = number <= limit.low if limit.low_open else number < limit.low
    if too_low or number > limit.high:
        raise CaptionerError(f"{name} must be {limit.range} (got {value!r}).")
    return number


@dataclass(frozen=True)
class DecodingOptions:
    strategy: str | None = None          # greedy | beam | sample
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    num_candidates: int | None = None    # SBG: captions sampled per image before CLIP re-ranking
    prompt: str | None = None            # FuseCap: text the caption starts from
    keep_prompt: bool | None = None      # FuseCap: keep the prompt at the start of the caption
    postprocess: bool | None = None      # apply the preset's caption clean-up
    # Several captions per image and how they are chosen (see captioners/judging/candidates.py).
    captions_per_image: int | None = None  # captions kept per image (default 1)
    candidates: str | None = None        # beam | sample: how candidates are made (default: from strategy)
    select: str | None = None            # model | clip: rank candidates by the model or by CLIPScore
    guidance: float | None = None        # CLIP-prefix: specificity guidance G (0 = none)

    def merged(self, defaults: "DecodingOptions") -> "DecodingOptions":
        """These options, with every unset field taken from ``defaults``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        filled = {k: (v if v is not None else getattr(defaults, k)) for k, v in values.items()}
        return DecodingOptions(**filled).validated()

    def validated(self) -> "DecodingOptions":
        """These options with numbers in their types; a CaptionerError for any wrong type or range."""
        changes = {}
        for name in LIMITS.keys() & {f.name for f in fields(self)}:
            value = getattr(self, name)
            if value is not None:
                changes[name] = checked_number(name, value)
        for name in TEXT_OPTIONS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise CaptionerError(f"{name} must be text (got {value!r}).")
        for name in FLAG_OPTIONS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise CaptionerError(f"{name} must be true or false (got {value!r}).")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise CaptionerError(f"Unknown decoding strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}.")
        for name, choices in (("candidates", CANDIDATE_MODES), ("select", SELECTIONS)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise CaptionerError(f"{name} must be one of {', '.join(choices)} (got {value!r}).")
        if self.prompt is not None and len(self.prompt) > MAX_PROMPT_CHARS:
            raise CaptionerError(f"prompt must be at most {MAX_PROMPT_CHARS} characters (got {len(self.prompt)}).")
        return replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "DecodingOptions":
        """Build from user input (JSON, API, UI), rejecting unknown names with a clear message."""
        if data is not None and not isinstance(data, Mapping):
            raise CaptionerError(f"Decoding options must be an object of option names and values, not {data!r}.")
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise CaptionerError(f"Unknown decoding option(s) {', '.join(map(str, unknown))}; "
                                 f"known: {', '.join(sorted(known))}.")
        return cls(**{k: v for k, v in data.items() if v is not None}).validated()

    def replace(self, **changes: Any) -> "DecodingOptions":
        return replace(self, **changes)
