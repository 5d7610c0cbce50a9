"""The index folder's manifest: what the index is made of, swapped by compare-and-swap, with checksums."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from image_embeddings.search.store import (
    REBUILD,
    ManifestChangedError,
    Store,
    UnsafeIndexNameError,
    VectorIndexError,
    checked_name,
)

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which of its builds loads is no news


FORMAT = 2  # 2: the manifest records checksums and retired files; format 1 (no checksums) still loads


READABLE_FORMATS = (1, 2)


MANIFEST = "manifest.json"


GRACE_SECONDS = 3600.0  # a retired file outlives its manifest this long: a reader that read that manifest loads


@dataclass
class Manifest:
    """What an index folder holds; written last by every build or update.

    ``checksums`` maps every file it names to the sha256 of its bytes, checked on load. A format-1 manifest
    (written by the release before checksums) has none: it still loads, its files unverified (logged), until a
    rebuild replaces them. ``retired`` maps files that an earlier manifest named to when they stopped being named.
    """

    model_key: str
    table: str
    version: int
    type: str
    nlist: int
    dim: int
    trained: str
    base_rows: int
    rows: int
    changed_since_base: int = 0
    segments: list[dict[str, Any]] = field(default_factory=list)
    built_at: float = 0.0
    updated_at: float = 0.0
    checksums: dict[str, str] = field(default_factory=dict)
    retired: dict[str, float] = field(default_factory=dict)
    format: int = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        return Manifest(**json.loads(data))


@dataclass(frozen=True)
class ManifestRead:
    """A manifest as a writer read it: the token its compare-and-swap checks (S3 ETag or local sha256; None when
    there was no manifest) and what it named and retired then (the writer may change ``manifest`` in place)."""

    manifest: Manifest | None
    token: str | None
    files: tuple[str, ...] = ()
    retired: tuple[tuple[str, float], ...] = ()


def _files(manifest: Manifest) -> list[str]:
    names = [manifest.trained]
    for segment in manifest.segments:
        names += [f"{segment['name']}.faiss", f"{segment['name']}.ids.parquet"]
    return names


def _well_formed(manifest: Manifest) -> bool:
    return (isinstance(manifest.segments, list) and all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                        for s in manifest.segments)
            and isinstance(manifest.checksums, dict) and all(isinstance(v, str) for v in manifest.checksums.values())
            and isinstance(manifest.retired, dict)
            and all(isinstance(t, (int, float)) for t in manifest.retired.values()))


def parse_manifest(data: bytes, folder: str) -> Manifest:
    """A manifest's bytes as a :class:`Manifest`; refuses an unreadable one, another format, and (before any name
    is used as a path) every name that is not a plain file in ``folder`` (:class:`UnsafeIndexNameError`)."""
    try:
        manifest = Manifest.from_json(data)
    except (ValueError, TypeError) as exc:
        raise VectorIndexError(f"the index manifest {folder}/{MANIFEST} is unreadable: {exc}; {REBUILD}") from exc
    if not _well_formed(manifest):
        raise VectorIndexError(f"the index manifest {folder}/{MANIFEST} is unreadable: malformed segments, "
                               f"checksums or retired files; {REBUILD}")
    if manifest.format not in READABLE_FORMATS:
        raise VectorIndexError(f"the index at {folder} has format {manifest.format}, this release reads "
                               f"{', '.join(map(str, READABLE_FORMATS))}: {REBUILD}")
    names = [manifest.trained, *(s["name"] for s in manifest.segments), *manifest.checksums, *manifest.retired]
    for name in names:
        checked_name(name, folder)
    for name in [*_files(manifest), *manifest.checksums, *manifest.retired]:
        if checked_name(name, folder) == MANIFEST:  # retiring it would delete the index's own manifest
            raise UnsafeIndexNameError(f"the index at {folder} names its own {MANIFEST} as a data file: {REBUILD}")
    return manifest


def read_state(store: Store, lenient: bool = False) -> ManifestRead:
    """The manifest and the token a later :func:`write_manifest` checks. ``lenient`` (a full build, which replaces
    whatever is there): a manifest that cannot be used reads as none, so nothing it names is touched."""
    data, token = store.read_versioned(MANIFEST)
    if data is None:
        return ManifestRead(None, None)
    try:
        manifest = parse_manifest(data, store.location)
    except VectorIndexError as exc:
        if not lenient:
            raise
        log.warning("replacing the index at %s, whose manifest cannot be used: %s", store.location, exc)
        return ManifestRead(None, token)
    return ManifestRead(manifest, token, tuple(_files(manifest)), tuple(manifest.retired.items()))


def read_manifest(store: Store) -> Manifest | None:
    """The index's manifest, or None when there is no index yet."""
    return read_state(store).manifest


def write_manifest(store: Store, manifest: Manifest, read: ManifestRead, new_files: Sequence[str] = (),
                   grace_s: float | None = None) -> list[str]:
    """Replace the manifest with ``manifest`` if it is still the one ``read`` saw; returns the files deleted.

    Files ``read`` named that ``manifest`` does not are retired now, and retired files older than ``grace_s``
    (default :data:`GRACE_SECONDS`) are deleted once the new manifest is in place: a reader or writer that read
    an older manifest keeps its files that long. When another writer replaced the manifest meanwhile:
    :class:`ManifestChangedError`, its manifest stays, and this writer's ``new_files`` (named by no manifest) go.
    """
    grace = GRACE_SECONDS if grace_s is None else grace_s
    now = time.time()
    keep = set(_files(manifest))
    retired = {n: t for n, t in read.retired if n not in keep}
    retired.update({n: now for n in read.files if n not in keep and n not in retired})
    due = sorted(n for n, t in retired.items() if now - t >= grace)
    manifest.retired = {n: t for n, t in retired.items() if n not in due}
    manifest.checksums = {n: s for n, s in manifest.checksums.items() if n in keep}
    manifest.format = FORMAT
    data = manifest.to_json()
    parse_manifest(data, store.location)  # never write a manifest that readers would refuse
    # A put whose reply was lost and retried meets its own ETag: the manifest then holds this writer's bytes.
    if not store.replace_if(MANIFEST, data, read.token) and (current := store.read(MANIFEST)) != data:
        _discard(store, new_files, current)
        raise ManifestChangedError(f"another writer replaced the index manifest at {store.location}/{MANIFEST} "
                                   "while this one ran (its index stays): run again")
    store.delete(due)
    return due


def _discard(store: Store, names: Sequence[str], current: bytes | None) -> None:
    """Remove a losing writer's new files, except any that the current manifest names."""
    named: set[str] = set()
    if current is not None:
        try:
            named = set(_files(parse_manifest(current, store.location)))
        except VectorIndexError:
            return  # the current manifest cannot be read: leave everything as it is
    try:
        store.delete([n for n in names if n not in named])
    except Exception as exc:  # garbage left behind must not hide the conflict
        log.warning("could not remove the unused files %s from %s: %s", list(names), store.location, exc)
