"""Error texts stored in the tables: one line, ``<reason>: <detail>``, the reason from :data:`REASONS`.

Reports count errors by reason; the reason is what an operator filters on, the detail what they read.
"""

from __future__ import annotations

import re
from typing import Any

REASONS: dict[str, str] = {
    "empty": "the file has no bytes",
    "not_an_image": "Pillow does not recognize the format",
    "too_large": "the file is larger than input.max_file_bytes (not read)",
    "too_many_pixels": "the image has more pixels than preprocess.max_pixels (not decoded)",
    "truncated": "the file ends before the image does",
    "decode_error": "the image cannot be decoded",
    "unreadable": "the file vanished or changed while the run read it",
    "no_image_id": "the file name does not match input.image_id_pattern",
    "wrong_size": "the stored thumbnail does not have the model's input size",
}
MAX_CHARS = 300
_FORM = re.compile(r"^([a-z_]+): ")


def error(reason: str, detail: str) -> str:
    """``reason: detail`` on one line, at most :data:`MAX_CHARS` characters."""
    if reason not in REASONS:
        raise ValueError(f"unknown error reason {reason!r}")
    message = f"{reason}: {' '.join(detail.split())}"
    return message if len(message) <= MAX_CHARS else message[: MAX_CHARS - 3] + "..."


EMPTY = error("empty", "no bytes")
UNREADABLE = error("unreadable", REASONS["unreadable"])
NO_IMAGE_ID = error("no_image_id", REASONS["no_image_id"])


def error_reason(text: str | None) -> str | None:
    """The reason of an error text (``'too_large: ...'`` -> ``'too_large'``); None for no error."""
    if text is None:
        return None
    return text.partition(":")[0].strip()


def as_error(exc: BaseException, default: str = "decode_error") -> str:
    """An exception as an error text: its message when that already has a known reason, else ``default``."""
    message = str(exc)
    match = _FORM.match(message)
    if match and match.group(1) in REASONS:
        return error(match.group(1), message[match.end():])
    return error(default, f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def reason_column(column: Any) -> Any:
    """The same as :func:`error_reason`, as a Spark column expression."""
    from pyspark.sql import functions as F

    return F.trim(F.substring_index(column, ":", 1))
