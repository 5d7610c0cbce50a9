"""Decode raw image bytes and downscale them to a small square RGB JPEG (pure Python, no Spark)."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin

from image_embeddings.core.config import MODES
from image_embeddings.core.errors import EMPTY, error, error_reason

# Raster formats Pillow decodes by itself; others (EPS through Ghostscript, for one) are refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_WHITE = (255, 255, 255)
DEFAULT_MAX_DECODED_BYTES = 512 << 20
# Source bytes (at 4 a pixel) converted at a time: small next to the decoded image, large enough that the
# per-strip overhead stays negligible.
_STRIP_BYTES = 4 << 20
# The largest intermediate image (size x rows read) left to Pillow's own two-pass resize.
_PASS_BYTES = 32 << 20
# Full-size copies a decoder holds at once: Pillow's WebP plugin keeps libwebp's canvas and the frame's bytes
# besides the image (a 25 MP RGBA WebP peaked at 382 MB, a PNG of it at 128 MB).
_DECODER_COPIES = {"WEBP": 3}

# Same table as PIL.ImageOps.exif_transpose; orientations 5-8 swap width and height.
_EXIF_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_TRUNCATION_MARKERS = ("truncated", "broken data stream", "premature end", "unexpected end")


@dataclass(frozen=True)
class DownscaleResult:
    """Outcome of `downscale`: JPEG bytes plus original (oriented) size, or an error string."""

    image: bytes | None
    width: int | None
    height: int | None
    error: str | None


class _ImageError(Exception):
    """Internal failure with an already-classified reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail




def downscale(
    content: bytes | None,
    size: int = 224,
    mode: str = "center_crop",
    quality: int = 90,
    max_pixels: int = 100_000_000,
    crop_fraction: float = 0.875,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> DownscaleResult:
    """Decode image bytes and return a size x size RGB JPEG, or an error; never raises."""
    _check_arguments(size, mode, quality, max_pixels, crop_fraction, max_decoded_bytes)
    if content is None or len(content) == 0:
        return DownscaleResult(None, None, None, EMPTY)
    seen = _Seen()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(content), formats=ALLOWED_FORMATS)
            except Image.UnidentifiedImageError:
                raise _ImageError(
                    "not_an_image", f"cannot identify image format ({len(content)} bytes)"
                ) from None
            with im:
                small = _decode_small(im, size, mode, crop_fraction, (max_pixels, max_decoded_bytes), seen)
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=quality)
        return DownscaleResult(out.getvalue(), seen.width, seen.height, None)
    except _ImageError as exc:
        return DownscaleResult(None, seen.width, seen.height, error(exc.reason, exc.detail))
    except Exception as exc:  # the contract is "never raises" for any input bytes (MemoryError included)
        reason = _classify(exc, content)
        return DownscaleResult(None, seen.width, seen.height, error(reason, _describe(exc)))


@dataclass
class _Seen:
    """The displayed size, once the header is read: error results report it too."""

    width: int | None = None
    height: int | None = None


def _decode_small(im: Image.Image, size: int, mode: str, crop_fraction: float, limits: tuple[int, int],
                  seen: _Seen) -> Image.Image:
    """Check the header against ``limits`` (pixels, decoded bytes), decode and return the size x size RGB image."""
    max_pixels, max_decoded_bytes = limits
    src_w, src_h = im.size
    # PNG may store eXIf after the pixel data: read EXIF now only if that decodes nothing.
    exif_after_load = im.format == "PNG" and "exif" not in im.info
    orientation = 1 if exif_after_load else _orientation(im)
    seen.width, seen.height = _oriented_size(src_w, src_h, orientation)
    _check_pixels(src_w, src_h, max_pixels)
    if isinstance(im, JpegImagePlugin.JpegImageFile):
        need_w, need_h = _draft_target(seen.width, seen.height, size, mode, crop_fraction)
        if orientation in _SWAPPING_ORIENTATIONS:
            need_w, need_h = need_h, need_w
        im.draft("RGB", (need_w, need_h))
    # After draft: a JPEG decoded at 1/8 scale allocates 1/64 of the bytes.
    _check_decoded_bytes(im, max_decoded_bytes)
    im.load()
    if exif_after_load:
        orientation = _orientation(im)
        seen.width, seen.height = _oriented_size(src_w, src_h, orientation)
    method = _EXIF_TRANSPOSE.get(orientation)
    current = _oriented_size(*im.size, orientation)
    box = _source_box(seen.width, seen.height, current, size, mode, crop_fraction)
    # Resize the stored pixels and turn the small result upright: transposing first copies the full image.
    small = _resize(im, size, _stored_box(box, im.size, method))
    if method is not None:
        small = small.transpose(method)
    return small if small.mode == "RGB" else small.convert("RGB")


def _check_arguments(size: int, mode: str, quality: int, max_pixels: int, crop_fraction: float,
                     max_decoded_bytes: int) -> None:
    """Raise ValueError for invalid (programming/config) arguments."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 95:
        raise ValueError(f"quality must be an integer in 1..95, got {quality!r}")
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if not isinstance(max_decoded_bytes, int) or isinstance(max_decoded_bytes, bool) or max_decoded_bytes < 1:
        raise ValueError(f"max_decoded_bytes must be a positive integer, got {max_decoded_bytes!r}")
    if not (isinstance(crop_fraction, (int, float)) and 0.0 < crop_fraction <= 1.0):
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """Bytes Pillow allocates for a decoded width x height image of ``mode``.

    One byte a pixel for 1, L and P (Pillow stores a bit in a byte), two for the 16-bit modes, four for every
    other mode: I and F hold 32-bit samples, and Pillow pads 2- and 3-band 8-bit modes (LA, RGB) to 4 bytes.
    """
    if mode in ("1", "L", "P"):
        per_pixel = 1
    elif mode.startswith("I;16"):
        per_pixel = 2
    else:
        per_pixel = 4
    return width * height * per_pixel


def _check_decoded_bytes(im: Image.Image, max_decoded_bytes: int) -> None:
    """Refuse, before decoding, an image whose decoding would hold more bytes than the memory budget."""
    (width, height), copies = im.size, _DECODER_COPIES.get(im.format or "", 1)
    need = decoded_bytes(im.mode, width, height) * copies
    if need > max_decoded_bytes:
        held = f" ({im.format} decoding holds {copies} copies)" if copies > 1 else ""
        raise _ImageError("over_memory_budget", f"{width}x{height} {im.mode} = {need} decoded bytes{held} > "
                                                f"preprocess.max_decoded_bytes {max_decoded_bytes}")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Reject images whose header size is degenerate or exceeds the pixel budget."""
    if width < 1 or height < 1:
        raise _ImageError("decode_error", f"invalid dimensions {width}x{height}")
    pixels = width * height
    if pixels > max_pixels:
        raise _ImageError("too_many_pixels", f"{width}x{height} = {pixels} pixels > limit {max_pixels}")


def _orientation(im: Image.Image) -> int:
    """Return the EXIF orientation (1..8), treating missing or unreadable EXIF as 1."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _EXIF_TRANSPOSE else 1


def _oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """Return (width, height) as displayed after applying the EXIF orientation."""
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _stored_box(
    box: tuple[float, float, float, float], stored: tuple[int, int], method: Image.Transpose | None
) -> tuple[float, float, float, float]:
    """The region of the stored pixels that ``method`` turns into ``box`` of the upright image."""
    x0, y0, x1, y1 = box
    sw, sh = stored
    mapped = {
        None: (x0, y0, x1, y1),
        Image.Transpose.FLIP_LEFT_RIGHT: (sw - x1, y0, sw - x0, y1),
        Image.Transpose.FLIP_TOP_BOTTOM: (x0, sh - y1, x1, sh - y0),
        Image.Transpose.ROTATE_180: (sw - x1, sh - y1, sw - x0, sh - y0),
        Image.Transpose.TRANSPOSE: (y0, x0, y1, x1),
        Image.Transpose.TRANSVERSE: (sw - y1, sh - x1, sw - y0, sh - x0),
        Image.Transpose.ROTATE_90: (sw - y1, x0, sw - y0, x1),
        Image.Transpose.ROTATE_270: (y0, sh - x1, y1, sh - x0),
    }[method]
    # Clamped: a subtraction a rounding error past the edge would make Pillow refuse the box.
    return (max(0.0, mapped[0]), max(0.0, mapped[1]), min(float(sw), mapped[2]), min(float(sh), mapped[3]))


def _support_range(start: float, stop: float, length: int, size: int) -> tuple[int, int]:
    """Source pixels (first, last + 1) a Lanczos resize of [start, stop) to ``size`` reads along one axis."""
    support = 3.0 * max((stop - start) / size, 1.0)  # Lanczos reads 3 (scaled) source pixels either side
    return max(0, math.floor(start - support) - 1), min(length, math.ceil(stop + support) + 1)


def _resize(im: Image.Image, size: int, box: tuple[float, float, float, float]) -> Image.Image:
    """Lanczos-resize ``box`` of the decoded ``im`` to size x size L or RGB, without full-size copies."""
    x0, y0, x1, y1 = box
    first, last = _support_range(y0, y1, im.height, size)
    rows = last - first
    first, last = _support_range(x0, x1, im.width, size)
    columns = last - first
    # The first pass makes a size x rows (or columns x size) image of 4-byte pixels: Pillow picks the order
    # itself, which may be gigabytes for a very tall image squashed; the strips take the smaller one.
    if not _converts(im) and 4 * size * max(rows, columns) <= _PASS_BYTES:
        return im.resize((size, size), Image.Resampling.LANCZOS, box=box)
    return _resize_in_strips(im, size, box, rows_first=rows <= columns)


def _converts(im: Image.Image) -> bool:
    """Whether :func:`_to_l_or_rgb` changes the pixels of ``im`` (any mode but L and RGB, or transparency)."""
    return im.mode not in ("L", "RGB") or "transparency" in im.info


def _resize_in_strips(
    im: Image.Image, size: int, box: tuple[float, float, float, float], rows_first: bool
) -> Image.Image:
    """Pillow's two Lanczos passes, the first one run on strips converted to L or RGB one at a time.

    A conversion works pixel by pixel and a pass row by row (or column by column), so this gives the pixels of
    converting the whole image, then resizing it, with a converted copy of one strip at a time instead.
    """
    lanczos = Image.Resampling.LANCZOS
    x0, y0, x1, y1 = box
    width, height = im.size
    first, last = _support_range(y0, y1, height, size) if rows_first else _support_range(x0, x1, width, size)
    step = max(1, _STRIP_BYTES // (4 * (width if rows_first else height)))
    mid: Image.Image | None = None
    for a in range(first, last, step):
        b = min(a + step, last)
        if rows_first:
            strip = _to_l_or_rgb(im.crop((0, a, width, b)))
            part = strip.resize((size, b - a), lanczos, box=(x0, 0.0, x1, float(b - a)))
        else:
            strip = _to_l_or_rgb(im.crop((a, 0, b, height)))
            part = strip.resize((b - a, size), lanczos, box=(0.0, y0, float(b - a), y1))
        if mid is None:
            mid = Image.new(part.mode, (size, last - first) if rows_first else (last - first, size))
        mid.paste(part, (0, a - first) if rows_first else (a - first, 0))
    if mid is None:  # pragma: no cover - a box inside the image always reads some pixels
        raise _ImageError("decode_error", f"empty source box {box}")
    if rows_first:
        return mid.resize((size, size), lanczos, box=(0.0, y0 - first, float(size), y1 - first))
    return mid.resize((size, size), lanczos, box=(x0 - first, 0.0, x1 - first, float(size)))


def _resized_dims(width: int, height: int, size: int, crop_fraction: float) -> tuple[int, int]:
    """Size after torchvision-style Resize(round(size / crop_fraction)) of the shorter side."""
    short_target = max(size, round(size / crop_fraction))
    if width <= height:
        return short_target, max(1, int(short_target * height / width))
    return max(1, int(short_target * width / height)), short_target


def _draft_target(width: int, height: int, size: int, mode: str, crop_fraction: float) -> tuple[int, int]:
    """Smallest (oriented) full-image size that still covers the output with source pixels."""
    if mode == "squash":
        need_w, need_h = size, size
    else:
        need_w, need_h = _resized_dims(width, height, size, crop_fraction)
    return max(1, min(width, need_w)), max(1, min(height, need_h))


def _source_box(
    width: int,
    height: int,
    current: tuple[int, int],
    size: int,
    mode: str,
    crop_fraction: float,
) -> tuple[float, float, float, float]:
    """Return the region of the (possibly drafted) oriented image that maps onto the output square."""
    cur_w, cur_h = current
    if mode == "squash":
        return (0.0, 0.0, float(cur_w), float(cur_h))
    resized_w, resized_h = _resized_dims(width, height, size, crop_fraction)
    left = int(round((resized_w - size) / 2.0))
    top = int(round((resized_h - size) / 2.0))
    scale_x = cur_w / resized_w
    scale_y = cur_h / resized_h
    return (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)


def _to_l_or_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit L or RGB, compositing transparency over white."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(im)
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8))
    has_alpha = "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")
    return im.convert("RGB")


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale (I;16* or I) linearly to 8 bits instead of saturating."""
    raw = np.asarray(im)
    values = np.clip(raw, 0, 65535).astype(np.uint32) if im.mode == "I" else raw.astype(np.uint32)
    # round(v * 255 / 65535) with integer arithmetic (round half up).
    scaled = ((values * 510 + 65535) // 131070).astype(np.uint8)
    transparency = im.info.get("transparency")
    if isinstance(transparency, int):
        scaled[raw == transparency] = 255
    return Image.fromarray(scaled)


def _classify(exc: BaseException, content: bytes) -> str:
    """Map a decoding exception to an error reason."""
    if isinstance(exc, Image.DecompressionBombError):
        return "too_many_pixels"
    if isinstance(exc, EOFError):
        return "truncated"
    message = str(exc).lower()
    if any(marker in message for marker in _TRUNCATION_MARKERS) or _riff_is_truncated(content):
        return "truncated"
    return "decode_error"


def _riff_is_truncated(content: bytes) -> bool:
    """Return True for a RIFF/WEBP file shorter than its header declares (libwebp gives no reason)."""
    if len(content) < 12 or content[:4] != b"RIFF" or content[8:12] != b"WEBP":
        return False
    return int.from_bytes(content[4:8], "little") + 8 > len(content)


def _describe(exc: BaseException) -> str:
    """Return a short description of an exception, prefixed with its type."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__




__all__ = ["DEFAULT_MAX_DECODED_BYTES", "DownscaleResult", "downscale", "error_reason"]
