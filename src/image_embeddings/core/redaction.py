"""What counts as a secret, by key and by value, and how it is kept out of every text the package writes.

Config keys that name secrets are refused (:func:`is_secret_key`); reports, log lines, failure lines, the runs
table, ``status`` and ``check-config`` pass through :func:`redact` or :func:`scrub`, which also catch credentials
that hide inside values: user info in a URI, AWS access key ids and secret-looking strings.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# Key names of secrets: S3A's access and secret keys, session tokens, the S3 encryption key, Azure account keys and
# SAS tokens, GCS service-account private keys and key files, passwords of any kind.
_SECRET_KEY = re.compile(
    r"(?i)(secret|password|passwd|token|access[._-]?key|credential|encryption[._-]?key|account[._-]?key"
    r"|private[._-]?key|key[._-]?file|keyfile|\.sas\.|sas[._-]?token|signature)")
# The class that supplies credentials is not one (fs.s3a.aws.credentials.provider).
_NOT_SECRET_SUFFIXES = (".provider", "provider.type", ".algorithm")

# scheme://user:secret@ (the secret may hold '/'), or scheme://user@.
_USER_INFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^/@\s:'\"]+:(?!\d+(?:[/?#\s'\"]|$))[^@\s'\"]*|[^/@\s:'\"]+)@")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b")
# 40 characters of base64 with both letter cases and a digit or '/' or '+': the shape of an AWS secret key. Hex
# digests (lower case only) and run ids do not have it.
_SECRET_LIKE = re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])"
                          r"(?=[A-Za-z0-9/+]*[0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
# key=value and "key": "value" pairs whose key names a secret.
_SECRET_PAIR = re.compile(r"(?i)([\w.\-]*(?:secret|password|passwd|token|access[._-]?key|credential|encryption"
                          r"[._-]?key|account[._-]?key|private[._-]?key)[\w.\-]*['\"]?\s*[=:]\s*['\"]?)([^\s,'\"}]+)")


def is_secret_key(key: str) -> bool:
    """True for a config or report key that names a credential."""
    return bool(_SECRET_KEY.search(key)) and not key.lower().endswith(_NOT_SECRET_SUFFIXES)


def scrub(text: str) -> str:
    """``text`` with credentials masked: URI user info, AWS key ids, secret-shaped strings, secret ``key=value``."""
    if not text:
        return text
    text = _USER_INFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    text = _AWS_KEY_ID.sub(MASK, text)
    text = _SECRET_LIKE.sub(MASK, text)
    return _SECRET_PAIR.sub(lambda m: m.group(1) + MASK if m.group(2) != MASK else m.group(0), text)


def redact(data: Any) -> Any:
    """``data`` (JSON-like) with the values of secret keys replaced by ``***`` and every string scrubbed."""
    if isinstance(data, dict):
        return {k: (MASK if isinstance(k, str) and is_secret_key(k) and v is not None else redact(v))
                for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    if isinstance(data, str):
        return scrub(data)
    return data


class ScrubbingFormatter(logging.Formatter):
    """A formatter whose whole output (message, arguments and stack trace) is passed through :func:`scrub`."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
