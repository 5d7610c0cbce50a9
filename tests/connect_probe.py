"""Run with ``SPARK_REMOTE`` set to a Spark Connect server; prints what a test checks, as JSON.

    connect_probe.py BAD_PARQUET CONFIG [SETTINGS...]   BAD_PARQUET: a folder holding a file that is no Parquet

The package's session factory picks the session up from ``SPARK_REMOTE``; then the parts of the package that use
classic-only APIs on a classic session run over it: parallelism, progress, the one-line failure of a server error,
and a missing input folder reported where it is read (a Connect session analyzes plans lazily).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def _slow(batches: Iterator[Any]) -> Iterator[Any]:
    for batch in batches:
        time.sleep(0.6)
        yield batch


def main(bad_parquet: str, config_file: str, settings: list[str]) -> dict[str, Any]:
    from pyspark.sql import functions as F

    from image_embeddings.core.config import load_config
    from image_embeddings.core.errors import failure_line
    from image_embeddings.core.progress import Progress
    from image_embeddings.core.spark import default_parallelism, get_spark, is_connect
    from image_embeddings.ingest.stage import IngestError, list_files

    lines = _Lines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)
    spark = get_spark(load_config(config_file, settings, needs_input=False))
    out: dict[str, Any] = {"session": type(spark).__module__, "is_connect": is_connect(spark),
                           "parallelism": default_parallelism(spark),
                           "time_zone": spark.conf.get("spark.sql.session.timeZone")}
    with Progress(spark, "probe", 1200, "images", interval=0.3, terminal=False) as progress:
        rows = spark.range(0, 24, 1, 12).mapInPandas(_slow, "id long").agg(F.count(F.lit(1))).first()
    out["progress_rows"] = rows[0] if rows is not None else None
    out["progress_lines"] = progress.lines
    try:
        spark.read.parquet(bad_parquet).collect()
    except Exception as exc:
        out["failure_line"] = failure_line(exc)
    try:
        list_files(spark, "/nonexistent/images", ("jpg",))
        out["missing_folder"] = "no error"
    except IngestError as exc:
        out["missing_folder"] = str(exc).splitlines()[0]
    out["log"] = lines.lines
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
