"""Run by the WebUI at start-up (``python install.py`` with the WebUI root on PYTHONPATH).

Installs only what is missing. It never pins or upgrades the WebUI's own packages (torch, pydantic,
transformers, gradio, protobuf, numpy, Pillow...): those belong to the host, and this extension works
with the versions A1111 (transformers 4.30.2, gradio 3.41.2), Forge (4.46.1, 4.40.0) and Forge Neo
(4.57.6, 4.40.0) ship.
"""

import os
import tempfile
from importlib import metadata

import launch

# importable module -> what to install when it is absent, with no version specifier. A1111, Forge and
# reForge have all three in their own requirements, so there this installs nothing. Forge Neo has no
# open-clip-torch: there this installs open_clip_torch (which adds timm and ftfy).
NEEDED = {
    "open_clip": "open_clip_torch",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
}
# The host's packages, held at their installed versions while pip installs ours: a requirement of
# the newest open_clip_torch or timm (torch, torchvision, numpy...) must never make pip move one of
# them; pip picks releases of ours that fit the host instead, or fails and changes nothing.
HOST_PACKAGES = ("torch", "torchvision", "transformers", "tokenizers", "gradio", "gradio_client", "protobuf",
                 "numpy", "Pillow", "pydantic", "pydantic_core", "safetensors", "huggingface_hub", "accelerate")


def host_constraints() -> list[str]:
    """``name==version`` of each host package that is installed."""
    pins = []
    for name in HOST_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def install(requirement: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="captioners-host-", delete=False) as constraints:
        constraints.write("\n".join(host_constraints()) + "\n")
    try:
        launch.run_pip(f'install "{requirement}" -c "{constraints.name}"', f"{requirement} for sd-webui-captioners")
    finally:
        os.unlink(constraints.name)


for module, requirement in NEEDED.items():
    if not launch.is_installed(module):
        install(requirement)
