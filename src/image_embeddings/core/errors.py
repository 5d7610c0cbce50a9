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
    "over_memory_budget": "the decoded image would take more bytes than preprocess.max_decoded_bytes (not decoded)",
    "crashed": "decoding the file killed its process (out of memory, a codec crash) in a retried task",
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


_JVM_PREFIX = re.compile(r"^(?:[a-z_][\w$]*\.)+(?=[A-Z])")  # org.apache.spark.SparkException -> SparkException
_CONNECT = re.compile(r"(?i)connect(?:ion)? to \[?([\w.\-]+(?::\d+)?)|https?://([\w.\-]+:\d+)")


def _entry(name: str, message: str) -> str:
    """``Name: first line of the message`` (just the name for an empty message)."""
    lines = message.strip().splitlines()
    return f"{name}: {lines[0] if lines else ''}".rstrip(": ")


def _chain(exc: BaseException) -> list[str]:
    """Messages from the outermost exception to the root cause, Java causes included (first lines only)."""
    messages: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        java = getattr(current, "java_exception", None)
        if java is not None:
            messages += _java_chain(java)
        elif server := _server_chain(current):
            messages += server
            break  # what it was raised from is the gRPC call that carried it
        else:
            messages.append(_entry(type(current).__name__, str(current)))
        current = current.__cause__ or current.__context__
    return messages


def _java_chain(throwable: Any) -> list[str]:
    messages = []
    try:
        for _ in range(50):
            messages.append(_entry(str(throwable.getClass().getSimpleName()), str(throwable.getMessage() or "")))
            cause = throwable.getCause()
            if cause is None or cause.equals(throwable):
                break
            throwable = cause
    except Exception:  # the JVM is gone: what was read so far
        pass
    return messages


_CAUSED_BY = re.compile(r"^Caused by: ([\w.$]+): ?(.*)$")


def _server_chain(exc: BaseException) -> list[str]:
    """A Spark Connect error's chain, read from the server's stack trace it carries (no JVM object to ask): the
    error, then each ``Caused by:`` of the trace. [] for other exceptions and traces the server did not send."""
    trace = getattr(exc, "getStackTrace", None)
    try:
        text = trace() if callable(trace) else None
    except Exception:
        text = None
    if not isinstance(text, str) or not text.strip():
        return []
    lines = text.splitlines()
    name = lines[0].strip().rsplit(".", 1)[-1]
    message = str(exc).split("\n\nJVM stacktrace:", 1)[0]
    messages = [_entry(name or type(exc).__name__, message)]
    for line in lines[1:]:
        match = _CAUSED_BY.match(line)
        if match:
            messages.append(_entry(match.group(1).rsplit(".", 1)[-1], match.group(2)))
    return messages


def failure_line(exc: BaseException) -> str:
    """The cause of a failure in one line for an operator: the root exception's first line without the JVM's
    class-name wrapping, or, when the object store (or any endpoint) refused connections, that in words."""
    from image_embeddings.core.redaction import scrub

    return scrub(_failure_line(exc))


def _failure_line(exc: BaseException) -> str:
    if type(exc).__module__.startswith("image_embeddings."):  # the package's own errors say what to do already
        return " ".join(str(exc).split())[:MAX_CHARS * 2]
    chain = [_JVM_PREFIX.sub("", m) for m in _chain(exc)]
    everything = " ".join(chain)
    if re.search(r"(?i)connection refused|ConnectException", everything):
        where = next((m.group(1) or m.group(2) for m in _CONNECT.finditer(everything)), None)
        store = "the object store" if re.search(r"(?i)s3|amazonaws|bucket", everything) else "the service"
        return f"cannot reach {store}{f' at {where}' if where else ''}: connection refused"
    root = chain[-1] if chain else type(exc).__name__
    if root.split(":")[0] in {"Py4JJavaError", "SparkException"} and len(chain) > 1:
        root = chain[-2]
    return " ".join(root.split())[:MAX_CHARS * 2]
