"""modules/processing.py: the processing object ``p`` and ``process_images``, in the WebUI's order.

What scripts see, as in A1111 1.10 (Forge and Forge Neo keep it):
1. ``scripts.before_process(p)``: ``p.prompt`` and ``p.init_images`` are set, nothing derived yet;
2. ``p.setup_prompts()``: ``p.all_prompts`` from ``p.prompt`` (so a prompt changed later is ignored);
3. ``scripts.process(p)``, then per batch ``before_process_batch`` / ``process_batch``;
4. each image's infotext (``p.extra_generation_params`` included), then ``images.save_image``
   (which calls the image-saved callbacks), then a grid of several images into ``outpath_grids``.
"Sampling" here returns the init image (or a grey one): no model runs.
"""

import json

from PIL import Image

from modules import images, shared


class StableDiffusionProcessing:
    def __init__(self, prompt="", negative_prompt="", styles=None, batch_size=1, n_iter=1, seed=-1, steps=20,
                 cfg_scale=7.0, width=64, height=64, outpath_samples=None, outpath_grids=None,
                 do_not_save_samples=False, do_not_save_grid=False, override_settings=None, **_):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.styles = styles or []
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.seed = seed
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.outpath_samples = outpath_samples
        self.outpath_grids = outpath_grids
        self.do_not_save_samples = do_not_save_samples
        self.do_not_save_grid = do_not_save_grid
        self.override_settings = override_settings or {}
        self.extra_generation_params = {}
        self.scripts = None
        self.script_args = []
        self.all_prompts = self.all_negative_prompts = self.all_seeds = None
        self.prompts = self.negative_prompts = self.seeds = None
        self.main_prompt = None
        self.iteration = 0
        self.is_api = False
        self.user = None
        self.comments = {}

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.main_prompt = self.all_prompts[0]

    def sample(self, index):
        return Image.new("RGB", (self.width, self.height), (128, 128, 128))

    def close(self):
        pass


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, mask=None, mask_blur=4, inpainting_fill=0, resize_mode=0,
                 denoising_strength=0.75, image_cfg_scale=None, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images
        self.image_mask = mask
        self.mask_blur = mask_blur
        self.inpainting_fill = inpainting_fill
        self.resize_mode = resize_mode
        self.denoising_strength = denoising_strength
        self.image_cfg_scale = image_cfg_scale

    def sample(self, index):
        source = self.init_images[index % len(self.init_images)]
        return source.convert("RGB").resize((self.width, self.height))


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", all_prompts=None, infotexts=None):
        self.images = images_list
        self.prompt = p.prompt
        self.seed = seed
        self.info = info
        self.all_prompts = all_prompts or p.all_prompts or [p.prompt]
        self.infotexts = infotexts or [info]
        self.extra_generation_params = dict(p.extra_generation_params)
        self.comments = "".join(f"{comment}\n" for comment in p.comments)  # shown under the result


def quote(text):
    """infotext_utils.quote: values with a comma, colon or newline go in JSON quotes."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    all_negative_prompts = all_negative_prompts or p.all_negative_prompts
    params = {"Steps": p.steps, "CFG scale": p.cfg_scale, "Seed": all_seeds[index],
              "Size": f"{p.width}x{p.height}", **p.extra_generation_params}
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    prompt = p.main_prompt if use_main_prompt else all_prompts[index]
    negative = all_negative_prompts[index]
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}"


def fix_seed(p):
    if p.seed is None or p.seed == -1:
        p.seed = 1234


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    return process_images_inner(p)


def process_images_inner(p):
    fix_seed(p)
    p.setup_prompts()
    p.all_seeds = [int(p.seed) + x for x in range(len(p.all_prompts))]
    if p.scripts is not None:
        p.scripts.process(p)
    output, infotexts = [], []
    for n in range(p.n_iter):
        p.iteration = n
        if shared.state.interrupted or shared.state.stopping_generation:
            break
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
        for i in range(len(p.prompts)):
            image = p.sample(n * p.batch_size + i)
            text = create_infotext(p, p.prompts, p.seeds, p.seeds, iteration=n, position_in_batch=i,
                                   all_negative_prompts=p.negative_prompts, index=i)
            if not p.do_not_save_samples:
                images.save_image(image, p.outpath_samples, "", p.seeds[i], p.prompts[i], "png", info=text, p=p)
            output.append(image)
            infotexts.append(text)
        shared.state.nextjob()
    if len(output) > 1 and not p.do_not_save_grid and not p.do_not_save_samples:
        grid = images.image_grid(output)
        text = create_infotext(p, p.all_prompts, p.all_seeds, p.all_seeds, use_main_prompt=True)
        images.save_image(grid, p.outpath_grids, "grid", p.all_seeds[0], p.all_prompts[0], "png", info=text,
                          p=p, grid=True)
    return Processed(p, output, p.all_seeds[0], infotexts[0] if infotexts else "", infotexts=infotexts)
