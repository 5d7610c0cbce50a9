"""Progress of a long step from Spark's status tracker: log lines every few seconds, an updating terminal line."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import pytest

from image_embeddings.core.progress import Progress


def _slow_job(spark: Any, tasks: int, seconds: float) -> int:
    def slow(rows: Any) -> Any:
        time.sleep(seconds)
        yield sum(1 for _ in rows)

    return sum(spark.sparkContext.parallelize(range(tasks * 10), tasks).mapPartitions(slow).collect())


def test_progress_logs_lines_with_counts_rate_and_time_left(spark: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="image_embeddings.core.progress")
    with Progress(spark, "embed", 1200, "images", interval=0.3, terminal=False) as progress:
        assert _slow_job(spark, 12, 0.4) == 120
    lines = [r.getMessage() for r in caplog.records if r.name == "image_embeddings.core.progress"]
    assert lines == ["progress " + line for line in progress.lines]
    assert lines[-1].startswith("progress embed: 1,200 of 1,200 images (100%) in 0:0") and "images/s" in lines[-1]
    partial = [line for line in progress.lines[:-1] if " of 1,200 images (" in line and not line.startswith(
        "embed: 0 ") and "(100%)" not in line]
    assert partial, progress.lines  # the count grew while the job ran
    assert all("left" in line for line in partial)


def test_progress_on_a_terminal_is_one_updating_line(spark: Any) -> None:
    stream = io.StringIO()
    with Progress(spark, "decode", 50, "files", interval=0.3, stream=stream, terminal=True):
        _slow_job(spark, 4, 0.5)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, rewritten in place, ended when done
    assert text.count("\r\x1b[2K") >= 2 and "decode: 50 of 50 files (100%) in " in text


def test_nothing_to_do_shows_nothing(spark: Any) -> None:
    stream = io.StringIO()
    with Progress(spark, "embed", 0, "images", stream=stream, terminal=True) as progress:
        pass
    assert stream.getvalue() == "" and progress.lines == []
