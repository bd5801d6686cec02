"""Fixtures for the WebUI adapter, the service, the API and the UI: a stand-in WebUI
(``tests/fake_webui``), a models folder whose ``tiny`` preset runs the tiny test models offline, and
an API client. Registered as a pytest plugin in conftest.py, so tests use them without imports."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


HOSTS = ("a1111", "forge", "reforge", "forge_neo")
# The hosts whose img2img images are ForgeCanvas objects (the others: gr.Image).
CANVAS_HOSTS = ("forge", "forge_neo")
# Each host's memory manager (A1111 has none: it moves the SD model itself).
MEMORY_MANAGERS = {"forge": "backend.memory_management", "forge_neo": "backend.memory_management",
                   "reforge": "ldm_patched.modules.model_management"}


@pytest.fixture(params=HOSTS)
def webui(request, monkeypatch, tmp_path, icg_checkpoint, clip_overrides):
    """The stand-in WebUI of one host, with the tiny model as the Settings' default.

    Gives the imported fake modules; ``.host`` names the host. ``forge_neo/modules`` layers itself
    over ``a1111/modules`` (see its ``__init__``).
    """
    host = request.param
    # The host's folder before a1111/ on sys.path: Forge Neo's ``modules`` must be found before A1111's.
    paths = ([str(FAKE / host)] if host != "a1111" else []) + [str(FAKE / "a1111")]
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
    if host in MEMORY_MANAGERS:
        modules.memory = importlib.import_module(MEMORY_MANAGERS[host])
    yield modules
    _purge()


def start_webui(webui, api=True, api_auth=None):
    """Load the extension, build the settings, and call on_app_started with a FastAPI app."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    spec = importlib.util.spec_from_file_location("captioners_webui.py", ROOT / "scripts" / "captioners_webui.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    webui.script_callbacks.ui_settings_callback()
    webui.shared.opts.set("captioners_model", TINY)
    cmd_opts = webui.shared.cmd_opts
    cmd_opts.api, cmd_opts.api_auth = api, api_auth
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    assert webui.script_callbacks.errors == []
    return script.extension, TestClient(app)


@pytest.fixture()
def client(webui):
    """A TestClient on the API routes the extension mounted in the stand-in WebUI."""
    extension, client = start_webui(webui)
    yield client
    webui.shared.cmd_opts.api, webui.shared.cmd_opts.api_auth = True, None
