"""Sharing the GPU with the SD model, the way each WebUI needs it.

- Forge: ``backend.memory_management`` unloads its models; Forge reloads them at the next generation.
- reForge (and the 2024 Forge): the same with ``ldm_patched.modules.model_management``.
- A1111: ``sd_models.send_model_to_cpu`` (it also handles --lowvram/--medvram), then
  ``send_model_to_device`` afterwards, because A1111 does not bring the model back by itself.

``shared.sd_model`` is never read: in A1111 reading it loads a checkpoint when none is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Callable

log = logging.getLogger(__name__)

MEMORY_MANAGERS = (("forge", "backend.memory_management"), ("reforge", "ldm_patched.modules.model_management"))


def memory_manager() -> tuple[str, ModuleType | None]:
    """("forge" | "reforge", its memory-management module) or ("a1111", None)."""
    if importlib.util.find_spec("modules_forge") is not None:  # only the Forge family ships it
        for host, name in MEMORY_MANAGERS:
            try:
                return host, importlib.import_module(name)
            except ImportError:
                continue
    return "a1111", None


def free_sd_vram() -> Callable[[], None]:
    """Move the SD model's weights off the GPU; returns what puts them back (a no-op where the host
    reloads them by itself)."""
    host, manager = memory_manager()
    if manager is not None:
        manager.unload_all_models()
        manager.soft_empty_cache()
        log.debug("Captioners: unloaded %s's models from VRAM", host)
        return _nothing
    from modules import devices, sd_models

    model = sd_models.model_data.sd_model  # None when no checkpoint is loaded; never triggers a load
    if model is None:
        devices.torch_gc()
        return _nothing
    sd_models.send_model_to_cpu(model)  # handles lowvram/medvram, then torch_gc
    log.debug("Captioners: moved the SD model to the CPU")

    def restore() -> None:
        sd_models.send_model_to_device(model)

    return restore


def _nothing() -> None:
    return None
