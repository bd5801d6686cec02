"""A model is "ready" only when every file it needs is there (its CLIP's included), and what the tab,
the img2img button and the API say about a missing file names the tab's fields, not command-line options."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from PIL import Image

from captioners.errors import MissingWeightsError
from captioners.service import CaptionService, Host, Settings
from captioners.ui import render
from captioners.ui.tab import caption_image, download_model
from captioners.weights import read_checkpoint_shapes
from tests import tiny_models
from tests.webui_host import TINY, write_tiny_preset

CLI_OPTION = re.compile(r"(^|[\s(])--[a-z]")  # "--clip-weights", not the "--" inside "timm--vit..."


@pytest.fixture()
def legacy_models(tmp_path, tokenizer_dir):
    """A models folder holding a ClipCap checkpoint of the ViT-B/32 width saved in the legacy
    (pre-1.6, not zip) torch.save format, and the GPT-2 tokenizer, but not the CLIP."""
    checkpoint = tiny_models.build_checkpoint(tmp_path / "ck", tokenizer_dir, "mlp", prefix_size=512)
    models = tmp_path / "models"
    (models / "clip_prefix").mkdir(parents=True)
    state = torch.load(checkpoint.path, weights_only=True)
    torch.save(state, models / "clip_prefix" / "legacy.pt", _use_new_zipfile_serialization=False)
    shutil.copytree(tokenizer_dir, models / "gpt2-tokenizer")
    return models


def test_legacy_checkpoints_tell_their_shapes_without_being_read(legacy_models):
    shapes = read_checkpoint_shapes(legacy_models / "clip_prefix" / "legacy.pt")
    assert shapes["clip_project.model.0.weight"][1] == 512
    assert all(isinstance(shape, tuple) for shape in shapes.values())


def test_legacy_shape_reading_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('owned', 'w')",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": Evil()}, path, _use_new_zipfile_serialization=False)
    assert read_checkpoint_shapes(path) is None and not (tmp_path / "owned").exists()


def test_a_model_whose_clip_is_missing_is_not_ready(legacy_models, photos):
    """Its CLIP came from the checkpoint's layout, which a legacy file did not tell: the model showed
    "ready", Download missing files fetched nothing, and captioning then failed."""
    service = CaptionService(Host(lambda: Settings(models_dir=legacy_models, model="local:legacy", device="cpu")))
    row = next(row for row in service.model_rows() if row.id == "local:legacy")
    clip = [f for f in row.files if "vit_base_patch32_clip_224.openai" in f.path]
    assert clip and not clip[0].present and not row.ready
    assert render.model_label(row).endswith(render.MISSING)
    lines = list(download_model(service, "local:legacy"))
    assert any("downloading https://huggingface.co/timm/vit_base_patch32_clip_224.openai" in line for line in lines)
    with pytest.raises(MissingWeightsError) as info:
        service.caption([Image.open(photos[0])])
    message = str(info.value)
    assert "vit_base_patch32_clip_224.openai" in message and "Models > Local files: clip weights" in message
    assert not CLI_OPTION.search(message), message


def test_missing_file_messages_for_people_and_for_the_command_line(tiny_models_dir, icg_checkpoint, clip_overrides,
                                                                   tmp_path, photos):
    """The same missing file: the command line's message names its option, the tab's the field."""
    overrides = {**clip_overrides, "clip_weights": str(tmp_path / "gone" / "clip.safetensors")}
    write_tiny_preset(tiny_models_dir, icg_checkpoint.path, overrides, name="tiny-lost-clip")
    service = CaptionService(Host(lambda: Settings(models_dir=tiny_models_dir, model=TINY, device="cpu")))
    row = next(row for row in service.model_rows() if row.id == "tiny-lost-clip")
    assert not row.ready
    _, status, _ = caption_image(service, Image.open(photos[0]), "tiny-lost-clip" + render.MISSING)
    assert status.startswith("Error: Missing model file of tiny-lost-clip") and "clip.safetensors" in status
    assert "check the path given in Models > Local files: clip weights" in status
    assert not CLI_OPTION.search(status), status

    from captioners.registry import FAMILIES
    from captioners.weights import ensure_assets

    spec = service.spec("tiny-lost-clip")
    with pytest.raises(MissingWeightsError) as info:  # the command line calls this directly
        ensure_assets(FAMILIES[spec.family].assets(spec), tiny_models_dir, model=spec.id)
    assert "--clip-weights" in str(info.value) and "Local files" in info.value.ui_message
