"""A folder of real photos mixed with awkward and hostile files, each with its expected outcome."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from image_embeddings.testing.sample import encode, photo


@dataclass(frozen=True)
class Case:
    """One file: where it goes, its bytes, the expected error reason (None: decodes) and image_id."""

    relpath: str
    content: bytes
    reason: str | None
    image_id: str
    size: tuple[int, int] | None = None  # expected (width, height) after EXIF orientation


def _save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def cases(big_bytes: int) -> list[Case]:
    """Every awkward input with its exact expected outcome; ``big_bytes`` sizes the too-large file."""
    astronaut, coffee, rocket, chelsea = (photo(n) for n in ("astronaut", "coffee", "rocket", "chelsea"))
    camera = photo("camera")
    good_jpeg = encode(astronaut)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    gray16 = (np.linspace(0, 60000, 200 * 120).reshape(120, 200)).astype(np.uint16)
    palette = Image.fromarray(chelsea).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, size=(1200, 1600, 3), dtype=np.uint8)
    big = encode(noise, quality=100)
    assert len(big) > big_bytes, "the too-large case must exceed the byte limit"
    return [
        Case("astronaut.jpg", good_jpeg, None, "astronaut", (512, 512)),
        Case("nested/deeper/coffee.JPG", encode(coffee), None, "coffee", (600, 400)),
        Case("rocket.jpeg", encode(rocket, fmt="JPEG"), None, "rocket", (640, 427)),
        Case("chelsea.png", encode(chelsea, fmt="PNG"), None, "chelsea", (451, 300)),
        Case("camera.webp", encode(camera, fmt="WEBP"), None, "camera", (512, 512)),
        Case("broken/truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "truncated", "truncated"),
        Case("broken/zero.jpg", b"", "empty", "zero"),
        Case("broken/text.jpg", b"this is not an image\n", "not_an_image", "text"),
        Case("modes/cmyk.jpg", _save(Image.fromarray(coffee).convert("CMYK"), "JPEG"), None, "cmyk",
             (600, 400)),
        Case("modes/gray.jpg", _save(Image.fromarray(camera).convert("L"), "JPEG"), None, "gray", (512, 512)),
        Case("modes/gray16.png", _save(Image.fromarray(gray16), "PNG"), None, "gray16", (200, 120)),
        Case("modes/palette_alpha.png", _save(palette, "PNG"), None, "palette_alpha", (451, 300)),
        Case("modes/rotated.jpg", _save(Image.fromarray(rocket), "JPEG", exif=exif), None, "rotated",
             (427, 640)),
        Case("modes/progressive.jpg", _save(Image.fromarray(coffee), "JPEG", progressive=True), None,
             "progressive", (600, 400)),
        Case("shapes/one_pixel.png", _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), None,
             "one_pixel", (1, 1)),
        Case("shapes/very_wide.jpg", encode(astronaut, size=(10000, 10)), None, "very_wide", (10000, 10)),
        Case("hostile/bomb.png", png_claiming(100_000, 100_000), "too_many_pixels", "bomb"),
        Case("hostile/huge.jpg", big, "too_large", "huge"),
    ]


def write_cases(folder: Path, all_cases: list[Case]) -> None:
    """Write each case's bytes under ``folder``, plus one file that is not an image by extension."""
    for case in all_cases:
        target = folder / case.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(case.content)
    (folder / "notes.txt").write_text("not listed: the extension filter drops it\n")
