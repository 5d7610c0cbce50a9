"""Stage 2: embed the images table's downscaled images into ``output.embeddings_table``.

Rows are keyed by ``image_id`` and ``model_key`` (model name, weights checksum, preprocessing and
normalization): a second model or new weights add rows of their own, never mix with the old ones. An image
is embedded again only when its content sha256 changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from image_embeddings.core.backbones import model_spec
from image_embeddings.core.config import AppConfig
from image_embeddings.core.lease import leased
from image_embeddings.core.progress import Progress
from image_embeddings.core.report import RunReport, errors_by_reason, run_reported, utcnow
from image_embeddings.core.spark import concurrently, default_parallelism, persisted, session_conf
from image_embeddings.core.tables import (
    Table,
    changes_since,
    clustered,
    commit_state,
    ensure_features,
    in_ranges,
    key_ranges,
    key_scope,
    literal_keys,
    merge_changes,
    path_ranges,
    ranges_sql,
    read,
    read_table,
    record_state,
    require_columns,
    sql_string,
    table_version,
    with_commit_retries,
)
from image_embeddings.embed.drift import run_drift
from image_embeddings.embed.embedder import EmbedderSettings, Weights
from image_embeddings.embed.identity import embedder_settings, model_key, resolve_config_weights

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

EMBED_STRUCT = ("embedding ARRAY<FLOAT>, error STRING, device STRING, precision STRING, worker_pid INT, "
                "model_loads INT, worker_batches INT, warmed BOOLEAN")
EMBEDDING_COLUMNS = ("image_id", "model_key", "sha256", "embedding", "model", "weights_checksum", "preprocess_id",
                     "normalized", "precision", "device", "error", "run_id", "embedded_at")


class EmbedError(RuntimeError):
    """Stage 2 cannot run with this input or config; the message says what to fix."""








def embed_column(image: Column, settings: EmbedderSettings) -> Column:
    """A struct column (embedding, error, device, precision, worker_pid, model_loads) from JPEG bytes.

    An Iterator pandas UDF: the model is loaded on the first batch a Python worker sees and kept in the
    process for every later batch and task (:func:`image_embeddings.embed.embedder.cached_embedder`).
    """
    from collections.abc import Iterator

    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def _embed(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        import os

        from image_embeddings.core.worker import prepare_worker
        from image_embeddings.embed.workers import cached_embedder, is_loaded_or_loading, load_count

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

    from image_embeddings.embed.embedder import task_device

    context = TaskContext.get()
    if context is None:
        return settings
    return dataclasses.replace(settings, threads=settings.threads or max(1, context.cpus()),
                               device=task_device(settings.device, context.resources()))


def warm_up_workers(spark: SparkSession, settings: EmbedderSettings) -> int:
    """Have the Python workers start loading the embedder in the background; return how many started.

    For ``run``: stage 1 starts it beside its listing and planning, which leave the cores partly idle; loading
    torch and the model then overlaps stage 1 instead of delaying stage 2's first batch. One tiny task per task
    slot; each returns at once (:func:`image_embeddings.embed.embedder.warm_up_in_background`). Never raises.
    """
    from collections.abc import Iterable, Iterator

    import pandas as pd

    def start(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from image_embeddings.core.worker import prepare_worker
        from image_embeddings.embed.workers import warm_up_in_background

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
    feed = changes_since(spark, images_path, int(state[1]["images_table_version"]), images_version, ("image_id",),
                         "images-table")
    return feed.reason, feed.changes


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
    """Stage 2 as its phases: check the inputs -> plan (the images to embed) -> embed -> write the embeddings."""
    inputs = _inputs(spark, config)
    report.metrics.update(model=config.model.name, model_key=inputs.key, weights=config.model.weights,
                          weights_checksum=inputs.weights.checksum)
    with ExitStack() as cached:
        with report.step("plan"):
            plan = _plan(spark, config, inputs, cached)
        report.metrics.update(plan.metrics())
        if plan.todo is None:  # the images table has not changed since this model's last commit
            report.metrics.update(UNCHANGED)
        else:
            result = _embedded_rows(spark, config, inputs, plan, report.run_id, cached)
            with report.step("embed"), Progress(spark, "embed", plan.to_embed, "images"):
                summary = summarize_embedded(result, plan.to_embed, time.monotonic())
            report.metrics.update(summary.metrics(plan.considered))
            if summary.embedded:
                with report.step("drift"):
                    report.metrics["drift"] = run_drift(result, plan.existing, inputs.key)
            write = _write_embeddings(spark, config, inputs.key, plan, result, summary.rows, report)
            report.metrics.update(write.metrics())
    report.metrics["embeddings_table_version"] = table_version(spark, config.output.embeddings)


# The report of a run that found the images table as this model's last commit left it.
UNCHANGED: dict[str, Any] = dict(rows_considered=0, embedded=0, skipped=0, removed=0, errors={}, python_workers=0,
                                 model_loads=0, workers_warmed_up=0, batches=0, device=[], precision=[],
                                 embed_seconds=0.0)


@dataclass(frozen=True)
class _Inputs:
    """Stage 2's checked inputs: the files table (thumbnails), the weights, the embedder and the model key."""

    files: DataFrame
    weights: Weights
    settings: EmbedderSettings
    key: str


def _inputs(spark: SparkSession, config: AppConfig) -> _Inputs:
    """Check that stage 1's tables exist and fit this model, and resolve the weights (or fail in one line)."""
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
    key = model_key(mc.name, weights.checksum, config.preprocess.preprocess_id, mc.normalize)
    return _Inputs(files, weights, embedder_settings(config, weights), key)


@dataclass(frozen=True)
class EmbedPlan:
    """What this run embeds: the images-table version it reflects, this model's state, the rows to embed
    (``todo``; None when nothing changed) and the stale rows to remove."""

    images_version: int
    existing: DataFrame | None
    state: tuple[int, dict[str, Any]] | None
    sync: str
    todo: DataFrame | None = None
    stale: DataFrame | None = None
    considered: int = 0
    to_embed: int = 0

    def metrics(self) -> dict[str, Any]:
        return {"images_table_version": self.images_version, "images_sync": self.sync,
                "rows_considered": self.considered}


def _plan(spark: SparkSession, config: AppConfig, inputs: _Inputs, cached: ExitStack) -> EmbedPlan:
    """The images whose embedding for this model is missing or out of date, read only where they changed."""
    from pyspark.sql import functions as F

    out, key = config.output, inputs.key
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
    if existing is not None and state is not None and int(state[1]["images_table_version"]) == images_version:
        return EmbedPlan(images_version, existing, state, "incremental")
    reason, keys = _changed_images(spark, out.images, existing, state, images_version)
    current = images.select("image_id", "sha256", "path", "error")
    mine = None if existing is None else existing.where(F.col("model_key") == key)
    if keys is not None:
        scope = key_scope(persisted(cached, keys), "image_id")
        current, mine = scope.restrict(current), None if mine is None else scope.restrict(mine)
    wanted = persisted(cached, select_todo(current, mine, key))
    considered, to_embed = concurrently(current.count, wanted.count)
    thumbnails = inputs.files.select("path", "sha256", "image")
    if keys is not None and 0 < to_embed <= MAX_LISTED_PATHS:
        # Only the data files that hold these thumbnails are read (Delta skips the others by path range).
        paths = [r["path"] for r in wanted.select("path").collect()]
        thumbnails = thumbnails.where(in_ranges("path", path_ranges(paths)))
    todo = wanted.join(thumbnails, ["path", "sha256"]).select("image_id", "sha256", "image")
    # Spread the images over every task slot (every core, or every GPU share) of the cluster.
    todo = todo.repartition(config.model.partitions or default_parallelism(spark))
    return EmbedPlan(images_version, existing, state, reason or "incremental", todo,
                     stale_rows(current, mine, key), considered, to_embed)


def _embedded_rows(spark: SparkSession, config: AppConfig, inputs: _Inputs, plan: EmbedPlan, run_id: str,
                   cached: ExitStack) -> DataFrame:
    """The embeddings-table rows of ``plan.todo`` (with each worker's counters), cached: computed by one job."""
    from pyspark.sql import functions as F

    mc = config.model
    assert plan.todo is not None
    # The embedding UDF's own batch size, for this stage only (stage 1 keeps its smaller batches of whole files).
    cached.enter_context(session_conf(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch":
                                              str(mc.arrow_batch_rows)}))
    result = plan.todo.withColumn("_e", embed_column(F.col("image"), inputs.settings)).select(
        "image_id", F.lit(inputs.key).alias("model_key"), "sha256", F.col("_e.embedding").alias("embedding"),
        F.lit(mc.name).alias("model"), F.lit(inputs.weights.checksum).alias("weights_checksum"),
        F.lit(config.preprocess.preprocess_id).alias("preprocess_id"), F.lit(mc.normalize).alias("normalized"),
        F.col("_e.precision").alias("precision"), F.col("_e.device").alias("device"),
        F.col("_e.error").alias("error"), F.lit(run_id).alias("run_id"),
        F.lit(utcnow()).cast("timestamp").alias("embedded_at"),
        F.col("_e.worker_pid").alias("_pid"), F.col("_e.model_loads").alias("_loads"),
        F.col("_e.worker_batches").alias("_batches"), F.col("_e.warmed").alias("_warmed"),
    )
    return persisted(cached, result)


@dataclass(frozen=True)
class EmbedSummary:
    """What one embedding job did: rows, rows embedded, errors by reason, and its Python workers' counters."""

    rows: int = 0
    embedded: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 0
    model_loads: int = 0
    warmed_up: int = 0  # workers whose first task found the model loaded or loading (stage 1 of `run`, or earlier)
    batches: int = 0
    devices: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()

    def metrics(self, considered: int) -> dict[str, Any]:
        return {"embed_seconds": self.seconds, "python_workers": self.workers, "model_loads": self.model_loads,
                "workers_warmed_up": self.warmed_up, "batches": self.batches, "embedded": self.embedded,
                "errors": dict(self.errors), "device": list(self.devices), "precision": list(self.precisions),
                "skipped": considered - self.rows}


def summarize_embedded(result: DataFrame, to_embed: int, started: float) -> EmbedSummary:
    """Run the embedding job (none when there is nothing to embed: no Python worker starts) and summarize it."""
    from pyspark.sql import functions as F

    if not to_embed:
        return EmbedSummary(seconds=round(time.monotonic() - started, 3))
    stats = result.agg(F.count(F.lit(1)).alias("rows"), F.count("embedding").alias("ok")).first()
    assert stats is not None
    seconds = round(time.monotonic() - started, 3)
    workers = result.groupBy("_pid").agg(
        F.max("_loads").alias("loads"), F.min(F.col("_warmed").cast("int")).alias("warmed"),
        F.max("_batches").alias("batches"), F.min("_batches").alias("first"),
        F.collect_set("device").alias("devices"), F.collect_set("precision").alias("precisions")).collect()
    return EmbedSummary(
        rows=int(stats["rows"]), embedded=int(stats["ok"]), errors=errors_by_reason(result), seconds=seconds,
        workers=len(workers), model_loads=sum(int(r["loads"]) for r in workers),
        warmed_up=sum(int(r["warmed"]) for r in workers),
        batches=sum(int(r["batches"]) - int(r["first"]) + 1 for r in workers),
        devices=tuple(sorted({d for r in workers for d in r["devices"] if d})),
        precisions=tuple(sorted({p for r in workers for p in r["precisions"] if p})))


@dataclass(frozen=True)
class WriteResult:
    """What a run wrote to its table: rows removed, and the commit attempts (0: nothing written)."""

    removed: int
    attempts: int = 0

    def metrics(self) -> dict[str, Any]:
        return {"removed": self.removed, **({"embeddings_table_attempts": self.attempts} if self.attempts else {})}


def _write_embeddings(spark: SparkSession, config: AppConfig, key: str, plan: EmbedPlan, result: DataFrame,
                      rows: int, report: RunReport) -> WriteResult:
    """Merge the new embeddings and remove the stale ones; the commit records the images-table version."""
    table, stale = config.output.embeddings, plan.stale
    n_stale = stale.count() if stale is not None else 0
    reached = {"model_key": key, "images_table_version": plan.images_version}
    if rows or n_stale or plan.existing is None:
        with report.step("write_embeddings_table"):
            written = clustered(result.select(*EMBEDDING_COLUMNS), "image_id", rows, ROWS_PER_EMBEDDINGS_FILE)
            _, attempts = with_commit_retries(str(table), lambda: merge_changes(
                spark, table, written, stale, ["image_id", "model_key"], metadata=reached,
                target_filter=_merge_scope(key, result, rows, stale, n_stale)))
        return WriteResult(n_stale, attempts)
    if plan.state is None or plan.state[1]["images_table_version"] != plan.images_version:
        record_state(spark, table, reached)  # nothing to embed, but later runs start here
    return WriteResult(n_stale)
