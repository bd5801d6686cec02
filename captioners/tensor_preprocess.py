"""A model's preprocessing on a decoded image tensor, wherever the tensor is (the GPU, after nvjpeg).

The families preprocess PIL images (open_clip's transforms, BLIP's image processor). With GPU JPEG
decoding (``--gpu-decode``) an image arrives as a (3, H, W) uint8 tensor on the GPU instead, and the
same steps run there: resize (shorter side or exact size, antialiased), rounding back to 0..255 as
PIL's uint8 resize does, center crop, scale to 0..1, normalize. The pixels are close to the PIL
path's but not equal (another JPEG decoder, another implementation of the resize kernel), so
captions can differ from the CPU path's, as with ``--fast-decode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class TensorPreprocess:
    """(3, H, W) uint8 RGB tensor -> the model's (3, h, w) float32 input, on the tensor's device."""

    size: int | tuple[int, int]          # an int: the shorter side (aspect kept); (h, w): exact
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: tuple[int, int] | None = None  # center crop (h, w) after the resize
    interpolation: str = "bicubic"       # a torchvision InterpolationMode value

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        x = F.resize(image.float(), _size_argument(self.size), InterpolationMode(self.interpolation), antialias=True)
        x = x.clamp_(0, 255).round_()  # PIL resizes uint8 images: its results are rounded and clipped
        if self.crop is not None:
            x = F.center_crop(x, list(self.crop))
        return F.normalize(x.div_(255), list(self.mean), list(self.std))


def _size_argument(size: int | tuple[int, int]) -> list[int]:
    return [size] if isinstance(size, int) else list(size)


# Steps of a torchvision Compose that a decoded RGB uint8 tensor does not need: mode conversion (the
# decoder gives RGB) and PIL -> tensor (done by the scaling in TensorPreprocess).
_NOT_NEEDED = {"ToTensor", "MaybeToTensor", "MaybeConvertMode", "_convert_to_rgb", "convert_to_rgb"}


def from_transforms(preprocess: Callable[..., Any]) -> TensorPreprocess | None:
    """The tensor version of a torchvision ``Compose`` (open_clip's preprocessing: Resize, CenterCrop,
    RGB, ToTensor, Normalize), or None for a pipeline with any other step."""
    steps = getattr(preprocess, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        return None
    size = crop = mean = std = None
    interpolation = "bicubic"
    for step in steps:
        name = getattr(step, "__name__", None) or type(step).__name__
        if name == "Resize" and getattr(step, "max_size", None) is None:
            size = step.size if isinstance(step.size, int) else tuple(step.size)
            size = size[0] if isinstance(size, tuple) and len(size) == 1 else size
            interpolation = getattr(step.interpolation, "value", str(step.interpolation))
        elif name == "CenterCrop":
            crop = tuple(step.size) if not isinstance(step.size, int) else (step.size, step.size)
        elif name == "Normalize":
            mean, std = tuple(step.mean), tuple(step.std)
        elif name not in _NOT_NEEDED:
            return None
    if size is None or mean is None:
        return None
    return TensorPreprocess(size, mean, std, crop, interpolation)
