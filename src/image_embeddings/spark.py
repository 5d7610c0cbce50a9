"""The one place a SparkSession is obtained."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from image_embeddings.config import AppConfig
from image_embeddings.uri import is_s3

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


def session_settings(config: AppConfig, stage: str | None = None) -> dict[str, str]:
    """Static settings applied when the session is created here (Delta, S3A, jars, extra conf).

    ``stage="embed"`` adds ``spark.embed_conf`` (GPU scheduling for the embedding stage).
    """
    spark, s3 = config.spark, config.s3
    settings: dict[str, str] = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.hadoop.fs.s3a.path.style.access": str(s3.path_style_access).lower(),
        "spark.hadoop.fs.s3a.connection.ssl.enabled": str(s3.ssl).lower(),
        "spark.hadoop.fs.s3a.attempts.maximum": str(s3.max_attempts),
        "spark.hadoop.fs.s3a.retry.limit": str(s3.retry_limit),
    }
    if s3.endpoint:
        settings["spark.hadoop.fs.s3a.endpoint"] = s3.endpoint
    if s3.region:
        settings["spark.hadoop.fs.s3a.endpoint.region"] = s3.region
    if s3.map_s3_scheme:
        settings["spark.hadoop.fs.s3.impl"] = "org.apache.hadoop.fs.s3a.S3AFileSystem"
    packages = spark.packages + (spark.s3_packages if reaches_s3(config) else ())
    if packages:
        settings["spark.jars.packages"] = ",".join(packages)
    if spark.ivy_dir:
        settings["spark.jars.ivy"] = str(Path(spark.ivy_dir).expanduser().resolve())
    settings.update(runtime_settings(config))
    settings.update(spark.conf)
    if stage == "embed":
        settings.update(spark.embed_conf)
    return settings


def reaches_s3(config: AppConfig) -> bool:
    """True when a table or input of ``config`` is on S3, or an S3 endpoint is configured."""
    out = config.output
    locations = (config.input.images, config.input.sales, out.images_table, out.embeddings_table, out.runs_table,
                 out.files_table_path, *out.locations.values())
    return bool(config.s3.endpoint) or any(is_s3(loc) for loc in locations)


def runtime_settings(config: AppConfig) -> dict[str, str]:
    """SQL settings this package needs, applied even to a session it did not create."""
    return {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(config.spark.arrow_max_records_per_batch),
        # Spark 4.0+; Spark 3.5 ignores it and the row bound (times input.max_file_bytes) is the limit.
        "spark.sql.execution.arrow.maxBytesPerBatch": str(config.spark.arrow_max_bytes_per_batch),
    }


@contextlib.contextmanager
def session_conf(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Set SQL settings for the duration of a stage and put the previous values back afterwards."""
    previous: dict[str, str | None] = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, old)


def concurrently(*actions: Callable[[], Any]) -> list[Any]:
    """Run independent Spark actions from threads at once and return their results in order.

    Small actions spend most of their time on the driver (planning, scheduling, Delta log reads), one core each;
    side by side they overlap. The first exception is raised after every action has finished.
    """
    from concurrent.futures import ThreadPoolExecutor

    if len(actions) == 1:
        return [actions[0]()]
    with ThreadPoolExecutor(max_workers=len(actions), thread_name_prefix="spark-action") as pool:
        futures = [pool.submit(action) for action in actions]
        return [future.result() for future in futures]


def local_frame(spark: SparkSession, rows: list[tuple[Any, ...]], schema: str) -> DataFrame:
    """A DataFrame of a few rows held by the driver, sent to the JVM as Arrow.

    ``spark.createDataFrame(list_of_tuples)`` runs a Python job to re-pickle the rows, which starts a Python worker
    daemon of its own (with its workers); a pandas frame goes over Arrow without one.
    """
    import pandas as pd

    # Columns are matched to ``schema`` by position.
    return spark.createDataFrame(pd.DataFrame.from_records(rows, columns=[f"_{i}" for i in range(len(rows[0]))]),
                                 schema)


@contextlib.contextmanager
def _console_to(path: str | None) -> Iterator[None]:
    """Point this process's stdout and stderr at ``path`` while the block runs: a JVM launched inside keeps
    them for its life (Ivy's report, JVM and Spark warnings, stack traces of failed tasks, its Python workers'
    stderr), while this process gets its own console back."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def get_spark(config: AppConfig, stage: str | None = None, jvm_log: str | None = None) -> SparkSession:
    """Return the active SparkSession (notebook, Databricks, spark-submit), a Spark Connect session to
    ``SPARK_REMOTE`` when that is set (as Databricks sets it), or create a local one from config.

    With ``jvm_log``, a JVM this call launches writes its console output to that file instead of the terminal
    (the command line's quiet default). Sessions that already exist keep their own logging.
    """
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is not None:
        log.info("reusing the active spark session (version %s%s)", spark.version,
                 ", Spark Connect" if is_connect(spark) else "")
    elif os.environ.get("SPARK_REMOTE"):
        spark = _connect(config, stage, os.environ["SPARK_REMOTE"])
    else:
        spark = _launch(config, stage, jvm_log)
    for key, value in runtime_settings(config).items():
        spark.conf.set(key, value)
    if not is_connect(spark):
        drop_java_jars_from_python_path(spark)
    return spark


def is_connect(spark: SparkSession) -> bool:
    """True for a Spark Connect session (Databricks shared and serverless compute, ``SPARK_REMOTE``): one without
    ``sparkContext``, ``_jvm`` or RDDs. Needs no Connect packages to answer."""
    return type(spark).__module__.startswith("pyspark.sql.connect.")


def default_parallelism(spark: SparkSession) -> int:
    """The task slots Spark spreads work over (``defaultParallelism``).

    A Connect session has no SparkContext: ``spark.default.parallelism`` when the server sets it, else the number of
    partitions the server gives a range without a count, which is its ``defaultParallelism`` (one small job).
    """
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    configured = spark.conf.get("spark.default.parallelism", None)
    if configured:
        return max(1, int(configured))
    from pyspark.sql import functions as F

    last = spark.range(0, 1 << 16).select(F.spark_partition_id().alias("part")).agg(F.max("part")).first()
    return 1 + int(last[0]) if last is not None and last[0] is not None else 1


def analyzed(df: DataFrame) -> DataFrame:
    """``df``, analyzed now: a Spark Connect session analyzes a plan only when its schema or rows are asked for,
    so a missing path or table would otherwise surface at a later step instead of where it is read (a classic
    session analyzes at once, and this costs it nothing)."""
    _ = df.schema
    return df


def remote_address(url: str) -> str:
    """``sc://host:port`` of a Spark Connect URL, without its parameters (a token may be among them)."""
    return url.split("/;", 1)[0].split(";", 1)[0]


def _connect(config: AppConfig, stage: str | None, url: str) -> SparkSession:
    """A Spark Connect session to ``url``, given the settings of :func:`session_settings` a client may set.

    The server's static settings (jars, packages, extensions, the driver's JVM) are its own: each one that
    differs here is left as it is, and named in the log.
    """
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(url).getOrCreate()
    log.info("spark connect session: %s (server version %s)", remote_address(url), spark.version)
    skipped = [key for key, value in session_settings(config, stage).items() if not _try_set(spark, key, value)]
    if config.spark.master:
        skipped.append("spark.master")
    if skipped:
        log.info("settings a Spark Connect client cannot set, left as the server has them: %s",
                 ", ".join(sorted(skipped)))
    return spark


def _try_set(spark: SparkSession, key: str, value: str) -> bool:
    """Set ``key`` on the session unless it has that value already; False when the session refuses it."""
    try:
        if spark.conf.get(key, None) != value:
            spark.conf.set(key, value)
    except Exception:  # CANNOT_MODIFY_CONFIG: a static or core setting of the server
        return False
    return True


def _launch(config: AppConfig, stage: str | None, jvm_log: str | None) -> SparkSession:
    """A classic session created from config (launching a JVM unless spark-submit started one)."""
    from pyspark.sql import SparkSession

    launching = "PYSPARK_GATEWAY_PORT" not in os.environ  # spark-submit and notebooks started the JVM already
    quiet = jvm_log if launching else None
    builder = SparkSession.builder.appName(config.spark.app_name)
    if config.spark.master:
        builder = builder.master(config.spark.master)
    if (config.spark.master or "").startswith("local"):
        # Local Python workers run this interpreter, which has the package and its dependencies.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    settings = session_settings(config, stage)
    dump = None
    if launching and config.spark.class_archive_dir and (config.spark.master or "").startswith("local"):
        options, dump = class_archive_options(Path(config.spark.class_archive_dir).expanduser(), settings)
        settings["spark.driver.extraJavaOptions"] = " ".join(
            filter(None, [settings.get("spark.driver.extraJavaOptions", ""), options]))
    for key, value in settings.items():
        builder = builder.config(key, value)
    if quiet:
        builder = builder.config("spark.ui.showConsoleProgress", "false")
    with _console_to(quiet):
        spark = builder.getOrCreate()
    if dump is not None:
        note_archiving_jvm(spark, dump)
    log.info("spark session created: master=%s version=%s", spark.sparkContext.master, spark.version)
    return spark


def class_archive_options(folder: Path, settings: dict[str, str]) -> tuple[str, Path | None]:
    """JVM options that use this setup's class-data-sharing archive in ``folder``, or make it at the JVM's exit
    (then also the file it will be dumped to: :func:`note_archiving_jvm` records which JVM writes it).

    Loading and verifying Spark's and Delta's classes is a large part of a short local run. Java's dynamic archive
    (``-XX:ArchiveClassesAtExit``, JDK 13+) keeps them ready for the next JVM. The archive is named by what it
    depends on (the java binary, pyspark's jars, the packages and JVM options), so another setup gets its own. Each
    JVM dumps to a file of its own; a later start adopts one whose JVM has exited. A JVM that cannot use an archive
    (another JDK, a damaged file) runs without it (``-Xshare:auto``, the default), silently: its CDS log is off.
    """
    import hashlib
    import shutil

    import pyspark

    home = os.environ.get("JAVA_HOME")
    java = Path(home, "bin", "java") if home else Path(shutil.which("java") or "java")
    jars = Path(pyspark.__file__).parent / "jars"
    parts = [str(java.resolve()), str(java.resolve().stat().st_mtime) if java.exists() else "",
             *sorted(f"{j.name}:{j.stat().st_size}" for j in jars.glob("*.jar")),
             settings.get("spark.jars.packages", ""), settings.get("spark.driver.extraJavaOptions", "")]
    name = "spark-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16] + ".jsa"
    archive = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for dumped in folder.glob(name + ".*.tmp"):
            marker = dumped.with_name(dumped.name + ".jvm")
            pid = int(marker.read_text()) if marker.exists() else None
            if pid is not None and not _alive(pid):  # its JVM has exited: the dump is complete
                if archive.exists():
                    dumped.unlink()  # a second dump, made while the first one was being written
                else:
                    dumped.replace(archive)
                marker.unlink()
            elif time.time() - dumped.stat().st_mtime > 86400:  # left by a JVM that was killed
                dumped.unlink()
                marker.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:
        log.warning("no JVM class archive in %s: %s", folder, exc)
        return "", None
    # The JVM's own CDS messages (classes it cannot archive, an archive it cannot map) would reach the console.
    quiet = "-Xlog:cds*=off"
    if archive.exists():
        log.debug("JVM class archive: %s", archive)
        return f"-XX:SharedArchiveFile={archive} {quiet}", None
    dump = folder / f"{name}.{os.getpid()}.tmp"
    log.debug("JVM class archive: made at this JVM's exit, for the next runs (%s)", archive)
    return f"-XX:ArchiveClassesAtExit={dump} {quiet}", dump


def note_archiving_jvm(spark: SparkSession, dump: Path) -> None:
    """Record which JVM will write ``dump`` at its exit, so a later start adopts it only once that JVM is gone."""
    try:
        pid = int(spark._jvm.java.lang.ProcessHandle.current().pid())  # type: ignore[union-attr]
        dump.with_name(dump.name + ".jvm").write_text(str(pid))
    except Exception as exc:  # the archive is an optimization only
        log.warning("JVM class archive %s will not be used: %s", dump, exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A jar this large is a bundle of Java dependencies (the AWS SDK's: 560 MB, 340,000 entries), not a Python package.
SCAN_JAR_BYTES = 64 << 20


def drop_java_jars_from_python_path(spark: SparkSession) -> list[str]:
    """Take jars without Python code off the Python path of the driver and the workers; return their names.

    Spark puts every jar resolved from ``spark.jars.packages`` on the Python path, since a jar may carry a Python
    package (Delta's does). Anything that asks ``importlib.metadata`` for installed distributions then reads each
    jar's whole zip directory: ``import torch`` does, and with the AWS SDK bundle on the path it took 4.8 s of CPU in
    a Python worker instead of 1.3 s. Jars holding ``.py`` files stay; jars over ``SCAN_JAR_BYTES`` go unread.
    """
    import zipfile

    from pyspark import SparkFiles

    sc = spark.sparkContext
    includes = getattr(sc, "_python_includes", None)  # the file names every Python task puts on its path
    if not includes:
        return []
    root = SparkFiles.getRootDirectory()

    def has_python(name: str) -> bool:
        path = os.path.join(root, name)
        try:
            if os.path.getsize(path) > SCAN_JAR_BYTES:
                return False
            with zipfile.ZipFile(path) as jar:
                return any(entry.endswith(".py") for entry in jar.namelist())
        except (OSError, zipfile.BadZipFile):
            return True  # unknown: leave it as Spark set it

    dropped = [name for name in includes if name.lower().endswith(".jar") and not has_python(name)]
    if dropped:
        sc._python_includes = [name for name in includes if name not in dropped]
        paths = {os.path.join(root, name) for name in dropped}
        sys.path[:] = [entry for entry in sys.path if entry not in paths]
        log.info("jars without Python code taken off the Python path: %s", ", ".join(dropped))
    return dropped
