"""sd-webui-captioners: caption on save (Settings → Captioners): a caption file beside every image
the WebUI saves. Off until turned on there; the logic lives in captioners.webui.on_save.
"""

from modules import script_callbacks

from captioners.webui.on_save import on_image_saved

script_callbacks.on_image_saved(on_image_saved)  # no name=: Forge Neo's registrar takes none
