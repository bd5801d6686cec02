"""Where model files live.

Order: an explicit folder (flag / argument) > ``$CAPTIONERS_MODELS_DIR`` > the WebUI's
``<models_path>/Captioners`` (set by the WebUI adapter) > a per-user cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_MODELS_DIR = "CAPTIONERS_MODELS_DIR"
DEFAULT_MODEL = "clip-prefix-flickr8k-gradient"  # the model of every entry point when none is named


def default_models_dir() -> Path:
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    if os.name == "nt":
        cache = os.environ.get("LOCALAPPDATA", cache)
    return Path(cache) / "sd-webui-captioners"


def resolve_models_dir(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit).expanduser() if explicit else default_models_dir()
