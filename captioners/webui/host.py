"""The WebUI as the service's host: its queue lock, its job state, its devices and Settings."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from captioners.devices import resolve_device
from captioners.service import Host, Settings
from captioners.webui import gpu, settings

log = logging.getLogger(__name__)


class WebUIHost(Host):
    def __init__(self) -> None:
        super().__init__(self._read_settings)

    @staticmethod
    def _read_settings() -> Settings:
        from modules import paths, shared

        return settings.read(shared.opts, paths.models_path)

    def device(self, name: str) -> torch.device:
        if name in (None, "", "auto"):
            from modules import devices

            # The interrogate device honours --use-cpu interrogate/all.
            device = getattr(devices, "device_interrogate", None) or devices.get_optimal_device()
            return torch.device(device)
        return resolve_device(name)

    def dtype(self, name: str, device: torch.device) -> str:
        from modules import shared

        full = getattr(shared.cmd_opts, "no_half", False) or getattr(shared.cmd_opts, "precision", "") == "full"
        return "fp32" if name in (None, "", "auto") and full else name

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The WebUI's queue lock (no generation meanwhile), then the service's own lock (see
        :meth:`current_job`). Always in this order, so the two never wait on each other."""
        from modules.call_queue import queue_lock

        with queue_lock, self._lock:
            yield

    @contextlib.contextmanager
    def current_job(self, name: str, device: torch.device) -> Iterator[None]:
        """Inside a generation (an img2img script, an image-saved callback). The generation holds the
        queue lock, in Forge from another thread than the one running the script, so waiting for it
        here would wait forever. Only the service's own lock is taken: it keeps a tab or API job off
        the model should the caller run outside the queue (the gallery's Save button does). The SD
        model stays on the GPU, which the generation needs next, and ``shared.state`` stays the
        generation's."""
        with self._lock:
            yield

    @contextlib.contextmanager
    def job(self, name: str, device: torch.device) -> Iterator[None]:
        """Under the queue lock, as a WebUI job; the SD model leaves the GPU meanwhile (per Settings).

        Whatever happens inside, the SD model is put back and ``shared.state`` is ended.
        """
        from modules import shared

        with self.exclusive():
            shared.state.begin(job=name)
            try:
                restore = None
                if device.type == "cuda" and getattr(shared.opts, "captioners_free_sd_vram", True):
                    restore = gpu.free_sd_vram()
                try:
                    yield
                finally:
                    if restore is not None:
                        try:
                            restore()
                        except Exception:  # never hide the job's own error behind this one
                            log.exception("Captioners: could not move the SD model back to the GPU")
            finally:
                shared.state.end()

    def report(self, done: int, total: int, text: str) -> None:
        from modules import shared

        shared.state.job_count = total
        shared.state.job_no = done
        shared.state.textinfo = text or None

    def stop_requested(self) -> bool:
        """The Interrupt button: its first click during a job of several items only sets
        ``stopping_generation`` (stop after the current one), the next sets ``interrupted``. A batch
        stops after its current batch of images either way."""
        from modules import shared

        state = shared.state
        return bool(state.interrupted or getattr(state, "stopping_generation", False))
