"""What to judge about captions and what to do about flagged ones (light: no torch import).

The decoding side (captions per image, candidates, select, guidance) is in DecodingOptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from captioners.errors import CaptionerError
from captioners.judging.gates import GateSettings
from captioners.options import checked_number


class OnFlag(str, Enum):
    KEEP = "keep"    # write flagged captions as they are (and list them)
    SKIP = "skip"    # write nothing for an image whose caption is flagged
    RETRY = "retry"  # caption it again with beam search, keep the better of the two


@dataclass(frozen=True)
class JudgingOptions:
    """What to judge and what to do about it (the decoding side, N and select, is in DecodingOptions)."""

    score: bool = False               # CLIPScore of every caption
    score_clip: str | None = None     # ARCH[:WEIGHTS] of the scoring CLIP; None: the model's own, else ViT-L-14
    max_tokens: int = 75              # CLIP token budget (over it: flagged; 0: no check)
    t5_max_tokens: int = 0            # T5 token budget for Flux / SD3 trainers (0: no check)
    trim_to_budget: bool = False      # cut over-budget captions at a sentence or comma boundary
    on_flag: OnFlag = OnFlag.KEEP
    # The host's default scoring CLIP (WebUI Settings), for models without their own CLIP; never
    # taken from a request (score_clip is), so it does not replace a model's own CLIP.
    fallback_score_clip: str | None = None

    def __post_init__(self) -> None:
        for name in ("score", "trim_to_budget"):
            if not isinstance(getattr(self, name), bool):
                raise CaptionerError(f"{name} must be true or false (got {getattr(self, name)!r}).")
        if self.score_clip is not None and not isinstance(self.score_clip, str):
            raise CaptionerError(f"score_clip must be text like ViT-L-14:openai (got {self.score_clip!r}).")
        object.__setattr__(self, "max_tokens", checked_number("max_tokens", self.max_tokens))
        object.__setattr__(self, "t5_max_tokens", checked_number("t5_max_tokens", self.t5_max_tokens))
        try:
            object.__setattr__(self, "on_flag", OnFlag(self.on_flag))
        except ValueError:
            raise CaptionerError(f"on_flag must be one of {', '.join(m.value for m in OnFlag)} "
                                 f"(got {self.on_flag!r}).") from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "JudgingOptions":
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise CaptionerError(f"judging must be an object of options, not {data!r}.")
        known = {"score", "score_clip", "max_tokens", "t5_max_tokens", "trim_to_budget", "on_flag"}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise CaptionerError(f"Unknown judging option(s) {', '.join(map(str, unknown))}; "
                                 f"known: {', '.join(sorted(known))}.")
        return cls(**{k: v for k, v in data.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "score_clip": self.score_clip, "max_tokens": self.max_tokens,
                "t5_max_tokens": self.t5_max_tokens, "trim_to_budget": self.trim_to_budget,
                "on_flag": self.on_flag.value}

    def gate_settings(self) -> GateSettings:
        return GateSettings(max_tokens=self.max_tokens, t5_max_tokens=self.t5_max_tokens)
