"""modules/script_callbacks.py: registrars ``on_X(callback, *, name=None)`` and their runners.

As in the WebUI, a runner reports a callback's exception and goes on; here it is kept in
``errors`` so tests can assert there was none.
"""

from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {name: [] for name in (
    "callbacks_app_started", "callbacks_ui_tabs", "callbacks_ui_settings", "callbacks_after_component",
    "callbacks_before_component", "callbacks_script_unloaded", "callbacks_on_reload", "callbacks_model_loaded",
    "callbacks_before_image_saved", "callbacks_image_saved")}
errors = []


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image        # the PIL image
        self.p = p                # the processing object, or None (Extras, init images)
        self.filename = filename  # the file the image is saved to
        self.pnginfo = pnginfo    # dict; the infotext is under "parameters"


def add_callback(callbacks, fun, *, name=None, category="unknown"):
    callbacks.append(ScriptCallback("fake", fun, name or f"fake/{category}"))


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()
    errors.clear()


def _run(category, *args, **kwargs):
    results = []
    for c in callback_map[category]:
        try:
            results.append(c.callback(*args, **kwargs))
        except Exception as exc:  # the WebUI prints and carries on
            errors.append((category, exc))
    return results


def on_app_started(callback, *, name=None):
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_before_reload(callback, *, name=None):
    add_callback(callback_map["callbacks_on_reload"], callback, name=name, category="on_reload")


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_after_component(callback, *, name=None):
    add_callback(callback_map["callbacks_after_component"], callback, name=name, category="after_component")


def on_before_component(callback, *, name=None):
    add_callback(callback_map["callbacks_before_component"], callback, name=name, category="before_component")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def app_started_callback(demo, app):
    _run("callbacks_app_started", demo, app)


def ui_tabs_callback():
    res = []
    for tabs in _run("callbacks_ui_tabs"):
        res += tabs or []
    return res


def ui_settings_callback():
    _run("callbacks_ui_settings")


def after_component_callback(component, **kwargs):
    _run("callbacks_after_component", component, **kwargs)


def before_component_callback(component, **kwargs):
    _run("callbacks_before_component", component, **kwargs)


def script_unloaded_callback():
    _run("callbacks_script_unloaded")


def on_before_image_saved(callback, *, name=None):
    add_callback(callback_map["callbacks_before_image_saved"], callback, name=name, category="before_image_saved")


def on_image_saved(callback, *, name=None):
    add_callback(callback_map["callbacks_image_saved"], callback, name=name, category="image_saved")


def before_image_saved_callback(params: ImageSaveParams):
    _run("callbacks_before_image_saved", params)


def image_saved_callback(params: ImageSaveParams):
    _run("callbacks_image_saved", params)
