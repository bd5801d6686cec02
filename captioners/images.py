"""Opening user images safely: any mode Pillow reads becomes an upright RGB image, or a clear error."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import IO, Iterable, Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

from captioners.display import display_path
from captioners.errors import ImageLoadError

log = logging.getLogger(__name__)

ORIENTATION = 0x0112  # EXIF tag
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _register_optional_plugins() -> None:
    """avif and jxl are only read when their Pillow plugins are installed."""
    for module, exts in (("pillow_avif", (".avif",)), ("pillow_jxl", (".jxl",))):
        try:
            __import__(module)
        except ImportError:
            continue
        IMAGE_EXTENSIONS.update(exts)
    if ".avif" not in IMAGE_EXTENSIONS and ".avif" in Image.registered_extensions():
        IMAGE_EXTENSIONS.add(".avif")  # Pillow >= 11.3 reads AVIF natively


_register_optional_plugins()


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def iter_image_files(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> Iterator[Path]:
    """Image files named directly or found in the given folders, in a stable (sorted) order."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            yield from sorted(p for p in path.glob(pattern) if p.is_file() and is_image_path(p))
        else:
            yield path


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Upright RGB: EXIF rotation applied, first frame of animations, alpha composited on white."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    if image.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even upright images
        image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white. Pillow < 10
        # (A1111 and Forge ship 9.5) opens 16-bit PNGs as "I", so look at the values too.
        sixteen_bit = mode.startswith("I;16") or (mode == "I" and (image.getextrema()[1] or 0) > 255)
        image = image.point(lambda v: v / 256).convert("L") if sixteen_bit else image.convert("L")
    elif mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _draft_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The size to request so that the shorter side stays >= ``min_side`` after JPEG scaling."""
    width, height = size
    scale = min_side / max(1, min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# What opening a user's image can raise (UnidentifiedImageError and the rest are OSErrors).
OPEN_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@contextlib.contextmanager
def opened(source: str | os.PathLike | IO[bytes]) -> Iterator[Image.Image]:
    """``Image.open`` without the decompression-bomb warning: sizes are checked by the callers, and
    images above Pillow's hard limit (2 x ``Image.MAX_IMAGE_PIXELS``) still raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            yield image


def load_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Open ``path`` as an RGB image; raise :class:`ImageLoadError` with the reason otherwise.

    ``min_side`` lets JPEG decoding skip detail the model never sees: the decoder downscales by a
    power of two while keeping both sides at least that large (much faster on big photos).
    Images above Pillow's decompression-bomb limit (2 x ``Image.MAX_IMAGE_PIXELS``) are refused.
    """
    path = Path(path)
    try:
        with opened(path) as image:
            if min_side and image.format == "JPEG":
                image.draft("RGB", _draft_size(image.size, min_side))
            image.load()
            return to_rgb(image)
    except OPEN_ERRORS as exc:
        raise ImageLoadError(f"{display_path(path)}: {open_failure(exc, path)}") from exc


def open_failure(exc: BaseException, path: Path | None = None) -> str:
    """Why an image (a file, or bytes when ``path`` is None) could not be opened, in words."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied (the file is not readable)"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(exc, UnidentifiedImageError):  # its own text names a BytesIO object: no help to anyone
        if path is None:
            return "not a known image format, or damaged"
        empty = path.is_file() and path.stat().st_size == 0
        return "empty file (0 bytes)" if empty else "not an image Pillow can read"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels (possible decompression bomb): {exc}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "truncated or corrupt image" if "truncated" in text.lower() else text


def check_image_file(path: Path) -> str | None:
    """Why ``path`` cannot be captioned, from its header alone (cheap: no decoding), or None."""
    try:
        with opened(path):
            return None
    except OPEN_ERRORS as exc:
        return open_failure(exc, path)


class EncodedImage:
    """An image a client sent as bytes: its size read from the header, its pixels not decoded yet.

    Decoding waits until the job runs (one image at a time, each dropped once preprocessed), so a
    request's images never all sit decoded in memory, and sizes are checked before any decoding:
    a 17 KiB PNG can declare 150 million pixels.
    """

    def __init__(self, data: bytes, where: str):
        self.data = data
        self.where = where
        try:
            with opened(io.BytesIO(data)) as image:
                self.size: tuple[int, int] = image.size
        except OPEN_ERRORS as exc:
            raise self._error(exc) from exc

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]

    def decode(self) -> Image.Image:
        """The upright RGB image (see :func:`to_rgb`)."""
        try:
            with opened(io.BytesIO(self.data)) as image:
                image.load()
                return to_rgb(image)
        except OPEN_ERRORS as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> ImageLoadError:
        return ImageLoadError(f"{self.where} is not an image Pillow can read ({open_failure(exc)}).")
