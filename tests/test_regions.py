"""captioners.regions: reading masks as the WebUI does, and the crop around a masked area (pure PIL/numpy)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from captioners.errors import CaptionerError
from captioners.images import EncodedImage
from captioners.regions import (GREY, Box, EmptyMaskError, RegionError, RegionImage, RegionOptions, alpha_mask,
                                composite_layer, crop_box, crop_region, editor_value, encoded_mask, layers_mask,
                                mask_box, parse_box, read_mask, sketch_mask, upright_size)


def photo(width: int = 200, height: int = 120) -> Image.Image:
    """An RGB gradient, so every crop has different pixels."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


def l_mask(size, *rects, value=255) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for rect in rects:
        draw.rectangle(rect, fill=value)  # inclusive corners
    return mask


NO_MIN = RegionOptions(margin=0.0, min_margin=0, min_size=0)


# ---- reading masks -------------------------------------------------------------------------------
def test_mask_box_is_the_bounding_box_of_every_stroke():
    mask = l_mask((200, 120), (50, 20, 69, 39), (100, 90, 104, 99))
    assert mask_box(mask) == Box(50, 20, 55, 80)
    assert mask_box(l_mask((200, 120))) is None  # empty


def test_values_up_to_128_are_not_masked_as_in_the_webui():
    assert mask_box(l_mask((50, 50), (10, 10, 20, 20), value=128)) is None
    assert mask_box(l_mask((50, 50), (10, 10, 20, 20), value=129)) == Box(10, 10, 11, 11)


def test_rgba_masks_use_their_alpha_when_any_pixel_is_transparent():
    """A1111's sketch tool and uploaded RGBA masks: opaque = masked, whatever the colour (black here)."""
    mask = Image.new("RGBA", (60, 40), (255, 255, 255, 0))
    ImageDraw.Draw(mask).rectangle((5, 6, 14, 9), fill=(0, 0, 0, 255))
    assert mask_box(mask) == Box(5, 6, 10, 4)
    opaque = l_mask((60, 40), (30, 10, 39, 19)).convert("RGBA")  # fully opaque: brightness counts
    assert mask_box(opaque) == Box(30, 10, 10, 10)
    assert mask_box(mask.convert("LA")) == Box(5, 6, 10, 4)


def test_other_mask_modes():
    assert mask_box(l_mask((40, 40), (1, 2, 3, 4)).convert("1")) == Box(1, 2, 3, 3)
    assert mask_box(l_mask((40, 40), (1, 2, 3, 4)).convert("RGB")) == Box(1, 2, 3, 3)
    assert mask_box(l_mask((40, 40), (1, 2, 3, 4)).convert("P")) == Box(1, 2, 3, 3)
    sixteen = Image.fromarray((np.asarray(l_mask((40, 40), (1, 2, 3, 4))).astype(np.int32) * 257), "I")
    assert mask_box(sixteen) == Box(1, 2, 3, 3)
    array = np.zeros((40, 40), dtype=bool)
    array[5:7, 8:9] = True
    assert mask_box(array) == Box(8, 5, 1, 2)
    assert mask_box(np.asarray(l_mask((40, 40), (1, 2, 3, 4)))) == Box(1, 2, 3, 3)
    with pytest.raises(RegionError, match="shape"):
        read_mask(np.zeros((2, 2, 2, 2)))


def test_a_mask_of_another_size_is_scaled_to_the_image_without_losing_a_stroke():
    mask = l_mask((100, 60), (25, 10, 34, 19))  # half the image's size
    assert mask_box(mask, (200, 120)) == Box(50, 20, 20, 20)
    dot = l_mask((1000, 600), (501, 301, 501, 301))  # a one-pixel stroke on a 5x bigger mask
    box = mask_box(dot, (200, 120))
    assert box.w >= 1 and box.h >= 1 and box.x <= 100.2 <= box.right and box.y <= 60.2 <= box.bottom
    crop = crop_region(photo(), dot, RegionOptions(outside="grey"))
    assert crop.target == box
    inside = np.asarray(crop.image) != GREY  # the stroke's pixel kept its colour when the rest went grey
    assert inside.any(axis=-1).sum() >= 1


def test_alpha_and_layers_masks():
    layer = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((10, 10, 19, 19), fill=(0, 0, 0, 255))  # black strokes count too
    assert mask_box(alpha_mask(layer)) == Box(10, 10, 10, 10)
    full = Image.new("RGBA", (50, 50), (0, 0, 0, 255))  # everything painted: still all masked
    assert alpha_mask(full).all()
    other = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    ImageDraw.Draw(other).rectangle((80, 80, 89, 89), fill=(255, 0, 0, 255))
    assert mask_box(layers_mask([layer, other])) == Box(10, 10, 35, 35)
    assert layers_mask([]) is None and layers_mask(None) is None


def test_inpaint_sketch_mask_is_what_differs_from_the_image_before_drawing():
    """A1111's Inpaint sketch: the mask is where the colour sketch differs from its original."""
    original = photo()
    drawn = original.copy()
    ImageDraw.Draw(drawn).line((30, 40, 60, 50), fill=(255, 0, 0), width=3)
    assert mask_box(sketch_mask(drawn, original)) == mask_box(
        np.any(np.asarray(drawn) != np.asarray(original), axis=-1))
    box = mask_box(sketch_mask(drawn, original))
    assert 28 <= box.x <= 30 and 58 <= box.right <= 63
    assert not sketch_mask(original, original).any()
    with pytest.raises(RegionError, match="differ in size"):
        sketch_mask(drawn, original.resize((100, 60)))


def test_editor_values_of_gradio_3_and_4():
    image = photo()
    gradio3 = {"image": image.convert("RGBA"), "mask": l_mask(image.size, (10, 10, 19, 29)).convert("RGB")}
    got_image, mask = editor_value(gradio3)
    assert got_image is gradio3["image"] and mask_box(mask) == Box(10, 10, 10, 20)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((40, 50, 49, 59), fill=(255, 0, 255, 255))
    gradio4 = {"background": image, "layers": [layer], "composite": image}
    got_image, mask = editor_value(gradio4)
    assert got_image is image and mask_box(mask) == Box(40, 50, 10, 10)
    assert editor_value({"background": None, "layers": None, "composite": image}) == (image, None)
    assert editor_value(image) == (image, None) and editor_value(None) == (None, None)


def test_composite_layer_scales_the_layer():
    background = photo(40, 40)
    layer = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    layer.putpixel((0, 0), (255, 0, 0, 255))
    out = composite_layer(background, layer)
    assert out.size == (40, 40) and out.getpixel((1, 1)) == (255, 0, 0, 255)


# ---- the crop ------------------------------------------------------------------------------------
def test_margin_is_a_fraction_of_the_box_with_a_pixel_minimum():
    options = RegionOptions(margin=0.1, min_margin=8, min_size=0)
    assert crop_box(Box(50, 20, 100, 60), (400, 300), options) == Box(40, 12, 120, 76)  # 10 px; 6 -> 8 px
    assert crop_box(Box(50, 20, 200, 200), (400, 300), options) == Box(30, 0, 240, 240)  # clamped at the top


def test_small_boxes_grow_to_the_minimum_size_around_their_centre():
    options = RegionOptions(margin=0.0, min_margin=0, min_size=64)
    assert crop_box(Box(100, 50, 10, 10), (400, 300), options) == Box(73, 23, 64, 64)
    # At a border the window shifts inside the image instead of shrinking.
    assert crop_box(Box(0, 0, 4, 4), (400, 300), options) == Box(0, 0, 64, 64)
    assert crop_box(Box(396, 296, 4, 4), (400, 300), options) == Box(336, 236, 64, 64)
    # An image smaller than the minimum: its whole side.
    assert crop_box(Box(5, 5, 4, 4), (40, 30), options) == Box(0, 0, 40, 30)


def test_crop_keeps_greys_or_blurs_the_outside():
    image = photo()
    mask = l_mask(image.size, (50, 20, 69, 39))
    keep = crop_region(image, mask, RegionOptions(min_size=0))
    assert keep.target == Box(50, 20, 20, 20) and keep.box == Box(42, 12, 36, 36)
    assert keep.image.mode == "RGB" and keep.image.size == (36, 36)
    assert np.array_equal(np.asarray(keep.image), np.asarray(image.crop(keep.box.ltrb)))
    grey = np.asarray(crop_region(image, mask, RegionOptions(outside="grey", min_size=0)).image)
    assert (grey[0, 0] == GREY).all() and (grey[-1, -1] == GREY).all()
    assert np.array_equal(grey[8:28, 8:28], np.asarray(image)[20:40, 50:70])  # the mask's pixels stay
    blur = np.asarray(crop_region(image, mask, RegionOptions(outside="blur", min_size=0)).image)
    assert np.array_equal(blur[8:28, 8:28], grey[8:28, 8:28])
    assert not np.array_equal(blur[:8], np.asarray(keep.image)[:8]) and not (blur[:8] == GREY).all()


def test_a_box_region_greys_outside_the_box():
    image = photo()
    crop = crop_region(image, Box(10, 10, 30, 20), RegionOptions(outside="grey", margin=0, min_margin=5, min_size=0))
    assert crop.box == Box(5, 5, 40, 30)
    pixels = np.asarray(crop.image)
    assert (pixels[:5] == GREY).all() and (pixels[5:25, 5:35] == np.asarray(image)[10:30, 10:40]).all()


def test_mask_touching_the_borders_and_a_tiny_mask():
    image = photo()
    whole = crop_region(image, l_mask(image.size, (0, 0, 199, 119)))
    assert whole.box == Box(0, 0, 200, 120) and whole.image.size == image.size
    corner = crop_region(image, l_mask(image.size, (190, 0, 199, 5)))
    assert corner.box.right == 200 and corner.box.y == 0 and corner.box.w == 64 and corner.box.h == 64
    tiny = crop_region(image, l_mask(image.size, (100, 60, 100, 60)))
    assert tiny.target == Box(100, 60, 1, 1) and tiny.image.size == (64, 64)


def test_rgba_images_become_rgb_and_invert_takes_the_unmasked_area():
    image = photo().convert("RGBA")
    mask = l_mask(image.size, (0, 0, 199, 59))  # the top half
    crop = crop_region(image, mask, NO_MIN, invert=True)
    assert crop.image.mode == "RGB" and crop.target == Box(0, 60, 200, 60)


def test_empty_masks_and_bad_boxes_are_clear_errors():
    image = photo()
    with pytest.raises(EmptyMaskError, match="The mask is empty"):
        crop_region(image, l_mask(image.size))
    with pytest.raises(EmptyMaskError):
        crop_region(image, Image.new("RGBA", image.size, (255, 255, 255, 0)))
    with pytest.raises(RegionError, match=r"does not fit in the 200x120 image"):
        crop_region(image, Box(190, 0, 20, 10))
    assert issubclass(RegionError, CaptionerError)  # a 400 in the API, a status line in the tab


@pytest.mark.parametrize("value", [{"x": 1, "y": 2, "w": 3, "h": 4}, [1, 2, 3, 4], (1, 2, 3.0, 4)])
def test_parse_box(value):
    assert parse_box(value) == Box(1, 2, 3, 4)


@pytest.mark.parametrize("value, words", [
    ({"x": 1, "y": 2, "w": 3}, "exactly the keys"),
    ({"x": 1, "y": 2, "w": 3, "h": 4, "z": 0}, "exactly the keys"),
    ([1, 2, 3], "in pixels"),
    ("1,2,3,4", "in pixels"),
    (None, "in pixels"),
    ([1, 2, 0, 4], "box.w must be at least 1"),
    ([-1, 2, 3, 4], "box.x must be at least 0"),
    ([1.5, 2, 3, 4], "box.x must be a whole number"),
    ([True, 2, 3, 4], "box.x must be a whole number"),
    ([float("nan"), 2, 3, 4], "whole number"),
    (["1", 2, 3, 4], "whole number"),
])
def test_parse_box_refuses_bad_values(value, words):
    with pytest.raises(RegionError, match=words):
        parse_box(value)


def test_region_options_from_user_input():
    defaults = RegionOptions(outside="blur", margin=0.2)
    assert RegionOptions.from_mapping(None, defaults) == defaults
    assert RegionOptions.from_mapping({"outside": "grey", "min_size": 128}, defaults) == RegionOptions(
        outside="grey", margin=0.2, min_size=128)
    for data, words in (({"outside": "black"}, "outside must be one of keep, grey, blur"),
                        ({"margin": -0.1}, "margin must be at least 0"), ({"margin": "10%"}, "margin must be a number"),
                        ({"min_size": 1.5}, "whole number"), ({"colour": 1}, "Unknown region option"),
                        ([1], "must be an object")):
        with pytest.raises(RegionError, match=words):
            RegionOptions.from_mapping(data, defaults)


# ---- encoded images (the API) ------------------------------------------------------------------
def png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def test_region_image_checks_now_and_crops_when_decoded():
    image = photo()
    encoded = EncodedImage(png(image), "image")
    region = RegionImage(encoded, Box(10, 10, 30, 20), RegionOptions(min_size=0))
    assert region.box == Box(2, 2, 46, 36) and region.size == image.size
    assert np.array_equal(np.asarray(region.decode()), np.asarray(image.crop(region.box.ltrb)))
    with pytest.raises(RegionError, match="image: 'box'"):
        RegionImage(encoded, Box(0, 0, 201, 10), RegionOptions())
    mask = encoded_mask(EncodedImage(png(l_mask(image.size, (50, 20, 69, 39))), "mask"))
    assert RegionImage(encoded, mask, RegionOptions(min_size=0)).box == Box(42, 12, 36, 36)


def test_encoded_masks_keep_their_alpha_and_empty_ones_are_refused():
    transparent = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    ImageDraw.Draw(transparent).rectangle((3, 4, 5, 6), fill=(0, 0, 0, 255))
    assert mask_box(encoded_mask(EncodedImage(png(transparent), "mask"))) == Box(3, 4, 3, 3)
    with pytest.raises(EmptyMaskError):
        encoded_mask(EncodedImage(png(Image.new("L", (30, 30))), "mask"))


def test_rotated_photos_use_their_upright_size():
    image = photo(200, 120)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: decoded as 120 x 200
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    encoded = EncodedImage(buffer.getvalue(), "image")
    assert encoded.size == (200, 120) and upright_size(encoded) == (120, 200)
    region = RegionImage(encoded, Box(0, 150, 120, 50), NO_MIN)
    assert region.decode().size == (120, 50)
