"""A generated folder of every odd image case a batch run meets in real training sets.

``make_corpus`` returns what each file should become: a caption, or a failure whose reason holds
a given phrase. Files that are not images are listed separately: they must be ignored, not reported.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw


@dataclass
class Corpus:
    root: Path
    captioned: list[Path] = field(default_factory=list)        # images that must get a caption
    failing: dict[Path, str] = field(default_factory=dict)     # image -> phrase expected in its reason
    ignored: list[Path] = field(default_factory=list)          # not images: never captioned or reported
    unreadable: Path | None = None                             # chmod 000 (needs a process without root's DAC override)


def _scene(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(6):
        x, y = (seed * 37 + i * 53) % size[0], (seed * 91 + i * 29) % size[1]
        colour = ((seed * 40 + i * 70) % 256, i * 40, 200 - i * 30)
        draw.ellipse((x, y, x + size[0] // 3, y + size[1] // 3), fill=colour)
    return image.convert(mode) if mode != "RGB" else image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand, for pixel formats Pillow cannot save (48-bit RGB) or a lying header."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw_rows))
            + _png_chunk(b"IEND", b""))


def rgb16_png(width: int, height: int) -> bytes:
    rows = b"".join(b"\x00" + b"".join(struct.pack(">HHH", x * 1000, y * 2000, 40000) for x in range(width))
                    for y in range(height))
    return png_bytes(width, height, 16, 2, rows)


def bomb_png() -> bytes:
    """Claims 30000 x 30000 pixels (10x Pillow's limit) in a few bytes: refused before decoding."""
    return png_bytes(30000, 30000, 8, 0, b"\x00" * 16)


def make_corpus(root: Path, with_avif: bool = True) -> Corpus:
    corpus = Corpus(root)
    root.mkdir(parents=True, exist_ok=True)

    def ok(relative: str, image: Image.Image | bytes, **save) -> Path:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, bytes):
            path.write_bytes(image)
        else:
            image.save(path, **save)
        corpus.captioned.append(path)
        return path

    def bad(relative: str, data: bytes, reason: str) -> Path:
        path = root / relative
        path.write_bytes(data)
        corpus.failing[path] = reason
        return path

    for i in range(4):
        ok(f"photo_{i}.jpg", _scene((96 + 16 * i, 72), i), quality=90)
    ok("plain.png", _scene((64, 48), 5))
    ok("bitmap.bmp", _scene((50, 40), 6))
    ok("scan.tiff", _scene((60, 45), 7))
    ok("webp_photo.webp", _scene((70, 50), 8))
    ok("cmyk.jpg", _scene((80, 60), 9, "CMYK"), quality=90)
    ok("gray16.png", Image.linear_gradient("L").resize((64, 64)).convert("I").point(lambda v: v * 256).convert("I;16"))
    ok("rgb16.png", rgb16_png(40, 30))
    palette = _scene((48, 48), 10).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    ok("palette_transparent.png", palette, transparency=0)
    rgba = _scene((64, 48), 11).convert("RGBA")
    alpha = Image.linear_gradient("L").resize((64, 48))
    alpha.paste(0, (0, 0, 10, 10))  # a fully transparent corner
    rgba.putalpha(alpha)
    ok("alpha.png", rgba)
    ok("alpha_lossless.webp", rgba, lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    ok("exif_rotated.jpg", _scene((120, 60), 12), exif=exif, quality=90)
    frames = [_scene((50, 50), 13 + k) for k in range(3)]
    ok("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    ok("huge.jpg", Image.linear_gradient("L").resize((6000, 4000)).convert("RGB"), quality=70)
    ok("unicode café 日本語 🐱.png", _scene((64, 64), 14))
    ok("sub/nested.jpg", _scene((64, 64), 15), quality=90)
    ok("sub/deeper/Ünïcode nested.png", _scene((48, 64), 16))
    ok("dotted.name.v2.jpg", _scene((64, 48), 17), quality=90)
    if with_avif and ".avif" in Image.registered_extensions():
        try:
            buffer = io.BytesIO()
            _scene((64, 48), 18).save(buffer, format="AVIF")
            ok("modern.avif", buffer.getvalue())
        except (KeyError, OSError, ValueError):
            pass

    # Two images, one caption name: the first (sorted) is captioned, the second reported.
    ok("same_name.jpg", _scene((64, 48), 20), quality=90)
    same = root / "same_name.png"
    _scene((64, 48), 21).save(same)
    corpus.failing[same] = "is also the caption file of"

    good = io.BytesIO()
    _scene((200, 150), 19).save(good, format="JPEG", quality=90)
    bad("truncated.jpg", good.getvalue()[: len(good.getvalue()) // 3], "truncated")
    bad("zero_bytes.jpg", b"", "empty file")
    bad("text_renamed.jpg", b"these are my notes, not a photo\n", "not an image")
    bad("bomb.png", bomb_png(), "decompression bomb")

    unreadable = root / "unreadable.jpg"
    unreadable.write_bytes(good.getvalue())
    unreadable.chmod(0)
    corpus.unreadable = unreadable

    for name in ("notes.md", "metadata.json", ".hidden.jpg", ".cache/inside.png", "sub/readme.txt"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(good.getvalue() if name.endswith((".jpg", ".png")) else b"not an image")
        corpus.ignored.append(path)
    return corpus
