"""modules/scripts.py: ``Script``, ``AlwaysVisible`` and the ``ScriptRunner`` that builds the scripts'
controls and calls their processing methods with their slice of ``p.script_args``.

As in the WebUI, a Script subclass found in a loaded script file is instantiated once per tab, its
``ui()`` controls are appended to the runner's ``inputs`` (``args_from``/``args_to`` mark its slice;
index 0 is the "Script" dropdown), and an exception in a script method is reported and ignored;
here it is kept in ``errors``.
"""

import importlib.util
import inspect
import os
import re
import sys
from collections import namedtuple

import gradio as gr

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
errors = []  # (method, filename, exception), as errors.report prints them


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


def load_script_file(path):
    """What load_scripts() does for one file of an extension's scripts/ folder: import it by file
    (module name = the file's name) with the extension root first on sys.path, and keep its Script
    subclasses."""
    basedir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    saved = sys.path
    sys.path = [basedir] + sys.path
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path = saved
    for value in module.__dict__.values():
        if inspect.isclass(value) and issubclass(value, Script) and value is not Script:
            scripts_data.append(ScriptClassData(value, path, basedir, module))
    return module


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        controls = script.ui(script.is_img2img)
        script.controls = controls
        if controls is None:
            return
        script.name = script.title().lower()
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names
        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui(self):
        """The always-visible scripts' controls (each in a gr.Group), then the Script dropdown."""
        for script in self.alwayson_scripts:
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)
        self.inputs[0] = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"], value="None",
                                     type="index")
        return self.inputs

    def run(self, p, *args):
        """The selected dropdown script; None when there is none (then process_images runs)."""
        return None

    def _call(self, method, p, **kwargs):
        for script in self.alwayson_scripts:
            if getattr(script.__class__, method) is getattr(Script, method):
                continue
            try:
                getattr(script, method)(p, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception as exc:  # errors.report(...), then the next script
                errors.append((method, script.filename, exc))

    def before_process(self, p):
        self._call("before_process", p)

    def process(self, p):
        self._call("process", p)

    def before_process_batch(self, p, **kwargs):
        self._call("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._call("process_batch", p, **kwargs)


scripts_txt2img = ScriptRunner()
scripts_img2img = ScriptRunner()
