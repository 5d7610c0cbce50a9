"""A real Spark standalone cluster on loopback (one master, two one-core workers from the installed pyspark's
``spark-class``): ``image-embeddings run`` with the data on the local S3 server survives a killed executor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import children, cmdline, cpu_seconds, standalone_cluster

from image_embeddings.testing.sample import PHOTOS, encode, photo, variants, write_sales

REPO = Path(__file__).resolve().parents[1]


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _embedding(pid: int) -> bool:
    """True when the Python worker ``pid`` has torch loaded and is computing (stage 2's UDF at work)."""
    if not _has_torch(pid):
        return False
    before = cpu_seconds(pid)
    time.sleep(0.5)
    # An idle worker uses no CPU; a computing one gets at least a share of a core, even while other tests run.
    return cpu_seconds(pid) - before > 0.05


def _has_torch(pid: int) -> bool:
    try:
        return "libtorch_cpu" in (Path("/proc") / str(pid) / "maps").read_text()
    except OSError:
        return False


@pytest.fixture
def cluster(tmp_path: Path, s3_plan: Any) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A master and two one-core workers; every process they started is killed afterwards."""
    with standalone_cluster(tmp_path, ["", ""]) as running:
        yield running


@pytest.mark.xdist_group("processes")
def test_run_on_a_standalone_cluster_survives_a_killed_executor(cluster: Any, s3_server: Any, spark: Any,
                                                                tmp_path: Path) -> None:
    master, started = cluster
    client = s3_server.client()
    client.create_bucket(Bucket="cluster")
    names = []
    for name in PHOTOS:
        array = photo(name)
        client.put_object(Bucket="cluster", Key=f"raw/{name}.jpg", Body=encode(array, size=(640, 480)))
        names.append(name)
        for suffix, variant in variants(array):
            client.put_object(Bucket="cluster", Key=f"raw/{name}_{suffix}.jpg", Body=encode(variant, size=(640, 480)))
            names.append(f"{name}_{suffix}")
    write_sales(tmp_path / "sales", names)
    args = [sys.executable, "-m", "image_embeddings", "run", "--config", str(REPO / "conf" / "local.yaml"),
            "--set", f"spark.master={master}", "--set", f"s3.endpoint={s3_server.endpoint}", "--set", "s3.ssl=false",
            "--set", "input.images=s3a://cluster/raw", "--set", f"input.sales={tmp_path / 'sales'}",
            "--set", "output.images_table=s3a://cluster/delta/images",
            "--set", "output.embeddings_table=s3a://cluster/delta/embeddings",
            "--set", "output.runs_table=s3a://cluster/delta/runs", "--set", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}",
            "--set", "model.weights=random:0", "--set", "model.precision=fp32", "--set", "model.batch_size=2",
            "--set", "model.partitions=8",
            "--log-file", str(tmp_path / "run.log")]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    lines: list[str] = []
    stage2 = threading.Event()

    def read() -> None:
        assert run.stdout is not None
        for line in run.stdout:
            lines.append(line)
            if "stage=ingest status=succeeded" in line:
                stage2.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed: list[int] = []
    try:
        assert stage2.wait(timeout=600), "".join(lines)[-3000:]

        def embedding_executor() -> int | None:
            for worker in started[1:]:
                for pid in children(worker.pid):
                    if "CoarseGrainedExecutorBackend" in cmdline(pid) and any(
                            _embedding(child) for child in children(pid)):
                        return pid
            return None

        _wait_for(lambda: embedding_executor() is not None or run.poll() is not None, 300, "stage 2 to embed")
        victim = embedding_executor()
        assert victim is not None, "stage 2 finished before an executor could be killed: " + "".join(lines)[-2000:]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        assert run.wait(timeout=900) == 0, "".join(lines)[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
        reader.join(timeout=10)
    assert killed

    from image_embeddings.core.config import load_config
    from image_embeddings.ops.status import collect_status

    config = load_config(REPO / "conf" / "local.yaml", [
        f"s3.endpoint={s3_server.endpoint}", "s3.ssl=false", "input.images=s3a://cluster/raw",
        f"input.sales={tmp_path / 'sales'}", "output.images_table=s3a://cluster/delta/images",
        "output.embeddings_table=s3a://cluster/delta/embeddings", "output.runs_table=s3a://cluster/delta/runs"])
    embeddings = spark.read.format("delta").load(config.output.embeddings_table)
    assert embeddings.count() == len(names)
    assert embeddings.select("image_id").distinct().count() == len(names), "exactly one embedding per image"
    assert embeddings.where("embedding IS NULL").count() == 0
    assert [r["status"] for r in collect_status(spark, config)["runs"]] == ["succeeded", "succeeded"]
