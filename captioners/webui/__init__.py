"""The Stable Diffusion WebUI adapter (A1111, Forge, reForge): the only code that imports ``modules.*``.

``scripts/captioners_webui.py`` creates one :class:`Extension` and registers its callbacks.
"""

from captioners.webui.extension import Extension

__all__ = ["Extension"]
