"""The index folder's storage: local or S3 files, their names checked, and the errors of a damaged folder."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from image_embeddings.core.config import AppConfig
from image_embeddings.core.storage import S3Access, s3_client
from image_embeddings.core.uri import is_local, local_path, split_s3

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which of its builds loads is no news


MAX_NAME_CHARS = 200


REBUILD = "rebuild it with `image-embeddings index --full`"


class VectorIndexError(RuntimeError):
    """The index cannot be built, updated or read; the message says why."""


class IndexDamagedError(VectorIndexError):
    """A file the manifest names is missing, unreadable or does not match its recorded checksum."""


class UnsafeIndexNameError(IndexDamagedError):
    """The manifest names something other than a plain file inside the index folder."""


class ManifestChangedError(VectorIndexError):
    """Another writer replaced the manifest after this writer read it."""


_PLAIN = re.compile(r"[A-Za-z0-9._-]+")


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a plain file name inside an index folder, or None when it is."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if len(name) > MAX_NAME_CHARS:
        return f"longer than {MAX_NAME_CHARS} characters"
    if "/" in name or "\\" in name:
        return "a path, not a file name"
    if ".." in name:
        return "contains '..'"
    if name.startswith("."):
        return "a hidden name (the folder's own temporary and lock files start with '.')"
    if not _PLAIN.fullmatch(name):
        return "has characters other than A-Z a-z 0-9 . _ -"
    return None


def checked_name(name: object, folder: str) -> str:
    """``name`` when it is a plain file name, else :class:`UnsafeIndexNameError` naming it and ``folder``."""
    why = name_problem(name)
    if why is not None:
        raise UnsafeIndexNameError(f"the index at {folder} names {name!r}, which is not a plain file name inside "
                                   f"the folder ({why}): nothing is read or deleted by it; {REBUILD}")
    assert isinstance(name, str)
    return name


def sha256_hex(data: bytes) -> str:
    """The checksum the manifest records for a file."""
    return hashlib.sha256(data).hexdigest()


class Store:
    """Files of one index folder on a local file system or S3 (boto3, credentials from the provider chain).

    Every name is checked to be a plain file name (:func:`checked_name`): nothing outside the folder is touched.
    """

    def __init__(self, location: str, endpoint: str | None = None, region: str | None = None) -> None:
        self.location = location.rstrip("/")
        self._client: Any = None
        self._access = S3Access(endpoint, region)

    def _s3(self) -> Any:
        if self._client is None:
            self._client = s3_client(self._access)
        return self._client

    def _key(self, name: str) -> tuple[str, str]:
        return split_s3(f"{self.location}/{checked_name(name, self.location) if name else ''}")

    def _local(self, name: str) -> Any:
        return local_path(self.location) / checked_name(name, self.location)

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        return self.read_versioned(name)[0]

    def read_versioned(self, name: str) -> tuple[bytes | None, str | None]:
        """The file's bytes and a token of this version of it (S3: its ETag; locally: its sha256), or (None, None)
        when it does not exist."""
        if is_local(self.location):
            path = self._local(name)
            try:  # O_NOFOLLOW: a link in the folder must not lead a reader outside it
                with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                return None, None
            except OSError as exc:  # a link, a folder, no permission
                raise IndexDamagedError(f"the index file {self.location}/{name} cannot be read ({exc}): "
                                        f"{REBUILD}") from None
            return data, sha256_hex(data)
        bucket, key = self._key(name)
        try:
            found = self._s3().get_object(Bucket=bucket, Key=key)
        except self._s3().exceptions.NoSuchKey:
            return None, None
        body: bytes = found["Body"].read()
        return body, str(found["ETag"])

    def write(self, name: str, data: bytes) -> None:
        """Write a whole file at once (a reader sees the old file or the new one)."""
        if is_local(self.location):
            target = self._local(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.parent / f".{name}.{secrets.token_hex(4)}.part"  # two writers never share one
            partial.write_bytes(data)
            partial.replace(target)
            return
        bucket, key = self._key(name)
        self._s3().put_object(Bucket=bucket, Key=key, Body=data)

    def replace_if(self, name: str, data: bytes, expected: str | None) -> bool:
        """Write ``name`` only if its current version still has the token ``expected`` (None: only if it does
        not exist); False, writing nothing, when it changed."""
        if not is_local(self.location):
            return self._put_if(name, data, expected)
        target = self._local(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.parent / f".{name}.{secrets.token_hex(4)}.part"
        partial.write_bytes(data)
        try:
            with open(target.parent / f".{name}.lock", "a") as lock:
                # Writers of this folder take turns between the check and the replace; readers take no lock
                # (os.replace shows them the old file or the new one), and a dead writer's lock goes with it.
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self.read_versioned(name)[1] != expected:
                    return False
                os.replace(partial, target)
                return True
        finally:
            partial.unlink(missing_ok=True)

    def _put_if(self, name: str, data: bytes, expected: str | None) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = self._key(name)
        condition = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
        try:
            self._s3().put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the ETag no longer matches (or the key now exists); 409: a concurrent conditional put won
            if error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise
        return True

    def delete(self, names: Sequence[str]) -> None:
        """Remove files that are no longer referenced; missing ones are fine."""
        for name in names:
            if is_local(self.location):
                self._local(name).unlink(missing_ok=True)
            else:
                bucket, key = self._key(name)
                self._s3().delete_object(Bucket=bucket, Key=key)

    def names(self) -> list[str]:
        """The files in the folder, not counting the hidden temporary and lock files of local writers."""
        if is_local(self.location):
            folder = local_path(self.location)
            return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
                if folder.is_dir() else []
        bucket, prefix = self._key("")
        pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))


def store_for(config: AppConfig, key: str) -> Store:
    """The folder of model ``key``'s index under the configured location."""
    folder = hashlib.sha256(key.encode()).hexdigest()[:16]
    where = config.index.location_for(config.output.embeddings)
    return Store(f"{where.rstrip('/')}/{key.split('-')[0]}-{folder}", config.s3.endpoint, config.s3.region)
