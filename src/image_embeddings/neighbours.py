"""The neighbours table: the top-k most similar images of every image of one model, kept fresh incrementally.

Rows: ``image_id``, ``model_key``, ``neighbours`` (``array<struct<image_id, score>>``, best first, the image
itself left out), ``k``, ``embeddings_version`` (the embeddings table version they were computed at) and
``updated_at``. Spark tasks search the nearest-neighbour index (:mod:`image_embeddings.vector_index`), which each
Python worker loads once.

A later run reads the embeddings table's change data feed since the version recorded with the last commit and
recomputes the rows of the changed image_ids and of every image whose list a change can touch: an image's list
changes only if a changed image's old vector scored at least its k-th neighbour (it was in the list) or its new
vector scores above that. Each commit records a floor under every row's k-th score, so a range search of the
index around each old and new vector with that floor finds them all (for the exact index; an IVF index searches
``index.nprobe`` lists), nearest first and at most ``REVERSE_LIMIT`` per vector. Its cost follows the change.
``--full`` recomputes every row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.config import AppConfig
from image_embeddings.lease import leased
from image_embeddings.vector_index import (
    Store,
    cached_index,
    load_index,
    model_table,
    store_for,
    unit_rows,
    update_index,
    vector_batches,
)

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

NEIGHBOURS = "array<struct<image_id:string,score:float>>"
REVERSE_LIMIT = 10_000  # images refreshed per changed vector at most (a floor far below most rows' k-th score)
ROWS_PER_FILE = 5_000  # a full write orders rows by image_id into files of this many (about 1 MB at k=20)


def neighbours_frame(rows: DataFrame, store: Store, version: int, nprobe: int, k: int, key: str) -> DataFrame:
    """The neighbour rows of ``rows`` (image_id, embedding), searched in Spark tasks."""
    import pandas as pd
    from pyspark.sql import functions as F

    def find(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        loaded = cached_index(store, version, nprobe)
        for b in batches:
            if not len(b):
                continue
            scores, names, _ = loaded.search(unit_rows(np.stack(b["embedding"].to_numpy())), k + 1)
            lists = [[{"image_id": n, "score": float(s)} for n, s in zip(found, row, strict=False) if n != own][:k]
                     for own, found, row in zip(b["image_id"], names, scores, strict=True)]
            yield pd.DataFrame({"image_id": b["image_id"], "neighbours": lists})

    found = rows.select("image_id", "embedding").mapInPandas(
        find, f"image_id string, neighbours {NEIGHBOURS}")  # type: ignore[arg-type]
    return found.select("image_id", F.lit(key).alias("model_key"), "neighbours", F.lit(k).alias("k"),
                        F.lit(version).cast("long").alias("embeddings_version"),
                        F.current_timestamp().alias("updated_at"))


def run_neighbours(spark: SparkSession, config: AppConfig, k: int | None = None, full: bool = False
                   ) -> dict[str, Any]:
    """Bring the neighbours table of this config's model to the embeddings table's current version.

    Updates the index first. Returns what was done: ``full`` (every row), ``updated`` (the changed rows) or
    ``fresh`` (nothing to do).
    """
    from pyspark.sql import functions as F

    from image_embeddings.tables import (
        MAX_LITERAL_KEYS,
        clustered,
        commit_state,
        in_ranges,
        key_ranges,
        merge_changes,
        overwrite_where,
        ranges_sql,
        read_changes,
        sql_string,
        with_commit_retries,
    )

    started = time.perf_counter()
    k = k or config.index.neighbours_k
    index = update_index(spark, config)
    key, version = index["model_key"], int(index["version"])
    store = store_for(config, key)
    path = config.output.table(config.index.neighbours_for(config.output.embeddings_table))
    nprobe = config.index.nprobe
    state = commit_state(spark, path, lambda s: s.get("model_key") == key)
    other_k = None if state is None or state[1].get("k") == k else state[1].get("k")
    if other_k is not None:  # every row holds lists of another length: all of them are rewritten
        state = None
    metadata: dict[str, Any] = {"model_key": key, "k": k, "embeddings_version": version}
    rows, _ = model_table(spark, config, version, check=False)
    result: dict[str, Any] = {"table": str(path), "model_key": key, "k": k, "version": version, "index": index}
    since = None if state is None else int(state[1]["embeddings_version"])
    if since is not None and since == version:
        return {**result, "action": "fresh", "rows_written": 0}
    changes = None if full or since is None or since > version else read_changes(
        spark, config.output.embeddings, since, version, ("image_id", "model_key", "_change_type", "embedding"))
    if changes is None:
        found = clustered(neighbours_frame(rows, store, version, nprobe, k, key), "image_id", int(index["rows"]),
                          ROWS_PER_FILE)
        found = found.persist()
        written, floor = found.agg(F.count(F.lit(1)), F.min(kth_score(k))).first()  # type: ignore[misc]
        metadata["floor"] = -1.0 if floor is None else float(floor)
        with_commit_retries(str(path), lambda: overwrite_where(found, path, f"model_key = {sql_string(key)}", metadata))
        found.unpersist()
        reason = ("asked for (--full)" if full else f"k changed from {other_k}" if other_k is not None
                  else "no earlier run" if since is None else "change feed unreadable")
        log.info("neighbours of %d images of model %s written (k=%d, every row: %s)", written, key, k, reason)
        return {**result, "action": "full", "reason": reason, "rows_written": written,
                "elapsed_s": round(time.perf_counter() - started, 3)}
    try:
        mine = changes.where(F.col("model_key") == key)
        touched = sorted({r[0] for r in mine.select("image_id").distinct().limit(MAX_LITERAL_KEYS + 1).collect()})
        old = mine.where(F.col("_change_type").isin("delete", "update_preimage") & F.col("embedding").isNotNull())
        old_vectors = [v for _, _, v in vector_batches(old.withColumn("sha256", F.lit(None).cast("string")))]
    finally:
        changes.unpersist()
    if len(touched) > MAX_LITERAL_KEYS:
        return run_neighbours(spark, config, k, full=True)
    current = rows.where(in_ranges("image_id", key_ranges(touched)) & F.col("image_id").isin(touched))
    new_vectors = [v for _, _, v in vector_batches(current)]
    loaded = load_index(store, nprobe)
    floor = float(state[1].get("floor", -1.0)) if state is not None else -1.0
    affected = set(touched)
    for batch in old_vectors + new_vectors:
        affected |= loaded.within(batch, floor - 1e-6, REVERSE_LIMIT)  # range search keeps > only
    wanted = sorted(affected)
    ranges = key_ranges(wanted)
    upserts = neighbours_frame(rows.where(in_ranges("image_id", ranges) & F.col("image_id").isin(wanted)),
                               store, version, nprobe, k, key).persist()
    present = {r[0] for r in upserts.select("image_id").collect()}
    lowest = upserts.agg(F.min(kth_score(k))).first()[0]  # type: ignore[index]
    metadata["floor"] = min(floor, float(lowest)) if lowest is not None else floor
    gone = [i for i in touched if i not in present]
    deletes = spark.createDataFrame([(i, key) for i in gone], "image_id string, model_key string")
    with_commit_retries(str(path), lambda: merge_changes(
        spark, path, upserts, deletes, ["image_id", "model_key"],
        target_filter=f"t.model_key = {sql_string(key)} AND {ranges_sql('t.image_id', ranges)}", metadata=metadata))
    upserts.unpersist()
    log.info("neighbours of model %s updated from embeddings version %d to %d: %d changed image_ids, %d rows "
             "rewritten, %d removed", key, since, version, len(touched), len(present), len(gone))
    return {**result, "action": "updated", "from_version": since, "changed": len(touched),
            "rows_written": len(present), "rows_removed": len(gone),
            "elapsed_s": round(time.perf_counter() - started, 3)}


def kth_score(k: int) -> Any:
    """A row's k-th neighbour score: -1 when it has fewer than ``k`` (any image may join its list)."""
    from pyspark.sql import functions as F

    return F.when(F.size("neighbours") >= k, F.element_at("neighbours", -1)["score"]).otherwise(F.lit(-1.0))


def neighbours_with_sales(spark: SparkSession, config: AppConfig) -> DataFrame:
    """The neighbours table joined with the images table's sales columns, as for embeddings."""
    from image_embeddings.embed import with_sales
    from image_embeddings.tables import read

    path = config.output.table(config.index.neighbours_for(config.output.embeddings_table))
    return with_sales(spark, config, read(spark, path))


@leased('neighbours')
def run_neighbours_reported(spark: SparkSession, config: AppConfig, k: int | None = None, full: bool = False,
                            run_id: str | None = None, report_file: str | None = None,
                            run_date: str | None = None) -> Any:
    """:func:`run_neighbours` with a run report (also appended to the runs table)."""
    from image_embeddings.report import run_reported

    def work(report: Any) -> None:
        with report.step("neighbours"):
            report.metrics.update(run_neighbours(spark, config, k=k, full=full))

    return run_reported("neighbours", work, spark, config.output.runs, run_id, report_file, run_date,
                        rate=None)


def neighbours_line(metrics: dict[str, Any]) -> str:
    """One line saying what ``image-embeddings neighbours`` did."""
    action = metrics["action"]
    if action == "fresh":
        what = "already fresh"
    elif action == "full":
        what = f"written for every image ({metrics['reason']}): {metrics['rows_written']:,} rows"
    else:
        what = (f"updated from embeddings version {metrics['from_version']}: {metrics['changed']:,} image_ids "
                f"changed, {metrics['rows_written']:,} rows rewritten, {metrics['rows_removed']:,} removed")
    return (f"neighbours (k={metrics['k']}) of model {metrics['model_key']} at embeddings version "
            f"{metrics['version']} {what}; table {metrics['table']}")
