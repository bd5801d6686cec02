"""sd-webui-captioners: img2img's "Captioners: caption the input into the prompt" section.

An always-visible img2img script (the WebUI only finds those in an extension's scripts/ folder);
its logic lives in captioners.webui.prompt_script.
"""

from modules import scripts

from captioners.webui.prompt_script import CaptionIntoPrompt


class CaptionersImg2ImgPrompt(CaptionIntoPrompt, scripts.Script):
    """Captions each img2img input image (every file of a Batch run) into its prompt."""
