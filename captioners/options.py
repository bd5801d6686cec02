"""Decoding options shared by every model family.

A field left at ``None`` means "use the model's default"; :meth:`DecodingOptions.merged` fills the
gaps from a preset's defaults. Families read only the fields that apply to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from captioners.errors import CaptionerError

STRATEGIES = ("greedy", "beam", "sample")


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

    def merged(self, defaults: "DecodingOptions") -> "DecodingOptions":
        """These options, with every unset field taken from ``defaults``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        filled = {k: (v if v is not None else getattr(defaults, k)) for k, v in values.items()}
        return DecodingOptions(**filled).validated()

    def validated(self) -> "DecodingOptions":
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise CaptionerError(f"Unknown decoding strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}.")
        for name in ("num_beams", "max_new_tokens", "num_candidates"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CaptionerError(f"{name} must be at least 1 (got {value}).")
        if self.temperature is not None and self.temperature <= 0:
            raise CaptionerError(f"temperature must be above 0 (got {self.temperature}).")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise CaptionerError(f"top_p must be in (0, 1] (got {self.top_p}).")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "DecodingOptions":
        """Build from user input (JSON, API, UI), rejecting unknown names with a clear message."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CaptionerError(f"Unknown decoding option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**{k: v for k, v in data.items() if v is not None}).validated()

    def replace(self, **changes: Any) -> "DecodingOptions":
        return replace(self, **changes)
