"""A nearest-neighbour index (faiss) of one model's rows of the embeddings table, stored beside the table.

An index location (``index.location``, default ``<embeddings_table>_index``; local or ``s3a://``) holds one folder
per model key::

    manifest.json                   the table version covered, the index type, the segments in order, the sha256
                                    of every file it names and the files it retired (and when)
    base-v12-1a2b3c4d.faiss         the base segment: every vector of version 12, filled per Spark partition
    base-v12-1a2b3c4d.ids.parquet   its vector ids with image_id and sha256
    base-v12-1a2b3c4d.trained.faiss the trained, empty index that every later segment starts from
    delta-v12-v15-5e6f7a8b.faiss    an update: the current vectors of the image_ids that changed in versions 13-15
    delta-v12-v15-5e6f7a8b.ids.parquet  their ids (kind ``add``) and every changed image_id's id (kind ``remove``)

A full build trains the coarse quantizer on a sample and fills the base per partition (merged on the driver).
An update reads the table's change data feed since the covered version and writes one small segment: its cost
follows the night's changed rows, not the table. Loading applies the segments in order (removals, then
additions). Once the rows changed since the base pass ``index.rebuild_fraction`` of it (its clusters drift), or
when the change feed cannot be read, an update builds a new base instead.

The folder is shared by builds, updates and readers. Every writer writes new files under names no other writer
uses (a random suffix), then replaces the manifest only if it is still the one it read (a compare-and-swap: a
conditional put on S3, a check under a lock file locally); otherwise it fails and leaves the other writer's
manifest whole. A file the manifest stops naming is retired, and deleted by a later write only once
:data:`GRACE_SECONDS` have passed, so a reader that read the previous manifest can still load it. Names in a
manifest must be plain file names in the folder, and every file is checked against its recorded sha256 when
loaded: a damaged index is an error, never a wrong answer.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.config import AppConfig, IndexConfig
from image_embeddings.lease import leased
from image_embeddings.uri import is_local, local_path, split_s3
from image_embeddings.weights import S3Access, s3_client

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

    from image_embeddings.tables import Table

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which of its builds loads is no news

FORMAT = 2  # 2: the manifest records checksums and retired files; format 1 (no checksums) still loads
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
GRACE_SECONDS = 3600.0  # a retired file outlives its manifest this long: a reader that read that manifest loads
MAX_NAME_CHARS = 200
CHUNK_BYTES = 32 * 1024 * 1024  # serialized partial indexes travel to the driver in rows of this size
# Delta operations that change no rows: an index covering the version before them is still fresh.
NO_DATA_CHANGE = ("OPTIMIZE", "VACUUM START", "VACUUM END", "SET TBLPROPERTIES", "UNSET TBLPROPERTIES")
REBUILD = "rebuild it with `image-embeddings index --full`"


class VectorIndexError(RuntimeError):
    """The index cannot be built, updated or read; the message says why."""


class IndexDamagedError(VectorIndexError):
    """A file the manifest names is missing, unreadable or does not match its recorded checksum."""


class UnsafeIndexNameError(IndexDamagedError):
    """The manifest names something other than a plain file inside the index folder."""


class ManifestChangedError(VectorIndexError):
    """Another writer replaced the manifest after this writer read it."""


# ---------------------------------------------------------------------------------------------------------
# names and storage

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


# ---------------------------------------------------------------------------------------------------------
# vectors and index types


def vector_ids(image_ids: Sequence[str]) -> np.ndarray:
    """Stable 63-bit ids of image_ids (faiss wants int64): the first 8 bytes of BLAKE2b, shifted right by one."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") >> 1 for i in image_ids),
        dtype=np.int64, count=len(image_ids))


def unit_rows(vectors: Any) -> np.ndarray:
    """Rows scaled to length 1 (float32, C order): inner product is then cosine."""
    matrix = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    return np.ascontiguousarray(matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12))


def choose_type(rows: int, settings: IndexConfig) -> str:
    """``index.type``, or by size when ``auto``: exact below ``exact_below`` rows, IVF-SQ8 up to ``pq_above``,
    IVF-PQ beyond (32 bytes of codes per 256 dimensions)."""
    if settings.type != "auto":
        return settings.type
    if rows < settings.exact_below:
        return "flat"
    return "ivf_sq8" if rows <= settings.pq_above else "ivf_pq"


def list_count(kind: str, rows: int) -> int:
    """Inverted lists for ``rows`` vectors: one for the exact index, else a power of two near sqrt(rows)."""
    if kind == "flat":
        return 1
    return int(min(65536, max(16, 2 ** round(np.log2(max(rows, 1) ** 0.5)))))


def faiss_module() -> Any:
    """faiss, or an error naming the install that brings it."""
    try:
        import faiss
    except ImportError as exc:
        raise VectorIndexError("the index needs faiss: pip install 'spark-image-embeddings[embed]' (faiss-cpu) "
                               f"where stage 2 runs ({exc})") from None
    return faiss


def new_index(kind: str, dim: int, nlist: int) -> Any:
    """An untrained inner-product index; ``flat`` is an IVF of one list (exact, with the same add and remove)."""
    faiss = faiss_module()

    quantizer = faiss.IndexFlatIP(dim)
    if kind in ("flat", "ivf_flat"):
        return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf_sq8":
        return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                             faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf_pq":
        sub = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m and dim % m == 0 and m <= 512)
        return faiss.IndexIVFPQ(quantizer, dim, nlist, sub, 8, faiss.METRIC_INNER_PRODUCT)
    raise VectorIndexError(f"unknown index type {kind!r}")


def _serialize(index: Any) -> bytes:
    return bytes(faiss_module().serialize_index(index))


def _deserialize(data: bytes) -> Any:
    return faiss_module().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _parquet(table: Any) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _ids_table(ids: np.ndarray, image_ids: Sequence[str], sha256: Sequence[str | None], kind: str) -> Any:
    import pyarrow as pa

    return pa.table({"id": pa.array(ids, pa.int64()), "image_id": pa.array(list(image_ids), pa.string()),
                     "sha256": pa.array(list(sha256), pa.string()), "kind": pa.array([kind] * len(ids), pa.string())})


# ---------------------------------------------------------------------------------------------------------
# Spark side: the rows of one model, their vectors on the driver, partial indexes per partition


def model_table(spark: SparkSession, config: AppConfig, version: int | None = None, check: bool = True
                ) -> tuple[DataFrame, str]:
    """This config's embedded rows (``embedding`` not null) at ``version``, and the model key; refuses a table
    without this model's rows when ``check``."""
    from pyspark.sql import functions as F

    from image_embeddings.similar import config_key, model_rows

    rows = model_rows(spark, config, version=version, check=check)
    return rows.where(F.col("embedding").isNotNull()), config_key(config)


def vector_batches(rows: DataFrame, batch_rows: int = 4096) -> Iterator[tuple[list[str], list[str | None],
                                                                               np.ndarray]]:
    """(image_ids, sha256s, unit vectors) in batches, streamed to the driver one partition at a time.

    The vectors cross as float32 bytes (not as lists of Python floats), and never all at once: the driver's
    result size limit does not bound the table.
    """
    import pandas as pd

    def pack(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for b in batches:
            if len(b):
                vecs = unit_rows(np.stack(b["embedding"].to_numpy()))
                yield pd.DataFrame({"image_id": b["image_id"], "sha256": b["sha256"],
                                    "vec": [v.tobytes() for v in vecs]})

    packed = rows.select("image_id", "sha256", "embedding").mapInPandas(
        pack, "image_id string, sha256 string, vec binary")  # type: ignore[arg-type]
    ids: list[str] = []
    shas: list[str | None] = []
    vecs: list[bytes] = []
    for row in packed.toLocalIterator(prefetchPartitions=True):
        ids.append(row[0])
        shas.append(row[1])
        vecs.append(row[2])
        if len(ids) >= batch_rows:
            yield ids, shas, _matrix(vecs)
            ids, shas, vecs = [], [], []
    if ids:
        yield ids, shas, _matrix(vecs)


def _matrix(vecs: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(vecs), dtype=np.float32).reshape(len(vecs), -1)


def shipped(spark: SparkSession, data: bytes) -> tuple[Callable[[], bytes], Callable[[], None]]:
    """``data`` for the tasks of a UDF: (a function the tasks call to get it, one that frees it afterwards).

    A classic session broadcasts it (one copy per executor); a Spark Connect session has no SparkContext to
    broadcast with, so it travels inside the UDF's own pickled closure, part of the plan the client sends.
    """
    from image_embeddings.spark import is_connect

    if is_connect(spark):
        return (lambda: data), (lambda: None)
    shared = spark.sparkContext.broadcast(data)
    return (lambda: shared.value), shared.unpersist


def fill(spark: SparkSession, rows: DataFrame, trained: bytes) -> tuple[Any, Any]:
    """Add ``rows`` to copies of the ``trained`` empty index, one per Spark partition, and merge them on the driver.

    Each partition's index crosses as serialized chunks; the output is cached first so that every partition is
    computed in parallel, then streamed to the driver one at a time. Returns (index, ids table).
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark import StorageLevel

    trained_bytes, release = shipped(spark, trained)

    def add(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pyspark import TaskContext

        index = _deserialize(trained_bytes())
        parts = []
        for b in batches:
            if not len(b):
                continue
            names = b["image_id"].tolist()
            ids = vector_ids(names)
            index.add_with_ids(unit_rows(np.stack(b["embedding"].to_numpy())), ids)
            parts.append(_ids_table(ids, names, b["sha256"].tolist(), "add"))
        if not parts:
            return
        part = TaskContext.get().partitionId()  # type: ignore[union-attr]
        for kind, data in (("index", _serialize(index)), ("ids", _parquet(pa.concat_tables(parts)))):
            chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
            yield pd.DataFrame({"part": part, "kind": kind, "seq": range(len(chunks)), "data": chunks})

    partials = rows.select("image_id", "sha256", "embedding").mapInPandas(
        add, "part int, kind string, seq int, data binary").persist(StorageLevel.MEMORY_AND_DISK)  # type: ignore[arg-type]
    try:
        partials.count()
        merged = _deserialize(trained)
        tables = []
        pieces: dict[tuple[int, str], list[bytes]] = {}
        for row in partials.toLocalIterator(prefetchPartitions=True):
            pieces.setdefault((row[0], row[1]), []).append(row[3])
            if row[1] == "ids":  # a partition's index chunks come before its ids
                index_bytes = b"".join(pieces.pop((row[0], "index"), []))
                if index_bytes:
                    merged.merge_from(_deserialize(index_bytes), 0)
        for (_, kind), chunks in pieces.items():
            if kind == "ids":
                tables.append(pq.read_table(io.BytesIO(b"".join(chunks))))
        empty = _ids_table(np.zeros(0, np.int64), [], [], "add")
        return merged, pa.concat_tables([empty, *tables]) if tables else empty
    finally:
        partials.unpersist()
        release()


LOCAL_FILL_ROWS = 50_000  # up to this many change-feed rows (400 MB of 2048-d vectors) an update adds on the driver


def fill_from_feed(feed: pd.DataFrame, trained: bytes) -> tuple[Any, Any]:
    """:func:`fill` on the driver from change-feed rows (image_id, sha256, _change_type, _commit_version,
    embedding): each image_id's last row, when it is an insert or a post-image with an embedding."""
    index = _deserialize(trained)
    last: dict[str, tuple[tuple[int, int], Any, Any, str]] = {}
    for image_id, sha, kind, version, embedding in zip(feed["image_id"], feed["sha256"], feed["_change_type"],
                                                       feed["_commit_version"], feed["embedding"], strict=True):
        order = (int(version), ORDER.get(kind, 1))
        if image_id not in last or order >= last[image_id][0]:
            last[image_id] = (order, sha, embedding, kind)
    kept = [(i, sha, e) for i, (_, sha, e, kind) in sorted(last.items())
            if kind in ("insert", "update_postimage") and e is not None]
    names = [i for i, _, _ in kept]
    ids = vector_ids(names)
    if kept:
        index.add_with_ids(unit_rows(np.stack([np.asarray(e, dtype=np.float32) for _, _, e in kept])), ids)
    return index, _ids_table(ids, names, [sha for _, sha, _ in kept], "add")


# ---------------------------------------------------------------------------------------------------------
# manifest, build, update


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


def build_index(spark: SparkSession, config: AppConfig, version: int, reason: str,
                grace_s: float | None = None) -> dict[str, Any]:
    """Train on a sample of the rows at ``version`` and fill a new base segment; replaces the previous index
    (whose files are retired, see :func:`write_manifest`)."""
    started = time.perf_counter()
    settings = config.index
    rows, key = model_table(spark, config, version)
    store = store_for(config, key)
    read = read_state(store, lenient=True)  # read before the work: a writer that replaces it meanwhile wins
    n = rows.count()
    kind = choose_type(n, settings)
    nlist = min(list_count(kind, n), max(1, n))
    # faiss wants about 40 points per list; product quantizers 10,000 or so; an exact index needs none.
    sample_size = 1 if kind == "flat" else min(n, settings.train_rows, max(40 * nlist, 10_000))
    sample = rows.sample(fraction=min(1.0, 1.2 * sample_size / max(n, 1)), seed=17).limit(sample_size)
    training = np.concatenate([v for _, _, v in vector_batches(sample)] or [np.zeros((0, 0), np.float32)])
    if not len(training):  # a sampled fraction of a tiny sample can come back empty
        training = np.concatenate([v for _, _, v in vector_batches(rows.limit(sample_size))]
                                  or [np.zeros((0, 0), np.float32)])
    if not len(training):
        raise VectorIndexError(f"the embeddings table {config.output.embeddings_table} has no embedded rows for "
                               f"model {key} at version {version}")
    index = new_index(kind, training.shape[1], nlist)
    index.train(training)
    trained = _serialize(index)
    merged, ids = fill(spark, rows, trained)
    manifest, written = commit_base(store, read, key, config.output.embeddings_table, version, trained, merged, ids,
                                    kind=kind, nlist=nlist, grace_s=grace_s)
    seconds = time.perf_counter() - started
    log.info("index built for model %s at table version %d: %s, %d rows, %d lists, %.1f s (%s)", key, version,
             kind, manifest.rows, nlist, seconds, reason)
    return {"action": "built", "reason": reason, "model_key": key, "version": version, "type": kind,
            "rows": manifest.rows, "nlist": nlist, "elapsed_s": round(seconds, 3), "location": store.location,
            "bytes": written}


def commit_base(store: Store, read: ManifestRead, key: str, table: str, version: int, trained: bytes, index: Any,
                ids: Any, *, kind: str, nlist: int, grace_s: float | None = None) -> tuple[Manifest, int]:
    """Write a base segment (the ``trained`` empty index, the filled ``index`` and its ``ids``) under new names,
    then a manifest naming only it (:func:`write_manifest`); returns the manifest and the bytes written."""
    _check_unique(ids)
    name = f"base-v{version}-{secrets.token_hex(4)}"  # never a name that a live or retired manifest uses
    files = {f"{name}.trained.faiss": trained, f"{name}.faiss": _serialize(index), f"{name}.ids.parquet": _parquet(ids)}
    for file_name, data in files.items():
        store.write(file_name, data)
    now = time.time()
    rows = int(index.ntotal)
    manifest = Manifest(model_key=key, table=table, version=version, type=kind, nlist=nlist, dim=int(index.d),
                        trained=f"{name}.trained.faiss", base_rows=rows, rows=rows,
                        segments=[{"name": name, "added": rows, "removed": 0, "from_version": None,
                                   "to_version": version}],
                        built_at=now, updated_at=now, checksums={n: sha256_hex(d) for n, d in files.items()})
    write_manifest(store, manifest, read, list(files), grace_s)
    return manifest, sum(len(data) for data in files.values())


def commit_update(store: Store, read: ManifestRead, version: int, touched: Sequence[str], existed: int,
                  delta: Any = None, ids: Any = None, grace_s: float | None = None) -> tuple[Manifest, int]:
    """Append a segment to the manifest ``read`` (``delta`` holding the vectors ``ids`` adds; removing the
    ``touched`` image_ids, ``existed`` of which were indexed) and move it to ``version``; with nothing touched
    only the covered version moves. Returns the manifest and the vectors added."""
    import pyarrow as pa

    manifest = read.manifest
    assert manifest is not None, "an update starts from a manifest"
    added = 0
    written: list[str] = []
    if touched:
        _check_unique(ids)
        name = f"delta-v{manifest.version}-v{version}-{secrets.token_hex(4)}"
        removed = _ids_table(vector_ids(touched), touched, [None] * len(touched), "remove")
        for file_name, data in ((f"{name}.faiss", _serialize(delta)),
                                (f"{name}.ids.parquet", _parquet(pa.concat_tables([removed, ids])))):
            store.write(file_name, data)
            manifest.checksums[file_name] = sha256_hex(data)
            written.append(file_name)
        added = int(delta.ntotal)
        manifest.segments.append({"name": name, "added": added, "removed": len(touched),
                                  "from_version": manifest.version, "to_version": version})
        manifest.rows += added - existed
    manifest.version = version
    manifest.changed_since_base += len(touched)
    manifest.updated_at = time.time()
    write_manifest(store, manifest, read, written, grace_s)
    return manifest, added


def _check_unique(ids: Any) -> None:
    import pyarrow.compute as pc

    if len(pc.unique(ids.column("id"))) != ids.num_rows:
        raise VectorIndexError("two image_ids share a 63-bit vector id (or an image_id is duplicated for one model); "
                               "the index cannot tell them apart")


def update_index(spark: SparkSession, config: AppConfig, full: bool = False,
                 grace_s: float | None = None) -> dict[str, Any]:
    """Bring the index of this config's model to the embeddings table's current version.

    Writes one segment with the changed image_ids (read from the change data feed since the covered version),
    or a new base when asked (``full``), when there is none, when the feed cannot be read, or once the rows
    changed since the base pass ``index.rebuild_fraction`` of it. Files no longer named are deleted after
    ``grace_s`` (default :data:`GRACE_SECONDS`) by a later write.
    """
    from image_embeddings.similar import config_key
    from image_embeddings.tables import table_version

    table = config.output.embeddings
    version = table_version(spark, table)
    if version is None:
        raise VectorIndexError(f"there is no embeddings table at {table} yet: run stage 2 first")
    key = config_key(config)
    if full:  # before reading the manifest: a full build also replaces one that cannot be used
        return build_index(spark, config, version, "asked for (--full)", grace_s)
    store = store_for(config, key)
    read = read_state(store)
    manifest = read.manifest
    if manifest is None:
        return build_index(spark, config, version, "no index yet", grace_s)
    if manifest.version == version:
        return {"action": "fresh", "model_key": key, "version": version, "type": manifest.type,
                "rows": manifest.rows, "location": store.location}
    if manifest.version > version:
        return build_index(spark, config, version, f"the index covers version {manifest.version}, newer than "
                                                   f"the table's {version} (table restored?)", grace_s)
    started = time.perf_counter()
    changes = _changes(spark, config, key, manifest.version, version)
    if isinstance(changes, str):
        return build_index(spark, config, version, changes, grace_s)
    night, before = changes
    touched = sorted(before)
    if manifest.changed_since_base + len(touched) > config.index.rebuild_fraction * max(manifest.base_rows, 1):
        return build_index(spark, config, version, f"{manifest.changed_since_base + len(touched)} rows changed "
                                                   f"since the base of {manifest.base_rows} rows (threshold "
                                                   f"{config.index.rebuild_fraction:.0%})", grace_s)
    delta = ids = None
    if touched:
        try:
            trained = _verified(store, manifest, manifest.trained)
        except IndexDamagedError:
            return build_index(spark, config, version, f"the trained index {manifest.trained} is missing or "
                                                       "damaged", grace_s)
        delta, ids = _fill_changed(spark, config, version, night, touched, trained)
    previous_version = manifest.version
    manifest, added = commit_update(store, read, version, touched, sum(before.values()), delta, ids, grace_s)
    seconds = time.perf_counter() - started
    log.info("index of model %s updated from table version %d to %d: %d image_ids changed, %d vectors added, "
             "%.1f s", key, previous_version, version, len(touched), added, seconds)
    return {"action": "updated" if touched else "fresh", "model_key": key, "from_version": previous_version,
            "version": version, "type": manifest.type, "changed": len(touched), "added": added,
            "rows": manifest.rows, "elapsed_s": round(seconds, 3), "location": store.location,
            "segments": len(manifest.segments)}


def _changes(spark: SparkSession, config: AppConfig, key: str, covered: int, version: int
             ) -> tuple[Any, dict[str, bool]] | str:
    """Model ``key``'s change feed after version ``covered`` up to ``version``: (its rows with vectors when few
    enough, else None; for each changed image_id whether it was indexed before), or why to build a base instead."""
    from pyspark.sql import functions as F

    from image_embeddings.tables import MAX_LITERAL_KEYS, change_feed

    feed = change_feed(spark, config.output.embeddings, covered + 1, version).where(F.col("model_key") == key)
    try:  # a night's changes: one Arrow collect of the feed, vectors included; more: their keys only
        night: Any = feed.select("image_id", "sha256", "_change_type", "_commit_version", "embedding") \
            .limit(LOCAL_FILL_ROWS + 1).toPandas()
        found: list[Any]
        if len(night) <= LOCAL_FILL_ROWS:
            found = list(zip(night["image_id"], night["_change_type"], night["_commit_version"],
                             night["embedding"].notna(), strict=True))
        else:
            night = None
            found = feed.select("image_id", "_change_type", "_commit_version", F.col("embedding").isNotNull()) \
                .limit(4 * MAX_LITERAL_KEYS + 1).collect()
    except Exception as exc:  # not enabled for those versions, or vacuumed
        return f"the change feed after version {covered} is unreadable: {str(exc).splitlines()[0][:200]}"
    before = existed_before([(r[0], r[1], int(r[2]), bool(r[3])) for r in found])
    if len(found) > 4 * MAX_LITERAL_KEYS or len(before) > MAX_LITERAL_KEYS:
        return f"more than {MAX_LITERAL_KEYS:,} image_ids changed"
    return night, before


def _fill_changed(spark: SparkSession, config: AppConfig, version: int, night: Any, touched: list[str],
                  trained: bytes) -> tuple[Any, Any]:
    """The current vectors of the ``touched`` image_ids in copies of the ``trained`` index."""
    from pyspark.sql import functions as F

    from image_embeddings.tables import in_ranges, key_ranges

    if night is not None:  # the feed's last image of each changed row is its current vector
        return fill_from_feed(night, trained)
    rows, _ = model_table(spark, config, version, check=False)  # the manifest names this model
    return fill(spark, rows.where(in_ranges("image_id", key_ranges(touched)) & F.col("image_id").isin(touched)),
                trained)


ORDER = {"update_preimage": 0, "delete": 0, "insert": 1, "update_postimage": 1}


def existed_before(changes: list[tuple[str, str, int, bool]]) -> dict[str, bool]:
    """For each image_id in the change feed rows (image_id, change type, version, has embedding): whether it had
    an embedding before the first of its changes (then its first row is a preimage or a delete)."""
    first: dict[str, tuple[int, int, str, bool]] = {}
    for image_id, kind, version, has in changes:
        entry = (version, ORDER.get(kind, 1), kind, has)
        if image_id not in first or entry < first[image_id]:
            first[image_id] = entry
    return {i: e[2] in ("update_preimage", "delete") and e[3] for i, e in first.items()}


def _verified(store: Store, manifest: Manifest, name: str) -> bytes:
    """The bytes of a file the manifest names, checked against its recorded sha256 (when it has one)."""
    data = store.read(name)
    if data is None:
        raise IndexDamagedError(f"the index at {store.location} is damaged: it lacks {name}; {REBUILD}")
    expected = manifest.checksums.get(name)
    if expected is not None and sha256_hex(data) != expected:
        raise IndexDamagedError(f"the index at {store.location} is damaged: {name} ({len(data):,} bytes) does not "
                                f"match the sha256 its manifest records (corrupted, truncated or replaced); {REBUILD}")
    return data


def _decoded(store: Store, manifest: Manifest, name: str) -> Any:
    """A verified segment file, deserialized (a faiss index or an ids table)."""
    import pyarrow.parquet as pq

    data = _verified(store, manifest, name)
    try:
        return pq.read_table(io.BytesIO(data)) if name.endswith(".parquet") else _deserialize(data)
    except Exception as exc:  # an unverified (format-1) file can still be broken
        raise IndexDamagedError(f"the index at {store.location} is damaged: {name} cannot be read "
                                f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); "
                                f"{REBUILD}") from exc


# ---------------------------------------------------------------------------------------------------------
# loading and searching


@dataclass
class LoadedIndex:
    """An index with its segments applied, ready to search."""

    index: Any
    manifest: Manifest
    image_ids: pd.Series  # vector id -> image_id
    sha256: pd.Series     # vector id -> sha256

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, list[list[str]], list[list[str | None]]]:
        """Top-``k`` (scores, image_ids, sha256s) of each query row by cosine."""
        q = unit_rows(queries)
        scores, ids = self.index.search(q, k)
        names, shas = [], []
        for row in ids:
            found = row[row >= 0]
            names.append(self.image_ids.reindex(found).tolist())
            shas.append(self.sha256.reindex(found).tolist())
        return scores, names, shas

    def within(self, queries: Any, threshold: float, limit: int) -> set[str]:
        """The image_ids whose cosine to any query row exceeds ``threshold`` (at most ``limit`` per query, the
        nearest first)."""
        lims, scores, ids = self.index.range_search(unit_rows(queries), float(threshold))
        found: set[str] = set()
        for i in range(len(lims) - 1):
            part_ids, part_scores = ids[lims[i]:lims[i + 1]], scores[lims[i]:lims[i + 1]]
            if len(part_ids) > limit:
                part_ids = part_ids[np.argsort(-part_scores, kind="stable")[:limit]]
            found.update(self.image_ids.reindex(part_ids).dropna().tolist())
        return found


def load_index(store: Store, nprobe: int) -> LoadedIndex:
    """Read the base and apply every later segment: its removals, then its additions.

    Each file is checked against the sha256 the manifest records: a missing, corrupted or replaced file is an
    :class:`IndexDamagedError` (a search must not answer from it). Files of a format-1 manifest (no checksums)
    load unverified.
    """
    import pandas as pd

    manifest = read_manifest(store)
    if manifest is None:
        raise VectorIndexError(f"there is no index at {store.location}")
    unverified = [n for n in _files(manifest)[1:] if n not in manifest.checksums]
    if unverified:
        log.warning("the index at %s has no checksums of %s (written by an earlier release): loading them "
                    "unverified; `image-embeddings index --full` records them", store.location, unverified)
    index = None
    maps: list[pd.DataFrame] = []
    for segment in manifest.segments:
        part = _decoded(store, manifest, f"{segment['name']}.faiss")
        ids = _decoded(store, manifest, f"{segment['name']}.ids.parquet").to_pandas()
        removed = ids.loc[ids["kind"] == "remove", "id"].to_numpy(np.int64)
        if index is None:
            index = part
        else:
            if len(removed):
                index.remove_ids(removed)
            index.merge_from(part, 0)
        maps.append(ids[ids["kind"] == "add"])
        if len(removed):
            maps = [m[~m["id"].isin(removed)] for m in maps[:-1]] + [maps[-1]]
    assert index is not None
    index.nprobe = min(nprobe, manifest.nlist)
    table = pd.concat(maps).drop_duplicates("id", keep="last").set_index("id")
    return LoadedIndex(index, manifest, table["image_id"], table["sha256"])


def is_fresh(spark: SparkSession, table: Table, covered: int) -> tuple[bool, int]:
    """Whether no commit after version ``covered`` changed rows (OPTIMIZE, VACUUM and property changes do not),
    and the table's latest version. Reads the last 50 commit infos of the Delta log, no data."""
    from image_embeddings.tables import history as table_history

    history = [(int(r[0]), str(r[1])) for r in table_history(spark, table, 50).select("version", "operation").collect()]
    latest = max(v for v, _ in history)
    later = [op for v, op in history if v > covered]
    if covered > latest or len(later) < latest - covered:  # restored, or more commits than were read
        return False, latest
    return all(op in NO_DATA_CHANGE for op in later), latest


_LOADED: dict[tuple[str, int], LoadedIndex] = {}


def cached_index(store: Store, version: int, nprobe: int) -> LoadedIndex:
    """The index covering ``version``, loaded once per Python process (Spark reuses its Python workers)."""
    key = (store.location, version)
    if key not in _LOADED:
        loaded = load_index(store, nprobe)
        if loaded.manifest.version != version:
            raise VectorIndexError(f"the index at {store.location} moved to table version "
                                   f"{loaded.manifest.version} while a job expected {version}")
        _LOADED.clear()
        _LOADED[key] = loaded
    return _LOADED[key]


@leased("index")
def run_index(spark: SparkSession, config: AppConfig, full: bool = False, run_id: str | None = None,
              report_file: str | None = None, run_date: str | None = None) -> Any:
    """:func:`update_index` with a run report (also appended to the runs table)."""
    from image_embeddings.report import run_reported

    def work(report: Any) -> None:
        with report.step("index"):
            report.metrics.update(update_index(spark, config, full=full))

    return run_reported("index", work, spark, config.output.runs, run_id, report_file, run_date, rate=None)


def index_line(metrics: dict[str, Any]) -> str:
    """One line saying what ``image-embeddings index`` did."""
    what = {"built": f"built ({metrics.get('reason')})", "updated": "updated", "fresh": "already fresh"}
    line = (f"index {what.get(metrics['action'], metrics['action'])}: {metrics['type']}, {metrics['rows']:,} rows "
            f"of model {metrics['model_key']}, table version {metrics['version']}")
    if metrics["action"] == "updated":
        line += f" (from {metrics['from_version']}: {metrics['changed']:,} image_ids changed, " \
                f"{metrics['added']:,} vectors added, {metrics['segments']} segments)"
    if "bytes" in metrics:
        line += f", {metrics['bytes'] / 1e6:,.1f} MB"
    if "elapsed_s" in metrics:
        line += f", {metrics['elapsed_s']:.1f} s"
    return f"{line}; at {metrics['location']}"
