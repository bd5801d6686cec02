"""Models tab: path fields pointing a model at local copies of its files (saved in presets.json)."""

from __future__ import annotations

import gradio as gr

from captioners.local_paths import current_paths, path_keys, save_local_paths
from captioners.registry import PATH_KEYS
from captioners.service import CaptionService
from captioners.ui import render


def fields_for(service: CaptionService, label: str | None) -> tuple[list[str], dict[str, str]]:
    """The path options of the model behind ``label`` and their saved values."""
    try:
        spec = service.spec(render.model_id(label))
        return path_keys(spec), current_paths(service.settings().models_dir, spec)
    except Exception:  # an unknown model or a broken presets file: no fields; Save reports the error
        return [], {}


def show_paths(service: CaptionService, label: str | None) -> list:
    """One update per PATH_KEYS field: visible with its saved value when the model's family takes it."""
    keys, saved = fields_for(service, label)
    return [gr.update(visible=key in keys, value=saved.get(key, "")) for key in PATH_KEYS]


def save_paths(service: CaptionService, label: str | None, *values: str) -> str:
    try:
        spec = service.spec(render.model_id(label))
        keys = path_keys(spec)
        chosen = {key: value for key, value in zip(PATH_KEYS, values) if key in keys}
        path = save_local_paths(service.settings().models_dir, spec, chosen)
    except Exception as exc:
        return f"Not saved: {exc}"
    return f"Saved local paths of {spec.id} in {path} (empty fields use the default files)."


def local_paths_section(service: CaptionService, dropdown: gr.Dropdown, log_box: gr.Textbox) -> None:
    with gr.Accordion("Local files for the selected model", open=False, elem_id="captioners_local_paths"):
        gr.Markdown("Point the model at files you already have instead of downloading them. "
                    "Saved in the models folder's `presets.json`, so the command line and the API use them too.")
        keys, saved = fields_for(service, dropdown.value)
        fields = [gr.Textbox(saved.get(key, ""), label=key.replace("_", " "), elem_id=f"captioners_path_{key}",
                             visible=key in keys) for key in PATH_KEYS]
        save = gr.Button("Save local paths", elem_id="captioners_save_paths")
    dropdown.change(lambda label: show_paths(service, label), inputs=[dropdown], outputs=fields)
    save.click(lambda label, *values: save_paths(service, label, *values), inputs=[dropdown, *fields],
               outputs=[log_box])
