"""The part of modules/ui.py's img2img tab the extension hooks into, in the WebUI's creation order:
prompt, the tools row with 📎 📦, the five image sub-tabs in ``mode_img2img``, then Batch, then the
inpaint controls (Mask mode). In Forge the first four images are ForgeCanvas objects. As in A1111,
Inpaint sketch's image before drawing is a gr.State made right after its image, and Inpaint upload
has a second gr.Image for its mask."""

import gradio as gr

from modules.ui_components import ToolButton

GRADIO3 = int(gr.__version__.split(".")[0]) < 4


def image(elem_id, tool=None, image_mode="RGBA"):
    extra = {"tool": tool} if tool and GRADIO3 else {}
    return gr.Image(label="Image for img2img", type="pil", image_mode=image_mode, elem_id=elem_id, **extra)


def create_img2img(forge=False):
    """Returns (blocks, components by name)."""
    if forge:
        from modules_forge.forge_canvas.canvas import ForgeCanvas
    made = {}
    with gr.Blocks(analytics_enabled=False) as demo:
        made["prompt"] = gr.Textbox(label="Prompt", elem_id="img2img_prompt", lines=3)
        with gr.Row(elem_id="img2img_tools"):
            made["interrogate"] = ToolButton("📎", elem_id="interrogate", tooltip="Interrogate CLIP")
            made["deepbooru"] = ToolButton("📦", elem_id="deepbooru", tooltip="Interrogate DeepBooru")
        with gr.Tabs(elem_id="mode_img2img"):
            for name, elem_id, tool, mode in (("img2img", "img2img_image", "editor", "RGBA"),
                                              ("sketch", "img2img_sketch", "color-sketch", "RGB"),
                                              ("inpaint", "img2maskimg", "sketch", "RGBA"),
                                              ("inpaint_sketch", "inpaint_sketch", "color-sketch", "RGB")):
                with gr.TabItem(name):
                    made[name] = ForgeCanvas(elem_id=elem_id) if forge else image(elem_id, tool, mode)
                    if name == "inpaint_sketch" and not forge:
                        made["inpaint_sketch_orig"] = gr.State(None)
            with gr.TabItem("inpaint upload"):
                made["inpaint_upload"] = image("img_inpaint_base", image_mode="RGB")
                made["inpaint_upload_mask"] = image("img_inpaint_mask")
            with gr.TabItem("batch"):
                made["batch_input_dir"] = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir")
        made["mask_mode"] = gr.Radio(label="Mask mode", choices=["Inpaint masked", "Inpaint not masked"],
                                     value="Inpaint masked", type="index", elem_id="img2img_mask_mode")
    return demo, made
