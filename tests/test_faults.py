"""Faults and hostile conditions: older tables, a killed Python worker, many runs on changing input."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from processes import cpu_seconds, python_workers

from image_embeddings.core.errors import failure_line
from image_embeddings.core.tables import IncompatibleTableError, table_version
from image_embeddings.embed.stage import run_embed
from image_embeddings.ingest.stage import FILE_COLUMNS, run_ingest
from image_embeddings.pipeline import run_pipeline
from image_embeddings.testing.sample import PHOTOS, encode, photo, variants, write_sales


def test_tables_of_an_older_version_are_extended_or_refused(spark: Any, make_config: Any, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "astronaut.jpg").write_bytes(encode(photo("astronaut")))
    write_sales(tmp_path / "sales", ["astronaut"])
    config = make_config(folder, tmp_path / "sales")
    # The runs table of the previous release had no run_date column: it is extended in place.
    spark.createDataFrame(
        [("old-run", "ingest", "succeeded", None, None, 1.0, "{}")],
        "run_id STRING, stage STRING, status STRING, started_at TIMESTAMP, finished_at TIMESTAMP, "
        "duration_s DOUBLE, report STRING").write.format("delta").save(config.output.runs_table)
    report = run_ingest(spark, config, run_date="2026-11-23")
    runs = {r.run_id: r for r in spark.read.format("delta").load(config.output.runs_table).collect()}
    assert set(runs) == {"old-run", report.run_id} and runs[report.run_id].run_date == "2026-11-23"
    assert runs["old-run"].run_date is None
    history = [r.operation for r in spark.sql(f"DESCRIBE HISTORY delta.`{config.output.runs_table}`").collect()]
    assert set(history) == {"WRITE"}, "appended, never rewritten"

    # A files table without a column this version needs is refused, and left as it was.
    old = make_config(folder, tmp_path / "sales", tables=tmp_path / "old")
    columns = [c for c in FILE_COLUMNS if c != "preprocess_id"]
    spark.read.format("delta").load(config.output.files_table_path).select(*columns).write.format("delta").save(
        old.output.files_table_path)
    with pytest.raises(IncompatibleTableError, match=r"output.files_table at .* lacks column\(s\) preprocess_id"):
        run_ingest(spark, old)
    assert table_version(spark, old.output.files_table_path) == 0


@pytest.mark.parametrize("stage", ["ingest", "embed"])
def test_a_killed_python_worker_is_retried_without_loss_or_duplicates(spark: Any, make_config: Any, tmp_path: Path,
                                                                      stage: str) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    ids = []
    for name in PHOTOS[:8]:
        array = photo(name)
        for suffix, variant in [("", array), *variants(array)]:
            ids.append(f"{name}{suffix and '_' + suffix}")
            size = (320, 240) if stage == "embed" else (2400, 1800)
            (folder / f"{ids[-1]}.jpg").write_bytes(encode(variant, size=size))
    write_sales(tmp_path / "sales", ids)
    config = make_config(folder, tmp_path / "sales", "model.weights=random:0", "model.partitions=4",
                         "model.arrow_batch_rows=4", "model.batch_size=4", "spark.arrow_max_records_per_batch=2")
    if stage == "embed":
        run_ingest(spark, config)
    killed: list[int] = []
    stages: list[int] = []
    done = threading.Event()

    def killer() -> None:
        tracker = spark.sparkContext.statusTracker()
        while not done.is_set() and not killed:
            if tracker.getActiveStageIds() and (workers := python_workers(os.getpid())):
                before = {pid: cpu_seconds(pid) for pid in workers}
                time.sleep(1.0 if stage == "embed" else 0.3)  # let a task get going inside the worker
                busy = [pid for pid in workers if cpu_seconds(pid) > before[pid]]
                if busy:  # a worker that used CPU since: inside a task, not idle in Spark's queue
                    stages.extend(tracker.getActiveStageIds())
                    try:
                        os.kill(busy[0], signal.SIGKILL)
                        killed.append(busy[0])
                    except ProcessLookupError:
                        pass  # it ended meanwhile: look again
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        report = (run_embed if stage == "embed" else run_ingest)(spark, config)
    finally:
        done.set()
        thread.join(timeout=30)
    assert killed, "a Python worker was killed during the run"
    tracker = spark.sparkContext.statusTracker()
    failed = sum(info.numFailedTasks for info in map(tracker.getStageInfo, stages) if info is not None)
    assert failed >= 1, f"the kill failed a task (stages {stages}), which Spark ran again"
    assert report.status == "succeeded"
    if stage == "ingest":
        assert report.metrics["files_decoded"] == len(ids) and report.metrics["errors"] == {}
        rows = spark.read.format("delta").load(config.output.images_table)
        assert rows.where("error IS NULL").count() == len(ids)
        thumbnails = spark.read.format("delta").load(config.output.files_table_path)
        assert thumbnails.where("image IS NOT NULL").count() == len(ids)
    else:
        assert report.metrics["embedded"] == len(ids)
        rows = spark.read.format("delta").load(config.output.embeddings_table)
        assert rows.where("embedding IS NULL").count() == 0
    assert rows.count() == len(ids) == rows.select("image_id").distinct().count()


def test_soak_many_runs_on_growing_changing_input(spark: Any, make_config: Any, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = [v for name in PHOTOS for v in [photo(name), *(a for _, a in variants(photo(name)))]]
    live: dict[str, bytes] = {}
    config = make_config(folder, tmp_path / "sales", "model.weights=random:0", "input.join=left")
    counter = 0
    for run in range(7):  # new files every run; a changed file on runs 1, 3, 5; a removed one on runs 2, 5
        for _ in range(3):  # three new files a run
            image_id = f"img{counter:03d}"
            live[image_id] = encode(arrays[counter % len(arrays)], size=(96, 72))
            (folder / f"{image_id}.jpg").write_bytes(live[image_id])
            counter += 1
        if run % 2 == 1:  # change one file's content
            image_id = sorted(live)[run]
            live[image_id] = encode(arrays[(counter + 7) % len(arrays)], size=(96, 72))
            (folder / f"{image_id}.jpg").write_bytes(live[image_id])
            os.utime(folder / f"{image_id}.jpg", (time.time() + run + 1, time.time() + run + 1))
        if run % 3 == 2:  # remove one
            image_id = sorted(live)[0]
            (folder / f"{image_id}.jpg").unlink()
            del live[image_id]
        write_sales(tmp_path / "sales", sorted(live), seed=run)
        combined = run_pipeline(spark, config)
        assert combined["status"] == "succeeded", run
    files = spark.read.format("delta").load(config.output.files_table_path)
    images = spark.read.format("delta").load(config.output.images_table)
    embeddings = spark.read.format("delta").load(config.output.embeddings_table)
    assert files.count() == len(live) == files.select("path").distinct().count()
    assert sorted(r.image_id for r in images.select("image_id").collect()) == sorted(live)
    by_id = {r.image_id: r.sha256 for r in embeddings.collect()}
    assert sorted(by_id) == sorted(live), "one embedding per live image and model"
    assert embeddings.count() == len(live)
    current = {r.image_id: r.sha256 for r in images.collect()}
    assert by_id == current, "every embedding was made from the image's current content"


def test_object_store_outage_and_a_transient_stall(spark: Any, make_config: Any, s3_server: Any,
                                                    tmp_path: Path) -> None:
    from image_embeddings.testing import s3server

    server = s3server.start(tmp_path / "minio" / "data", access_key=s3_server.access_key,
                            secret_key=s3_server.secret_key)
    port = int(server.endpoint.rsplit(":", 1)[1])
    hadoop = spark.sparkContext._jsc.hadoopConfiguration()
    for key, value in {"endpoint": server.endpoint, "attempts.maximum": "2", "retry.limit": "2",
                       "retry.interval": "200ms", "connection.establish.timeout": "2s",
                       "connection.timeout": "20s"}.items():
        hadoop.set(f"fs.s3a.bucket.flaky.{key}", value)
    client = server.client()
    client.create_bucket(Bucket="flaky")
    local = tmp_path / "local"
    local.mkdir()
    names = list(PHOTOS[:6])
    for name in names[:4]:
        client.put_object(Bucket="flaky", Key=f"raw/{name}.jpg", Body=encode(photo(name), size=(320, 240)))
    write_sales(local / "sales", names)
    # The lease's boto3 client knows s3.endpoint only, not this bucket's own endpoint: the lease stays local.
    config = make_config("s3a://flaky/raw", local / "sales", "model.weights=random:0", f"lease.location={local}/lease",
                         tables="s3a://flaky/delta")
    run_ingest(spark, config)

    # A stall shorter than the client's timeouts (the server paused, then resumed) does not fail the run.
    for name in names[4:5]:
        client.put_object(Bucket="flaky", Key=f"raw/{name}.jpg", Body=encode(photo(name), size=(320, 240)))
    server.process.send_signal(signal.SIGSTOP)
    threading.Timer(3.0, lambda: server.process.send_signal(signal.SIGCONT)).start()
    stalled = run_ingest(spark, config)
    assert stalled.status == "succeeded" and stalled.metrics["files_new"] == 1
    versions = (table_version(spark, config.output.files_table_path), table_version(spark, config.output.images_table))

    # The store goes away while a run is under way: the run fails clearly and commits nothing.
    client.put_object(Bucket="flaky", Key=f"raw/{names[5]}.jpg", Body=encode(photo(names[5]), size=(320, 240)))

    def stop_when_running() -> None:
        tracker = spark.sparkContext.statusTracker()
        deadline = time.monotonic() + 120
        while not tracker.getActiveStageIds() and time.monotonic() < deadline:
            time.sleep(0.02)
        server.stop()

    stopper = threading.Thread(target=stop_when_running)
    stopper.start()
    with pytest.raises(Exception) as failure:
        run_ingest(spark, config)
    stopper.join(timeout=60)
    assert any(word in str(failure.value) for word in ("Connect", "connect", "refused", "Unable to execute")), (
        str(failure.value)[:2000])
    # What an operator reads: the cause in one line, in the command's last line and in the run's report.
    assert failure_line(failure.value) == f"cannot reach the object store at 127.0.0.1:{port}: connection refused"

    server = s3server.start(tmp_path / "minio" / "data", port=port, access_key=s3_server.access_key,
                            secret_key=s3_server.secret_key)
    try:
        assert (table_version(spark, config.output.files_table_path),
                table_version(spark, config.output.images_table)) == versions, "no partial commit"
        resumed = run_ingest(spark, config)
        assert resumed.status == "succeeded" and resumed.metrics["files_new"] == 1
        assert spark.read.format("delta").load(config.output.images_table).count() == len(names)
    finally:
        server.stop()
