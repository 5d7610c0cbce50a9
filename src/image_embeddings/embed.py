"""Stage 2: embed the images table's downscaled images into ``output.embeddings_table``.

Rows are keyed by ``image_id`` and ``model_key`` (model name, weights checksum, preprocessing and
normalization): a second model or new weights add rows of their own, never mix with the old ones. An image
is embedded again only when its content sha256 changed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

from image_embeddings.config import AppConfig
from image_embeddings.embedder import EmbedderSettings
from image_embeddings.lease import leased
from image_embeddings.models import model_spec
from image_embeddings.progress import Progress
from image_embeddings.quality import run_drift
from image_embeddings.report import RunReport, errors_by_reason, run_reported, utcnow
from image_embeddings.spark import concurrently, default_parallelism, session_conf
from image_embeddings.tables import (
    Table,
    clustered,
    commit_state,
    ensure_features,
    in_ranges,
    key_ranges,
    literal_keys,
    merge_changes,
    path_ranges,
    ranges_sql,
    read,
    read_changes,
    read_table,
    record_state,
    require_columns,
    sql_string,
    table_version,
    with_commit_retries,
)
from image_embeddings.weights import S3Access, Weights, resolve_weights

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

EMBED_STRUCT = ("embedding ARRAY<FLOAT>, error STRING, device STRING, precision STRING, worker_pid INT, "
                "model_loads INT, worker_batches INT, warmed BOOLEAN")
EMBEDDING_COLUMNS = ("image_id", "model_key", "sha256", "embedding", "model", "weights_checksum", "preprocess_id",
                     "normalized", "precision", "device", "error", "run_id", "embedded_at")


class EmbedError(RuntimeError):
    """Stage 2 cannot run with this input or config; the message says what to fix."""


def embedder_settings(config: AppConfig, weights: Weights) -> EmbedderSettings:
    """The picklable settings every Python worker builds its embedder from."""
    m = config.model
    return EmbedderSettings(model=m.name, weights=m.weights, device=m.device, precision=m.precision,
                            batch_size=m.batch_size, normalize=m.normalize, cache_dir=m.cache_dir,
                            threads=m.threads, s3=S3Access(config.s3.endpoint, config.s3.region),
                            checksum=weights.checksum, decode=m.decode, engine=m.engine)


def resolve_config_weights(config: AppConfig) -> Weights:
    """Find or fetch the weights named by ``model.weights`` (S3 through ``s3.endpoint`` when set)."""
    mc = config.model
    return resolve_weights(mc.weights, model_spec(mc.name), mc.cache_dir,
                           S3Access(config.s3.endpoint, config.s3.region))


def model_key(model: str, weights_checksum: str, preprocess_id: str, normalized: bool) -> str:
    """A short identity of everything that decides an embedding's value, stored with every row."""
    text = f"{model}|{weights_checksum}|{preprocess_id}|{'l2' if normalized else 'raw'}"
    return f"{model}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def embed_column(image: Column, settings: EmbedderSettings) -> Column:
    """A struct column (embedding, error, device, precision, worker_pid, model_loads) from JPEG bytes.

    An Iterator pandas UDF: the model is loaded on the first batch a Python worker sees and kept in the
    process for every later batch and task (:func:`image_embeddings.embedder.cached_embedder`).
    """
    from collections.abc import Iterator

    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def _embed(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        import os

        from image_embeddings.worker import cached_embedder, is_loaded_or_loading, load_count, prepare_worker

        prepare_worker()
        own = worker_settings(settings)
        warmed = is_loaded_or_loading(own)  # before this task: by an earlier task, or by stage 1 (warm_up)
        embedder = None
        for batch in batches:
            if embedder is None:
                embedder = cached_embedder(own)
            result = embedder.embed(list(batch))
            pairs = zip(result.embeddings, result.errors, strict=True)
            vectors = [None if err is not None else row for row, err in pairs]
            yield pd.DataFrame({
                "embedding": pd.Series(vectors, dtype=object),
                "error": pd.Series(result.errors, dtype=object),
                "device": embedder.device,
                "precision": embedder.precision,
                "worker_pid": os.getpid(),
                "model_loads": load_count(own),
                "worker_batches": embedder.calls,
                "warmed": warmed,
            })

    # Real classes, not the strings of `from __future__ import annotations`: Spark reads them.
    _embed.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.DataFrame]}
    return pandas_udf(_embed, EMBED_STRUCT)(image)  # type: ignore[call-overload]


def worker_settings(settings: EmbedderSettings) -> EmbedderSettings:
    """``settings`` for this Spark task: torch threads default to the task's CPUs (``spark.task.cpus``), and the
    device is the GPU Spark assigned the task, when it schedules GPUs (:func:`embedder.task_device`).

    torch would start one thread per core in every Python worker; with one worker per task slot that
    oversubscribes the executor.
    """
    import dataclasses

    from pyspark import TaskContext

    from image_embeddings.embedder import task_device

    context = TaskContext.get()
    if context is None:
        return settings
    return dataclasses.replace(settings, threads=settings.threads or max(1, context.cpus()),
                               device=task_device(settings.device, context.resources()))


def warm_up_workers(spark: SparkSession, settings: EmbedderSettings) -> int:
    """Have the Python workers start loading the embedder in the background; return how many started.

    For ``run``: stage 1 starts it beside its listing and planning, which leave the cores partly idle; loading
    torch and the model then overlaps stage 1 instead of delaying stage 2's first batch. One tiny task per task
    slot; each returns at once (:func:`image_embeddings.embedder.warm_up_in_background`). Never raises.
    """
    from collections.abc import Iterable, Iterator

    import pandas as pd

    def start(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from image_embeddings.worker import prepare_worker, warm_up_in_background

        prepare_worker()
        for _ in batches:
            yield pd.DataFrame({"started": [int(warm_up_in_background(worker_settings(settings)))]})

    try:
        slots = default_parallelism(spark)
        rows = spark.range(0, slots, 1, slots).mapInPandas(start, "started INT").collect()  # one row per slot
    except Exception as exc:  # an optimization only: stage 2 loads the model itself
        log.warning("could not start the model warm-up in the Python workers: %s", exc)
        return 0
    started = sum(int(row["started"]) for row in rows)
    log.info("model warm-up started in %d Python workers", started)
    return started


def select_todo(images: DataFrame, embeddings: DataFrame | None, key: str) -> DataFrame:
    """Images rows (image_id, sha256, path) with pixels and no embedding yet for their content under model ``key``."""
    from pyspark.sql import functions as F

    candidates = images.where(F.col("error").isNull() & F.col("sha256").isNotNull()).select(
        "image_id", "sha256", "path")
    if embeddings is None:
        return candidates
    done = embeddings.where(F.col("model_key") == key).select("image_id", "sha256")
    return candidates.join(done, ["image_id", "sha256"], "left_anti")


def stale_rows(images: DataFrame, embeddings: DataFrame | None, key: str) -> DataFrame | None:
    """Keys of this model's rows whose image is gone from the images table (or lost its pixels)."""
    from pyspark.sql import functions as F

    if embeddings is None:
        return None
    live = images.where(F.col("error").isNull() & F.col("sha256").isNotNull()).select("image_id")
    return (embeddings.where(F.col("model_key") == key).select("image_id", "model_key")
            .join(live, "image_id", "left_anti"))


# Past this many images to embed, thumbnails are found by a join alone (no path list on the driver).
MAX_LISTED_PATHS = 1_000_000


def embeddings_with_sales(spark: SparkSession, config: AppConfig) -> DataFrame:
    """The embeddings joined with the images table's sales columns (the article's combined table)."""
    return with_sales(spark, config, read(spark, config.output.embeddings))


def with_sales(spark: SparkSession, config: AppConfig, rows: DataFrame) -> DataFrame:
    """``rows`` (keyed by ``image_id``) joined with the images table's sales columns."""
    images = read(spark, config.output.images)
    own = {"path", "file_size", "modification_time", "sha256", "width", "height", "image", "error", "preprocess_id",
           "run_id", "ingested_at", "duplicate_files", "updated_run_id", "updated_at"}
    sales = [c for c in images.columns if c not in own]
    return rows.join(images.select(*sales), "image_id", "left")


@leased('embed')
def run_embed(spark: SparkSession, config: AppConfig, run_id: str | None = None,
              report_file: str | None = None, run_date: str | None = None) -> RunReport:
    """Run stage 2 once and return its report (also logged, written to ``report_file`` and the runs table)."""
    return run_reported("embed", lambda report: _embed_stage(spark, config, report), spark, config.output.runs,
                        run_id, report_file, run_date, rate=("embedded", "embed_seconds"))


def _changed_images(spark: SparkSession, images_path: Table, existing: DataFrame | None,
                    state: tuple[int, dict[str, Any]] | None,
                    images_version: int) -> tuple[str | None, DataFrame | None]:
    """Why every image must be compared (None: it need not), and the image_ids changed since this model's state.

    The state is the images-table version recorded with this model's last embeddings commit; the images
    table's change data feed after it names the images to look at. Without one (a new table or model, a table
    of an older release, a change feed already vacuumed) every image is compared once.
    """
    if existing is None:
        return "full: new table", None
    if state is None:
        return "full: no recorded state for this model", None
    since = int(state[1]["images_table_version"])
    if since > images_version:
        return "full: recorded images-table version is ahead of the table", None
    keys = read_changes(spark, images_path, since, images_version, ("image_id",))
    if keys is None:
        return "full: change data feed unavailable", None
    return None, keys


# Embeddings-table rows per data file a run writes (about 7 MB at 2048 dimensions): a MERGE that replaces a few
# embeddings reads and marks only the files that hold them.
ROWS_PER_EMBEDDINGS_FILE = 1000


def _merge_scope(key: str, result: DataFrame, n_result: int, stale: DataFrame | None, n_stale: int) -> str:
    """The MERGE's target condition: this model's rows in the key ranges of what it writes and removes, so Delta
    scans only the data files that may hold them (past :data:`MAX_LITERAL_KEYS` keys: all the model's rows)."""
    ids = literal_keys(result, "image_id", n_result)
    gone = [] if stale is None or not n_stale else literal_keys(stale, "image_id", n_stale)
    scope = f"t.model_key = {sql_string(key)}"
    if ids is None or gone is None:
        return scope
    return f"{scope} AND {ranges_sql('t.image_id', key_ranges(ids + gone))}"


def _embed_stage(spark: SparkSession, config: AppConfig, report: RunReport) -> None:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    out, mc = config.output, config.model
    spec = model_spec(mc.name)
    if config.preprocess.size != spec.input_size:
        raise EmbedError(f"preprocess.size: {mc.name} takes {spec.input_size}x{spec.input_size} images, "
                         f"but stage 1 wrote {config.preprocess.size}x{config.preprocess.size}")
    images = read_table(spark, out.images)
    if images is None:
        raise EmbedError(f"output.images_table: no Delta table at {out.images_table}; run `ingest` first")
    require_columns(images, out.images_table, ("image_id", "sha256", "path", "error"), "output.images_table")
    files = read_table(spark, out.files)
    if files is None:
        raise EmbedError(f"output.files_table: no Delta table at {out.files_table_path}; run `ingest` first")
    weights = resolve_config_weights(config)
    settings = embedder_settings(config, weights)
    preprocess_id = config.preprocess.preprocess_id
    key = model_key(mc.name, weights.checksum, preprocess_id, mc.normalize)
    m = report.metrics
    m.update(model=mc.name, model_key=key, weights=mc.weights, weights_checksum=weights.checksum)

    with report.step("plan"):
        images_version = table_version(spark, out.images)
        assert images_version is not None
        images = read(spark, out.images, images_version)
        existing = read_table(spark, out.embeddings)
        if existing is not None:
            require_columns(existing, out.embeddings_table, EMBEDDING_COLUMNS, "output.embeddings_table")
            ensure_features(spark, out.embeddings)
            existing = read_table(spark, out.embeddings)
        state = commit_state(spark, out.embeddings,
                             lambda s: s.get("model_key") == key and "images_table_version" in s)
        m["images_table_version"] = images_version
        if existing is not None and state is not None and int(state[1]["images_table_version"]) == images_version:
            # The images table has not changed since this model's last commit: nothing to embed or remove.
            m.update(images_sync="incremental", rows_considered=0, embedded=0, skipped=0, removed=0, errors={},
                     python_workers=0, model_loads=0, workers_warmed_up=0, batches=0, device=[], precision=[],
                     embed_seconds=0.0, embeddings_table_version=table_version(spark, out.embeddings))
            return
        reason, keys = _changed_images(spark, out.images, existing, state, images_version)
        m["images_sync"] = reason or "incremental"
        current = images.select("image_id", "sha256", "path", "error")
        mine = None if existing is None else existing.where(F.col("model_key") == key)
        if keys is not None:
            # The changed image_ids as ranges too: Delta then reads only the data files that may hold them.
            ids = literal_keys(keys, "image_id")
            if ids is not None:
                near = in_ranges("image_id", key_ranges(ids))
                current = current.where(near)
                mine = None if mine is None else mine.where(near)
            current = current.join(F.broadcast(keys), "image_id", "left_semi")
            mine = None if mine is None else mine.join(F.broadcast(keys), "image_id", "left_semi")
        wanted = select_todo(current, mine, key).persist(StorageLevel.MEMORY_AND_DISK)
        stale = stale_rows(current, mine, key)
        m["rows_considered"], n_todo = concurrently(current.count, wanted.count)
        thumbnails = files.select("path", "sha256", "image")
        if keys is not None and 0 < n_todo <= MAX_LISTED_PATHS:
            # Only the data files that hold these thumbnails are read (Delta skips the others by path range).
            paths = [r["path"] for r in wanted.select("path").collect()]
            thumbnails = thumbnails.where(in_ranges("path", path_ranges(paths)))
        todo = wanted.join(thumbnails, ["path", "sha256"]).select("image_id", "sha256", "image")
        # Spread the images over every task slot (every core, or every GPU share) of the cluster.
        todo = todo.repartition(mc.partitions or default_parallelism(spark))
    # The embedding UDF's own batch size, for this stage only (stage 1 keeps its smaller batches of whole files).
    with session_conf(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(mc.arrow_batch_rows)}):
        embedded_at = utcnow()
        started = time.monotonic()
        result = todo.withColumn("_e", embed_column(F.col("image"), settings)).select(
            "image_id", F.lit(key).alias("model_key"), "sha256", F.col("_e.embedding").alias("embedding"),
            F.lit(mc.name).alias("model"), F.lit(weights.checksum).alias("weights_checksum"),
            F.lit(preprocess_id).alias("preprocess_id"), F.lit(mc.normalize).alias("normalized"),
            F.col("_e.precision").alias("precision"), F.col("_e.device").alias("device"),
            F.col("_e.error").alias("error"), F.lit(report.run_id).alias("run_id"),
            F.lit(embedded_at).cast("timestamp").alias("embedded_at"),
            F.col("_e.worker_pid").alias("_pid"), F.col("_e.model_loads").alias("_loads"),
            F.col("_e.worker_batches").alias("_batches"), F.col("_e.warmed").alias("_warmed"),
        ).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            with report.step("embed"), Progress(spark, "embed", n_todo, "images"):
                # Nothing to embed (a rerun): no job at all, so no Python worker starts.
                stats = (result.agg(F.count(F.lit(1)).alias("rows"), F.count("embedding").alias("ok")).first()
                         if n_todo else {"rows": 0, "ok": 0})
            assert stats is not None
            m["embed_seconds"] = round(time.monotonic() - started, 3)
            workers = result.groupBy("_pid").agg(
                F.max("_loads").alias("loads"), F.min(F.col("_warmed").cast("int")).alias("warmed"),
                F.max("_batches").alias("batches"), F.min("_batches").alias("first"),
                F.collect_set("device").alias("devices"), F.collect_set("precision").alias("precisions")
            ).collect() if n_todo else []
            m["python_workers"] = len(workers)
            m["model_loads"] = sum(int(r["loads"]) for r in workers)
            # Workers whose first task found the model loaded or loading: by stage 1 of `run`, or an earlier run.
            m["workers_warmed_up"] = sum(int(r["warmed"]) for r in workers)
            m["batches"] = sum(int(r["batches"]) - int(r["first"]) + 1 for r in workers)
            m["embedded"] = int(stats["ok"])
            m["errors"] = errors_by_reason(result) if n_todo else {}
            m["device"] = sorted({d for r in workers for d in r["devices"] if d})
            m["precision"] = sorted({p for r in workers for p in r["precisions"] if p})
            if m["embedded"]:
                with report.step("drift"):
                    m["drift"] = run_drift(result, existing, key)
            n_stale = stale.count() if stale is not None else 0
            m["skipped"] = m["rows_considered"] - int(stats["rows"])
            m["removed"] = n_stale
            # Recorded with the commit: the images-table version these embeddings reflect.
            reached = {"model_key": key, "images_table_version": images_version}
            if int(stats["rows"]) or n_stale or existing is None:
                with report.step("write_embeddings_table"):
                    rows = clustered(result.select(*EMBEDDING_COLUMNS), "image_id", int(stats["rows"]),
                                     ROWS_PER_EMBEDDINGS_FILE)
                    _, m["embeddings_table_attempts"] = with_commit_retries(str(out.embeddings), lambda: merge_changes(
                        spark, out.embeddings, rows, stale, ["image_id", "model_key"], metadata=reached,
                        target_filter=_merge_scope(key, result, int(stats["rows"]), stale, n_stale)))
            elif state is None or state[1]["images_table_version"] != images_version:
                record_state(spark, out.embeddings, reached)  # nothing to embed, but later runs start here
        finally:
            result.unpersist()
            wanted.unpersist()
            if keys is not None:
                keys.unpersist()
    m["embeddings_table_version"] = table_version(spark, out.embeddings)
