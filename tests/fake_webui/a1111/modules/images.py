"""modules/images.py: ``save_image`` as A1111 1.10 runs it, minus the filename patterns.

Order: the name ``<number>-<seed><suffix>.<ext>`` (``<basename>-<number>`` for grids), the
before-image-saved callbacks, the image with its infotext in the PNG's "parameters" text, the
``<name>.txt`` of generation parameters when ``opts.save_txt`` is on, then the image-saved callbacks
(which therefore see that .txt file already written).

With ``opts.save_images_replace_action`` other than "Replace" (A1111's "Add number suffix", which its
img2img Batch with an output folder also sets), an image whose file exists is written as
``<name>-1.<ext>`` (``-2``, ...) while ``params.filename``, the .txt file and the returned name keep
``<name>.<ext>``, as in A1111.
"""

import os

from PIL import Image, PngImagePlugin

from modules import script_callbacks, shared


def image_grid(imgs, batch_size=1, rows=None):
    width, height = imgs[0].size
    grid = Image.new("RGB", (width * len(imgs), height))
    for i, img in enumerate(imgs):
        grid.paste(img, (i * width, 0))
    return grid


def _next_number(path):
    numbers = [int(name.split("-")[0]) for name in os.listdir(path) if name.split("-")[0].isdigit()]
    return max(numbers, default=-1) + 1


def _free_name(filename):
    """Where the image is written: the name itself, unless numbered copies are asked for and it exists."""
    if getattr(shared.opts, "save_images_replace_action", "Replace") == "Replace":
        return filename
    stem, extension = os.path.splitext(filename)
    number, free = 0, filename
    while os.path.exists(free):
        number += 1
        free = f"{stem}-{number}{extension}"
    return free


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    os.makedirs(path, exist_ok=True)
    if forced_filename is not None:
        name = forced_filename
    elif basename:
        name = f"{basename}-{_next_number(path):04}"
    else:
        name = f"{_next_number(path):05}-{seed}{suffix}"
    fullfn = os.path.join(path, f"{name}.{extension}")
    pnginfo = existing_info or {}
    if info is not None:
        pnginfo[pnginfo_section_name] = info
    params = script_callbacks.ImageSaveParams(image, p, fullfn, pnginfo)
    script_callbacks.before_image_saved_callback(params)
    text = PngImagePlugin.PngInfo()
    for key, value in params.pnginfo.items():
        text.add_text(key, str(value))
    params.image.save(_free_name(params.filename), pnginfo=text, format="PNG")
    txt_fullfn = None
    if getattr(shared.opts, "save_txt", False) and info is not None:
        txt_fullfn = f"{os.path.splitext(params.filename)[0]}.txt"
        with open(txt_fullfn, "w", encoding="utf8") as file:
            file.write(f"{info}\n")
    script_callbacks.image_saved_callback(params)
    return params.filename, txt_fullfn
