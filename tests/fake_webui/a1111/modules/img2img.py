"""modules/img2img.py: the img2img tab's handler and its Batch sub-tab, as the WebUIs run them.

- ``img2img`` runs under the queue lock with ``shared.state`` begun, as ``wrap_gradio_gpu_call`` does;
  in Forge, reForge and Forge Neo its body then runs on the "main thread"
  (``modules_forge.main_thread.run_and_wait_result``), another thread than the lock's holder.
- ``process_batch`` reuses ONE ``p`` for every input file: it sets ``p.init_images`` (and, with PNG
  info, ``p.prompt`` from the prompt it saw first) and calls ``process_images(p)`` once per file.
"""

import importlib.util
import os

from PIL import Image

from modules import call_queue, scripts, shared
from modules.processing import Processed, fix_seed, process_images

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")


def _png_prompt(image):
    info = image.info.get("parameters") or ""
    return info.split("\n")[0] if info else ""


def process_batch(p, input, output_dir, inpaint_mask_dir, args, to_scale=False, scale_by=1.0, use_png_info=False,
                  png_info_props=None, png_info_dir=None):
    fix_seed(p)
    files = sorted(os.path.join(input, name) for name in os.listdir(input) if name.lower().endswith(EXTENSIONS))
    shared.state.job_count = len(files) * p.n_iter
    prompt = p.prompt
    results = None
    for i, path in enumerate(files):
        shared.state.job = f"{i + 1} out of {len(files)}"
        if shared.state.interrupted or shared.state.stopping_generation:
            break
        image = Image.open(path)
        image.load()
        p.init_images = [image] * p.batch_size
        if use_png_info:
            extra = _png_prompt(image)
            p.prompt = prompt + (" " + extra if extra else "")
        if output_dir:
            p.outpath_samples = output_dir
        proc = scripts.scripts_img2img.run(p, *args)
        if proc is None:
            proc = process_images(p)
        if results is None:
            results = proc
        else:
            results.images.extend(proc.images)
            results.infotexts.extend(proc.infotexts)
    return results


def img2img_function(p, batch_input_dir=None, batch_output_dir="", use_png_info=False):
    """The handler's body, given a ``p`` built from the page's fields (``p.scripts``, ``p.script_args`` set)."""
    if batch_input_dir:
        processed = process_batch(p, batch_input_dir, batch_output_dir, "", p.script_args, use_png_info=use_png_info)
        return processed or Processed(p, [], p.seed, "")
    return scripts.scripts_img2img.run(p, *p.script_args) or process_images(p)


def img2img(p, batch_input_dir=None, batch_output_dir="", use_png_info=False):
    """The Generate button: the queue lock and a WebUI job around the handler."""
    with call_queue.queue_lock:
        shared.state.begin(job="img2img")
        try:
            if importlib.util.find_spec("modules_forge") is not None:
                from modules_forge import main_thread

                return main_thread.run_and_wait_result(img2img_function, p, batch_input_dir, batch_output_dir,
                                                       use_png_info)
            return img2img_function(p, batch_input_dir, batch_output_dir, use_png_info)
        finally:
            shared.state.end()
