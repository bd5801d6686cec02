"""The part of modules/ui.py's img2img tab the extension hooks into, as Forge Neo builds it.

Neo has no interrogators: its img2img tools row holds only ↙ (``paste``), 🗑️
(``img2img_clear_prompt``), 📋 (``img2img_style_apply``) and the hidden 🌀
(``img2img_restore_progress``) before the token counters; there are no 📎 ``interrogate`` / 📦
``deepbooru`` buttons. The first four image sub-tabs are ForgeCanvas objects (as in Forge),
Inpaint upload has two ``gr.Image`` (image and mask), and Batch has an "Upload" sub-tab
(``gr.Files``) before "From directory" (``img2img_batch_input_dir``). The inpaint controls (Mask
mode) come after the sub-tabs.
"""

import gradio as gr

from modules.ui_components import ToolButton
from modules_forge.forge_canvas.canvas import ForgeCanvas


def create_img2img(forge=True):
    """Returns (blocks, components by name). ``forge`` is ignored: Neo's images are always canvases."""
    made = {}
    with gr.Blocks(analytics_enabled=False) as demo:
        made["prompt"] = gr.Textbox(label="Prompt", elem_id="img2img_prompt", lines=3)
        with gr.Row(elem_id="img2img_tools"):
            made["paste"] = ToolButton("↙️", elem_id="paste", tooltip="Read generation parameters")
            made["clear_prompt"] = ToolButton("🗑️", elem_id="img2img_clear_prompt", tooltip="Clear prompt")
            made["style_apply"] = ToolButton("📋", elem_id="img2img_style_apply", tooltip="Apply styles")
            made["restore_progress"] = ToolButton("🌀", elem_id="img2img_restore_progress", visible=False,
                                                  tooltip="Restore progress")
            made["token_counter"] = gr.HTML("<span>0/75</span>", elem_id="img2img_token_counter", visible=False)
        with gr.Tabs(elem_id="mode_img2img"):
            for name, elem_id in (("img2img", "img2img_image"), ("sketch", "img2img_sketch"),
                                  ("inpaint", "img2maskimg"), ("inpaint_sketch", "inpaint_sketch")):
                with gr.TabItem(name):
                    made[name] = ForgeCanvas(elem_id=elem_id)
            with gr.TabItem("Inpaint upload"):
                made["inpaint_upload"] = gr.Image(label="Image for img2img", type="pil", elem_id="img_inpaint_base")
                made["inpaint_upload_mask"] = gr.Image(label="Mask", type="pil", image_mode="RGBA",
                                                       elem_id="img_inpaint_mask")
            with gr.TabItem("Batch"):
                with gr.Tabs(elem_id="img2img_batch_source"):
                    with gr.TabItem("Upload"):
                        made["batch_upload"] = gr.Files(label="Files", elem_id="img2img_batch_upload")
                    with gr.TabItem("From directory"):
                        made["batch_input_dir"] = gr.Textbox(label="Input directory",
                                                             elem_id="img2img_batch_input_dir")
        made["mask_mode"] = gr.Radio(label="Mask mode", choices=["Inpaint masked", "Inpaint not masked"],
                                     value="Inpaint masked", type="index", elem_id="img2img_mask_mode")
    return demo, made
