"""One answer to "what kind of location is this?" for config checks, Spark, boto3 and the command line."""

from __future__ import annotations

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


def location_problem(location: str) -> str | None:
    """Why ``location`` cannot be a table or input location, or None when it can."""
    if not location.strip():
        return "must not be empty"
    found = scheme(location)
    if found is None:
        return None
    rest = location[len(found) + 1:]
    if found in S3_SCHEMES and "@" in rest.lstrip("/").split("/")[0]:
        return "credentials must not be embedded in the URI"
    if found == "s3n":
        return "s3n:// is not supported (Hadoop 3 removed it): use s3a:// or s3://"
    if found not in SPARK_SCHEMES:
        return f"unsupported scheme {found!r} (use one of {', '.join(SPARK_SCHEMES)})"
    return None


def qualify(location: str) -> str:
    """A location as Spark reports it: local paths become absolute ``file:/...``; others lose a trailing slash."""
    if not is_local(location):
        return location.rstrip("/")
    return "file:" + str(local_path(location).resolve())
