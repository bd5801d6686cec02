"""Captioning part of an image: the crop around a mask or a box (the idea of FINECAPTION).

A *target* is what the user marked: a mask (a PIL image or a bool array) or a :class:`Box`. The
crop is the target's bounding box plus a margin (a fraction of the box, at least ``min_margin``
pixels), grown around its centre to at least ``min_size`` pixels and clamped to the image. Inside
the crop, what lies outside the target is kept, greyed out or blurred (``outside``).

Masks follow the WebUI's own rule (A1111 ``processing.create_binary_mask``): an image with a
transparent pixel is masked where it is opaque; any other image where it is bright. A pixel counts
above 128, as in A1111 and Forge. Pure PIL and numpy; every function here is unit-tested.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from captioners.errors import CaptionerError
from captioners.images import EncodedImage, to_rgb

OUTSIDE_MODES = ("keep", "grey", "blur")
THRESHOLD = 128  # a mask value above this is masked (A1111 and Forge round masks the same way)
GREY = (128, 128, 128)
MAX_MARGIN = 4.0  # 400 % of the box on each side: beyond that the crop is the whole image anyway
MAX_PIXELS = 16384  # for min_margin / min_size


class RegionError(CaptionerError):
    """A mask, box or region option the user can fix (HTTP 400 in the API)."""


class EmptyMaskError(RegionError):
    """Nothing is painted in the mask."""


EMPTY_MASK = ("The mask is empty: paint the area to caption (white on black, or opaque on transparent).")


class Box(NamedTuple):
    """A rectangle in pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h

    @property
    def ltrb(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), as ``Image.crop`` takes it."""
        return self.x, self.y, self.right, self.bottom

    def to_dict(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}

    def __str__(self) -> str:
        return f"{self.w}x{self.h} at {self.x},{self.y}"


@dataclass(frozen=True)
class RegionOptions:
    outside: str = "keep"   # one of OUTSIDE_MODES: what to do with the crop's pixels outside the target
    margin: float = 0.1     # around the target's box on each side, as a fraction of its width / height
    min_margin: int = 8     # pixels, at least
    min_size: int = 64      # the crop's sides, at least (unless the image is smaller)

    def validated(self) -> "RegionOptions":
        if self.outside not in OUTSIDE_MODES:
            raise RegionError(f"outside must be one of {', '.join(OUTSIDE_MODES)} (got {self.outside!r}).")
        margin = _number("margin", self.margin, 0, MAX_MARGIN, integer=False)
        min_margin = _number("min_margin", self.min_margin, 0, MAX_PIXELS, integer=True)
        min_size = _number("min_size", self.min_size, 0, MAX_PIXELS, integer=True)
        return replace(self, margin=float(margin), min_margin=int(min_margin), min_size=int(min_size))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, defaults: "RegionOptions | None" = None
                     ) -> "RegionOptions":
        """User input (the API's ``region`` object) over ``defaults``; unknown names are refused."""
        defaults = defaults or cls()
        if data is None:
            return defaults.validated()
        if not isinstance(data, Mapping):
            raise RegionError("'region' must be an object of outside, margin, min_margin, min_size.")
        known = ("outside", "margin", "min_margin", "min_size")
        unknown = sorted(set(map(str, data)) - set(known))
        if unknown:
            raise RegionError(f"Unknown region option(s) {', '.join(unknown)}; known: {', '.join(known)}.")
        return replace(defaults, **{k: v for k, v in data.items() if v is not None}).validated()


def _number(name: str, value: Any, low: float, high: float, integer: bool) -> int | float:
    """``value`` as a number in [low, high] (a whole one if ``integer``), or a RegionError saying so."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and isinstance(value, float):
        ok = value.is_integer()
    if not ok:
        kind = "a whole number" if integer else "a number"
        raise RegionError(f"{name} must be {kind} (got {value!r}).")
    if not low <= value <= high:
        raise RegionError(f"{name} must be at least {low:g} and at most {high:g} (got {value!r}).")
    return int(value) if integer else value


# ---- reading boxes and masks ---------------------------------------------------------------------
def parse_box(value: Any, where: str = "box") -> Box:
    """``{"x", "y", "w", "h"}`` or ``[x, y, w, h]`` (whole numbers; x, y >= 0, w, h >= 1)."""
    names = ("x", "y", "w", "h")
    if isinstance(value, Mapping):
        if set(value) != set(names):
            raise RegionError(f"'{where}' must have exactly the keys x, y, w, h (got {', '.join(map(str, value))}).")
        items = [value[name] for name in names]
    elif isinstance(value, (list, tuple)) and len(value) == 4:
        items = list(value)
    else:
        raise RegionError(f"'{where}' must be {{\"x\", \"y\", \"w\", \"h\"}} or [x, y, w, h] in pixels.")
    numbers = []
    for name, item in zip(names, items):
        low = 1 if name in ("w", "h") else 0
        numbers.append(_number(f"{where}.{name}", item, low, 10**9, integer=True))
    return Box(*numbers)


def check_box(box: Box, size: tuple[int, int], where: str = "box") -> Box:
    """``box`` if it lies inside an image of ``size``, else a RegionError naming both."""
    width, height = size
    if box.w < 1 or box.h < 1 or box.x < 0 or box.y < 0 or box.right > width or box.bottom > height:
        raise RegionError(f"'{where}' ({box}) does not fit in the {width}x{height} image.")
    return box


def read_mask(mask: Image.Image | np.ndarray) -> np.ndarray:
    """A mask image as a bool array (height x width): where it is opaque if it has any transparent
    pixel (A1111's inpaint sketch tool and uploaded RGBA masks), else where it is bright."""
    if isinstance(mask, np.ndarray):
        return _array_mask(mask)
    if mask.mode == "P":
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA", "PA", "RGBa"):
        alpha = np.asarray(mask.getchannel("A"))
        if alpha.min() < 255:
            return alpha > THRESHOLD
    if mask.mode.startswith("I") or mask.mode == "F":  # 16/32-bit: scaled to 8 bits first
        mask = to_rgb(mask)
    return np.asarray(mask.convert("L")) > THRESHOLD


def _array_mask(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool and array.ndim == 2:
        return array
    if array.ndim == 2:
        return array > THRESHOLD
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        return read_mask(Image.fromarray(np.ascontiguousarray(array).astype(np.uint8).squeeze()))
    raise RegionError(f"A mask must be an image, not an array of shape {array.shape}.")


def alpha_mask(layer: Image.Image) -> np.ndarray:
    """A drawing layer's strokes: where it is opaque (Forge's canvas foreground, gradio 4 layers).
    A layer without alpha falls back to :func:`read_mask`."""
    if layer.mode == "P":
        layer = layer.convert("RGBA")
    if layer.mode in ("RGBA", "LA", "PA", "RGBa"):
        return np.asarray(layer.getchannel("A")) > THRESHOLD
    return read_mask(layer)


def layers_mask(layers: Sequence[Image.Image] | None) -> np.ndarray | None:
    """The union of drawing layers' strokes (at the first layer's size), or None without layers."""
    masks = [alpha_mask(layer) for layer in (layers or []) if layer is not None]
    if not masks:
        return None
    union = masks[0].copy()
    for other in masks[1:]:
        union |= fit_mask(other, (union.shape[1], union.shape[0]))
    return union


def sketch_mask(drawn: Image.Image, original: Image.Image) -> np.ndarray:
    """Where a colour sketch differs from the image it was drawn on (A1111's Inpaint sketch)."""
    drawn_rgb, original_rgb = to_rgb(drawn), to_rgb(original)
    if drawn_rgb.size != original_rgb.size:
        raise RegionError(f"The sketch ({drawn_rgb.width}x{drawn_rgb.height}) and the image it was drawn on "
                          f"({original_rgb.width}x{original_rgb.height}) differ in size: load the image again.")
    return np.any(np.asarray(drawn_rgb) != np.asarray(original_rgb), axis=-1)


def composite_layer(background: Image.Image, layer: Image.Image) -> Image.Image:
    """A drawing layer over its background (Forge's sketch canvases), the layer scaled to fit."""
    base = background.convert("RGBA")
    top = layer.convert("RGBA")
    if top.size != base.size:
        top = top.resize(base.size, Image.NEAREST)
    return Image.alpha_composite(base, top)


def editor_value(value: Any) -> tuple[Any, np.ndarray | None]:
    """(image, mask or None) of a brush component's value: gradio 3's ``{"image", "mask"}`` (an
    ``Image(tool="sketch")``) or gradio 4+'s ``{"background", "layers", "composite"}`` (ImageMask).
    Any other value is the image itself, without a mask."""
    if not isinstance(value, Mapping):
        return value, None
    if "image" in value or "mask" in value:
        mask = value.get("mask")
        return value.get("image"), None if mask is None else read_mask(mask)
    image = value.get("background")
    if image is None:
        image = value.get("composite")
    return image, layers_mask(value.get("layers"))


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` scaled to ``size`` (width, height) when it has another size. Shrinking, a pixel
    partly covered counts (a thin stroke survives, as in :func:`mask_box`); growing, nearest neighbour."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    shrinking = size[0] < mask.shape[1] or size[1] < mask.shape[0]
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    resized = image.resize(tuple(size), Image.BOX if shrinking else Image.NEAREST)
    return np.asarray(resized) > (0 if shrinking else THRESHOLD)


# ---- the crop ------------------------------------------------------------------------------------
def mask_box(mask: Image.Image | np.ndarray, size: tuple[int, int] | None = None) -> Box | None:
    """The bounding box of the masked pixels, or None for an empty mask. With ``size`` (the image's,
    when the mask has another size) the box is scaled outwards to that size, so no stroke is lost."""
    array = mask if isinstance(mask, np.ndarray) and mask.dtype == bool else read_mask(mask)
    rows = np.flatnonzero(array.any(axis=1))
    cols = np.flatnonzero(array.any(axis=0))
    if rows.size == 0:
        return None
    left, right, top, bottom = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    if size is not None and tuple(size) != (array.shape[1], array.shape[0]):
        sx, sy = size[0] / array.shape[1], size[1] / array.shape[0]
        left, top = math.floor(left * sx), math.floor(top * sy)
        right, bottom = min(size[0], math.ceil(right * sx)), min(size[1], math.ceil(bottom * sy))
    return Box(left, top, right - left, bottom - top)


def crop_box(target: Box, size: tuple[int, int], options: RegionOptions | None = None) -> Box:
    """The crop around ``target`` in an image of ``size``: margin, minimum size, clamped to the image."""
    options = options or RegionOptions()
    width, height = size
    margin_x = max(options.min_margin, round(options.margin * target.w))
    margin_y = max(options.min_margin, round(options.margin * target.h))
    left, right = _span(target.x - margin_x, target.right + margin_x, options.min_size, width)
    top, bottom = _span(target.y - margin_y, target.bottom + margin_y, options.min_size, height)
    return Box(left, top, right - left, bottom - top)


def _span(start: int, end: int, min_length: int, limit: int) -> tuple[int, int]:
    """One side of the crop: clamped to [0, limit], then grown around its centre to ``min_length``
    (shifted back inside the image at a border, so a region at the edge still gets its context)."""
    start, end = max(0, start), min(limit, end)
    if end - start >= min_length:
        return start, end
    length = min(min_length, limit)
    begin = round((start + end - length) / 2)
    begin = min(max(begin, 0), limit - length)
    return begin, begin + length


class Crop(NamedTuple):
    image: Image.Image  # RGB, what the model captions
    box: Box            # where the crop lies in the image
    target: Box         # the bounding box of the mask (or the given box)


def region_target(region: Box | Image.Image | np.ndarray, size: tuple[int, int], invert: bool = False
                  ) -> tuple[Box, np.ndarray | None]:
    """(the target's box, its mask or None for a box) in an image of ``size``; errors for an empty
    mask or a box outside the image. ``invert``: the unmasked area (A1111's "Inpaint not masked")."""
    if isinstance(region, Box):
        return check_box(region, size), None
    mask = region if isinstance(region, np.ndarray) and region.dtype == bool else read_mask(region)
    if invert:
        mask = ~mask
    target = mask_box(mask, size)
    if target is None:
        raise EmptyMaskError(EMPTY_MASK)
    return target, mask


def crop_region(image: Image.Image, region: Box | Image.Image | np.ndarray,
                options: RegionOptions | None = None, invert: bool = False) -> Crop:
    """The part of ``image`` to caption for ``region`` (a mask of any size, or a box), as RGB."""
    options = (options or RegionOptions()).validated()
    rgb = to_rgb(image)
    target, mask = region_target(region, rgb.size, invert)
    box = crop_box(target, rgb.size, options)
    piece = rgb.crop(box.ltrb)
    if options.outside != "keep":
        inside = _inside(mask, target, box, rgb.size)
        piece = neutralise(piece, inside, options.outside)
    return Crop(piece, box, target)


def _inside(mask: np.ndarray | None, target: Box, box: Box, size: tuple[int, int]) -> np.ndarray:
    """The target's pixels within the crop ``box``, as a bool array of the crop's size."""
    if mask is None:
        inside = np.zeros((box.h, box.w), dtype=bool)
        inside[target.y - box.y:target.bottom - box.y, target.x - box.x:target.right - box.x] = True
        return inside
    full = fit_mask(mask, size)
    return full[box.y:box.bottom, box.x:box.right]


def neutralise(piece: Image.Image, inside: np.ndarray, outside: str) -> Image.Image:
    """``piece`` with the pixels outside ``inside`` greyed out or blurred (``outside``)."""
    if outside == "grey":
        background = Image.new("RGB", piece.size, GREY)
    elif outside == "blur":
        # Strong enough that the surroundings read as context, not as things to describe.
        background = piece.filter(ImageFilter.GaussianBlur(max(2.0, 0.04 * max(piece.size))))
    else:
        return piece
    keep = Image.fromarray(inside.astype(np.uint8) * 255, "L")
    return Image.composite(piece, background, keep)


# ---- images sent to the API ----------------------------------------------------------------------
class RegionImage(EncodedImage):
    """An encoded image that decodes to its region's crop: the API checks the region when the request
    arrives (from the image's header) and the job decodes and crops one image at a time."""

    def __init__(self, image: EncodedImage, region: Box | np.ndarray, options: RegionOptions):
        self.data, self.where, self.size = image.data, image.where, image.size
        self.region, self.options = region, options.validated()
        self.upright = upright_size(image)
        try:
            target, _ = region_target(region, self.upright)
        except EmptyMaskError:
            raise
        except RegionError as exc:  # a box that does not fit: say which image
            raise RegionError(f"{image.where}: {exc}") from None
        self.box = crop_box(target, self.upright, self.options)

    def decode(self) -> Image.Image:
        return crop_region(super().decode(), self.region, self.options).image


ORIENTATION = 0x0112
SWAPPED = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter: width and height swap


def encoded_mask(mask: EncodedImage) -> np.ndarray:
    """A mask the client sent, as a bool array (its alpha kept, EXIF rotation applied); an empty
    mask is refused here, before any image is decoded."""
    from captioners.errors import ImageLoadError
    from captioners.images import OPEN_ERRORS, open_failure, opened

    try:
        with opened(io.BytesIO(mask.data)) as image:
            image.load()
            if image.getexif().get(ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image) or image
            array = read_mask(image)
    except OPEN_ERRORS as exc:
        raise ImageLoadError(f"{mask.where} is not an image Pillow can read ({open_failure(exc)}).") from exc
    if not array.any():
        raise EmptyMaskError(EMPTY_MASK)
    return array


def upright_size(image: EncodedImage) -> tuple[int, int]:
    """The image's size as decoded (EXIF rotation applied), read from its header."""
    from captioners.images import opened

    with opened(io.BytesIO(image.data)) as opened_image:
        orientation = opened_image.getexif().get(ORIENTATION, 1)
    width, height = image.size
    return (height, width) if orientation in SWAPPED else (width, height)
