"""The few gradio differences the tab meets between 3.41 (A1111, reForge), 4.40 (Forge) and later.

No ``.style()``, no ``Component.update`` (``gr.update`` works everywhere), no ``gr.Box``.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js(code: str) -> dict[str, str]:
    """The keyword for a client-side function on an event: ``_js`` in gradio 3, ``js`` from 4."""
    return {"js": code} if GRADIO_MAJOR >= 4 else {"_js": code}


def image_sources(*sources: str) -> dict[str, Any]:
    """``source="upload"`` in gradio 3, ``sources=[...]`` from 4."""
    return {"sources": list(sources)} if GRADIO_MAJOR >= 4 else {"source": sources[0]}


def show_progress(on: bool) -> dict[str, Any]:
    if GRADIO_MAJOR >= 4:
        return {"show_progress": "full" if on else "hidden"}
    return {"show_progress": on}


def error(message: str) -> Exception:
    """An error shown to the user in the page (a toast / modal), without a traceback."""
    return gr.Error(message)


def warn(message: str) -> None:
    """A warning shown in the page (a toast), without ending the event as an error. Outside an event
    (tests, scripts) gradio hands it to ``warnings`` instead."""
    gr.Warning(message)


def blocks_kwargs(title: str | None = None, css: str | None = None) -> dict[str, Any]:
    """gr.Blocks(...) arguments; from gradio 6 the page's CSS goes to mount_gradio_app() instead (app.py)."""
    kwargs: dict[str, Any] = {"title": title} if title else {}
    if css and GRADIO_MAJOR < 6:
        kwargs["css"] = css
    return kwargs


def queue_kwargs(concurrency: int) -> dict[str, Any]:
    """Let a batch's progress stream while a caption or an interrupt gets through."""
    if GRADIO_MAJOR >= 4:
        return {"default_concurrency_limit": concurrency}
    return {"concurrency_count": concurrency}


MASK_COLOUR = "#ff00ff"  # only where a stroke is matters (its alpha); a colour that shows on photos


def mask_editor(label: str, elem_id: str) -> Any:
    """An image to paint a mask on. Gradio 3: ``gr.Image(tool="sketch")``, whose value is
    ``{"image", "mask"}``; from 4: ``gr.ImageMask``, whose value is ``{"background", "layers",
    "composite"}`` (captioners.regions.editor_value reads both)."""
    if GRADIO_MAJOR >= 4:
        return gr.ImageMask(type="pil", sources=["upload"], label=label, elem_id=elem_id, layers=False,
                            transforms=(), brush=gr.Brush(colors=[MASK_COLOUR], color_mode="fixed"))
    return gr.Image(type="pil", source="upload", tool="sketch", label=label, elem_id=elem_id,
                    brush_color=MASK_COLOUR)


def mask_editor_image(image: Any) -> Any:
    """The update that puts ``image`` in a ``mask_editor``. Gradio 3's sketch takes its default brush
    radius from the editor's size on screen, once: an image that arrives while the editor is hidden
    (a closed accordion) gets an infinite radius, and strokes paint nothing. So give it a radius for
    the image's size (about 4% of its longer side, the size of gradio's default on a typical screen)."""
    if GRADIO_MAJOR >= 4 or image is None:
        return image
    return gr.update(value=image, brush_radius=max(2, round(0.04 * max(image.size))))
