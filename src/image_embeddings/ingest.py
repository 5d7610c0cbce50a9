"""Stage 1: list images, decode and downscale the new ones, join sales, write Delta.

State lives in two Delta tables:

* the files table (``output.files_table``, default ``<images_table>_files``): one row per listed file,
  keyed by ``path``, with its metadata, content sha256, the downscaled JPEG or an ``error``. It decides
  what is new: a file whose path, size and modification time are unchanged is never read again.
* the images table (``output.images_table``): one row per ``image_id`` (duplicates resolved by
  :func:`resolve_duplicates`), joined with the sales table. It is brought up to date by a diff, so a
  rerun on unchanged input writes nothing and a change in sales updates rows without decoding images.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from image_embeddings.config import AppConfig, PreprocessConfig
from image_embeddings.embed import warm_up_workers
from image_embeddings.embedder import EmbedderSettings
from image_embeddings.errors import EMPTY, NO_IMAGE_ID, UNREADABLE, reason_column
from image_embeddings.lease import leased
from image_embeddings.progress import Progress
from image_embeddings.report import RunReport, errors_by_reason, run_reported, utcnow
from image_embeddings.spark import analyzed, concurrently, local_frame, runtime_settings, session_conf
from image_embeddings.tables import (
    Table,
    add_columns,
    clustered,
    commit_state,
    create,
    ensure_features,
    in_ranges,
    key_ranges,
    literal_keys,
    merge_changes,
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
from image_embeddings.uri import qualify

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

DECODE_STRUCT = "image BINARY, width INT, height INT, error STRING, sha256 STRING"
FILE_COLUMNS = ("path", "image_id", "file_size", "modification_time", "sha256", "width", "height", "image",
                "error", "preprocess_id", "run_id", "ingested_at")
# Every column but the thumbnail, which only the files table stores.
NARROW_FILE_COLUMNS = tuple(c for c in FILE_COLUMNS if c != "image")
IMAGE_COLUMNS = ("image_id", "path", "file_size", "modification_time", "sha256", "width", "height",
                 "error", "preprocess_id", "run_id", "ingested_at", "duplicate_files")


class IngestError(RuntimeError):
    """Stage 1 cannot run with this input; the message says what to fix."""


# ---------------------------------------------------------------------------------------------------------
# readers


def list_files(spark: SparkSession, root: str, extensions: tuple[str, ...]) -> DataFrame:
    """List image files under ``root`` recursively without reading their content.

    Spark's scan skips zero-byte files, so those are taken from the file index and listed with size 0 and
    no modification time.
    """
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F

    try:
        df = _scan(spark, root, extensions)
    except AnalysisException as exc:
        raise IngestError(f"input.images: cannot list {root}: {exc}") from exc
    listing = select_extensions(df.select("path", F.col("length").alias("file_size"),
                                          F.col("modificationTime").alias("modification_time")), extensions)
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    indexed = [(p,) for p in map(_uri_to_path, df.inputFiles()) if p.lower().endswith(suffixes)]
    if not indexed:
        return listing
    every = local_frame(spark, indexed, "path STRING")
    empty = every.join(listing, "path", "left_anti").select(
        "path", F.lit(0).cast("long").alias("file_size"), F.lit(None).cast("timestamp").alias("modification_time"))
    return listing.unionByName(empty)


def _scan(spark: SparkSession, root: str, extensions: tuple[str, ...]) -> DataFrame:
    """Spark's binaryFile scan of the image files under ``root``; its file index is listed when it is created."""
    return analyzed(spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                    .option("pathGlobFilter", extensions_glob(extensions)).load(root))


def _uri_to_path(uri: str) -> str:
    """Turn a file-index URI (``file:///a%20b.jpg``) into the form of the scan's path column."""
    from urllib.parse import unquote

    path = unquote(uri)
    return "file:/" + path[len("file:///"):] if path.startswith("file:///") else path


def read_contents(spark: SparkSession, locations: list[str], max_file_bytes: int,
                  extensions: tuple[str, ...] | None = None) -> DataFrame:
    """Read file contents of the given files or folders; files above the byte limit are never opened."""
    from pyspark.sql import functions as F

    # A file deleted after the scan listed it is left out (and found missing by the caller), not a failed job.
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("ignoreMissingFiles", "true")
    if extensions:
        reader = reader.option("pathGlobFilter", extensions_glob(extensions))
    df = analyzed(reader.load([_escape_glob(p) for p in locations]))
    return df.where(F.col("length") <= max_file_bytes).select(
        "path", F.col("length").alias("file_size"), F.col("modificationTime").alias("modification_time"),
        "content")


def read_planned(spark: SparkSession, root: str, paths: list[str] | None, max_file_bytes: int,
                 extensions: tuple[str, ...], attempts: int = 3) -> DataFrame | None:
    """Contents of the files a run planned to read: every file under ``root`` (``paths`` None) or those ``paths``.

    Planned paths deleted since the listing are left out (None when none is left): Spark refuses to load a list
    that names a missing file, so the folder is listed again and the paths still there are read.
    """
    from pyspark.errors import AnalysisException

    for _ in range(attempts):
        try:
            return read_contents(spark, [root] if paths is None else paths, max_file_bytes, extensions)
        except AnalysisException as exc:
            if paths is None or "PATH_NOT_FOUND" not in str(exc):
                raise
            there = {_uri_to_path(uri) for uri in _scan(spark, root, extensions).inputFiles()}
            left = [p for p in paths if p in there]
            log.warning("%d of %d files to read were deleted after the listing", len(paths) - len(left), len(paths))
            if not left:
                return None
            paths = left
    raise IngestError(f"input.images: files under {root} kept disappearing while the run read them")


def read_sales(spark: SparkSession, location: str, key: str) -> DataFrame:
    """Read the sales Parquet table and name its join key ``image_id`` (as a string)."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F

    try:
        sales = analyzed(spark.read.parquet(location))
    except AnalysisException as exc:
        raise IngestError(f"input.sales: cannot read Parquet at {location}: {exc}") from exc
    if key not in sales.columns:
        raise IngestError(f"input.sales_key: column {key!r} is not in the sales table "
                          f"(columns: {', '.join(sales.columns)})")
    if key != "image_id" and "image_id" in sales.columns:
        raise IngestError(f"input.sales_key: the sales table has both {key!r} and 'image_id'; "
                          "rename one of them")
    column = F.col(key)
    if dict(sales.dtypes)[key] in ("float", "double"):
        # A whole-number float key (an int column with gaps, saved by pandas) joins as "12", not "12.0".
        column = F.when(column == F.floor(column), column.cast("long").cast("string")).otherwise(column.cast("string"))
    else:
        column = column.cast("string")
    return sales.withColumn(key, column).withColumnRenamed(key, "image_id")


def _escape_glob(location: str) -> str:
    """Escape Hadoop glob characters so a file named ``a[1].jpg`` is read as itself."""
    return "".join("\\" + c if c in "{}[]*?\\" else c for c in location)


# ---------------------------------------------------------------------------------------------------------
# transforms


def extensions_glob(extensions: tuple[str, ...]) -> str:
    """A Hadoop glob for file names with these extensions in any letter case: ``*.{[jJ][pP][gG],...}``.

    ``pathGlobFilter`` is case-sensitive, so each letter becomes a class; the filter then works inside the file
    listing, and files of other types are neither listed nor read.
    """
    def any_case(ext: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in ext.lstrip("."))

    return "*.{" + ",".join(any_case(e) for e in extensions) + "}"


def select_extensions(df: DataFrame, extensions: tuple[str, ...]) -> DataFrame:
    """Keep rows whose ``path`` ends in one of ``extensions``, ignoring case."""
    from pyspark.sql import functions as F

    alternatives = "|".join(e.lower().lstrip(".") for e in extensions)
    return df.where(F.lower(F.col("path")).rlike(rf"\.({alternatives})$"))


def with_image_id(df: DataFrame, pattern: str) -> DataFrame:
    """Add ``image_id``: group 1 of ``pattern`` matched against the file name (null when it does not match)."""
    from pyspark.sql import functions as F

    name = F.regexp_extract(F.col("path"), r"([^/]+)$", 1)
    image_id = F.regexp_extract(name, pattern, 1)
    return df.withColumn("image_id", F.when(image_id != "", image_id))


def plan_files(listing: DataFrame, files: DataFrame | None, scope: str, preprocess_id: str,
               max_file_bytes: int, track_deletions: bool = True) -> DataFrame:
    """Compare a listing with the files table and give each path a ``status``.

    ``new``, ``changed`` (size, modification time or preprocessing differ), ``retry`` (an earlier run could
    not read it, or it was too large for a limit since raised), ``unchanged``, and ``removed`` (in the
    table under ``scope`` but no longer listed).
    """
    from pyspark.sql import functions as F

    listed = listing.withColumn("_listed", F.lit(True))
    if files is None:
        return listed.drop("_listed").withColumn("status", F.lit("new"))
    known = files.select(
        "path", F.col("file_size").alias("_old_size"),
        F.col("modification_time").alias("_old_mtime"), F.col("error").alias("_old_error"),
        F.col("preprocess_id").alias("_old_preprocess"), F.col("image_id").alias("_old_image_id"))
    joined = listed.join(known, "path", "full_outer")
    old_reason = reason_column(F.col("_old_error"))
    in_scope = F.col("path").startswith(scope.rstrip("/") + "/")
    status = (
        F.when(F.col("_listed").isNull(),
               F.when(in_scope & F.lit(track_deletions), F.lit("removed")))
        .when(F.col("_old_size").isNull(), F.lit("new"))
        .when((F.col("file_size") != F.col("_old_size"))
              | (F.col("modification_time") != F.col("_old_mtime"))
              | (F.col("preprocess_id") != F.col("_old_preprocess"))
              | ~F.col("image_id").eqNullSafe(F.col("_old_image_id")), F.lit("changed"))
        .when((old_reason == "unreadable")
              | ((old_reason == "too_large") & (F.col("file_size") <= max_file_bytes)), F.lit("retry"))
        .otherwise(F.lit("unchanged"))
    )
    return (
        joined.withColumn("preprocess_id", F.lit(preprocess_id))
        .withColumn("status", status)
        .where(F.col("status").isNotNull())
        .withColumn("image_id", F.when(F.col("_listed"), F.col("image_id")).otherwise(F.col("_old_image_id")))
        .select("path", "file_size", "modification_time", "image_id", "status")
    )


def downscale_column(content: Column, pre: PreprocessConfig) -> Column:
    """Return a struct column (image, width, height, error, sha256) decoded from file ``content``."""
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    size, mode, quality = pre.size, pre.mode, pre.jpeg_quality
    max_pixels, crop_fraction = pre.max_pixels, pre.crop_fraction

    def _downscale(contents: pd.Series) -> pd.DataFrame:
        import hashlib

        from image_embeddings.images import downscale
        from image_embeddings.worker import prepare_worker

        prepare_worker()

        out: dict[str, list[Any]] = {"image": [], "width": [], "height": [], "error": [], "sha256": []}
        for data in contents:
            result = downscale(data, size=size, mode=mode, quality=quality, max_pixels=max_pixels,
                               crop_fraction=crop_fraction)
            out["image"].append(result.image)
            out["width"].append(result.width)
            out["height"].append(result.height)
            out["error"].append(result.error)
            out["sha256"].append(hashlib.sha256(data).hexdigest() if data is not None else None)
        return pd.DataFrame({
            "image": pd.Series(out["image"], dtype=object),
            "width": pd.array(out["width"], dtype="Int32"),
            "height": pd.array(out["height"], dtype="Int32"),
            "error": pd.Series(out["error"], dtype=object),
            "sha256": pd.Series(out["sha256"], dtype=object),
        })

    # Real classes, not the strings of `from __future__ import annotations`: Spark reads them.
    _downscale.__annotations__ = {"contents": pd.Series, "return": pd.DataFrame}
    return pandas_udf(_downscale, DECODE_STRUCT)(content)  # type: ignore[call-overload]


def decode_files(files: DataFrame, pre: PreprocessConfig, run_id: str, ingested_at: Any) -> DataFrame:
    """Turn rows of (path, image_id, file_size, modification_time, content) into files-table rows."""
    from pyspark.sql import functions as F

    decoded = files.withColumn("_d", downscale_column(F.col("content"), pre))
    error = F.when(F.col("image_id").isNull(), F.lit(NO_IMAGE_ID)).otherwise(F.col("_d.error"))
    return decoded.select(
        "path", "image_id", "file_size", "modification_time",
        F.col("_d.sha256").alias("sha256"), F.col("_d.width").alias("width"),
        F.col("_d.height").alias("height"),
        F.when(error.isNull(), F.col("_d.image")).alias("image"),
        error.alias("error"),
        F.lit(pre.preprocess_id).alias("preprocess_id"),
        F.lit(run_id).alias("run_id"),
        F.lit(ingested_at).cast("timestamp").alias("ingested_at"),
    )


def error_rows(todo: DataFrame, error: Column, preprocess_id: str, run_id: str, ingested_at: Any) -> DataFrame:
    """Files-table rows for files that were not decoded (too large, unreadable), with ``error``."""
    from pyspark.sql import functions as F

    return todo.select(
        "path", "image_id", "file_size", "modification_time",
        F.lit(None).cast("string").alias("sha256"), F.lit(None).cast("int").alias("width"),
        F.lit(None).cast("int").alias("height"), F.lit(None).cast("binary").alias("image"),
        error.alias("error"), F.lit(preprocess_id).alias("preprocess_id"),
        F.lit(run_id).alias("run_id"), F.lit(ingested_at).cast("timestamp").alias("ingested_at"))


def too_large_error(max_file_bytes: int) -> Column:
    """The error of a file over ``input.max_file_bytes``."""
    from pyspark.sql import functions as F

    return F.concat(F.lit("too_large: "), F.col("file_size").cast("string"),
                    F.lit(f" bytes > input.max_file_bytes {max_file_bytes}"))


def resolve_duplicates(files: DataFrame) -> DataFrame:
    """Keep one file per ``image_id``: the latest modification time wins, then the smallest path.

    Adds ``duplicate_files``: how many other files had the same ``image_id``. Files without an image_id
    are dropped.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    by_id = Window.partitionBy("image_id")
    ordered = by_id.orderBy(F.col("modification_time").desc(), F.col("path").asc())
    return (
        files.where(F.col("image_id").isNotNull())
        .withColumn("_rank", F.row_number().over(ordered))
        .withColumn("duplicate_files", (F.count(F.lit(1)).over(by_id) - 1).cast("int"))
        .where(F.col("_rank") == 1)
        .drop("_rank")
    )


def join_sales(images: DataFrame, sales: DataFrame, how: str) -> DataFrame:
    """Join images with sales on ``image_id`` (``inner`` or ``left``)."""
    clash = sorted(set(images.columns) & set(sales.columns) - {"image_id"})
    if clash:
        raise IngestError(f"sales columns {', '.join(clash)} clash with image columns; rename them in the "
                          "sales table")
    return images.join(sales, "image_id", how)


def fingerprint(df: DataFrame, exclude: tuple[str, ...] = ("image", "updated_run_id", "updated_at")) -> Column:
    """A 64-bit hash of every column but the excluded ones, to find rows that changed.

    ``xxhash64`` skips nulls, so each column's null flag is hashed too: ``(1, null)`` and ``(null, 1)`` differ.
    """
    from pyspark.sql import functions as F

    columns = [F.col(f"`{c}`") for c in sorted(df.columns) if c not in exclude]
    return F.xxhash64(*columns, *(c.isNull() for c in columns))


# ---------------------------------------------------------------------------------------------------------
# the job


@leased('ingest')
def run_ingest(spark: SparkSession, config: AppConfig, run_id: str | None = None,
               report_file: str | None = None, run_date: str | None = None,
               warm_up: EmbedderSettings | None = None) -> RunReport:
    """Run stage 1 once and return its report (also logged, written to ``report_file`` and the runs table).

    ``warm_up``: the settings of a stage 2 that follows in this session. Once stage 1 has decoded files, its model
    starts loading in the background of stage 1's Python workers, beside the table writes (JVM work that leaves
    cores idle), instead of at stage 2's first batch. Not beside the decoding: there it took a core from it (on
    2 cores, 2,000 photos decoded in 9.8 s instead of 6.3 s). A run with nothing to decode loads nothing.
    """
    def work(report: RunReport) -> None:
        # Stage 1's Arrow batches carry whole files: keep them small even if another stage changed the setting.
        with session_conf(spark, runtime_settings(config)), ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="warm-up") as warming:
            def start_warm_up() -> None:
                if warm_up is not None:  # never raises; waited for on the way out
                    report.metrics["model_warm_up"] = True
                    warming.submit(warm_up_workers, spark, warm_up)

            _ingest(spark, config, report, start_warm_up)

    return run_reported("ingest", work, spark, config.output.runs,
                        run_id, report_file, run_date, rate=("files_decoded", None))


# Files-table rows per data file a run writes (about 7 MB of 224x224 thumbnails), in path order: a night's
# changes touch the few files of its folders, and the files table's MERGE (no deletion vectors, see
# tables.table_features) rewrites only those.
ROWS_PER_WRITTEN_FILE = 500

TO_DO = ("new", "changed", "retry")  # the plan's statuses of files this run decodes (or records as errors)


def _ingest(spark: SparkSession, config: AppConfig, report: RunReport,
            on_decoded: Callable[[], None] = lambda: None) -> None:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    inp, out, pre = config.input, config.output, config.preprocess
    started = time.monotonic()
    root = qualify(inp.images)
    m = report.metrics
    m["input_images"] = root
    m["preprocess_id"] = pre.preprocess_id

    def check_sales() -> tuple[DataFrame, str, tuple[int, dict[str, Any]] | None]:
        sales = read_sales(spark, inp.sales, inp.sales_key)
        sales_fp = sales_fingerprint(spark, inp.sales)
        images_state = commit_state(spark, out.images, lambda s: "files_table_version" in s)
        # Sales files that have not changed since the images table was last brought up to date passed it then.
        if images_state is None or images_state[1].get("sales") != sales_fp:
            _check_sales_keys(sales, inp.sales_key)
        return sales, sales_fp, images_state

    # The sales table is read and its keys checked beside listing and planning (the driver's work of each overlaps
    # the other's Spark jobs); nothing is read or written before it passed.
    sales_check = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sales-check")
    sales_checked = sales_check.submit(check_sales)
    sales_check.shutdown(wait=False)

    with report.step("list"):
        listing = with_image_id(list_files(spark, root, inp.extensions), inp.image_id_pattern)
        files = read_table(spark, out.files)
        if files is not None:
            require_columns(files, out.files_table_path, FILE_COLUMNS, "output.files_table")
            ensure_features(spark, out.files)
            files = read_table(spark, out.files)
        images_now = read_table(spark, out.images)
        if images_now is not None:
            require_columns(images_now, out.images_table, (*IMAGE_COLUMNS, "updated_run_id", "updated_at"),
                            "output.images_table")
    # Only the files-table rows under the listed folder: Delta skips the data files of other folders (days) by
    # their path statistics, so planning reads what this run lists, not the whole table.
    scope = root.rstrip("/") + "/"
    in_scope = None if files is None else files.where(F.col("path").startswith(scope))
    plan = plan_files(listing, in_scope, root, pre.preprocess_id, inp.max_file_bytes, inp.track_deletions)
    plan = plan.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        readable = (F.col("file_size") > 0) & (F.col("file_size") <= inp.max_file_bytes)
        with report.step("plan"):
            # The path set only of the files to read: unchanged ones are most of a nightly listing.
            rows = plan.groupBy("status", readable.alias("readable")).agg(
                F.count(F.lit(1)).alias("count"), path_set(F.col("status").isin(*TO_DO) & readable).alias("paths")
            ).collect()
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + int(row["count"])
        for status in (*TO_DO, "unchanged", "removed"):
            m[f"files_{status}"] = counts.get(status, 0)
        m["files_listed"] = sum(v for k, v in counts.items() if k != "removed")
        todo = plan.where(F.col("status").isin(*TO_DO))
        to_read = todo.where(readable)
        planned = [r for r in rows if r["readable"] and r["status"] in TO_DO]
        n_to_read, paths_to_read = sum(int(r["count"]) for r in planned), xor_all(r["paths"] for r in planned)
        n_readable = sum(int(r["count"]) for r in rows if r["readable"] and r["status"] != "removed")
        with report.step("sales_check"):
            sales, sales_fp, images_state = sales_checked.result()
        ingested_at = utcnow()
        not_read = todo.where(~readable).withColumn("_error", F.when(
            F.col("file_size") == 0, F.lit(EMPTY)).otherwise(too_large_error(inp.max_file_bytes)))
        processed = error_rows(not_read, F.col("_error"), pre.preprocess_id, report.run_id, ingested_at)
        decoded = None
        contents = None if not n_to_read else read_planned(
            spark, root, None if n_to_read == n_readable else [row["path"] for row in to_read.select("path").collect()],
            inp.max_file_bytes, inp.extensions)
        if contents is not None:
            decoded = decode_files(with_image_id(select_extensions(contents, inp.extensions), inp.image_id_pattern),
                                   pre, report.run_id, ingested_at).persist(StorageLevel.MEMORY_AND_DISK)
            processed = decoded.unionByName(processed)
        try:
            with report.step("read_and_decode"), Progress(spark, "decode", n_to_read, "files"):
                # One job decodes every file and counts the outcome. Nothing else reads `decoded` before it is
                # cached: two jobs computing it at once would each decode every file.
                n_todo = sum(counts.get(status, 0) for status in TO_DO)
                summary: dict[str, Any] = (_summarize(processed) if n_todo
                                           else {"rows": 0, "read": 0, "bytes": 0, "errors": {}})
                if n_to_read and (summary["read"], summary["paths"]) != (n_to_read, paths_to_read):
                    # A listed file that could not be read now (deleted or grown past the limit meanwhile). Only
                    # looked for when the files read are not those planned: that costs a join job (0.4 s of 7 for
                    # 2,000 photos on 2 cores) in a run that found every file.
                    missing = to_read if decoded is None else to_read.join(decoded.select("path"), "path", "left_anti")
                    vanished = error_rows(missing, F.lit(UNREADABLE), pre.preprocess_id, report.run_id, ingested_at)
                    lost = _summarize(vanished)  # unreadable rows only: nothing read, no bytes
                    if lost["rows"]:
                        processed = processed.unionByName(vanished)
                        summary["rows"] += lost["rows"]
                        summary["errors"] = dict(sorted((Counter(summary["errors"]) + Counter(lost["errors"])).items()))
            if decoded is not None:
                on_decoded()
            m["files_read"] = summary["read"]
            m["files_decoded"] = summary["read"]
            m["bytes_read"] = summary["bytes"]
            m["errors"] = summary["errors"]
            removed = plan.where(F.col("status") == "removed").select("path")
            if summary["rows"] or m["files_removed"] or files is None:
                written = clustered(processed.select(*FILE_COLUMNS), "path", summary["rows"], ROWS_PER_WRITTEN_FILE)
                with report.step("write_files_table"):
                    _, m["files_table_attempts"] = with_commit_retries(str(out.files), lambda: merge_changes(
                        spark, out.files, written, removed, "path",
                        target_filter=f"startswith(t.path, {sql_string(scope)})"))
        finally:
            if decoded is not None:
                decoded.unpersist()
    finally:
        plan.unpersist()
    with report.step("write_images_table"):
        sync_images(spark, config, sales, sales_fp, images_state, report)
    m["stage_seconds"] = round(time.monotonic() - started, 3)


def _summarize(processed: DataFrame) -> dict[str, Any]:
    """Rows, files read, bytes read and errors by reason of files-table rows, in one Spark job."""
    from pyspark.sql import functions as F

    read = F.col("sha256").isNotNull()
    rows = processed.groupBy(reason_column(F.col("error")).alias("reason")).agg(
        F.count(F.lit(1)).alias("rows"), F.count("sha256").alias("read"),
        F.sum(F.when(read, F.col("file_size"))).alias("bytes"), path_set(read).alias("paths")).collect()
    return {
        "rows": sum(int(r["rows"]) for r in rows),
        "read": sum(int(r["read"]) for r in rows),
        "paths": xor_all(r["paths"] for r in rows),
        "bytes": sum(int(r["bytes"] or 0) for r in rows),
        "errors": {r["reason"]: int(r["rows"]) for r in sorted(rows, key=lambda r: r["reason"] or "")
                   if r["reason"] is not None},
    }


def path_set(where: Column | None = None) -> Column:
    """An aggregate that identifies the set of ``path`` values (of the rows ``where`` holds): the XOR of their
    64-bit hashes. Two sets of unique paths with equal counts and equal values are the same set (short of a
    1 in 2**64 chance); null when there are none."""
    from pyspark.sql import functions as F

    hashed = F.xxhash64("path")
    return F.bit_xor(hashed if where is None else F.when(where, hashed))


def xor_all(values: Iterable[int | None]) -> int:
    """The XOR of :func:`path_set` results (of groups of disjoint sets): the set of all of them."""
    result = 0
    for value in values:
        result ^= value or 0
    return result


def _check_sales_keys(sales: DataFrame, key: str) -> None:
    from pyspark.sql import functions as F

    dupes = (sales.where(F.col("image_id").isNotNull()).groupBy("image_id").count()
             .where(F.col("count") > 1).orderBy("image_id").limit(5).collect())
    if dupes:
        examples = ", ".join(f"{r['image_id']!r} x{r['count']}" for r in dupes)
        raise IngestError(f"input.sales: key column {key!r} has duplicate values ({examples}); the sales "
                          "table must hold at most one row per image")


def match_counts(images: DataFrame, sales: DataFrame) -> dict[str, int]:
    """Images, duplicates and how images and sales rows matched, in one Spark job."""
    from pyspark.sql import functions as F

    left = images.select("image_id", "duplicate_files", F.lit(True).alias("_img"))
    right = sales.where(F.col("image_id").isNotNull()).select("image_id", F.lit(True).alias("_sale"))
    rows = (left.join(right, "image_id", "full_outer")
            .groupBy(F.col("_img").isNotNull().alias("img"), F.col("_sale").isNotNull().alias("sale"))
            .agg(F.count(F.lit(1)).alias("count"), F.sum("duplicate_files").alias("duplicates")).collect())
    counts = {(r["img"], r["sale"]): int(r["count"]) for r in rows}
    return {
        "images": counts.get((True, True), 0) + counts.get((True, False), 0),
        "duplicate_files": sum(int(r["duplicates"] or 0) for r in rows),
        "joined": counts.get((True, True), 0),
        "images_without_sales": counts.get((True, False), 0),
        "sales_without_images": counts.get((False, True), 0),
    }


def sales_fingerprint(spark: SparkSession, location: str) -> str:
    """A hash of the sales table's files (paths, sizes, modification times), read from a listing only."""
    import hashlib

    from pyspark.sql import functions as F

    rows = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(location)
            .select("path", "length", F.col("modificationTime").cast("long").alias("mtime")).collect())
    text = "\n".join(f"{r['path']}|{r['length']}|{r['mtime']}" for r in sorted(rows, key=lambda r: r["path"]))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def first_states(changes: DataFrame) -> DataFrame:
    """For each path in a change data feed, the row it had before the first change (none if it was inserted)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    before = F.col("_change_type").isin("update_preimage", "delete")
    order = Window.partitionBy("path").orderBy(F.col("_commit_version"), F.when(before, 0).otherwise(1))
    return (changes.withColumn("_n", F.row_number().over(order)).where((F.col("_n") == 1) & before)
            .drop("_n", "_change_type", "_commit_version"))


def error_changes(changes: DataFrame) -> Counter[str]:
    """Errors by reason added minus removed by the file rows of a change data feed."""
    from pyspark.sql import functions as F

    sign = F.when(F.col("_change_type").isin("insert", "update_postimage"), 1).otherwise(-1)
    rows = (changes.where(F.col("error").isNotNull())
            .groupBy(reason_column(F.col("error")).alias("reason")).agg(F.sum(sign).alias("n")).collect())
    return Counter({r["reason"]: int(r["n"]) for r in rows})


TOTALS = ("images", "duplicate_files", "joined", "images_without_sales", "sales_without_images")


def sync_images(spark: SparkSession, config: AppConfig, sales: DataFrame, sales_fp: str,
                state: tuple[int, dict[str, Any]] | None, report: RunReport) -> None:
    """Bring the images table up to date with the files table and the sales, reading only what changed.

    The images table records, with each commit, the files-table version it reflects, the sales files'
    fingerprint and running totals. The next run reads the files table's change data feed after that version:
    only the image_ids it names are resolved again (their file rows looked up by key, thumbnails never read),
    joined with their sales rows and merged. A new table, a table of an older release, changed sales files or
    a change feed that is no longer readable (vacuumed) take the full path once: every image compared.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    inp, out, m = config.input, config.output, report.metrics
    files_version = table_version(spark, out.files)
    assert files_version is not None
    files = (read(spark, out.files, files_version)
             .select(*NARROW_FILE_COLUMNS))
    m["files_table_version"] = files_version
    existing = read_table(spark, out.images)
    resolved = resolve_duplicates(files)
    shape = schema_id(join_sales(resolved, sales, inp.join))  # analysis only, no job
    reason, changes = _incremental_source(spark, config, existing, state, sales_fp, files_version, shape)
    m["images_sync"] = reason or "incremental"
    recorded = {"files_table_version": files_version, "sales": sales_fp, "join": inp.join, "schema": shape}
    if reason is not None:
        errors, totals = concurrently(lambda: errors_by_reason(files), lambda: match_counts(resolved, sales))
        m.update(totals, errors_total=errors)
        _write_images(spark, join_sales(resolved, sales, inp.join), existing, out.images, report,
                      {**recorded, "totals": totals, "errors_total": errors}, changed_keys=None)
        return
    assert state is not None
    totals, errors = dict(state[1].get("totals", {})), Counter(state[1].get("errors_total", {}))
    if changes is None:  # the files table did not change since the images table was last brought up to date
        m.update(totals, errors_total=dict(sorted(errors.items())), images_upserted=0, images_deleted=0,
                 images_table_write="unchanged", images_table_version=table_version(spark, out.images))
        return
    persisted = changes.where(F.col("image_id").isNotNull()).select("image_id").distinct().persist(
        StorageLevel.MEMORY_AND_DISK)
    keys = F.broadcast(persisted)
    try:
        # The changed image_ids as ranges too: Delta (and Parquet, for the sales) skip files that cannot hold them.
        ids = literal_keys(persisted, "image_id")
        scope = None if ids is None else key_ranges(ids)

        def near(df: DataFrame) -> DataFrame:
            return df if scope is None else df.where(in_ranges("image_id", scope))

        after = near(files).join(keys, "image_id", "left_semi")
        before = after.join(changes.select("path"), "path", "left_anti").unionByName(
            first_states(changes).join(keys, "image_id", "left_semi"))
        sales_k = near(sales).join(keys, "image_id", "left_semi")
        resolved = resolve_duplicates(after)
        now, then, delta = concurrently(lambda: match_counts(resolved, sales_k),
                                        lambda: match_counts(resolve_duplicates(before), sales_k),
                                        lambda: error_changes(changes))
        totals = {k: int(totals.get(k, 0)) + now[k] - then[k] for k in TOTALS}
        errors.update(delta)
        errors_total = {k: v for k, v in sorted(errors.items()) if v}
        m.update(totals, errors_total=errors_total)
        _write_images(spark, join_sales(resolved, sales_k, inp.join), existing, out.images, report,
                      {**recorded, "totals": totals, "errors_total": errors_total}, changed_keys=keys,
                      key_scope=scope)
    finally:
        persisted.unpersist()
        changes.unpersist()


def _incremental_source(spark: SparkSession, config: AppConfig, existing: DataFrame | None,
                        state: tuple[int, dict[str, Any]] | None, sales_fp: str,
                        files_version: int, shape: str) -> tuple[str | None, DataFrame | None]:
    """Why the images table needs the full comparison (None: it does not), and the files changes since its state.

    Columns the rows should have and the table lacks (a release or a sales file added one), or columns other
    than those the last run brought every row up to date with, need every row compared: never only the changed.
    """

    if existing is None:
        return "full: new table", None
    if "image" in existing.columns:
        return "full: upgrade (thumbnails now live in the files table only)", None
    if state is None:
        return "full: no recorded state", None
    recorded = state[1]
    if recorded.get("sales") != sales_fp:
        return "full: sales files changed", None
    if recorded.get("schema", shape) != shape:
        return "full: columns changed since the last run", None
    if recorded.get("join") != config.input.join:
        return "full: input.join changed", None
    if not set(schema_columns(shape)) <= set(existing.columns):
        return "full: columns to add", None
    since = int(recorded["files_table_version"])
    if since > files_version:
        return "full: recorded files-table version is ahead of the table", None
    if since == files_version:
        return None, None
    changes = read_changes(spark, config.output.files, since, files_version,
                           (*NARROW_FILE_COLUMNS, "_change_type", "_commit_version"))
    if changes is None:
        return "full: change data feed unavailable", None
    return None, changes


def _write_images(spark: SparkSession, desired: DataFrame, existing: DataFrame | None, path: Table,
                  report: RunReport, state: dict[str, Any], changed_keys: DataFrame | None,
                  key_scope: list[tuple[str, str]] | None = None) -> None:
    """Bring the images table to ``desired`` (for ``changed_keys`` only, when given), writing only rows that
    differ; the commit records ``state``. Nothing is written when nothing differs and the state is the same.
    ``key_scope``: image_id ranges that hold every changed key, so reads and the MERGE skip other files.

    The table is never replaced from a subset of rows: new columns are added to it (rows kept), columns someone
    else added are kept and left alone, and a column whose type changed fails the run with the table unchanged.
    """
    from pyspark.sql import functions as F

    target = desired.withColumn("updated_run_id", F.lit(report.run_id)).withColumn(
        "updated_at", F.lit(utcnow()).cast("timestamp"))
    m = report.metrics
    if existing is None or (changed_keys is None and "image" in existing.columns):
        _create_images(spark, path, target, existing is None, state, m)
        return
    added = add_columns(spark, path, existing, target, "output.images_table")
    if added:
        assert changed_keys is None, "columns are added on the full comparison only"
        existing = read_table(spark, path)
        assert existing is not None
        m["images_columns_added"] = added
    near = existing if key_scope is None else existing.where(in_ranges("image_id", key_scope))
    have_rows = near if changed_keys is None else near.join(changed_keys, "image_id", "left_semi")
    wanted = target.withColumn("_fp", fingerprint(desired))
    have = have_rows.select("image_id", fingerprint(existing.select(*desired.columns)).alias("_fp"))
    upserts = wanted.join(have, ["image_id", "_fp"], "left_anti").drop("_fp")
    deletes = have.join(wanted.select("image_id"), "image_id", "left_anti").select("image_id")
    n_upserts, n_deletes = concurrently(upserts.count, deletes.count)
    m["images_upserted"], m["images_deleted"] = n_upserts, n_deletes
    if n_upserts or n_deletes:
        _, m["images_table_attempts"] = with_commit_retries(str(path), lambda: merge_changes(
            spark, path, upserts.select(*target.columns), deletes, "image_id", metadata=state,
            target_filter=None if key_scope is None else ranges_sql("t.image_id", key_scope)))
        m["images_table_write"] = "merged"
    else:
        # Nothing to change, but record the state reached, so later runs start from here.
        record_state(spark, path, state)
        m["images_table_write"] = "unchanged"
    m["images_table_version"] = table_version(spark, path)


def _create_images(spark: SparkSession, path: Table, target: DataFrame, new: bool, state: dict[str, Any],
                   m: dict[str, Any]) -> None:
    """Write the whole images table: a new one (a first run that loses the race to create it merges into the
    winner's), or an older release's table with thumbnails, rewritten from every row without them."""
    if new:
        _, m["images_table_attempts"] = with_commit_retries(str(path), lambda: merge_changes(
            spark, path, target, None, "image_id", metadata=state))
    else:
        with_commit_retries(str(path), lambda: create(spark, path, target, state, mode="overwrite"))
    m["images_table_write"] = "created" if new else "overwritten (thumbnails moved to the files table)"
    m["images_upserted"] = m["joined"] if state["join"] == "inner" else m["images"]
    m["images_deleted"] = 0
    m["images_table_version"] = table_version(spark, path)


def schema_id(df: DataFrame) -> str:
    """The columns a table written from ``df`` has, with their types, as one string (``name type;...``)."""
    return ";".join(f"{f.name} {f.dataType.simpleString()}" for f in sorted(df.schema.fields, key=lambda f: f.name))


def schema_columns(shape: str) -> list[str]:
    """The column names of a :func:`schema_id`."""
    return [part.split(" ", 1)[0] for part in shape.split(";") if part]
