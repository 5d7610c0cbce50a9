"""Unit tests for image_embeddings.ingest.images (real Pillow decoding of scikit-image sample photos)."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from image_embeddings.core.config import DEFAULT_EXTENSIONS, MODES
from image_embeddings.ingest.images import DownscaleResult, _draft_target, downscale, error_reason

REASONS = {"empty", "not_an_image", "too_many_pixels", "truncated", "decode_error"}
# Reference comparisons encode the output at quality 95 so that they measure resampling, not the JPEG
# encoder (at the default quality 90 the encoder alone costs ~34-38 dB on these detailed photos).
Q = 95


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@cache
def _photo(name: str) -> np.ndarray:
    """Return a read-only RGB uint8 sample photo from scikit-image (bundled, no network)."""
    arr = np.ascontiguousarray(getattr(data, name)())
    arr.setflags(write=False)
    return arr


def _encode(img: Image.Image | np.ndarray, fmt: str, **params: object) -> bytes:
    """Encode an image (or array) into bytes with Pillow."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _decode(content: bytes) -> Image.Image:
    """Decode bytes with Pillow and return the loaded image."""
    im = Image.open(io.BytesIO(content))
    im.load()
    return im


def _ok(result: DownscaleResult, size: int = 224) -> np.ndarray:
    """Assert a successful result and return its pixels as an RGB array."""
    assert result.error is None
    assert result.image is not None
    im = _decode(result.image)
    assert im.format == "JPEG"
    assert im.mode == "RGB"
    assert im.size == (size, size)
    return np.asarray(im)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays, in dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _reference_center_crop(img: Image.Image, resize_to: int = 256, crop: int = 224) -> np.ndarray:
    """Independent reference: full-res LANCZOS resize of the shorter side, then center crop."""
    w, h = img.size
    if w <= h:
        new_w, new_h = resize_to, int(resize_to * h / w)
    else:
        new_w, new_h = int(resize_to * w / h), resize_to
    resized = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    return np.asarray(resized.crop((left, top, left + crop, top + crop)).convert("RGB"))


def _reference_squash(img: Image.Image, size: int = 224) -> np.ndarray:
    """Independent reference: full-res LANCZOS resize of the whole image to size x size."""
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS).convert("RGB"))


def _reference(img: Image.Image, mode: str) -> np.ndarray:
    """Reference output for the given mode."""
    return _reference_center_crop(img) if mode == "center_crop" else _reference_squash(img)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    """Build a PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_claiming_size(width: int, height: int) -> bytes:
    """A structurally valid PNG whose IHDR claims width x height but whose IDAT holds one tiny row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00\x00\x00" * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _with_orientation(img: Image.Image, orientation: int, **params: object) -> bytes:
    """Encode img as JPEG with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "JPEG", exif=exif.tobytes(), **params)


# ---------------------------------------------------------------------------
# constants and arguments
# ---------------------------------------------------------------------------


def test_public_constants() -> None:
    assert MODES == ("center_crop", "squash")
    assert DEFAULT_EXTENSIONS == ("jpg", "jpeg", "png", "webp")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "crop"},
        {"mode": "CENTER_CROP"},
        {"size": 0},
        {"size": -5},
        {"quality": 0},
        {"quality": 96},
        {"crop_fraction": 0.0},
        {"crop_fraction": 1.5},
        {"max_pixels": 0},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        downscale(_encode(_photo("chelsea"), "JPEG"), **kwargs)  # type: ignore[arg-type]


def test_invalid_arguments_are_checked_before_content() -> None:
    with pytest.raises(ValueError, match="mode"):
        downscale(None, mode="nope")


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (None, None),
        ("too_large: 5 > 3", "too_large"),
        ("truncated: OSError: image file is truncated (19 bytes not processed)", "truncated"),
        ("too_many_pixels: 12000x9000 = 108000000 pixels > limit 100000000", "too_many_pixels"),
        ("empty", "empty"),
    ],
)
def test_error_reason(error: str | None, reason: str | None) -> None:
    assert error_reason(error) == reason


# ---------------------------------------------------------------------------
# good photos
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fmt", "params"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True})],
)
@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
def test_good_photo_matches_reference(name: str, fmt: str, params: dict[str, object], mode: str) -> None:
    photo = _photo(name)
    content = _encode(photo, fmt, **params)
    result = downscale(content, mode=mode, quality=Q)
    out = _ok(result)
    assert (result.width, result.height) == (photo.shape[1], photo.shape[0])
    reference = _reference(_decode(content).convert("RGB"), mode)
    assert _psnr(out, reference) >= 35.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "rocket"])
def test_lossless_input_matches_encoded_reference(name: str, mode: str) -> None:
    # Without draft (PNG), the single box-resize equals "full-res resize, then crop" up to float rounding
    # in the filter coefficients, so the output is (nearly) the JPEG encoding of the reference itself.
    content = _encode(_photo(name), "PNG")
    out = _ok(downscale(content, mode=mode)).astype(np.int16)
    reference = _reference(_decode(content), mode)
    encoded_reference = np.asarray(_decode(_encode(reference, "JPEG", quality=90))).astype(np.int16)
    diff = np.abs(out - encoded_reference)
    assert diff.max() <= 2
    assert np.mean(diff > 0) < 0.01


@pytest.mark.parametrize("mode", MODES)
def test_default_quality_is_within_jpeg_encoder_noise(mode: str) -> None:
    content = _encode(_photo("chelsea"), "JPEG", quality=95)
    out = _ok(downscale(content, mode=mode))
    reference = _reference(_decode(content).convert("RGB"), mode)
    encoder_floor = _psnr(np.asarray(_decode(_encode(reference, "JPEG", quality=90))), reference)
    assert _psnr(out, reference) >= min(35.0, encoder_floor - 0.5)


@pytest.mark.parametrize("mode", MODES)
def test_output_size_parameter(mode: str) -> None:
    out = _ok(downscale(_encode(_photo("rocket"), "PNG"), size=97, mode=mode), size=97)
    assert out.shape == (97, 97, 3)


def test_output_has_no_exif() -> None:
    result = downscale(_with_orientation(Image.fromarray(_photo("chelsea")), 6))
    _ok(result)
    assert result.image is not None
    out = _decode(result.image)
    assert "exif" not in out.info
    assert len(out.getexif()) == 0


def test_quality_parameter_changes_output_size() -> None:
    content = _encode(_photo("astronaut"), "PNG")
    low = downscale(content, quality=20).image
    high = downscale(content, quality=95).image
    assert low is not None and high is not None
    assert len(low) < len(high)


def test_center_crop_fraction_one_is_largest_centered_square() -> None:
    photo = _photo("coffee")  # 600x400
    result = downscale(_encode(photo, "PNG"), crop_fraction=1.0, quality=Q)
    out = _ok(result)
    img = Image.fromarray(photo)
    reference = np.asarray(img.crop((100, 0, 500, 400)).resize((224, 224), Image.Resampling.LANCZOS))
    assert _psnr(out, reference) >= 35.0


def test_center_crop_differs_from_squash() -> None:
    content = _encode(_photo("coffee"), "PNG")
    crop = _ok(downscale(content, mode="center_crop"))
    squash = _ok(downscale(content, mode="squash"))
    assert _psnr(crop, squash) < 25.0


# ---------------------------------------------------------------------------
# draft (DCT scaling) for large JPEGs
# ---------------------------------------------------------------------------


def test_draft_target_center_crop() -> None:
    # Shorter side must stay >= 256 (round(224 / 0.875)), longer side keeps the aspect ratio.
    assert _draft_target(4000, 3000, 224, "center_crop", 0.875) == (341, 256)
    assert _draft_target(3000, 4000, 224, "center_crop", 0.875) == (256, 341)
    assert _draft_target(4000, 3000, 224, "center_crop", 1.0) == (298, 224)


def test_draft_target_squash() -> None:
    assert _draft_target(4000, 3000, 224, "squash", 0.875) == (224, 224)
    assert _draft_target(10000, 10, 224, "squash", 0.875) == (224, 10)


def test_draft_target_never_exceeds_source() -> None:
    assert _draft_target(100, 50, 224, "center_crop", 0.875) == (100, 50)
    assert _draft_target(1, 1, 224, "squash", 0.875) == (1, 1)
    assert _draft_target(10000, 10, 224, "center_crop", 0.875) == (10000, 10)


@cache
def _large_photo() -> Image.Image:
    """The astronaut photo upscaled to 4000x3000 (a typical camera-sized JPEG)."""
    return Image.fromarray(_photo("astronaut")).resize((4000, 3000), Image.Resampling.BICUBIC)


@cache
def _large_jpeg() -> bytes:
    return _encode(_large_photo(), "JPEG", quality=92)


def test_draft_target_makes_pillow_use_one_eighth_dct_scaling() -> None:
    im = Image.open(io.BytesIO(_large_jpeg()))
    im.draft("RGB", _draft_target(4000, 3000, 224, "center_crop", 0.875))
    assert im.size == (500, 375)  # 1/8 scale, still >= (341, 256)
    im = Image.open(io.BytesIO(_large_jpeg()))
    im.draft("RGB", _draft_target(4000, 3000, 224, "squash", 0.875))
    assert im.size == (500, 375)


@pytest.mark.parametrize("mode", MODES)
def test_large_jpeg_is_correct(mode: str) -> None:
    result = downscale(_large_jpeg(), mode=mode, quality=Q)
    out = _ok(result)
    assert (result.width, result.height) == (4000, 3000)
    reference = _reference(_decode(_large_jpeg()).convert("RGB"), mode)
    assert _psnr(out, reference) >= 35.0


def test_large_jpeg_is_fast() -> None:
    content = _large_jpeg()
    drafted = full_decode_only = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        _ok(downscale(content))
        drafted = min(drafted, time.perf_counter() - start)
        start = time.perf_counter()
        _decode(content)
        full_decode_only = min(full_decode_only, time.perf_counter() - start)
    # 1/8 DCT scaling decodes 64x fewer pixels: much faster than merely decoding at full resolution.
    assert drafted < full_decode_only


@pytest.mark.parametrize("mode", MODES)
def test_large_exif_rotated_jpeg(mode: str) -> None:
    stored = _large_photo()
    content = _with_orientation(stored, 8, quality=92)
    result = downscale(content, mode=mode, quality=Q)
    out = _ok(result)
    assert (result.width, result.height) == (3000, 4000)
    displayed = _decode(content).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    assert _psnr(out, _reference(displayed, mode)) >= 35.0


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", [None, b""])
def test_empty(content: bytes | None) -> None:
    result = downscale(content)
    assert result == DownscaleResult(None, None, None, result.error)
    assert error_reason(result.error) == "empty"


def test_text_named_jpg_is_not_an_image() -> None:
    result = downscale(b"hello")
    assert result.image is None
    assert (result.width, result.height) == (None, None)
    assert error_reason(result.error) == "not_an_image"


@pytest.mark.parametrize("mode", MODES)
def test_truncated_jpeg(mode: str) -> None:
    content = _encode(_photo("astronaut"), "JPEG")
    result = downscale(content[: len(content) // 2], mode=mode)
    assert result.image is None
    assert error_reason(result.error) == "truncated"
    assert (result.width, result.height) == (512, 512)  # the header was readable


def test_truncated_large_jpeg_with_draft() -> None:
    content = _large_jpeg()
    result = downscale(content[: len(content) // 2])
    assert result.image is None
    assert error_reason(result.error) == "truncated"


def test_truncated_png() -> None:
    content = _encode(_photo("coffee"), "PNG")
    result = downscale(content[: len(content) // 2])
    assert result.image is None
    assert error_reason(result.error) == "truncated"


def test_truncated_webp() -> None:
    content = _encode(_photo("coffee"), "WEBP")
    result = downscale(content[: len(content) // 2])
    assert result.image is None
    assert error_reason(result.error) == "truncated"


def test_header_claiming_huge_size_is_rejected_fast() -> None:
    content = _png_claiming_size(100_000, 100_000)
    assert len(content) < 100
    start = time.perf_counter()
    result = downscale(content)
    elapsed = time.perf_counter() - start
    assert result.image is None
    assert error_reason(result.error) == "too_many_pixels"
    assert elapsed < 1.0


def test_header_over_limit_but_under_pillow_bomb_limit_is_rejected_before_decoding() -> None:
    # 108 MP: above our default 100 MP limit but below Pillow's own error threshold (~179 MP).
    # The IDAT is tiny, so decoding would fail as "truncated": "too_many_pixels" proves no decode happened.
    result = downscale(_png_claiming_size(12_000, 9_000))
    assert result.error == "too_many_pixels: 12000x9000 = 108000000 pixels > limit 100000000"
    assert result.image is None
    assert (result.width, result.height) == (12_000, 9_000)


def test_pillow_decompression_bomb_warning_is_suppressed_locally() -> None:
    # 90 MP is above Pillow's warning threshold (~89.5 MP); with warnings turned into errors, an unsuppressed
    # DecompressionBombWarning would abort Image.open and surface as a different error.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = downscale(_png_claiming_size(10_000, 9_000), max_pixels=89_000_000)
        assert result.error == "too_many_pixels: 10000x9000 = 90000000 pixels > limit 89000000"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # global Pillow setting untouched


def test_crafted_small_png_decodes_as_truncated() -> None:
    # Sanity check of the crafted file: within limits, Pillow reads its header and then runs out of data.
    result = downscale(_png_claiming_size(64, 64))
    assert error_reason(result.error) == "truncated"
    assert (result.width, result.height) == (64, 64)


def test_real_image_above_max_pixels() -> None:
    content = _encode(_photo("chelsea"), "JPEG")  # 451 x 300 = 135300 pixels
    result = downscale(content, max_pixels=135_299)
    assert result.error == "too_many_pixels: 451x300 = 135300 pixels > limit 135299"
    assert result.image is None
    assert _ok(downscale(content, max_pixels=135_300)).shape == (224, 224, 3)


def test_corrupted_inputs_never_raise() -> None:
    rng = np.random.default_rng(1234)
    jpeg = bytearray(_encode(_photo("chelsea"), "JPEG"))
    png = bytearray(_encode(_photo("chelsea")[:64, :64], "PNG"))
    outcomes: set[str | None] = set()
    for base in (jpeg, png):
        for _ in range(60):
            mutated = bytearray(base)
            positions = rng.integers(0, len(mutated), size=int(rng.integers(1, 20)))
            for pos in positions:
                mutated[pos] = int(rng.integers(0, 256))
            cut = int(rng.integers(1, len(mutated) + 1))
            result = downscale(bytes(mutated[:cut]))
            if result.error is None:
                _ok(result)
                outcomes.add("ok")
            else:
                assert result.image is None
                assert "\n" not in result.error
                assert len(result.error) <= 300
                outcomes.add(error_reason(result.error))
    for _ in range(20):
        result = downscale(rng.integers(0, 256, size=int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        assert error_reason(result.error) == "not_an_image"
    assert outcomes <= REASONS | {"ok"}


# ---------------------------------------------------------------------------
# colour modes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cmyk_jpeg_keeps_colours(mode: str) -> None:
    img = Image.fromarray(_photo("coffee"))
    content = _encode(img.convert("CMYK"), "JPEG", quality=95)
    assert _decode(content).mode == "CMYK"
    out = _ok(downscale(content, mode=mode, quality=Q)).astype(np.float64)
    reference = _reference(img, mode).astype(np.float64)
    assert float(np.mean(np.abs(out - reference))) < 3.5
    # No colour cast: per-channel means agree (a naive/inverted CMYK conversion is off by tens).
    assert np.all(np.abs(out.mean(axis=(0, 1)) - reference.mean(axis=(0, 1))) < 1.5)


@pytest.mark.parametrize("mode", MODES)
def test_grayscale_jpeg_becomes_gray_rgb(mode: str) -> None:
    camera = _photo("camera")
    content = _encode(camera, "JPEG")
    out = _ok(downscale(content, mode=mode, quality=Q))
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 1], out[..., 2])
    assert _psnr(out[..., 0], _reference(_decode(content), mode)[..., 0]) >= 35.0


def test_one_bit_png() -> None:
    bits = np.zeros((64, 64), dtype=bool)
    bits[:, 32:] = True
    content = _encode(Image.fromarray(bits), "PNG")
    assert _decode(content).mode == "1"
    out = _ok(downscale(content, mode="squash"))
    assert out[:, :90].max() <= 5
    assert out[:, 134:].min() >= 250


def test_sixteen_bit_png_is_scaled_not_saturated() -> None:
    content = _encode(Image.fromarray(np.full((48, 64), 30000, dtype=np.uint16)), "PNG")
    assert _decode(content).mode.startswith("I")
    out = _ok(downscale(content))
    assert round(30000 * 255 / 65535) == 117
    assert np.all(np.abs(out.astype(np.int16) - 117) <= 1)


def test_sixteen_bit_gradient_png_uses_the_full_range() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (256, 1))
    out = _ok(downscale(_encode(Image.fromarray(ramp), "PNG"), size=256, mode="squash"), size=256)
    row = out[128, :, 0].astype(np.int16)
    expected = np.linspace(0, 255, 256)
    assert np.max(np.abs(row[8:-8] - expected[8:-8])) <= 3
    assert row[:4].max() <= 3
    assert row[-4:].min() >= 252


def test_mode_i_tiff_is_clipped_then_scaled() -> None:
    arr = np.zeros((64, 96), dtype=np.int32)
    arr[:, :32] = -5000  # clipped to 0
    arr[:, 32:64] = 30000  # -> 117
    arr[:, 64:] = 200_000  # clipped to 65535 -> 255
    content = _encode(Image.fromarray(arr), "TIFF")
    assert _decode(content).mode == "I"
    out = _ok(downscale(content, size=96, mode="squash"), size=96)
    assert out[:, 4:24].max() <= 2
    assert np.all(np.abs(out[:, 38:58].astype(np.int16) - 117) <= 2)
    assert out[:, 70:92].min() >= 253


def test_mode_f_tiff_is_clipped() -> None:
    arr = np.zeros((64, 96), dtype=np.float32)
    arr[:, :32] = -40.0
    arr[:, 32:64] = 100.4
    arr[:, 64:] = 1e6
    content = _encode(Image.fromarray(arr), "TIFF")
    assert _decode(content).mode == "F"
    out = _ok(downscale(content, size=96, mode="squash"), size=96)
    assert out[:, 4:24].max() <= 2
    assert np.all(np.abs(out[:, 38:58].astype(np.int16) - 100) <= 2)
    assert out[:, 70:92].min() >= 253


@pytest.mark.parametrize("mode", MODES)
def test_palette_png_transparency_becomes_white(mode: str) -> None:
    indices = np.ones((64, 64), dtype=np.uint8)
    indices[:, :32] = 0  # transparent index, palette colour black
    img = Image.fromarray(indices, mode="P")
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    content = _encode(img, "PNG", transparency=0)
    decoded = _decode(content)
    assert decoded.mode == "P" and "transparency" in decoded.info
    out = _ok(downscale(content, mode=mode)).astype(np.int16)
    assert out[:, :96].min() >= 250  # white, not the black palette entry
    right = out[:, 128:]
    assert np.all(np.abs(right - np.array([0, 0, 255])) <= 6)


@pytest.mark.parametrize("mode", MODES)
def test_rgba_png_alpha_zero_becomes_white(mode: str) -> None:
    photo = _photo("astronaut")
    alpha = np.full(photo.shape[:2], 255, dtype=np.uint8)
    alpha[:256, :] = 0
    rgba = np.dstack([photo, alpha])
    content = _encode(Image.fromarray(rgba, mode="RGBA"), "PNG")
    out = _ok(downscale(content, mode=mode, quality=Q))
    assert out[:90].min() >= 250
    over_white = photo.copy()
    over_white[:256] = 255
    assert _psnr(out, _reference(Image.fromarray(over_white), mode)) >= 35.0


def test_la_png_alpha_zero_becomes_white() -> None:
    gray = np.zeros((64, 64), dtype=np.uint8)
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[:, :32] = 0
    content = _encode(Image.fromarray(np.dstack([gray, alpha]), mode="LA"), "PNG")
    out = _ok(downscale(content, mode="squash"))
    assert out[:, :90].min() >= 250
    assert out[:, 134:].max() <= 5


def test_animated_gif_uses_first_frame() -> None:
    first = Image.new("RGB", (40, 30), (255, 0, 0))
    second = Image.new("RGB", (40, 30), (0, 0, 255))
    content = _encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    result = downscale(content)
    out = _ok(result).astype(np.int16)
    assert (result.width, result.height) == (40, 30)
    assert np.all(np.abs(out - np.array([255, 0, 0])) <= 6)


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_exif_orientation_6_on_landscape(mode: str) -> None:
    stored = Image.fromarray(_photo("chelsea"))  # landscape 451x300
    content = _with_orientation(stored, 6, quality=95)
    result = downscale(content, mode=mode, quality=Q)
    out = _ok(result)
    assert _decode(content).size == (451, 300)
    assert (result.width, result.height) == (300, 451)
    decoded = _decode(content).convert("RGB")
    displayed = decoded.transpose(Image.Transpose.ROTATE_270)  # orientation 6: rotate 90 degrees clockwise
    assert _psnr(out, _reference(displayed, mode)) >= 35.0
    # Orientation-sensitive: the other rotation is far off.
    wrong = decoded.transpose(Image.Transpose.ROTATE_90)
    assert _psnr(out, _reference(wrong, mode)) < 20.0


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 7])
def test_other_exif_orientations(orientation: int) -> None:
    transposes = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        7: Image.Transpose.TRANSVERSE,
    }
    content = _with_orientation(Image.fromarray(_photo("rocket")), orientation, quality=95)
    result = downscale(content, mode="squash", quality=Q)
    out = _ok(result)
    expected_size = (427, 640) if orientation in (5, 7) else (640, 427)
    assert (result.width, result.height) == expected_size
    displayed = _decode(content).convert("RGB").transpose(transposes[orientation])
    assert _psnr(out, _reference_squash(displayed)) >= 35.0


@pytest.mark.parametrize("mode", MODES)
def test_progressive_jpeg(mode: str) -> None:
    content = _encode(_photo("rocket"), "JPEG", quality=95, progressive=True)
    assert _decode(content).info.get("progressive") == 1
    result = downscale(content, mode=mode, quality=Q)
    out = _ok(result)
    assert (result.width, result.height) == (640, 427)
    assert _psnr(out, _reference(_decode(content).convert("RGB"), mode)) >= 35.0


@pytest.mark.parametrize("mode", MODES)
def test_one_pixel_png(mode: str) -> None:
    content = _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    result = downscale(content, mode=mode)
    out = _ok(result).astype(np.int16)
    assert (result.width, result.height) == (1, 1)
    assert np.all(np.abs(out - np.array([10, 200, 30])) <= 4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transpose", [False, True])
def test_very_wide_and_tall_images(mode: str, transpose: bool) -> None:
    ramp = np.tile(np.linspace(0, 255, 10_000).round().astype(np.uint8), (10, 1))
    rgb = np.dstack([ramp, ramp, np.full_like(ramp, 128)])
    if transpose:
        rgb = np.ascontiguousarray(rgb.transpose(1, 0, 2))
    result = downscale(_encode(rgb, "PNG"), mode=mode)
    out = _ok(result).astype(np.int16)
    assert (result.width, result.height) == ((10, 10_000) if transpose else (10_000, 10))
    along = out[112, :, 0] if not transpose else out[:, 112, 0]
    if mode == "squash":
        # The whole ramp is squeezed into 224 pixels.
        assert along[:3].max() <= 6
        assert along[-3:].min() >= 249
        assert np.all(np.diff(along[4:-4]) >= -3)
    else:
        # Only ~9 source pixels around the middle of the ramp remain: a flat mid-gray.
        assert np.all(np.abs(along - 128) <= 3)


def test_formats_outside_the_allowed_raster_set_are_refused() -> None:
    # A valid PostScript header: Pillow would hand it to Ghostscript if it were allowed.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    result = downscale(eps)
    assert result.image is None
    assert error_reason(result.error) == "not_an_image"


# ---------------------------------------------------------------------------
# memory: the decoded-bytes budget, and no full-size copy after the decode
# ---------------------------------------------------------------------------


def test_decoded_bytes_over_the_budget_are_refused_before_decoding() -> None:
    # 5000 x 5000 RGBA: 100 MB decoded from a file of a few hundred KB (pixels alone do not bound memory).
    big = _png_claiming_size(5_000, 5_000)
    assert downscale(big, max_decoded_bytes=64 << 20).error == (
        "over_memory_budget: 5000x5000 RGB = 100000000 decoded bytes > preprocess.max_decoded_bytes 67108864")
    # Within the budget the same header is decoded (and found truncated): the budget, not the size, refused it.
    assert error_reason(downscale(big, max_decoded_bytes=100_000_000).error) == "truncated"
    # A JPEG is checked after its DCT-domain reduction: 1/64 of the bytes at 1/8 scale.
    large = Image.fromarray(_photo("coffee")).resize((3200, 2400))  # 30.7 MB decoded at full size
    assert _ok(downscale(_encode(large, "JPEG"), max_decoded_bytes=8 << 20)).shape == (224, 224, 3)
    assert error_reason(downscale(_encode(large, "PNG"), max_decoded_bytes=8 << 20).error) == "over_memory_budget"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "CMYK"])
@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_strip_resize_matches_converting_the_whole_image(mode: str, orientation: int) -> None:
    from image_embeddings.ingest.images import (
        _EXIF_TRANSPOSE,
        _resize_in_strips,
        _source_box,
        _stored_box,
        _to_l_or_rgb,
    )

    rgb = Image.fromarray(_photo("coffee")).resize((1800, 1200))
    im = rgb.convert("I;16") if mode == "I;16" else rgb.convert(mode)
    method = _EXIF_TRANSPOSE.get(orientation)
    upright = im if method is None else im.transpose(method)
    box = _source_box(*upright.size, upright.size, 224, "center_crop", 0.875)
    stored_box = _stored_box(box, im.size, method)
    # Strip by strip, rows first (Pillow's own order), gives the pixels of converting the whole image first.
    whole = np.asarray(_to_l_or_rgb(im).resize((224, 224), Image.Resampling.LANCZOS, box=stored_box))
    strips = np.asarray(_resize_in_strips(im, 224, stored_box, rows_first=True))
    assert int(np.abs(strips.astype(int) - whole.astype(int)).max()) <= 1
    # Columns first, and turning the small result upright instead of the whole image, only reorder the two
    # passes: the rounding between them differs, far below what the JPEG encoder changes.
    reference = np.asarray(_to_l_or_rgb(upright).resize((224, 224), Image.Resampling.LANCZOS, box=box))
    for rows_first in (True, False):
        small = _resize_in_strips(im, 224, stored_box, rows_first=rows_first)
        got = np.asarray(small if method is None else small.transpose(method))
        assert _psnr(got, reference) > 50.0


PEAK_SCRIPT = """
import io, resource, sys
from PIL import Image
from image_embeddings.ingest.images import downscale
content = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = downscale(content)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(result.error, (after - before) * 1024)
"""


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_large_rgba_image_peaks_near_its_decoded_size(fmt: str, tmp_path: Path) -> None:
    """A 25 MP RGBA image, 100 MB decoded: once 477 MB at peak as PNG, 671 MB as WebP (converted and transposed
    copies); now 129 and 385 MB."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (50, 50, 4), dtype=np.uint8)
    image = Image.fromarray(small, "RGBA").resize((5000, 5000), Image.Resampling.NEAREST)
    path = tmp_path / f"big.{fmt.lower()}"
    image.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    error, peak = done.stdout.split()
    assert error == "None"
    decoded = 5000 * 5000 * 4
    # PNG holds the image; libwebp's canvas and frame besides it: the budget counts 3 copies for WebP.
    copies = 3 if fmt == "WEBP" else 1
    assert int(peak) < 1.25 * copies * decoded + (32 << 20), f"peak {int(peak) >> 20} MiB above the imports"
