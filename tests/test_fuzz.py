"""Property-based fuzzing of decode-and-downscale over mutated real JPEG and PNG bytes."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from image_embeddings.ingest.images import downscale, error_reason
from image_embeddings.testing.sample import encode, photo

REASONS = {"empty", "not_an_image", "too_many_pixels", "truncated", "decode_error"}
MAX_PIXELS = 2_000_000
SEEDS = {
    "jpeg": encode(photo("astronaut"), size=(160, 120), quality=85),
    "progressive": encode(photo("coffee"), size=(120, 80), quality=80, progressive=True),
    "png": encode(photo("rocket"), fmt="PNG", size=(96, 64)),
    "webp": encode(photo("chelsea"), fmt="WEBP", size=(96, 64)),
}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "header"]))
        if not data:
            break
        where = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[where] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[where: where + draw(st.integers(1, 64))]
        else:  # the first bytes hold the size fields of every format: hit them harder
            data[draw(st.integers(0, min(40, len(data) - 1)))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_no_input_raises_hangs_or_decodes_past_the_pixel_limit(content: bytes) -> None:
    result = downscale(content, max_pixels=MAX_PIXELS)
    if result.error is None:
        assert result.image is not None
        with Image.open(io.BytesIO(result.image)) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (224, 224))
        assert result.width is not None and result.height is not None
        assert result.width * result.height <= MAX_PIXELS, "memory is bounded by the pixel limit"
    else:
        assert result.image is None
        assert error_reason(result.error) in REASONS, result.error
        assert "\n" not in result.error and len(result.error) < 400
