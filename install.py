"""Run by the WebUI at start-up (``python install.py`` with the WebUI root on PYTHONPATH).

Installs only what is missing. It never pins or upgrades the WebUI's own packages (torch, pydantic,
transformers, gradio, protobuf, numpy, Pillow): those belong to the host, and this extension works
with the versions A1111 (transformers 4.30.2, gradio 3.41.2), Forge (4.46.1, 4.40.0) and Forge Neo
(4.57.6, 4.40.0) ship. A plain ``pip install`` of a missing package leaves already-satisfied
dependencies alone.
"""

import launch

# importable module -> what to install when it is absent. No version specifiers, so that nothing
# here can ever ask pip to move a package the host already pinned. A1111, Forge and reForge have all
# three in their own requirements, so there this installs nothing. Forge Neo has no open-clip-torch
# (its launcher installs gradio and its requirements.txt, which has safetensors and huggingface-hub):
# there this installs open_clip_torch, which adds timm and ftfy and moves none of Neo's pins
# (it asks torch>=2.0, huggingface-hub and safetensors unpinned). Neo re-installs its requirements
# after the extensions' installers only where one of its pins is no longer met.
NEEDED = {
    "open_clip": "open_clip_torch",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
}

for module, requirement in NEEDED.items():
    if not launch.is_installed(module):
        launch.run_pip(f'install "{requirement}"', f"{requirement} for sd-webui-captioners")
