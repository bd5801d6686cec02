"""Fixtures for the WebUI adapter, the service and the UI: a stand-in WebUI (``tests/fake_webui``)
and a models folder whose ``tiny`` preset runs the tiny test models offline."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

FAKE = Path(__file__).resolve().parent / "fake_webui"
FAKE_PACKAGES = ("modules", "modules_forge", "backend", "ldm_patched")
TINY = "tiny"


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_PACKAGES:
            del sys.modules[name]


def write_tiny_preset(models_dir: Path, checkpoint: Path, clip_overrides: dict[str, str], name: str = TINY) -> Path:
    """presets.json with a model ``name`` that runs the tiny checkpoint, CLIP and tokenizer."""
    models_dir.mkdir(parents=True, exist_ok=True)
    presets = models_dir / "presets.json"
    entries = json.loads(presets.read_text()) if presets.is_file() else {}
    entries[name] = {"family": "clip-prefix", "weights": str(checkpoint), **clip_overrides,
                     "description": "tiny test model"}
    presets.write_text(json.dumps(entries))
    return models_dir


@pytest.fixture()
def tiny_models_dir(tmp_path, icg_checkpoint, clip_overrides) -> Path:
    return write_tiny_preset(tmp_path / "models", icg_checkpoint.path, clip_overrides)


@pytest.fixture(params=["a1111", "forge", "reforge"])
def webui(request, monkeypatch, tmp_path, icg_checkpoint, clip_overrides):
    """The stand-in WebUI of one host, with the tiny model as the Settings' default.

    Gives the imported fake modules; ``.host`` names the host.
    """
    host = request.param
    paths = [str(FAKE / "a1111")] + ([str(FAKE / host)] if host != "a1111" else [])
    _purge()
    for path in reversed(paths):
        monkeypatch.syspath_prepend(path)
    importlib.invalidate_caches()
    modules = SimpleNamespace(host=host)
    for name in ("script_callbacks", "shared", "devices", "call_queue", "sd_models", "lowvram", "paths",
                 "infotext_utils", "gradio_extensions", "ui"):
        setattr(modules, name, importlib.import_module(f"modules.{name}"))
    modules.paths.models_path = str(tmp_path / "webui-models")
    write_tiny_preset(Path(modules.paths.models_path) / "Captioners", icg_checkpoint.path, clip_overrides)
    modules.gradio_extensions.patch(monkeypatch)
    modules.script_callbacks.clear_callbacks()
    if host != "a1111":
        manager = "backend.memory_management" if host == "forge" else "ldm_patched.modules.model_management"
        modules.memory = importlib.import_module(manager)
    yield modules
    _purge()
