"""Object-store access shared by every layer: one boto3 client recipe (credentials from the default provider chain)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class S3Access:
    """How boto3 reaches S3 (credentials always from the default provider chain)."""

    endpoint: str | None = None
    region: str | None = None


def s3_client(s3: S3Access) -> Any:
    """A boto3 S3 client for ``s3`` (path-style addressing with a custom endpoint, standard retries)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3.endpoint, region_name=s3.region,
                        config=Config(s3={"addressing_style": "path"} if s3.endpoint else {},
                                      retries={"max_attempts": 5, "mode": "standard"}))
