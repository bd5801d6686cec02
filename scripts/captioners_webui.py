"""sd-webui-captioners: registers the extension's callbacks with the WebUI.

Everything else lives in the ``captioners`` package (the WebUI adapter is ``captioners.webui``).
The WebUI puts this extension's folder on sys.path while it imports this file.
"""

from modules import script_callbacks

from captioners.webui import Extension

extension = Extension()

script_callbacks.on_ui_settings(extension.on_ui_settings)
script_callbacks.on_ui_tabs(extension.on_ui_tabs)
script_callbacks.on_after_component(extension.on_after_component)
script_callbacks.on_app_started(extension.on_app_started)
script_callbacks.on_script_unloaded(extension.on_script_unloaded)
