"""Filling a trained index from the embeddings table: in Spark tasks, or on the driver for a small feed."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.core.config import AppConfig
from image_embeddings.core.vectors import unit_rows
from image_embeddings.search.kinds import _deserialize, _ids_table, _parquet, _serialize, vector_ids

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession


log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which of its builds loads is no news


CHUNK_BYTES = 32 * 1024 * 1024  # serialized partial indexes travel to the driver in rows of this size


def model_table(spark: SparkSession, config: AppConfig, version: int | None = None, check: bool = True
                ) -> tuple[DataFrame, str]:
    """This config's embedded rows (``embedding`` not null) at ``version``, and the model key; refuses a table
    without this model's rows when ``check``."""
    from pyspark.sql import functions as F

    from image_embeddings.search.rows import config_key, model_rows

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


def shipped(spark: SparkSession, data: bytes) -> tuple[Callable[[], bytes], Callable[[], None]]:
    """``data`` for the tasks of a UDF: (a function the tasks call to get it, one that frees it afterwards).

    A classic session broadcasts it (one copy per executor); a Spark Connect session has no SparkContext to
    broadcast with, so it travels inside the UDF's own pickled closure, part of the plan the client sends.
    """
    from image_embeddings.core.spark import is_connect

    if is_connect(spark):
        return (lambda: data), (lambda: None)
    shared = spark.sparkContext.broadcast(data)
    return (lambda: shared.value), shared.unpersist


ORDER = {"update_preimage": 0, "delete": 0, "insert": 1, "update_postimage": 1}
