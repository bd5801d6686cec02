"""modules/ui_settings.py: how the Settings page builds an option's component, and (for the tests) the
hint a user then sees next to it.

A hint reaches the page two ways. An ``OptionInfo.info()`` hint goes into ``comment_after``, which
the page's ``javascript/ui_settings_hints.js`` inserts after the first text of the component's
``<label> <span>``: a gradio 3 Dropdown is a ``<label>``, a gradio 4 one (Forge) a ``<div>`` with no
label, where A1111's script would throw and Forge's skips the hint. A component's own ``info=`` is
rendered by gradio under the label, on every version.
"""

import html
import re

import gradio as gr

from modules.shared import opts

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def create_setting_component(key, is_quicksettings=False):
    info = opts.data_labels[key]
    args = info.component_args() if callable(info.component_args) else info.component_args
    comp = info.component or {str: gr.Textbox, int: gr.Number, bool: gr.Checkbox}.get(type(info.default))
    if comp is None:
        raise Exception(f"bad options item type: {type(info.default)} for key {key}")
    return comp(label=info.label, value=getattr(opts, key), elem_id=f"setting_{key}", **(args or {}))


def has_label_span(component) -> bool:
    """Whether ui_settings_hints.js finds the ``label span`` it puts a comment after."""
    return not (isinstance(component, gr.Dropdown) and GRADIO_MAJOR >= 4)


def shown_hint(key, component) -> str:
    """The hint text the page shows for option ``key`` (HTML tags dropped, as a browser renders them)."""
    parts = []
    comment = opts.data_labels[key].comment_after
    if comment and has_label_span(component):
        parts.append(html.unescape(re.sub(r"<[^>]*>", "", comment)).strip())
    if getattr(component, "info", None):
        parts.append(component.info)
    return " ".join(parts)
