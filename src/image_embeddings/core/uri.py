"""One answer to "what kind of location is this?" for config checks, Spark, boto3 and the command line."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

# Schemes Spark reaches through Hadoop file systems on the platforms this package targets. s3n is not among them:
# Hadoop 3 removed its NativeS3FileSystem (use s3a://, or s3:// which is mapped to S3A).
SPARK_SCHEMES = ("file", "s3", "s3a", "dbfs", "hdfs", "abfss", "gs", "wasbs")
S3_SCHEMES = ("s3", "s3a")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_S3 = re.compile(r"^s3a?://([^/]+)/(.+)$", re.IGNORECASE)


def scheme(location: str) -> str | None:
    """The location's URI scheme in lower case (``s3a://b/k`` -> ``s3a``, ``file:/x`` -> ``file``), or None for a
    plain path."""
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


def is_s3(location: str) -> bool:
    """True for ``s3://`` and ``s3a://`` locations."""
    return scheme(location) in S3_SCHEMES


def is_local(location: str) -> bool:
    """True for plain paths and ``file:`` URIs."""
    return scheme(location) in (None, "file")


def local_path(location: str) -> Path:
    """The file-system path of a local location: ``file:///a``, ``file:/a`` and ``/a`` all give ``/a``."""
    if not is_local(location):
        raise ValueError(f"not a local path: {location}")
    path = location[len("file:"):] if scheme(location) == "file" else location
    return Path(re.sub(r"^/+", "/", path)).expanduser()


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` (or ``s3a://``) -> (bucket, key)."""
    match = _S3.match(uri)
    if not match:
        raise ValueError(f"not an s3://bucket/key URI: {uri}")
    return match.group(1), match.group(2)


_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", re.DOTALL)
# user:secret@ where the secret holds a '/' (an AWS secret key may): not a port, and an '@' further on.
_CONTAINER_SCHEMES = ("abfs", "abfss", "wasb", "wasbs")
_SLASHED_USER_INFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]+:(?!\d+(?:[/?#]|$))[^@]*@")


def has_user_info(location: str) -> bool:
    """True when a URI carries user information (``scheme://user:secret@host/...``), where credentials hide."""
    text = location.strip()
    match = _AUTHORITY.match(text)
    if not match:
        return False
    if match.group(1).lower() in _CONTAINER_SCHEMES:  # container@account is the host there, not user info
        return ":" in match.group(2).partition("@")[0] or bool(_SLASHED_USER_INFO.match(text))
    return "@" in match.group(2) or bool(_SLASHED_USER_INFO.match(text))


def normalize(location: str) -> str:
    """One spelling per location, as Hadoop's ``Path`` makes it: repeated slashes, ``.`` and ``..`` segments and a
    trailing slash removed (``s3a://b//raw/./day/`` -> ``s3a://b/raw/day``); plain paths stay relative."""
    text = location.strip()
    match = _AUTHORITY.match(text)
    if match:
        name, authority, path = match.groups()
        clean = _normpath(path) if path.strip("/") else ""
        return f"{name}://{authority}{'' if clean in ('.', '/') else clean}"
    found = scheme(text)
    if found is not None:  # file:/a//b, without an authority
        return f"{found}:{_normpath(text[len(found) + 1:])}"
    return _normpath(text) if text else text


def _normpath(path: str) -> str:
    """``posixpath.normpath`` without its one exception: a leading ``//`` becomes ``/`` too."""
    clean = posixpath.normpath(path)
    return "/" + clean.lstrip("/") if clean.startswith("/") else clean


def location_problem(location: str) -> str | None:
    """Why ``location`` cannot be a table or input location, or None when it can."""
    if not location.strip():
        return "must not be empty"
    if has_user_info(location):
        return ("credentials must not be embedded in the URI (user info before '@'): remove them; S3 credentials "
                "come from the AWS default provider chain (environment, profile, instance role)")
    found = scheme(location)
    if found is None:
        return None
    if found == "s3n":
        return "s3n:// is not supported (Hadoop 3 removed it): use s3a:// or s3://"
    if found not in SPARK_SCHEMES:
        return f"unsupported scheme {found!r} (use one of {', '.join(SPARK_SCHEMES)})"
    return None


def qualify(location: str) -> str:
    """A location as Spark reports it: local paths become absolute ``file:/...``; others lose a trailing slash."""
    if not is_local(location):
        return normalize(location)
    return "file:" + str(local_path(location).resolve())
