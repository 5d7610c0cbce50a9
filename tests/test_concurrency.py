"""Two writers on one table: a Delta commit conflict is retried a bounded number of times, never duplicates."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from image_embeddings.core.tables import ConcurrentWriteError, merge_changes, with_commit_retries


def _wait_for(flag: Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not flag.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(flag)
        time.sleep(0.05)


def _held_on_first_attempt(folder: Path) -> tuple[Any, Path, Path]:
    """A UDF that, on its first call only, signals ``started`` and waits for ``other_done``: it runs in a Python
    worker while our transaction is open, so another writer commits first. (Nested, so Spark's workers receive it
    by value: they cannot import this test module.)"""
    from pyspark.sql import functions as F

    started, other_done, first_attempt = (str(folder / n) for n in ("started", "other_done", "first"))

    @F.udf("INT")
    def value_after_the_other_writer(v: int) -> int:
        import os
        import time as clock

        if not os.path.exists(first_attempt):
            open(first_attempt, "w").close()
            open(started, "w").close()
            deadline = clock.monotonic() + 120
            while not os.path.exists(other_done) and clock.monotonic() < deadline:
                clock.sleep(0.05)
        return v

    return value_after_the_other_writer, Path(started), Path(other_done)


def test_a_conflicting_commit_is_retried_and_nothing_is_duplicated(spark: Any, tmp_path: Path) -> None:
    table = str(tmp_path / "table")
    spark.createDataFrame([("a", 1), ("b", 2)], "k STRING, v INT").write.format("delta").save(table)
    value_after_the_other_writer, started, other_done = _held_on_first_attempt(tmp_path)

    def other_writer() -> None:
        _wait_for(started)
        spark.sql(f"UPDATE delta.`{table}` SET v = 10 WHERE k = 'a'")
        other_done.touch()

    thread = threading.Thread(target=other_writer)
    thread.start()
    upserts = spark.createDataFrame([("a", 100), ("c", 3)], "k STRING, v INT").withColumn(
        "v", value_after_the_other_writer("v"))
    _, attempts = with_commit_retries("test table", lambda: merge_changes(spark, table, upserts, None, "k"))
    thread.join(timeout=120)
    assert attempts == 2, "the first commit lost the race against the other writer and was retried"
    rows = {r.k: r.v for r in spark.read.format("delta").load(table).collect()}
    assert rows == {"a": 100, "b": 2, "c": 3}
    history = [r.operation for r in spark.sql(f"DESCRIBE HISTORY delta.`{table}`").orderBy("version").collect()]
    assert history == ["WRITE", "UPDATE", "MERGE"], "the failed attempt committed nothing"


def test_giving_up_after_the_bound_says_so() -> None:
    calls = []

    class ConcurrentAppendException(Exception):  # the name Delta's Python API uses
        pass

    def always_conflicts() -> None:
        calls.append(1)
        raise ConcurrentAppendException("files were added by a concurrent update")

    with pytest.raises(ConcurrentWriteError, match="gave up after 2 attempts .*run it again"):
        with_commit_retries("images table", always_conflicts, attempts=2)
    assert len(calls) == 2
    with pytest.raises(ValueError):
        with_commit_retries("images table", lambda: (_ for _ in ()).throw(ValueError("not a conflict")))


def test_reports_and_their_log_line_redact_credentials() -> None:
    import datetime as dt
    import json

    from image_embeddings.core.report import RunReport

    report = RunReport("r1", "ingest", dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc))
    report.metrics.update(files=3, s3={"secret_key": "abc123", "aws_access_key_id": "AKIAXYZ",
                                       "aws.credentials.provider": "default", "endpoint": "http://127.0.0.1:9000"},
                          session_token="tok")
    report.finish("succeeded")
    text = report.to_json() + report.summary()
    for secret in ("abc123", "AKIAXYZ", "tok\""):
        assert secret not in text
    data = json.loads(report.to_json())
    assert data["metrics"]["s3"] == {"secret_key": "***", "aws_access_key_id": "***",
                                     "aws.credentials.provider": "default", "endpoint": "http://127.0.0.1:9000"}
    assert "session_token=***" in report.summary() and "files=3" in report.summary()


def test_a_first_run_that_loses_the_race_to_create_the_table_merges_into_it(spark: Any, tmp_path: Path) -> None:
    table = str(tmp_path / "new_table")
    value_after_the_other_creator, started, other_done = _held_on_first_attempt(tmp_path)

    def other_creator() -> None:
        _wait_for(started)
        merge_changes(spark, table, spark.createDataFrame([("a", 1), ("b", 2)], "k STRING, v INT"), None, "k")
        other_done.touch()

    thread = threading.Thread(target=other_creator)
    thread.start()
    mine = spark.createDataFrame([("b", 20), ("c", 3)], "k STRING, v INT").withColumn(
        "v", value_after_the_other_creator("v"))
    _, attempts = with_commit_retries("new table", lambda: merge_changes(spark, table, mine, None, "k"))
    thread.join(timeout=120)
    assert attempts == 2, "the first attempt lost the race to create the table"
    assert {r.k: r.v for r in spark.read.format("delta").load(table).collect()} == {"a": 1, "b": 20, "c": 3}
