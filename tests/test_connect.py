"""Spark Connect sessions (Databricks shared and serverless compute): the commands and the notebook's rerun path,
against a real Spark Connect server started from the installed pyspark's jars, with Delta's jars on the server
and the session picked up from ``SPARK_REMOTE`` as Databricks sets it.

Every client runs in a subprocess (the CLI, a probe script, the notebook's kernel): a Connect session in pytest's
own process would turn pyspark's functions into Connect ones for every later test there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import connect_server

from image_embeddings.core.config import load_config
from image_embeddings.testing.sample import PHOTOS, write_sample

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "local.yaml"

pytestmark = pytest.mark.xdist_group("processes")


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The ``sc://`` URL of a Spark Connect server with the Delta packages conf/local.yaml names; stopped after."""
    config = load_config(CONF, needs_input=False)
    folder = tmp_path_factory.mktemp("connect-server")
    with connect_server(folder, config.spark.packages, REPO / ".cache" / "ivy", str(REPO / "src"),
                        conf={"spark.sql.shuffle.partitions": "2",
                              "spark.databricks.delta.snapshotPartitions": "2"}) as url:
        yield url


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sample photos (each with three near-copies) and the settings that point conf/local.yaml at them."""
    root = tmp_path_factory.mktemp("connect")
    write_sample(root / "sample")
    sets = [f"input.images={root}/sample/images", f"input.sales={root}/sample/sales",
            f"output.images_table={root}/delta/images", f"output.embeddings_table={root}/delta/embeddings",
            f"output.runs_table={root}/delta/runs", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}",
            "model.name=efficientnet_lite0", "model.weights=imagenet", f"model.cache_dir={root}/models"]
    return {"root": root, "sets": sets}


def _env(remote: str, root: Path) -> dict[str, str]:
    env = {**os.environ, "SPARK_REMOTE": remote, "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO / "tests"),
           "IMAGE_EMBEDDINGS_LOG_DIR": str(root / "logs"), "TORCH_HOME": str(root / "torch")}
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    return env


def _cli(remote: str, sample: dict[str, Any], *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "image_embeddings", *args, "--config", str(CONF),
               *[a for s in sample["sets"] for a in ("--set", s)]]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(remote, sample["root"]),
                          cwd=sample["root"])


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_the_session_picked_up_from_spark_remote_is_a_connect_one(remote: str, tmp_path: Path) -> None:
    """Parallelism, progress and one-line failures without a SparkContext; a missing folder fails where read."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "connect_probe.py"), str(tmp_path / "bad"),
                           str(CONF), f"spark.ivy_dir={REPO / '.cache' / 'ivy'}"],
                          capture_output=True, text=True, timeout=300, env=_env(remote, tmp_path))
    out = _json(done)
    assert out["session"] == "pyspark.sql.connect.session" and out["is_connect"] is True
    assert out["parallelism"] == 2  # the server's local[2], asked of the server
    assert out["time_zone"] == "UTC"  # the package's SQL settings reach a Connect session
    assert out["progress_rows"] == 24
    lines = out["progress_lines"]
    assert lines[-1].startswith("probe: 1,200 of 1,200 images (100%) in "), lines
    assert [line for line in lines[:-1] if "(100%)" not in line and not line.startswith("probe: 0 ")], lines
    assert sum("progress degraded on Spark Connect: no status tracker" in line for line in out["log"]) == 1
    # The root cause, read from the server's stack trace as a classic session reads the JVM's exception chain.
    assert out["failure_line"].startswith("RuntimeException: file:") and "is not a Parquet file" in out[
        "failure_line"], out["failure_line"]
    assert out["missing_folder"].startswith("input.images: cannot list /nonexistent/images: "), out


@pytest.fixture(scope="module")
def ran(remote: str, sample: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`image-embeddings run` over the Connect session."""
    return _cli(remote, sample, "run", "--report", str(sample["root"] / "run.json"))


def test_run_over_connect_writes_the_tables(remote: str, sample: dict[str, Any],
                                            ran: subprocess.CompletedProcess[str]) -> None:
    assert ran.returncode == 0, ran.stderr[-4000:]
    n = 4 * len(PHOTOS)
    report = json.loads((sample["root"] / "run.json").read_text())
    assert report["status"] == "succeeded" and set(report["stages"]) == {"ingest", "embed"}
    assert report["stages"]["ingest"]["metrics"]["files_decoded"] == n
    assert report["stages"]["embed"]["metrics"]["embedded"] == n
    # The session came from SPARK_REMOTE; what a Connect client cannot set was left to the server, and said so.
    assert "spark connect session: sc://127.0.0.1:" in ran.stderr
    skipped = next(line for line in ran.stderr.splitlines() if "settings a Spark Connect client cannot set" in line)
    assert "spark.jars.packages" in skipped and "spark.master" in skipped and "spark.driver.memory" in skipped
    assert ran.stderr.count("progress degraded on Spark Connect: no status tracker") == 1
    assert f"embed: {n} of {n} images (100%) in " in ran.stderr

    again = _cli(remote, sample, "run", "--report", str(sample["root"] / "again.json"))
    assert again.returncode == 0, again.stderr[-4000:]
    stages = json.loads((sample["root"] / "again.json").read_text())["stages"]
    assert stages["ingest"]["metrics"]["files_decoded"] == 0 and stages["embed"]["metrics"]["embedded"] == 0


def test_status_over_connect(remote: str, sample: dict[str, Any], ran: subprocess.CompletedProcess[str]) -> None:
    n = 4 * len(PHOTOS)
    status = _json(_cli(remote, sample, "status", "--json"))
    assert {(r["stage"], r["status"]) for r in status["runs"]} == {("ingest", "succeeded"), ("embed", "succeeded")}
    assert len(status["runs"]) == 4  # two runs of two stages
    rows = {t["table"]: t["rows"] for t in status["tables"] if t["exists"]}
    assert rows["images"] == n and rows["embeddings"] == n
    assert [(m["model"], m["rows"], m["without_embedding"]) for m in status["models"]] == [("efficientnet_lite0", n, 0)]
    assert status["last_failure"] is None


def _top(remote: str, sample: dict[str, Any], query: str, *flags: str) -> tuple[list[str], str]:
    done = _cli(remote, sample, "similar", "--id", query, "--k", "5", "--json", *flags)
    return [n["image_id"] for n in _json(done)], done.stderr


def test_similar_exactly_then_with_the_index_built_over_connect(remote: str, sample: dict[str, Any],
                                                                ran: subprocess.CompletedProcess[str]) -> None:
    for query in ("astronaut", "coffee", "chelsea"):  # trained weights: each photo's three copies come first
        found, how = _top(remote, sample, query)
        assert len(found) == 5 and set(found[:3]) == {f"{query}_flip", f"{query}_crop", f"{query}_bright"}, found
        assert "searched exactly" in how
    # The index is filled by Spark tasks that get the trained index inside their UDF (no broadcast on Connect).
    index = _cli(remote, sample, "index")
    assert index.returncode == 0, index.stderr[-4000:]
    found, how = _top(remote, sample, "astronaut")
    assert "searched with the " in how and set(found[:3]) == {"astronaut_flip", "astronaut_crop", "astronaut_bright"}


def test_evaluate_over_connect(remote: str, sample: dict[str, Any], ran: subprocess.CompletedProcess[str]) -> None:
    n = 4 * len(PHOTOS)
    report = sample["root"] / "evaluate.json"
    done = _cli(remote, sample, "evaluate", "--report", str(report))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "recall@1 " in done.stdout
    figures = json.loads(report.read_text())
    assert figures["sample"] == n and figures["statistics"]["rows"] == n and figures["statistics"]["dim"] == 1280
    assert figures["recall_at_5"] == 1.0 and figures["gap"] > 0.5


def test_the_example_notebook_reruns_one_day_over_connect(remote: str, tmp_path: Path) -> None:
    import nbclient
    import nbformat

    notebook = nbformat.read(REPO / "examples" / "rerun_one_day.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(
        "from image_embeddings.core.spark import is_connect\nprint('connect session:', is_connect(spark))"))
    env = {**_env(remote, tmp_path), "EXAMPLE_WORKDIR": str(tmp_path), "EXAMPLE_REPO": str(REPO)}
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "examples")}}).execute(env=env)
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "stage=ingest status=succeeded" in outputs and "stage=embed status=succeeded" in outputs
    assert "2026-11-23" in outputs and "connect session: True" in outputs


def test_a_classic_session_is_not_a_connect_one(spark: Any) -> None:
    from image_embeddings.core.spark import default_parallelism, is_connect

    assert not is_connect(spark)
    assert default_parallelism(spark) == spark.sparkContext.defaultParallelism
