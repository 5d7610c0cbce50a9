"""The jobs as clusters run them: spark-submit with the packed environment, and the deployment files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from image_embeddings.sample import PHOTOS, trained_like_weights, write_sample

REPO = Path(__file__).resolve().parents[1]
PACKAGES = "io.delta:delta-spark_2.13:4.0.1,org.apache.hadoop:hadoop-aws:3.4.1"


def _spark_submit(job: str, python: str, sets: list[str], report: Path, extra: tuple[str, ...] = ()
                  ) -> subprocess.CompletedProcess[str]:
    import pyspark

    env = {**os.environ, "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python,
           "SPARK_HOME": os.path.dirname(pyspark.__file__)}
    env.pop("PYTHONPATH", None)
    command = [str(REPO / ".venv" / "bin" / "spark-submit"), "--master", "local[2]", "--packages", PACKAGES,
               "--conf", f"spark.jars.ivy={REPO / '.cache' / 'ivy'}", "--conf", "spark.ui.enabled=false", *extra,
               str(REPO / "jobs" / job), "--config", str(REPO / "conf" / "local.yaml"),
               *[a for s in sets for a in ("--set", s)], "--report", str(report)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.xdist_group("pipelines")
def test_both_jobs_under_spark_submit_one_with_the_packed_environment(tmp_path: Path) -> None:
    built = subprocess.run(["bash", str(REPO / "scripts" / "build_dist.sh")], capture_output=True, text=True,
                           timeout=900, cwd=REPO, env={**os.environ, "PY": sys.executable})
    assert built.returncode == 0, built.stderr[-3000:]
    archive = REPO / "dist" / "env-ingest.tar.gz"
    wheel = next((REPO / "dist").glob("spark_image_embeddings-*.whl"))
    env_dir = tmp_path / "environment"
    with tarfile.open(archive) as tar:
        tar.extractall(env_dir, filter="fully_trusted")
    packed_python = env_dir / "bin" / "python"
    probe = subprocess.run([str(packed_python), "-c", "import image_embeddings, PIL, pyarrow; "
                            "print(image_embeddings.__file__)"], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and str(env_dir) in probe.stdout, "the package comes from the unpacked archive"
    torchless = subprocess.run([str(packed_python), "-c", "import torch"], capture_output=True, timeout=60)
    assert torchless.returncode != 0, "the stage 1 environment carries no torch"
    assert wheel.stat().st_size < 1_000_000

    write_sample(tmp_path / "sample", with_variants=False)
    weights = trained_like_weights(tmp_path / "w.pth")
    sets = [f"input.images={tmp_path}/sample/images", f"input.sales={tmp_path}/sample/sales",
            f"output.images_table={tmp_path}/delta/images", f"output.embeddings_table={tmp_path}/delta/embeddings",
            f"output.runs_table={tmp_path}/delta/runs", f"model.weights={weights}", "spark.packages=[]"]
    ingest = _spark_submit("ingest_images.py", str(packed_python), sets, tmp_path / "ingest.json")
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    assert json.loads((tmp_path / "ingest.json").read_text())["metrics"]["files_decoded"] == len(PHOTOS)

    # spark-submit passes the Python driver's output on through its stdout.
    assert f"({env_dir}/lib/" in ingest.stdout, "the driver ran the package from the unpacked archive"

    # Stage 2 on a node whose Python already has torch (a GPU image): the package is shipped as the wheel.
    embed = _spark_submit("embed_images.py", str(REPO / ".venv" / "bin" / "python"), sets, tmp_path / "embed.json",
                          ("--py-files", str(wheel)))
    assert embed.returncode == 0, embed.stderr[-3000:]
    assert f"{wheel.name}/image_embeddings/__init__.py)" in embed.stdout, "the package came from the shipped wheel"
    report = json.loads((tmp_path / "embed.json").read_text())
    assert report["status"] == "succeeded" and report["metrics"]["embedded"] == len(PHOTOS)
    assert report["metrics"]["model_loads"] == report["metrics"]["python_workers"]


def test_emr_cluster_steps_and_submit_script(tmp_path: Path) -> None:
    from image_embeddings.config import load_config
    from image_embeddings.deploy import emr_steps

    steps = json.loads((REPO / "deploy" / "emr" / "steps.json").read_text())
    assert steps == emr_steps("s3://my-bucket/image-embeddings", "2026-11-23"), "steps.json is rendered, not edited"
    assert steps[0]["HadoopJarStep"]["Args"] == [
        "spark-submit", "--deploy-mode", "cluster",
        "--archives", "s3://my-bucket/image-embeddings/dist/env-ingest.tar.gz#environment",
        "--conf", "spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python",
        "--conf", "spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python",
        "--files", "s3://my-bucket/image-embeddings/conf/emr.yaml",
        "s3://my-bucket/image-embeddings/jobs/ingest_images.py", "--config", "emr.yaml", "--run-date", "2026-11-23"]
    embed_args = steps[1]["HadoopJarStep"]["Args"]
    assert "s3://my-bucket/image-embeddings/dist/env-embed.tar.gz#environment" in embed_args
    assert embed_args[-5] == "s3://my-bucket/image-embeddings/jobs/embed_images.py"
    # The index and neighbours table right after embed, in stage 2's environment (torch for the model key, faiss).
    neighbours_args = steps[2]["HadoopJarStep"]["Args"]
    assert steps[2]["Name"] == "image-embeddings neighbours 2026-11-23"
    assert "s3://my-bucket/image-embeddings/dist/env-embed.tar.gz#environment" in neighbours_args
    assert neighbours_args[-5:] == ["s3://my-bucket/image-embeddings/jobs/index_embeddings.py", "--config",
                                    "emr.yaml", "--run-date", "2026-11-23"]
    # Maintenance after them, without torch (the stage 1 environment), never cancelling what follows.
    maintain_args = steps[3]["HadoopJarStep"]["Args"]
    assert steps[3]["Name"] == "image-embeddings maintain 2026-11-23"
    assert "s3://my-bucket/image-embeddings/dist/env-ingest.tar.gz#environment" in maintain_args
    assert maintain_args[-5:] == ["s3://my-bucket/image-embeddings/jobs/maintain_tables.py", "--config", "emr.yaml",
                                  "--run-date", "2026-11-23"]
    assert (REPO / "jobs" / "maintain_tables.py").exists() and (REPO / "jobs" / "index_embeddings.py").exists()
    assert [s["ActionOnFailure"] for s in steps] == ["CANCEL_AND_WAIT", "CONTINUE", "CONTINUE", "CONTINUE"]

    cluster = json.loads((REPO / "deploy" / "emr" / "cluster.json").read_text())
    classes = {c["Classification"]: c for c in cluster["Configurations"]}
    assert classes["delta-defaults"]["Properties"] == {"delta.enabled": "true"}
    assert classes["yarn-site"]["Properties"]["yarn.nodemanager.resource-plugins"] == "yarn.io/gpu"
    defaults = classes["spark-defaults"]["Properties"]
    assert defaults["spark.executor.resource.gpu.discoveryScript"] == "/usr/lib/spark/scripts/gpu/getGpusResources.sh"
    # Writers on several clusters (or drivers) commit through DynamoDB: S3 alone has no put-if-absent for Delta.
    assert defaults["spark.delta.logStore.s3.impl"] == defaults["spark.delta.logStore.s3a.impl"] == (
        "io.delta.storage.S3DynamoDBLogStore")
    assert defaults["spark.jars.packages"].startswith("io.delta:delta-storage-s3-dynamodb:3.")  # EMR 7: Delta 3.x
    ddb = json.loads((REPO / "deploy" / "emr" / "delta-log-table.json").read_text())
    assert ddb["TableName"] == defaults["spark.io.delta.storage.S3DynamoDBLogStore.ddb.tableName"]
    assert {k["AttributeName"]: k["KeyType"] for k in ddb["KeySchema"]} == {"tablePath": "HASH", "fileName": "RANGE"}
    groups = {g["InstanceRole"]: g for g in cluster["Instances"]["InstanceGroups"]}
    assert groups["CORE"]["InstanceType"].startswith("m6i") and groups["TASK"]["InstanceType"].startswith("g5")
    emr = load_config(REPO / "conf" / "emr.yaml", run_date="2026-11-23")
    assert emr.input.images == "s3://my-bucket/raw-images/2026-11-23"  # the day the DAG's sensor waits for
    assert emr.maintenance.vacuum_retention_hours >= 168  # never below Delta's default safety minimum
    assert emr.spark.embed_conf["spark.executor.resource.gpu.amount"] == "1"
    assert emr.spark.embed_conf["spark.task.resource.gpu.amount"] == "0.5"
    assert emr.spark.packages == () and emr.spark.master is None

    fake_aws = tmp_path / "aws"
    fake_aws.write_text('#!/usr/bin/env bash\necho "$@" > "$CALLS"\ncp "${6#file://}" "$CALLS.steps"\n')
    fake_aws.chmod(0o755)
    done = subprocess.run([str(REPO / "deploy" / "emr" / "submit.sh"), "j-ABC", "s3://b/p", "2026-11-24"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "AWS": str(fake_aws), "CALLS": str(tmp_path / "calls"),
                               "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text().split()[:4] == ["emr", "add-steps", "--cluster-id", "j-ABC"]
    assert json.loads((tmp_path / "calls.steps").read_text()) == emr_steps("s3://b/p", "2026-11-24")
    usage = subprocess.run([str(REPO / "deploy" / "emr" / "submit.sh")], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.parametrize(("job", "command"), [
    ("ingest_images.py", "ingest"), ("embed_images.py", "embed"), ("index_embeddings.py", "neighbours"),
    ("maintain_tables.py", "maintain")])
def test_spark_submit_entry_points_call_the_command_with_the_config(job: str, command: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    import image_embeddings.cli
    from image_embeddings.cli import build_parser
    from image_embeddings.deploy import _JOBS, STAGES

    calls: list[list[str]] = []
    monkeypatch.setattr(image_embeddings.cli, "main", lambda argv: calls.append(list(argv)) or 7)
    monkeypatch.setattr(sys, "argv", [job, "--config", "emr.yaml", "--run-date", "2026-11-23"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "jobs" / job), run_name="__main__")
    assert exited.value.code == 7, "the command's exit code is the job's"
    assert calls == [[command, "--config", "emr.yaml", "--run-date", "2026-11-23"]]
    args = build_parser().parse_args(calls[0])
    assert (args.command, args.config, args.run_date) == (command, "emr.yaml", "2026-11-23")
    if command in STAGES:  # the stage's EMR step runs this file
        assert _JOBS[command] == job


def test_databricks_job_definition() -> None:
    import tomllib

    from image_embeddings.cli import build_parser
    from image_embeddings.deploy import databricks_job

    job = json.loads((REPO / "deploy" / "databricks" / "job.json").read_text())
    assert job == databricks_job("/Workspace/Shared/image-embeddings"), "job.json is rendered, not edited"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    assert "gpu-ml" in clusters["gpu"]["spark_version"] and "gpu" not in clusters["cpu"]["spark_version"]
    assert clusters["gpu"]["spark_conf"]["spark.task.resource.gpu.amount"] == "0.5"
    assert "gpu" not in clusters["maintenance"]["spark_version"]
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert list(tasks) == ["ingest", "embed", "neighbours", "maintain"]
    # The neighbours run on embed's cluster (the ML runtime's torch), maintenance on its own, both after embed.
    assert [tasks[k]["job_cluster_key"] for k in tasks] == ["cpu", "gpu", "gpu", "maintenance"]
    assert tasks["embed"]["depends_on"] == [{"task_key": "ingest"}]
    assert tasks["neighbours"]["depends_on"] == [{"task_key": "embed"}]
    assert tasks["maintain"]["depends_on"] == [{"task_key": "embed"}]
    # faiss comes from PyPI with the [embed] extra's requirement (the wheel library brings only the base install).
    embed_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["embed"]
    faiss = next(r for r in embed_extra if r.startswith("faiss-cpu"))
    assert tasks["neighbours"]["libraries"][1:] == [{"pypi": {"package": faiss}}]
    assert [len(tasks[k]["libraries"]) for k in ("ingest", "embed", "maintain")] == [1, 1, 1]
    for stage, task in tasks.items():
        wheel_task = task["python_wheel_task"]
        assert wheel_task["entry_point"] in scripts
        args = build_parser().parse_args(wheel_task["parameters"])
        assert (args.command, args.run_date) == (stage, "{{job.start_time.iso_date}}")
        assert task["libraries"][0]["whl"].endswith(".whl")


def _airflow_probe(tmp_path: Path, settings: Path | None = None) -> dict:
    airflow_python = REPO / ".venv-airflow" / "bin" / "python"
    assert airflow_python.exists(), "the Airflow environment is missing: run `make setup`"
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__UNIT_TEST_MODE": "True"}
    if settings is not None:
        env["IMAGE_EMBEDDINGS_DAG_SETTINGS"] = str(settings)
    done = subprocess.run([str(airflow_python), str(REPO / "tests" / "airflow_probe.py"),
                           str(REPO / "deploy" / "airflow")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_airflow_dag_loads_and_renders_for_both_runners(tmp_path: Path) -> None:
    import yaml

    from image_embeddings.deploy import emr_steps

    emr = _airflow_probe(tmp_path)
    assert emr["import_errors"] == {} and emr["dags"] == ["image_embeddings_nightly"]
    # neighbours and maintain both after embed, neither waiting for the other.
    assert emr["tasks"] == {"wait_for_upload": ["ingest"], "ingest": ["ingest_done"], "ingest_done": ["embed"],
                            "embed": ["embed_done"], "embed_done": ["maintain", "neighbours"],
                            "neighbours": ["neighbours_done"], "neighbours_done": [],
                            "maintain": ["maintain_done"], "maintain_done": []}
    assert set(emr["retries"].values()) == {2} and set(emr["timeouts"].values()) == {6 * 3600.0}
    steps = emr_steps("s3://my-bucket/image-embeddings", "2026-11-23")
    assert emr["rendered"]["ingest.steps"] == [steps[0]] and emr["rendered"]["embed.steps"] == [steps[1]]
    assert emr["rendered"]["neighbours.steps"] == [steps[2]] and emr["rendered"]["maintain.steps"] == [steps[3]]
    assert emr["rendered"]["neighbours.steps"][0]["HadoopJarStep"]["Args"][-5] == (
        "s3://my-bucket/image-embeddings/jobs/index_embeddings.py")
    assert emr["rendered"]["wait_for_upload.bucket_key"] == "raw-images/2026-11-23/*"

    settings = yaml.safe_load((REPO / "deploy" / "airflow" / "settings.yaml").read_text())
    settings["runner"] = "databricks"
    del settings["upload_sensor"]
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(settings))
    dbx = _airflow_probe(tmp_path, tmp_path / "settings.yaml")
    assert dbx["import_errors"] == {} and dbx["tasks"] == {"ingest": ["embed"], "embed": ["maintain", "neighbours"],
                                                            "neighbours": [], "maintain": []}
    run = dbx["rendered"]["embed.json"]
    task = run["tasks"][0]
    assert run["run_name"] == "image-embeddings embed 2026-11-23"
    assert task["python_wheel_task"]["parameters"][-2:] == ["--run-date", "2026-11-23"]
    assert "gpu-ml" in task["new_cluster"]["spark_version"]
    maintain = dbx["rendered"]["maintain.json"]["tasks"][0]
    assert maintain["python_wheel_task"]["parameters"] == [
        "maintain", "--config", "/Workspace/Shared/image-embeddings/conf/databricks.yaml", "--run-date", "2026-11-23"]
    assert "gpu" not in maintain["new_cluster"]["spark_version"] and "depends_on" not in maintain
    neighbours_run = dbx["rendered"]["neighbours.json"]
    neighbours = neighbours_run["tasks"][0]
    assert neighbours_run["run_name"] == "image-embeddings neighbours 2026-11-23"
    assert neighbours["python_wheel_task"]["parameters"] == [
        "neighbours", "--config", "/Workspace/Shared/image-embeddings/conf/databricks.yaml", "--run-date", "2026-11-23"]
    assert neighbours["new_cluster"] == task["new_cluster"], "embed's (GPU) cluster"
    assert {"pypi": {"package": "faiss-cpu>=1.8,<2"}} in neighbours["libraries"] and "depends_on" not in neighbours
