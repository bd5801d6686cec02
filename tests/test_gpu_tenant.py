"""A good GPU tenant: a kept model is unloaded after a while unused, and a dataset job (a batch) frees
its model by default in the WebUI, so that a training run started next gets the memory back."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from PIL import Image

from captioners.service import CaptionService, Host, Settings
from tests.batch_helpers import copy_photos
from tests.webui_host import TINY


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture()
def settings(tiny_models_dir) -> dict[str, Settings]:
    """The service reads ``settings["now"]`` at each use, as the WebUI's Settings are read."""
    return {"now": Settings(models_dir=tiny_models_dir, model=TINY, device="cpu", after_use="keep")}


@pytest.fixture()
def service(settings) -> CaptionService:
    return CaptionService(Host(lambda: settings["now"]))


def test_a_kept_model_is_unloaded_once_idle(service, settings, photos):
    image = Image.open(photos[0])
    service.caption([image])
    time.sleep(0.3)
    assert service.loaded_model() == TINY  # no idle limit: kept
    for after_use in ("keep", "offload"):
        settings["now"] = replace(settings["now"], after_use=after_use, idle_unload_s=0.5)
        service.caption([image])
        assert service.loaded_model() == TINY
        assert wait_until(lambda: service.loaded_model() is None), after_use
        assert service._captioner is None


def test_each_use_restarts_the_idle_time(service, settings, photos):
    settings["now"] = replace(settings["now"], idle_unload_s=1.5)
    image = Image.open(photos[0])
    started = time.monotonic()
    for _ in range(3):
        service.caption([image])
        time.sleep(0.6)
    if time.monotonic() - started < 1.5 + 0.6 * 2:  # a slow machine proves nothing here
        assert service.loaded_model() == TINY
    assert wait_until(lambda: service.loaded_model() is None)
    service.unload()  # nothing left to do, and no timer fires later
    assert service._idle_timer is None


def test_a_timer_that_waited_for_a_job_leaves_its_model(service, settings, photos):
    """The timer takes the host's lock, so it waits for a running job (a generation, in the WebUI); that
    job's own use counts, and the model stays."""
    settings["now"] = replace(settings["now"], idle_unload_s=60)
    service.caption([Image.open(photos[0])])
    armed_at = service._last_used
    service.caption([Image.open(photos[0])])  # used again before the first timer's end
    service._unload_if_idle(armed_at, 60)
    assert service.loaded_model() == TINY
    service._unload_if_idle(service._last_used, 60)
    assert service.loaded_model() is None


@pytest.mark.parametrize("after_batch, stays", [("unload", False), (None, True)])
def test_a_batch_frees_its_model_when_settings_say_so(service, settings, photos, tmp_path, after_batch, stays):
    settings["now"] = replace(settings["now"], after_batch=after_batch)
    folder = tmp_path / "ds"
    copy_photos(photos, folder, 2)
    summary = service.run_batch({"inputs": [str(folder)]})
    assert summary.captioned == 2
    assert (service.loaded_model() == TINY) == stays
    service.caption([Image.open(photos[0])])
    assert service.loaded_model() == TINY  # captioning one image keeps it (after_use keep)
