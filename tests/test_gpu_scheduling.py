"""Each Spark task's Python worker uses the GPU Spark assigned it: a standalone cluster on loopback whose two
workers announce one fake GPU each through a discovery script (no CUDA needed: the device chosen is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import standalone_cluster

from image_embeddings.embed.embedder import task_device

PROBE = """
import json, sys
import pandas as pd
from pyspark.sql import SparkSession

spark = (SparkSession.builder.master(sys.argv[1]).appName("gpu-probe")
         .config("spark.executor.cores", "1").config("spark.executor.memory", "1g")
         .config("spark.executor.resource.gpu.amount", "1").config("spark.task.resource.gpu.amount", "1")
         .getOrCreate())

def choose(batches):
    import os
    from pyspark import TaskContext
    from image_embeddings.embed.stage import worker_settings
    from image_embeddings.embed.embedder import EmbedderSettings

    context = TaskContext.get()
    for batch in batches:
        chosen = worker_settings(EmbedderSettings("resnet50", "random:0", device="auto")).device
        yield pd.DataFrame({"pid": [os.getpid()], "device": [chosen],
                            "assigned": [",".join(context.resources()["gpu"].addresses)]})

rows = spark.range(0, 8, 1, 8).mapInPandas(choose, "pid long, device string, assigned string").collect()
print(json.dumps([r.asDict() for r in rows]))
spark.stop()
"""


def test_task_device_follows_the_assigned_gpu_only_where_a_gpu_may_be_used() -> None:
    class Gpu:
        addresses = ["3"]

    assert task_device("auto", {"gpu": Gpu()}) == "cuda:3" and task_device("cuda", {"gpu": Gpu()}) == "cuda:3"
    assert task_device("cpu", {"gpu": Gpu()}) == "cpu", "model.device=cpu is kept"
    assert task_device("auto", {}) == "auto", "Spark schedules no GPUs: the model picks as before"


@pytest.mark.xdist_group("processes")
def test_each_worker_uses_the_gpu_spark_assigned_its_task(tmp_path: Path) -> None:
    opts = []
    for address in ("0", "1"):  # one fake GPU per worker, as a node's discovery script would report it
        script = tmp_path / f"gpus-{address}.sh"
        script.write_text(f"#!/usr/bin/env bash\necho '{{\"name\": \"gpu\", \"addresses\": [\"{address}\"]}}'\n")
        script.chmod(0o755)
        opts.append(f"-Dspark.worker.resource.gpu.amount=1 -Dspark.worker.resource.gpu.discoveryScript={script}")
    with standalone_cluster(tmp_path, opts, memory="2g") as (master, _):
        probe = subprocess.run([sys.executable, "-c", PROBE, master], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable})
    assert probe.returncode == 0, probe.stderr[-3000:]
    rows = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(rows) == 8
    assert all(r["device"] == f"cuda:{r['assigned']}" for r in rows), rows
    assert {r["device"] for r in rows} == {"cuda:0", "cuda:1"}, "tasks ran on both workers, each on its own GPU"
