"""GPU JPEG decoding (``--gpu-decode``): the workers only read a JPEG's bytes; nvjpeg decodes the
batch on the GPU (``torchvision.io.decode_jpeg(..., device="cuda")``) and the model's preprocessing
runs there too (:mod:`captioners.tensor_preprocess`), so a fast GPU is not held back by the CPU's
JPEG decoding.

Which images go this way is decided in the workers from the file's header (read with Pillow, which
also refuses decompression bombs as the CPU path does): baseline or progressive JPEGs in RGB or
grayscale, one frame, ending in the end-of-image marker. Everything else (PNG, WebP, CMYK JPEGs, MPO) is decoded on the CPU as
without the option, and so is any JPEG the GPU decoder rejects. nvjpeg does not apply EXIF
orientation, so the worker reads it from the header and the GPU stage turns the decoded tensor
upright, as Pillow's ``exif_transpose`` does on the CPU path.

Pixels differ slightly from the CPU path's (another JPEG decoder and resize implementation), so
captions can too; the option is off by default.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from captioners.images import opened

log = logging.getLogger(__name__)

GPU_MODES = ("RGB", "L")  # JPEG colour modes nvjpeg decodes to RGB as Pillow would
EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"  # EOI marker
TAIL_BYTES = 4096  # read from a file's end to find it (after padding some writers add)


@dataclass
class EncodedJpeg:
    """A JPEG's bytes (a uint8 tensor, picklable for loader processes), left for the GPU to decode."""

    data: torch.Tensor
    orientation: int = 1  # EXIF orientation, 1 = upright
    name: str = "image"

    def raw(self) -> bytes:
        return self.data.numpy().tobytes()


def gpu_jpeg(source: Path | bytes, name: str) -> EncodedJpeg | None:
    """The JPEG at ``source`` (a file, or its bytes) kept for the GPU when its header says nvjpeg can
    decode it like Pillow, else None. Only a kept file is read whole: the others' header and last
    bytes tell. A file Pillow cannot open raises as :func:`captioners.images.load_image` does."""
    with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as stream:
        stream.seek(0, io.SEEK_END)
        stream.seek(max(0, stream.tell() - TAIL_BYTES))
        if not stream.read().rstrip(b"\0").endswith(JPEG_END):  # cut short: the CPU path says it is truncated
            return None
        stream.seek(0)
        with opened(stream) as image:
            if image.format != "JPEG" or image.mode not in GPU_MODES or getattr(image, "n_frames", 1) != 1:
                return None
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
        stream.seek(0)
        data = stream.read()
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, name)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned as EXIF ``orientation`` says (Pillow's exif_transpose, as tensor ops)."""
    turns = {
        2: lambda x: x.flip(-1),                          # mirrored
        3: lambda x: x.flip(-2, -1),                      # upside down
        4: lambda x: x.flip(-2),                          # mirrored upside down
        5: lambda x: x.transpose(-2, -1),                 # mirrored, rotated 90° counter-clockwise
        6: lambda x: x.transpose(-2, -1).flip(-1),        # rotated 90° counter-clockwise: turn clockwise
        7: lambda x: x.transpose(-2, -1).flip(-2, -1),    # mirrored, rotated 90° clockwise
        8: lambda x: x.transpose(-2, -1).flip(-2),        # rotated 90° clockwise: turn counter-clockwise
    }
    return turns[orientation](image) if orientation in turns else image


def decode_jpegs(jpegs: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 RGB tensors on ``device``, upright; None for a JPEG the decoder rejects.
    One batched call (nvjpeg's batched decode on CUDA); if it fails, each image alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(items: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # torchvision 0.29 announces TorchCodec at every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(items, mode=ImageReadMode.RGB, device=device)

    try:
        images: list[torch.Tensor | None] = list(decode([jpeg.data for jpeg in jpegs]))
    except RuntimeError:
        images = []
        for jpeg in jpegs:
            try:
                images.append(decode([jpeg.data])[0])
            except RuntimeError as exc:
                log.debug("GPU JPEG decoding failed for %s (%s); decoding it on the CPU", jpeg.name, exc)
                images.append(None)
    return [upright(image, jpeg.orientation) if image is not None else None for image, jpeg in zip(images, jpegs)]


class GpuJpegStage:
    """JPEGs decoded and preprocessed on ``device`` (loading.with_gpu_jpegs joins them to their batch).

    ``tensor_preprocess``: the models' preprocessing on a uint8 tensor (one function, or one per model
    as a MultiPreprocess); ``cpu_fallback``: the CPU path for a JPEG the GPU rejects (bytes -> the
    model's input, or the reason it cannot be used)."""

    def __init__(self, tensor_preprocess: Callable[[torch.Tensor], object], device: torch.device,
                 cpu_fallback: Callable[[bytes, str], object]):
        self.tensor_preprocess = tensor_preprocess
        self.device = device
        self.cpu_fallback = cpu_fallback

    def pixels_of(self, jpegs: Sequence[EncodedJpeg]) -> list[object]:
        """Each JPEG's model input on ``self.device`` (a tensor, or a tuple per model), or its reason."""
        out: list[object] = []
        for jpeg, image in zip(jpegs, decode_jpegs(jpegs, self.device)):
            out.append(self.tensor_preprocess(image) if image is not None else self.cpu_fallback(jpeg.raw(), jpeg.name))
        return out


def gpu_decode_device(requested: bool, device: torch.device | None, tensor_preprocess: object) -> torch.device | None:
    """The device JPEGs are decoded on with ``--gpu-decode``, or None (then the CPU decodes, as
    without it); logs why when it was asked for and cannot be had."""
    if not requested:
        return None
    if device is None or device.type != "cuda":
        log.warning("--gpu-decode needs a CUDA GPU (the model runs on %s): JPEGs are decoded on the CPU.", device)
        return None
    if tensor_preprocess is None:
        log.warning("--gpu-decode: a model's preprocessing has no tensor version: JPEGs are decoded on the CPU.")
        return None
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        log.warning("--gpu-decode needs torchvision's image decoders: JPEGs are decoded on the CPU.")
        return None
    return device
