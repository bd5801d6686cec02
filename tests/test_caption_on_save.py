"""Caption on save: a caption file beside every image the (stand-in) WebUI saves."""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from captioners.errors import CaptionerError
from captioners.webui import on_save
from captioners.webui.on_save import image_prompt, is_grid, prompt_of_infotext
from tests.webui_scripts import SCRIPTS, TIMEOUT_S, StubService, load_extension, within

SCRIPT_FILE = "captioners_save_captions.py"
any_host = pytest.mark.parametrize("webui", ["a1111"], indirect=True)


@pytest.fixture()
def loaded(webui):
    return load_extension(webui, SCRIPT_FILE)


@pytest.fixture()
def stub(loaded):
    loaded.extension.service = StubService(["a red bus", "a green tram"])
    return loaded.extension.service


def turn_on(webui, **options):
    opts = webui.shared.opts
    opts.set("captioners_save_captions", True)
    for key, value in options.items():
        opts.set(f"captioners_save_captions_{key}", value)


def generate(webui, tmp_path, prompt="a photo of a bus", batch_size=1, negative="blurry", **kwargs):
    """A txt2img run that saves its images (and a grid of several) under the queue lock."""
    from modules import call_queue, processing

    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, negative_prompt=negative, batch_size=batch_size, outpath_samples=str(tmp_path / "samples"),
        outpath_grids=str(tmp_path / "grids"), **kwargs)

    def run():
        with call_queue.queue_lock:
            webui.shared.state.begin(job="txt2img")
            try:
                return processing.process_images(p)
            finally:
                webui.shared.state.end()

    return within(TIMEOUT_S, run)


def saved_images(tmp_path: Path, folder: str = "samples") -> list[Path]:
    return sorted((tmp_path / folder).glob("*.png"))


# ---- registration and settings ------------------------------------------------------------------------
def test_script_file_is_thin_and_registers_one_callback(webui, loaded):
    source = (SCRIPTS / SCRIPT_FILE).read_text()
    assert len(source.splitlines()) <= 15
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert imported == {"modules", "captioners.webui.on_save"}
    callbacks = webui.script_callbacks.callback_map["callbacks_image_saved"]
    assert [c.callback for c in callbacks] == [on_save.on_image_saved]


@any_host
def test_settings_are_in_the_captioners_section(webui, loaded):
    opts = webui.shared.opts
    for key, default in (("captioners_save_captions", False), ("captioners_save_captions_prompt", False),
                         ("captioners_save_captions_existing", "skip")):
        assert opts.data_labels[key].default == default and opts.data_labels[key].section[0] == "captioners"
    assert opts.data_labels["captioners_save_captions_existing"].component_args["choices"] == ["skip", "overwrite"]


# ---- writing the caption file -----------------------------------------------------------------------
@any_host
def test_off_by_default(webui, loaded, stub, tmp_path):
    generate(webui, tmp_path)
    assert len(saved_images(tmp_path)) == 1 and not list((tmp_path / "samples").glob("*.txt"))
    assert stub.calls == []


def test_every_saved_image_gets_its_caption_file_but_grids_do_not(webui, loaded, stub, tmp_path):
    turn_on(webui)
    generate(webui, tmp_path, batch_size=2)
    images = saved_images(tmp_path)
    assert len(images) == 2 and len(saved_images(tmp_path, "grids")) == 1
    assert [image.with_suffix(".txt").read_text() for image in images] == ["a red bus", "a green tram"]
    assert not list((tmp_path / "grids").glob("*.txt"))
    assert len(stub.calls) == 2 and all(call["in_current_job"] for call in stub.calls)
    assert all(call["model"] is None for call in stub.calls)  # the Settings' model
    assert not [p for p in (tmp_path / "samples").iterdir() if p.name.startswith(".")]  # no temp file left
    assert webui.script_callbacks.errors == []


@any_host
def test_the_image_is_captioned_with_the_settings_model(webui, loaded, tmp_path):
    turn_on(webui)
    generate(webui, tmp_path)
    [image] = saved_images(tmp_path)
    expected = loaded.extension.service.caption([Image.open(image).convert("RGB")])[1][0]
    assert image.with_suffix(".txt").read_text() == expected


@any_host
def test_prompt_prefix_is_this_images_prompt_on_one_line(webui, loaded, stub, tmp_path):
    turn_on(webui, prompt=True)
    generate(webui, tmp_path, prompt="a photo of a bus,\nsunset")
    [image] = saved_images(tmp_path)
    assert image.with_suffix(".txt").read_text() == "a photo of a bus, sunset, a red bus"  # no negative prompt


def test_prompt_of_infotext():
    text = 'a cat,\nsitting\nNegative prompt: ugly\nSteps: 20, Seed: 1, Size: 64x64, Captioners caption: "a, b"'
    assert prompt_of_infotext(text) == "a cat, sitting"
    assert prompt_of_infotext("just a prompt") == "just a prompt"
    assert prompt_of_infotext("a dog\nSteps: 20, Seed: 1, Size: 8x8") == "a dog"
    assert prompt_of_infotext("a dog: good, style: fine") == "a dog: good, style: fine"  # only 2 pairs: prompt


def test_image_prompt_falls_back_to_p_then_nothing():
    class P:
        prompt = "a  long\nprompt"

    class Params:
        def __init__(self, p, pnginfo):
            self.p, self.pnginfo = p, pnginfo

    assert image_prompt(Params(P(), {})) == "a long prompt"
    assert image_prompt(Params(None, {"extras": "Postprocess upscale by: 2"})) == ""


def test_is_grid(tmp_path):
    class P:
        outpath_samples = str(tmp_path / "samples")
        outpath_grids = str(tmp_path / "grids")

    assert is_grid(tmp_path / "grids" / "2024-01-01" / "grid-0001.png", P())
    assert not is_grid(tmp_path / "samples" / "00001-1.png", P())
    assert not is_grid(tmp_path / "samples" / "00001-1.png", None)  # Extras: no p
    P.outpath_grids = P.outpath_samples  # one folder for both: the grid's own name tells
    assert is_grid(tmp_path / "samples" / "grid-0001.png", P())
    assert not is_grid(tmp_path / "samples" / "00002-1.png", P())


def test_the_gallerys_save_of_a_grid_is_a_grid(tmp_path):
    """The gallery's Save button rebuilds p from the generation's info: ``index_of_first_image`` is 1
    when the gallery starts with the grid, and ``batch_index`` is the saved image's index - 1."""
    class Saved:
        index_of_first_image = 1
        batch_index = -1

    saved = tmp_path / "saved" / "00003-1.png"  # the Save folder, named like a sample
    assert is_grid(saved, Saved())
    Saved.batch_index = 0  # the first image after the grid
    assert not is_grid(saved, Saved())
    Saved.index_of_first_image = 0  # a single image: no grid in the gallery
    assert not is_grid(saved, Saved())


# ---- which images: final ones, under the name they were written as ----------------------------------
@any_host
def test_a_numbered_copy_gets_its_own_caption_file(webui, loaded, stub, tmp_path, monkeypatch):
    """Settings > Saving > "Saving the image to an existing file: Add number suffix" (also set by img2img's
    Batch with an output folder): A1111 writes <name>-1.png and still hands the callback <name>.png."""
    from modules import images

    monkeypatch.setattr(webui.shared.opts, "save_images_replace_action", "Add number suffix", raising=False)
    turn_on(webui)
    folder = tmp_path / "saved"
    for _ in range(2):
        within(TIMEOUT_S, lambda: images.save_image(Image.new("RGB", (8, 8)), str(folder), "",
                                                   forced_filename="photo"))
    assert sorted(path.name for path in folder.iterdir()) == ["photo-1.png", "photo-1.txt", "photo.png", "photo.txt"]
    assert (folder / "photo.txt").read_text() == "a red bus"
    assert (folder / "photo-1.txt").read_text() == "a green tram"


def test_the_saved_file_is_the_newest_of_the_numbered_run(tmp_path):
    """<name>.png free again (deleted), older numbered copies left: A1111 wrote <name>.png itself."""

    class Opts:
        save_images_replace_action = "Add number suffix"

    for age, name in enumerate(["photo-2.png", "photo-1.png", "photo.png"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**18 + age * 10**9,) * 2)
    assert on_save.saved_file(tmp_path / "photo.png", Opts()) == tmp_path / "photo.png"
    os.utime(tmp_path / "photo-2.png", ns=(2 * 10**18,) * 2)
    assert on_save.saved_file(tmp_path / "photo.png", Opts()) == tmp_path / "photo-2.png"
    Opts.save_images_replace_action = "Replace"
    assert on_save.saved_file(tmp_path / "photo.png", Opts()) == tmp_path / "photo.png"


@any_host
def test_intermediate_images_get_no_caption_file(webui, loaded, stub, tmp_path, monkeypatch):
    """A dataset wants the final images only: not the copies before highres fix, face restoration or
    color correction, inpainting's masks, nor img2img's init images (saved without p, in their folder)."""
    from modules import images, processing

    samples, init_images = tmp_path / "samples", tmp_path / "init-images"
    monkeypatch.setattr(webui.shared.opts, "outdir_init_images", str(init_images), raising=False)
    turn_on(webui)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a bus", outpath_samples=str(samples),
                                                    outpath_grids=str(tmp_path / "grids"))

    def save(suffix, path=samples, on_p=p, basename="", **kwargs):
        within(TIMEOUT_S, lambda: images.save_image(Image.new("RGB", (8, 8)), str(path), basename, seed=1, p=on_p,
                                                   suffix=suffix, **kwargs))

    for suffix in on_save.INTERMEDIATE_SUFFIXES:
        save(suffix)
    save("", path=init_images, on_p=None, basename=None, forced_filename="0123abcd")
    assert not list(tmp_path.rglob("*.txt")) and stub.calls == []
    save("")  # the final image
    [caption] = list(tmp_path.rglob("*.txt"))
    assert caption.parent == samples and not caption.stem.endswith(on_save.INTERMEDIATE_SUFFIXES)
    assert caption.read_text() == "a red bus" and len(stub.calls) == 1


@any_host
def test_an_image_saved_outside_a_generation_is_captioned_too(webui, loaded, stub, tmp_path):
    """Extras, or the gallery's Save button (which runs outside the queue lock): p may be None."""
    from modules import images

    turn_on(webui, prompt=True)
    fullfn, _ = within(TIMEOUT_S, lambda: images.save_image(Image.new("RGB", (8, 8)), str(tmp_path), "",
                                                           info=None, p=None, forced_filename="upscaled"))
    assert Path(fullfn).with_suffix(".txt").read_text() == "a red bus"


# ---- an existing caption file -------------------------------------------------------------------------
@any_host
def test_the_webuis_own_parameters_file_is_kept_by_default(webui, loaded, stub, tmp_path, caplog, monkeypatch):
    """The WebUI's "Create a text file next to every image with generation parameters" writes <name>.txt
    just before the image-saved callbacks run: skip keeps it, and no caption is made for nothing."""
    monkeypatch.setattr(webui.shared.opts, "save_txt", True, raising=False)
    turn_on(webui)
    with caplog.at_level(logging.INFO, logger="captioners"):  # a CLI test may have set its level
        generate(webui, tmp_path)
    [image] = saved_images(tmp_path)
    assert image.with_suffix(".txt").read_text().startswith("a photo of a bus\nNegative prompt: blurry")
    assert stub.calls == [] and "kept the existing" in caplog.text


@any_host
def test_overwrite_keeps_a_backup(webui, loaded, stub, tmp_path, monkeypatch):
    monkeypatch.setattr(webui.shared.opts, "save_txt", True, raising=False)
    turn_on(webui, existing="overwrite")
    generate(webui, tmp_path)
    [image] = saved_images(tmp_path)
    assert image.with_suffix(".txt").read_text() == "a red bus"
    backup = image.with_name(image.with_suffix(".txt").name + ".bak")
    assert backup.read_text().startswith("a photo of a bus\nNegative prompt: blurry")


@any_host
def test_an_empty_file_is_filled_and_an_unknown_policy_skips(webui, loaded, stub, tmp_path):
    from modules import images

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "a.txt").write_text("  \n")
    (samples / "b.txt").write_text("mine")
    turn_on(webui)
    webui.shared.opts.data["captioners_save_captions_existing"] = "delete everything"
    for name in ("a", "b"):
        within(TIMEOUT_S, lambda: images.save_image(Image.new("RGB", (8, 8)), str(samples), "", forced_filename=name))
    assert (samples / "a.txt").read_text() == "a red bus" and (samples / "b.txt").read_text() == "mine"
    assert not list(samples.glob("*.bak"))


# ---- failures never break the save ------------------------------------------------------------------
@any_host
@pytest.mark.parametrize("error", [CaptionerError("Missing model files: coco_weights.pt\n(details)"),
                                   RuntimeError("CUDA out of memory")])
def test_a_failure_is_one_line_and_the_image_is_saved(webui, loaded, tmp_path, caplog, error):
    loaded.extension.service = StubService(error=error)
    turn_on(webui)
    with caplog.at_level(logging.INFO, logger="captioners"):  # a CLI test may have set its level
        generate(webui, tmp_path)
    assert len(saved_images(tmp_path)) == 1 and not list((tmp_path / "samples").glob("*.txt"))
    assert webui.script_callbacks.errors == []  # the callback itself never raised
    lines = [r for r in caplog.records if r.name.startswith("captioners") and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage() and not lines[0].exc_info
    assert str(error).splitlines()[0] in lines[0].getMessage()


@any_host
@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_a_linked_or_foreign_caption_file_is_never_replaced(webui, loaded, stub, tmp_path, caplog):
    from modules import images

    samples = tmp_path / "samples"
    samples.mkdir()
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("do not touch")
    (samples / "linked.txt").symlink_to(elsewhere)
    (samples / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    turn_on(webui, existing="overwrite")
    with caplog.at_level(logging.WARNING):
        for name in ("linked", "latin1"):
            within(TIMEOUT_S, lambda: images.save_image(Image.new("RGB", (8, 8)), str(samples), "",
                                                       forced_filename=name))
    assert elsewhere.read_text() == "do not touch" and (samples / "linked.txt").is_symlink()
    assert (samples / "latin1.txt").read_bytes() == "caf\xe9".encode("latin-1")
    assert len([r for r in caplog.records if r.name.startswith("captioners")]) == 2
    assert webui.script_callbacks.errors == []


# ---- under the generation's queue lock --------------------------------------------------------------
def test_captioning_a_saved_image_never_waits_for_the_generations_lock(webui, loaded, tmp_path):
    """The real service, called from inside a generation that holds the queue lock."""
    state, lock = webui.shared.state, webui.call_queue.queue_lock
    turn_on(webui)
    before, history = lock.acquisitions, len(state.history)
    generate(webui, tmp_path, batch_size=2)
    assert [image.with_suffix(".txt").is_file() for image in saved_images(tmp_path)] == [True, True]
    assert lock.acquisitions == before + 1 and not lock.locked()
    assert state.history[history:] == [("begin", "txt2img"), ("end", "txt2img")]


def test_img2img_in_forge_saves_captions_from_its_main_thread(webui, loaded, tmp_path, photos):
    """Forge, reForge and Forge Neo generate on their main thread while a gradio worker holds the lock."""
    from modules import img2img, processing, scripts

    turn_on(webui)
    p = processing.StableDiffusionProcessingImg2Img(prompt="x", init_images=[Image.open(photos[0])],
                                                    outpath_samples=str(tmp_path / "samples"),
                                                    outpath_grids=str(tmp_path / "grids"))
    p.scripts, p.script_args = scripts.scripts_img2img, [0]
    within(TIMEOUT_S, lambda: img2img.img2img(p))
    [image] = saved_images(tmp_path)
    assert image.with_suffix(".txt").read_text().strip()
