"""The WebUI adapter against the stand-in WebUI (A1111, Forge, reForge and Forge Neo flavours)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image

from tests.webui_host import CANVAS_HOSTS, TINY

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "captioners_webui.py"
# For what does not differ between A1111, Forge and reForge.
any_host = pytest.mark.parametrize("webui", ["a1111"], indirect=True)


def load_script():
    """Import the extension's script as the WebUI does (by file, with the extension root importable)."""
    spec = importlib.util.spec_from_file_location("captioners_webui.py", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def extension(webui):
    script = load_script()
    webui.script_callbacks.ui_settings_callback()
    webui.shared.opts.set("captioners_model", TINY)
    return script.extension


def test_script_only_registers_callbacks(webui):
    assert len(SCRIPT.read_text().splitlines()) <= 25
    load_script()
    registered = {k: len(v) for k, v in webui.script_callbacks.callback_map.items() if v}
    assert registered == {"callbacks_ui_settings": 1, "callbacks_ui_tabs": 1, "callbacks_after_component": 1,
                          "callbacks_app_started": 1, "callbacks_script_unloaded": 1}


@any_host
def test_every_setting_has_a_section_and_a_component(webui, extension):
    opts = webui.shared.opts
    keys = [k for k in opts.data_labels if k.startswith("captioners_")]
    assert len(keys) >= 12
    assert set(opts.data_labels) == set(keys), "options must all carry the extension's prefix"
    opts.dumpjson()  # reads section[0] of every option, as the WebUI's settings page does
    from modules import ui_settings

    with gr.Blocks():
        for key in keys:
            info = opts.data_labels[key]
            assert info.section == ("captioners", "Captioners") and info.category_id
            if not isinstance(info.default, (str, int, bool)) or isinstance(info.default, float):
                assert info.component is not None, f"{key}: floats and lists need an explicit component"
            component = ui_settings.create_setting_component(key)
            assert component.elem_id == f"setting_{key}"
            # The settings page refuses a saved value whose type differs from the default's.
            assert opts.same_type(getattr(opts, key), info.default)
    model_info = opts.data_labels["captioners_model"]
    assert TINY in model_info.component_args()["choices"] and TINY in model_info.refresh()
    assert webui.script_callbacks.errors == []
    assert not [k for k in keys if "<" in opts.data_labels[k].label]  # labels are HTML too
    for key in ("captioners_max_image_mpixels", "captioners_max_request_mpixels"):  # the page accepts 0.5
        assert opts.data_labels[key].component_args["step"] < 1


def test_every_settings_hint_is_shown_as_written(webui, extension):
    """The page shows hints as HTML (<words> vanish as a tag), and Forge's gradio 4 page drops the
    .info() hint of a dropdown: the Device hint was missing there."""
    from modules import ui_settings

    opts = webui.shared.opts
    shown = {}
    with gr.Blocks():
        for key, option in opts.data_labels.items():
            component = ui_settings.create_setting_component(key)
            written = " ".join(filter(None, (
                re.sub(r"<span class='info'>\((.*?)\)</span>", r"(\1)", option.comment_after).strip(),
                getattr(component, "info", None))))
            shown[key] = ui_settings.shown_hint(key, component)
            assert shown[key] == written, key
    assert "interrogate device" in shown["captioners_device"]
    assert "Captioners folder in the WebUI's models folder" in shown["captioners_models_dir"]
    assert "training" in shown["captioners_unload_after_batch"]


@any_host
def test_settings_are_read_at_each_use(webui, extension, tmp_path):
    opts = webui.shared.opts
    settings = extension.service.settings()
    assert settings.model == TINY
    assert settings.models_dir == Path(webui.paths.models_path) / "Captioners"
    assert settings.after_use == "offload" and settings.decoding.strategy is None
    assert settings.after_batch == "unload" and settings.idle_unload_s == 0  # a dataset job frees the GPU
    opts.set("captioners_models_dir", str(tmp_path / "elsewhere"))
    opts.set("captioners_strategy", "beam")
    opts.set("captioners_num_beams", 3.0)  # sliders give floats
    opts.set("captioners_top_p", 0.5)
    opts.set("captioners_seed", 7)
    opts.set("captioners_unload_after_batch", False)
    opts.set("captioners_idle_unload_minutes", 2.5)  # a Number gives floats
    settings = extension.service.settings()
    assert settings.after_batch is None and settings.idle_unload_s == 150
    assert settings.models_dir == tmp_path / "elsewhere"
    assert settings.decoding.to_dict() == {"strategy": "beam", "num_beams": 3, "top_p": 0.5, "seed": 7}


@any_host
def test_tab_builds_with_send_to_buttons(webui, extension):
    tabs = webui.script_callbacks.ui_tabs_callback()
    assert webui.script_callbacks.errors == []
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("Captioners", "captioners")
    bindings = webui.infotext_utils.registered_param_bindings[-3:]
    assert [b.tabname for b in bindings] == ["txt2img", "img2img", "inpaint"]
    for binding in bindings:
        assert binding.source_text_component.elem_id == "captioners_caption"
        assert binding.source_image_component.elem_id == "captioners_image"


def _dependency(blocks, button):
    for dep in blocks.config["dependencies"]:
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]
        if button._id in targets:
            return dep
    raise AssertionError("the button has no event")


def test_img2img_button_wires_every_subtab(webui, extension):
    forge = webui.host in CANVAS_HOSTS
    demo, made = webui.ui.create_img2img(forge=forge)
    button = extension.img2img
    assert webui.script_callbacks.errors == []
    assert button.wired and button.button is not None
    # Placed in the tools row, right after 📦; in Forge Neo (no interrogate buttons) after its last tool.
    anchor = made["deepbooru"] if "deepbooru" in made else made["restore_progress"]
    assert "interrogate" in made or webui.host == "forge_neo"
    row = anchor.parent
    children = row.children
    assert children[children.index(anchor) + 1] is button.button

    def image_of(name):
        component = made[name]
        return component.background if forge and name != "inpaint_upload" else component

    sources = [image_of(n) for n in ("img2img", "sketch", "inpaint", "inpaint_sketch", "inpaint_upload")]
    dep = _dependency(demo, button.button)
    assert dep["inputs"] == [button.tab_index._id, made["prompt"]._id, *(s._id for s in sources)]
    assert dep["outputs"] == [made["prompt"]._id]
    assert dep.get("js") == "captioners_img2img_args"


def test_img2img_button_captions_the_open_subtab(webui, extension, photos):
    webui.ui.create_img2img(forge=webui.host in CANVAS_HOSTS)
    button = extension.img2img
    photo = Image.open(photos[0]).convert("RGBA")  # img2img images are RGBA
    expected = extension.service.caption([photo])[1][0]
    lock = webui.call_queue.queue_lock
    for tab in range(5):
        images = [None] * 5
        images[tab] = {"image": photo, "mask": photo} if tab == 2 else photo
        before = lock.acquisitions
        assert button.run(tab, "old prompt", *images) == expected
        assert lock.acquisitions == before + 1 and not lock.locked()
        assert not webui.shared.state.busy
    webui.shared.opts.set("captioners_prompt_mode", "append")
    assert button.run(0, "a photo,", photo, None, None, None, None) == f"a photo, {expected}"
    webui.shared.opts.set("captioners_prompt_mode", "prepend")
    assert button.run("0", "style", photo, None, None, None, None) == f"{expected}, style"



@any_host
def test_img2img_button_answers_a_users_mistake_in_one_line(webui, extension, photos, caplog):
    """No image in the open sub-tab, or a model without its files: a warning in the page and one log
    line, the prompt left alone. (A raised gr.Error made gradio print a 25-line traceback.)"""
    webui.ui.create_img2img()
    button = extension.img2img
    photo = Image.open(photos[0])
    shown = []
    import captioners.webui.img2img as img2img

    original = img2img.warn
    img2img.warn = shown.append
    try:
        with caplog.at_level("INFO"):
            assert button.run(5, "kept", photo, None, None, None, None) == gr.update()  # the Batch sub-tab
            assert button.run(1, "kept", photo, None, None, None, None) == gr.update()  # an empty sketch
            webui.shared.opts.set("captioners_model", "clipcap-coco")  # its files are missing
            assert button.run(0, "kept", photo, None, None, None, None) == gr.update()
    finally:
        img2img.warn = original
    assert shown[0] == shown[1] and "No image in the open img2img tab" in shown[0]
    assert "coco_weights.pt" in shown[2] and "Local files" in shown[2] and "--weights" not in shown[2]
    ours = [r for r in caplog.records if r.name.startswith("captioners")]
    assert len(ours) == 3 and all(r.levelname == "WARNING" and not r.exc_info for r in ours)
    assert all("\n" not in r.getMessage() for r in ours)


def test_free_vram_takes_each_hosts_path(webui):
    from captioners.webui import gpu

    host, manager = gpu.memory_manager()
    assert host == ("forge" if webui.host == "forge_neo" else webui.host)  # Neo has Forge's backend
    sd_models = webui.sd_models

    class FakeSD:
        lowvram = False

        def __init__(self):
            self.moves = []

        def to(self, device):
            self.moves.append(str(device))

    restore = gpu.free_sd_vram()
    if webui.host == "a1111":
        assert sd_models.calls == []  # no checkpoint loaded: nothing to move, and none gets loaded
        model = sd_models.model_data.sd_model = FakeSD()
        restore = gpu.free_sd_vram()
        assert sd_models.calls == [("send_model_to_cpu", model)] and model.moves == ["cpu"]
        restore()
        assert sd_models.calls[-1] == ("send_model_to_device", model)
        model.lowvram = True  # --lowvram: only the module on the GPU is evicted
        gpu.free_sd_vram()
        assert webui.lowvram.calls[-1] == "send_everything_to_cpu" and model.moves == ["cpu", "cpu"]
    else:
        assert webui.memory.calls == ["unload_all_models", "soft_empty_cache"]
        restore()  # the host reloads its model by itself
        assert sd_models.calls == [] and webui.lowvram.calls == []
    assert webui.shared.sd_model_reads == []


def test_job_frees_vram_on_gpu_only_and_always_ends(webui, extension):
    from captioners.webui.host import WebUIHost

    host = WebUIHost()
    state, lock = webui.shared.state, webui.call_queue.queue_lock
    calls = []
    import captioners.webui.gpu as gpu

    original = gpu.free_sd_vram
    gpu.free_sd_vram = lambda: calls.append("free") or (lambda: calls.append("restore"))
    try:
        with host.job("captioners", torch.device("cpu")):
            assert state.busy and lock.locked()
        assert calls == []  # nothing to share on the CPU
        with pytest.raises(RuntimeError):
            with host.job("captioners", torch.device("cuda")):
                assert calls == ["free"]
                raise RuntimeError("CUDA out of memory")
        assert calls == ["free", "restore"]
        webui.shared.opts.set("captioners_free_sd_vram", False)
        with host.job("captioners", torch.device("cuda")):
            pass
        assert calls == ["free", "restore"]
    finally:
        gpu.free_sd_vram = original
    assert not state.busy and not lock.locked()
    assert [h[0] for h in state.history[-3:]] == ["end", "begin", "end"]


@any_host
def test_failed_caption_frees_the_model_and_ends_the_job(webui, extension, photos):
    service = extension.service
    service.caption([Image.open(photos[0])])
    captioner = service._captioner
    assert service.loaded_model() == TINY

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    captioner.caption_pixels = boom
    with pytest.raises(RuntimeError):
        service.caption([Image.open(photos[0])])
    assert service.loaded_model() is None and not captioner.loaded
    assert not webui.shared.state.busy and not webui.call_queue.queue_lock.locked()


@any_host
def test_device_and_precision_follow_the_webui(webui, extension):
    from captioners.webui.host import WebUIHost

    host = WebUIHost()
    assert host.device("auto") == torch.device(webui.devices.device_interrogate)
    assert host.device("cpu") == torch.device("cpu")
    assert host.dtype("auto", torch.device("cuda")) == "auto"
    webui.shared.cmd_opts.no_half = True
    try:
        assert host.dtype("auto", torch.device("cuda")) == "fp32"
        assert host.dtype("fp16", torch.device("cuda")) == "fp16"  # an explicit choice wins
    finally:
        webui.shared.cmd_opts.no_half = False


@pytest.mark.parametrize("webui", ["forge_neo"], indirect=True)
def test_forge_neo_has_no_interrogators_and_no_name_keyword(webui, extension):
    """Forge Neo: no interrogate module or device ("auto" is its one device, which --cpu sets), and
    registrars that take no name=, which the extension's scripts never pass."""
    from captioners.webui.host import WebUIHost

    assert importlib.util.find_spec("modules.interrogate") is None
    assert not hasattr(webui.devices, "device_interrogate")
    assert WebUIHost().device("auto") == torch.device(webui.devices.device)
    with pytest.raises(TypeError):
        webui.script_callbacks.on_image_saved(print, name="captioners")


@any_host
def test_webui_interrupt_stops_our_jobs(webui, extension):
    host = extension.host
    assert not host.stop_requested()
    webui.shared.state.interrupt()
    assert host.stop_requested()
    webui.shared.state.begin("next")
    assert not host.stop_requested()
    webui.shared.state.stop_generating()  # the first click on Interrupt while a batch runs
    assert host.stop_requested()


@any_host
def test_reload_unloads_the_model(webui, extension, photos):
    extension.service.caption([Image.open(photos[0])])
    assert extension.service.loaded_model() == TINY
    webui.script_callbacks.script_unloaded_callback()
    assert extension.service.loaded_model() is None
    assert webui.script_callbacks.errors == []


def test_checkpoints_load_despite_the_webuis_torch_load(monkeypatch, icg_checkpoint):
    """A1111 replaces torch.load with a checker that returns None for files written by newer torch."""
    from captioners.weights import load_state_dict

    def a1111_safe_load(*args, **kwargs):
        return None

    monkeypatch.setattr(torch, "load", a1111_safe_load)
    state = load_state_dict(icg_checkpoint.path)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
