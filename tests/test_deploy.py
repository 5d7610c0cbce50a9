"""The jobs as clusters run them: spark-submit with the packed environment, and the deployment files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from image_embeddings.testing.sample import PHOTOS, trained_like_weights, write_sample

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
    from image_embeddings.core.config import load_config
    from image_embeddings.ops.deploy import emr_steps

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


def test_emr_cluster_retries_s3_slow_down_and_shares_the_log_store() -> None:
    from image_embeddings.ops.deploy import DELTA_LOG_STORE, EMRFS_RETRY

    cluster = json.loads((REPO / "deploy" / "emr" / "cluster.json").read_text())
    classes = {c["Classification"]: c for c in cluster["Configurations"]}
    # EMRFS (s3:// on EMR) retries 503 Slow Down with back-off; the package's s3.* settings reach only S3A.
    assert classes["emrfs-site"]["Properties"] == EMRFS_RETRY == {"fs.s3.maxRetries": "30",
                                                                  "fs.s3.aimd.enabled": "true"}
    defaults = classes["spark-defaults"]["Properties"]
    assert {k: defaults[k] for k in DELTA_LOG_STORE} == DELTA_LOG_STORE, "EMR Serverless runs write the same way"


def test_emr_cluster_and_serverless_runs_use_the_glue_data_catalog() -> None:
    from image_embeddings.ops.deploy import GLUE_CATALOG, HIVE_CATALOG, emr_serverless_job

    cluster = json.loads((REPO / "deploy" / "emr" / "cluster.json").read_text())
    classes = {c["Classification"]: c for c in cluster["Configurations"]}
    # Tables by name (output.* = database.table) are created in Glue, where Athena finds them.
    assert classes["spark-hive-site"]["Properties"] == GLUE_CATALOG == {
        "hive.metastore.client.factory.class":
        "com.amazonaws.glue.catalog.metastore.AWSGlueDataCatalogHiveClientFactory"}
    defaults = classes["spark-defaults"]["Properties"]
    assert {k: defaults[k] for k in HIVE_CATALOG} == HIVE_CATALOG == {"spark.sql.catalogImplementation": "hive"}
    submit = emr_serverless_job("ingest", "s3://b/p", "2026-11-23")["jobDriver"]["sparkSubmit"]
    settings = dict(p.split(" ", 1)[1].split("=", 1) for p in
                    (" " + submit["sparkSubmitParameters"]).split(" --conf")[1:])
    assert settings["spark.sql.catalogImplementation"] == "hive"
    assert settings["spark.hadoop.hive.metastore.client.factory.class"] == GLUE_CATALOG[
        "hive.metastore.client.factory.class"]


@pytest.mark.parametrize(("job", "command"), [
    ("ingest_images.py", "ingest"), ("embed_images.py", "embed"), ("index_embeddings.py", "neighbours"),
    ("maintain_tables.py", "maintain")])
def test_spark_submit_entry_points_call_the_command_with_the_config(job: str, command: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    import image_embeddings.cli
    from image_embeddings.cli import build_parser
    from image_embeddings.ops.deploy import _JOBS, STAGES

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

    from image_embeddings.cli import _nightly_parser
    from image_embeddings.ops.deploy import databricks_job, workspace_values

    text = (REPO / "deploy" / "databricks" / "job.json").read_text()
    job = json.loads(text)
    assert job == databricks_job(workspace_values("/Workspace/Shared/image-embeddings")), (
        "job.json is rendered, not edited")
    assert "<instance-profile" not in text and "XXXX" not in text, "no placeholder to find and replace"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["image-embeddings-nightly"] == "image_embeddings.cli:nightly_main"
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    assert "gpu-ml" in clusters["gpu"]["spark_version"] and "gpu" not in clusters["cpu"]["spark_version"]
    assert clusters["gpu"]["spark_conf"]["spark.task.resource.gpu.amount"] == "0.5"
    assert "gpu" not in clusters["maintenance"]["spark_version"]
    assert all("instance_profile_arn" not in c["aws_attributes"] and "policy_id" not in c for c in clusters.values())
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
    # One run date for every task of a run: the job parameter Airflow sets, else the day before the trigger's.
    assert {p["name"]: p["default"] for p in job["parameters"]} == {"run_date": "", "trailing_days": "2"}
    assert job["schedule"] == {"quartz_cron_expression": "0 0 2 * * ?", "timezone_id": "UTC", "pause_status": "PAUSED"}
    for stage, task in tasks.items():
        wheel_task = task["python_wheel_task"]
        assert wheel_task["entry_point"] in scripts
        args = _nightly_parser().parse_args(wheel_task["parameters"])
        assert (args.stage, args.run_date, args.night) == (
            stage, "{{job.parameters.run_date}}", "{{job.trigger.time.iso_date}}")
        assert args.config == "/Workspace/Shared/image-embeddings/conf/databricks.yaml"
        assert task["libraries"][0]["whl"].endswith(".whl")
    assert _nightly_parser().parse_args(tasks["ingest"]["python_wheel_task"]["parameters"]).trailing_days == (
        "{{job.parameters.trailing_days}}")


def test_run_date_is_the_utc_day_before_the_night() -> None:
    import datetime as dt

    from image_embeddings.ops.deploy import idempotency_token, ingest_dates, run_date_for

    night = dt.datetime(2026, 11, 24, 2, 0, tzinfo=dt.timezone.utc)
    assert run_date_for(night) == run_date_for("2026-11-24") == run_date_for("2026-11-24T02:00:00+00:00") == (
        "2026-11-23")
    # A time given in another zone is the same instant: 2026-11-23 21:00 in New York is 02:00 UTC on the 24th.
    assert run_date_for(dt.datetime(2026, 11, 23, 21, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))) == "2026-11-23"
    assert run_date_for("2026-03-01") == "2026-02-28"
    complete = {"2026-11-21"}.__contains__  # 2026-11-22's upload never finished
    assert ingest_dates("2026-11-23", 2, complete) == ["2026-11-23", "2026-11-21"]
    assert ingest_dates("2026-11-23", 0, complete) == ["2026-11-23"]
    token = idempotency_token("image_embeddings_nightly", "scheduled__2026-11-24T02:00:00+00:00", "nightly")
    assert len(token) <= 64 and token == idempotency_token(
        "image_embeddings_nightly", "scheduled__2026-11-24T02:00:00+00:00", "nightly"), "the same for every try"
    assert token != idempotency_token("image_embeddings_nightly", "scheduled__2026-11-25T02:00:00+00:00", "nightly")
    assert token != idempotency_token("image_embeddings_nightly", "scheduled__2026-11-24T02:00:00+00:00", "ingest")


def test_emr_serverless_job_runs_of_the_cpu_stages(capsys: pytest.CaptureFixture[str]) -> None:
    from image_embeddings.ops.deploy import DELTA_LOG_STORE, emr_serverless_job, main

    for stage, job in (("ingest", "ingest_images.py"), ("maintain", "maintain_tables.py")):
        assert main(["emr-serverless-job", stage, "--s3-prefix", "s3://my-bucket/image-embeddings/",
                     "--run-date", "2026-11-23"]) == 0
        run = json.loads(capsys.readouterr().out)  # aws emr-serverless start-job-run --cli-input-json
        assert run == emr_serverless_job(stage, "s3://my-bucket/image-embeddings", "2026-11-23")
        assert run["name"] == f"image-embeddings {stage} 2026-11-23"
        submit = run["jobDriver"]["sparkSubmit"]
        assert submit["entryPoint"] == f"s3://my-bucket/image-embeddings/jobs/{job}"
        assert (REPO / "jobs" / job).exists()
        assert submit["entryPointArguments"] == ["--config", "conf/emr.yaml", "--run-date", "2026-11-23"]
        settings = dict(p.split(" ", 1)[1].split("=", 1) for p in
                        (" " + submit["sparkSubmitParameters"]).split(" --conf")[1:])
        assert settings["spark.archives"] == ("s3://my-bucket/image-embeddings/dist/env-ingest.tar.gz#environment,"
                                              "s3://my-bucket/image-embeddings/conf/emr-conf.tar.gz#conf")
        assert settings["spark.emr-serverless.driverEnv.PYSPARK_PYTHON"] == "./environment/bin/python"
        assert settings["spark.executorEnv.PYSPARK_PYTHON"] == "./environment/bin/python"
        assert {k: settings[k] for k in DELTA_LOG_STORE} == DELTA_LOG_STORE
        assert settings["spark.hadoop.fs.s3.maxRetries"] == "30"
    for stage in ("embed", "neighbours"):  # EMR Serverless has no GPUs
        with pytest.raises(ValueError, match="needs a GPU"):
            emr_serverless_job(stage, "s3://b/p", "2026-11-23")


def test_databricks_bundle_on_disk_is_the_rendered_one() -> None:
    import re

    import yaml

    from image_embeddings.ops.deploy import (
        BUNDLE_JOB,
        bundle_values,
        bundle_yaml,
        databricks_bundle,
        databricks_job,
        main,
    )

    text = (REPO / "deploy" / "databricks" / "databricks.yml").read_text()
    assert text == bundle_yaml(), "databricks.yml is rendered: python -m image_embeddings.ops.deploy databricks-bundle"
    bundle = yaml.safe_load(text)
    assert bundle == json.loads(json.dumps(databricks_bundle()))
    assert main(["databricks-bundle"]) == 0
    assert bundle["bundle"]["name"] == "image-embeddings"
    assert set(bundle["targets"]) == {"dev", "prod"} and bundle["targets"]["dev"]["default"] is True
    assert bundle["targets"]["dev"]["mode"] == "development" and bundle["targets"]["prod"]["mode"] == "production"
    assert bundle["artifacts"]["wheel"]["type"] == "whl" and (REPO / bundle["artifacts"]["wheel"]["path"].replace(
        "../..", ".") / "pyproject.toml").exists()
    assert bundle["sync"]["paths"] == ["../../conf"] and (REPO / "conf" / "databricks.yaml").exists()
    job = bundle["resources"]["jobs"][BUNDLE_JOB]
    assert job == databricks_job(bundle_values()), "the same job as job.json, with the bundle's references"
    assert [t["task_key"] for t in job["tasks"]] == ["ingest", "embed", "neighbours", "maintain"]
    assert all(t["libraries"][0] == {"whl": "../../dist/*.whl"} for t in job["tasks"])
    # Nothing to find and replace: every workspace setting is a declared variable, the required one without default.
    used = set(re.findall(r"\$\{var\.([a-z_]+)\}", text))
    assert used == set(bundle["variables"]) and "<instance-profile" not in text
    assert "default" not in bundle["variables"]["instance_profile_arn"]
    clusters = [c["new_cluster"] for c in job["job_clusters"]]
    assert {c["aws_attributes"]["instance_profile_arn"] for c in clusters} == {"${var.instance_profile_arn}"}
    assert {c["policy_id"] for c in clusters} == {"${var.cluster_policy_id}"}
    assert {c["node_type_id"] for c in clusters} == {"${var.cpu_node_type}", "${var.gpu_node_type}"}


def _nightly_config(tmp_path: Path, images: str, *lines: str) -> Path:
    import yaml

    config = yaml.safe_load((REPO / "conf" / "local.yaml").read_text())
    config["input"]["images"] = images
    for line in lines:
        key, value = line.split("=", 1)
        config.setdefault(key.split(".")[0], {})[key.split(".")[1]] = yaml.safe_load(value)
    path = tmp_path / "databricks.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_databricks_nightly_task_computes_the_date_and_reads_complete_late_days(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import image_embeddings.cli
    from image_embeddings.cli import nightly_main

    calls: list[list[str]] = []
    monkeypatch.setattr(image_embeddings.cli, "main", lambda argv: calls.append(list(argv)) or 0)
    config = str(_nightly_config(tmp_path, f"{tmp_path}/raw/{{run_date}}"))
    ingest = ["ingest", "--config", config, "--run-date", "", "--night", "2026-11-24", "--trailing-days", "2"]
    assert nightly_main(ingest) == 1 and calls == [], "no marker: the upload is not complete"
    assert "the upload of 2026-11-23 is not complete" in capsys.readouterr().err
    for day in ("2026-11-23", "2026-11-21"):  # 2026-11-22 has files but no marker: still uploading
        (tmp_path / "raw" / day).mkdir(parents=True)
        (tmp_path / "raw" / day / "_SUCCESS").write_text("")
    (tmp_path / "raw" / "2026-11-22").mkdir()
    assert nightly_main(ingest) == 0
    assert calls == [["ingest", "--config", config, "--run-date", day] for day in ("2026-11-23", "2026-11-21")]
    calls.clear()
    # Airflow passes the date explicitly; the later stages take the same date as the night's ingest.
    assert nightly_main(["embed", "--config", config, "--run-date", "2026-11-20", "--night", "2026-11-24"]) == 0
    assert nightly_main(["maintain", "--config", config, "--night", "2026-11-24"]) == 0
    assert calls == [["embed", "--config", config, "--run-date", "2026-11-20"],
                     ["maintain", "--config", config, "--run-date", "2026-11-23"]]


def test_databricks_nightly_task_finds_markers_on_s3(tmp_path: Path, s3_server: object, s3_plan: object,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    import image_embeddings.cli
    from image_embeddings.cli import nightly_main

    endpoint = s3_plan.endpoint  # type: ignore[attr-defined]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="nightly-markers")
    s3.put_object(Bucket="nightly-markers", Key="raw/2026-11-23/_SUCCESS", Body=b"")
    s3.put_object(Bucket="nightly-markers", Key="raw/2026-11-22/a.jpg", Body=b"jpeg")
    calls: list[list[str]] = []
    monkeypatch.setattr(image_embeddings.cli, "main", lambda argv: calls.append(list(argv)) or 0)
    config = str(_nightly_config(tmp_path, "s3://nightly-markers/raw/{run_date}", f"s3.endpoint={endpoint}",
                                 "s3.ssl=false"))
    assert nightly_main(["ingest", "--config", config, "--night", "2026-11-24"]) == 0
    assert calls == [["ingest", "--config", config, "--run-date", "2026-11-23"]]
