"""Image captioners for Stable Diffusion WebUI and the command line.

The package never imports the WebUI's ``modules``; only ``captioners.webui`` does.
"""

__version__ = "0.1.0"
