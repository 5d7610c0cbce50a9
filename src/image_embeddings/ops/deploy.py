"""Deployment definitions built in one place: EMR steps (exact spark-submit arguments), EMR Serverless job runs,
the Databricks job (Jobs API JSON and the Asset Bundle), and the run date every runner uses.

Each night runs ingest, then embed, then two steps that each follow embed: ``neighbours`` (the nearest-neighbour
index and the neighbours table, brought to the embeddings table's new version) and table maintenance (OPTIMIZE and
VACUUM). Neither changes the embeddings table's rows, and a failure of either leaves the data as it was, so neither
holds back the other, the data steps or the next night.

The run date is the day whose upload a night processes: the UTC day before the night's scheduled start
(:func:`run_date_for`). The Airflow DAG and the Databricks job both compute it with that function, so the same
night reads the same folder whichever runner starts it. Ingest also re-reads the previous ``trailing_days``
days whose upload is complete (:func:`ingest_dates`): files that land late for a day already processed are
picked up by a later night, and a re-read of an unchanged day writes nothing.

The files under ``deploy/`` are rendered from these functions (a test checks they match), and the Airflow
DAG calls them, so the arguments a cluster receives cannot drift apart. Nothing here imports Spark or torch.

    python -m image_embeddings.ops.deploy emr-steps --s3-prefix s3://bucket/image-embeddings --run-date 2026-11-23
    python -m image_embeddings.ops.deploy emr-serverless-job ingest --s3-prefix s3://bucket/prefix --run-date 2026-11-23
    python -m image_embeddings.ops.deploy databricks-job --workspace-dir /Workspace/Shared/image-embeddings
    python -m image_embeddings.ops.deploy databricks-bundle > deploy/databricks/databricks.yml
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from image_embeddings.core.version import __version__

WHEEL = f"spark_image_embeddings-{__version__}-py3-none-any.whl"
STAGES = ("ingest", "embed", "neighbours", "maintain")
# The stage each one runs after (Databricks' depends_on, the Airflow DAG's edges); EMR runs its steps in this order.
UPSTREAM = {"embed": "ingest", "neighbours": "embed", "maintain": "embed"}
_JOBS = {"ingest": "ingest_images.py", "embed": "embed_images.py", "neighbours": "index_embeddings.py",
         "maintain": "maintain_tables.py"}
# Stages that need the stage 2 environment: torch (the model key comes from the weights) and faiss ([embed]).
EMBED_ENV_STAGES = ("embed", "neighbours")
# EMR Serverless has no GPUs: only the CPU stages can run there; embed and neighbours stay on the cluster's GPUs.
SERVERLESS_STAGES = ("ingest", "maintain")
# Databricks: what a stage needs beyond the wheel and the runtime (the ML GPU runtime brings torch, not faiss).
_EXTRA_LIBRARIES: dict[str, list[dict[str, Any]]] = {"neighbours": [{"pypi": {"package": "faiss-cpu>=1.8,<2"}}]}
# The uploader writes this file into a day's folder last: the upload of that day is complete.
MARKER = "_SUCCESS"
TRAILING_DAYS = 2
# EMRFS (s3://) retries on 503 Slow Down: twice the default 15 attempts of its exponential back-off, and the
# AIMD strategy (EMR 6.4+), which lowers the request rate while S3 throttles. The package's s3.* keys reach S3A only.
EMRFS_RETRY = {"fs.s3.maxRetries": "30", "fs.s3.aimd.enabled": "true"}
# Delta's multi-cluster log store (deploy/emr/cluster.json has the same): every writer of the tables must use it.
DELTA_LOG_STORE = {
    "spark.jars.packages": "io.delta:delta-storage-s3-dynamodb:3.2.1",
    "spark.delta.logStore.s3.impl": "io.delta.storage.S3DynamoDBLogStore",
    "spark.delta.logStore.s3a.impl": "io.delta.storage.S3DynamoDBLogStore",
    "spark.io.delta.storage.S3DynamoDBLogStore.ddb.tableName": "image_embeddings_delta_log",
    "spark.io.delta.storage.S3DynamoDBLogStore.ddb.region": "us-east-1",
}
# The Glue Data Catalog as the session's metastore, for tables by name (deploy/emr/cluster.json has the same: its
# spark-hive-site classification and spark.sql.catalogImplementation in spark-defaults).
GLUE_CATALOG = {"hive.metastore.client.factory.class":
                "com.amazonaws.glue.catalog.metastore.AWSGlueDataCatalogHiveClientFactory"}
HIVE_CATALOG = {"spark.sql.catalogImplementation": "hive"}
# EMR Serverless ships Delta's jars but does not load them (a cluster's delta-defaults classification does).
_SERVERLESS_DELTA_JARS = "/usr/share/aws/delta/lib/delta-spark.jar,/usr/share/aws/delta/lib/delta-storage.jar"


def run_date_for(night: dt.datetime | dt.date | str) -> str:
    """The day whose upload the night starting at ``night`` processes: the UTC day before it (YYYY-MM-DD)."""
    if isinstance(night, str):
        night = dt.datetime.fromisoformat(night) if "T" in night or " " in night else dt.date.fromisoformat(night)
    if isinstance(night, dt.datetime):
        # An aware time (Airflow's) is taken in UTC; a naive one is UTC already.
        night = (night.astimezone(dt.timezone.utc) if night.tzinfo else night).date()
    return (night - dt.timedelta(days=1)).isoformat()


def ingest_dates(run_date: str, trailing_days: int, complete: Callable[[str], bool]) -> list[str]:
    """The days ingest reads: ``run_date`` first, then each of the ``trailing_days`` days before it whose upload
    is ``complete`` (a day without a finished upload has nothing to re-read and its folder may not exist)."""
    day = dt.date.fromisoformat(run_date)
    earlier = [(day - dt.timedelta(days=n)).isoformat() for n in range(1, trailing_days + 1)]
    return [run_date, *[d for d in earlier if complete(d)]]


def idempotency_token(dag_id: str, run_id: str, stage: str) -> str:
    """A Databricks run token per DAG run and stage (not per try: a retry finds the run an earlier try started).

    At most 64 characters, as the Jobs API allows; the readable prefix helps when reading the run list.
    """
    digest = hashlib.sha256(f"{dag_id}\n{run_id}\n{stage}".encode()).hexdigest()
    return f"image-embeddings-{stage}-{digest}"[:64]


def spark_submit_args(stage: str, s3_prefix: str, run_date: str, config: str = "emr.yaml") -> list[str]:
    """The spark-submit command of one stage on EMR (cluster mode, the packed environment from S3).

    ``neighbours`` runs with the stage 2 environment (torch and faiss-cpu, the ``[embed]`` extra); maintenance
    needs neither: it runs with the stage 1 environment.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    prefix = s3_prefix.rstrip("/")
    env = "env-embed" if stage in EMBED_ENV_STAGES else "env-ingest"
    job = _JOBS[stage]
    return [
        "spark-submit", "--deploy-mode", "cluster",
        "--archives", f"{prefix}/dist/{env}.tar.gz#environment",
        "--conf", "spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python",
        "--conf", "spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python",
        "--files", f"{prefix}/conf/{config}",
        f"{prefix}/jobs/{job}",
        "--config", config, "--run-date", run_date,
    ]  # the report goes to the log and to output.runs_table


def emr_step(stage: str, s3_prefix: str, run_date: str, config: str = "emr.yaml") -> dict[str, Any]:
    """One EMR step. A failed ingest cancels the steps behind it; the later stages let the cluster go on."""
    return {
        "Name": f"image-embeddings {stage} {run_date}",
        "ActionOnFailure": "CANCEL_AND_WAIT" if stage == "ingest" else "CONTINUE",
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": spark_submit_args(stage, s3_prefix, run_date, config)},
    }


def emr_steps(s3_prefix: str, run_date: str, config: str = "emr.yaml") -> list[dict[str, Any]]:
    """The four EMR steps (``aws emr add-steps --steps file://...`` and Airflow's EmrAddStepsOperator).

    A failed ingest cancels the steps behind it; a failed embed, neighbours or maintenance step lets the cluster go
    on (the tables keep their last good version), and the cluster stays up for the next night.
    """
    return [emr_step(stage, s3_prefix, run_date, config) for stage in STAGES]


def emr_serverless_job(stage: str, s3_prefix: str, run_date: str, config: str = "emr.yaml") -> dict[str, Any]:
    """An EMR Serverless job run of a CPU stage, as StartJobRun takes it (``name``, ``jobDriver``; the CLI's
    ``aws emr-serverless start-job-run --cli-input-json``; the application and role come from the caller).

    The environment archive is unpacked as ``./environment`` and ``conf/emr-conf.tar.gz`` (holding ``config``) as
    ``./conf`` in the driver's working directory. The Delta log store, EMRFS retries and Glue catalog of the
    cluster come along as Spark settings, since a Serverless application has no cluster classifications.
    """
    if stage not in SERVERLESS_STAGES:
        raise ValueError(f"{stage!r} needs a GPU: EMR Serverless runs only {', '.join(SERVERLESS_STAGES)}")
    prefix = s3_prefix.rstrip("/")
    python = "./environment/bin/python"
    settings = {
        "spark.archives": f"{prefix}/dist/env-ingest.tar.gz#environment,{prefix}/conf/emr-conf.tar.gz#conf",
        "spark.emr-serverless.driverEnv.PYSPARK_DRIVER_PYTHON": python,
        "spark.emr-serverless.driverEnv.PYSPARK_PYTHON": python,
        "spark.executorEnv.PYSPARK_PYTHON": python,
        "spark.jars": _SERVERLESS_DELTA_JARS,
        **DELTA_LOG_STORE,
        **{f"spark.hadoop.{key}": value for key, value in EMRFS_RETRY.items()},
        **HIVE_CATALOG,
        **{f"spark.hadoop.{key}": value for key, value in GLUE_CATALOG.items()},
    }
    return {
        "name": f"image-embeddings {stage} {run_date}",
        "jobDriver": {"sparkSubmit": {
            "entryPoint": f"{prefix}/jobs/{_JOBS[stage]}",
            "entryPointArguments": ["--config", f"conf/{config}", "--run-date", run_date],
            "sparkSubmitParameters": " ".join(f"--conf {key}={value}" for key, value in settings.items()),
        }},
    }


@dataclass(frozen=True)
class DatabricksValues:
    """What differs between workspaces: literal values (job.json) or bundle variables (databricks.yml).

    ``None`` leaves a setting out (the workspace's default: no instance profile, no cluster policy).
    """

    config: str
    wheel: str
    instance_profile_arn: str | None = None
    policy_id: str | None = None
    cpu_node_type: str = "m6i.2xlarge"
    gpu_node_type: str = "g5.2xlarge"
    spark_version: str = "15.4.x-scala2.12"
    gpu_spark_version: str = "15.4.x-gpu-ml-scala2.12"
    pause_status: str = "PAUSED"
    trailing_days: str = str(TRAILING_DAYS)


def workspace_values(workspace_dir: str, instance_profile_arn: str | None = None,
                     policy_id: str | None = None) -> DatabricksValues:
    """Literal values for a workspace folder holding ``conf/databricks.yaml`` and ``dist/`` (the wheel)."""
    return DatabricksValues(config=f"{workspace_dir}/conf/databricks.yaml", wheel=f"{workspace_dir}/dist/{WHEEL}",
                            instance_profile_arn=instance_profile_arn, policy_id=policy_id)


# Filled in by Databricks when a task starts: the job parameters (Airflow passes run_date) and the schedule's time.
_RUN_DATE_ARGS = ["--run-date", "{{job.parameters.run_date}}", "--night", "{{job.trigger.time.iso_date}}"]


def databricks_task(stage: str, values: DatabricksValues, cluster_key: str | None = None) -> dict[str, Any]:
    """One Databricks task: the wheel's ``image-embeddings-nightly`` entry point (``python_wheel_task``), which
    computes the run date (:func:`nightly_main`) and runs the stage.

    ``neighbours`` also installs faiss-cpu from PyPI (the ``[embed]`` extra's; a wheel library brings only the base
    dependencies, and the ML runtime brings torch).
    """
    parameters = [stage, "--config", values.config, *_RUN_DATE_ARGS]
    if stage == "ingest":
        parameters += ["--trailing-days", "{{job.parameters.trailing_days}}", "--marker", MARKER]
    task: dict[str, Any] = {
        "task_key": stage,
        "python_wheel_task": {"package_name": "spark_image_embeddings", "entry_point": "image-embeddings-nightly",
                              "parameters": parameters},
        "libraries": [{"whl": values.wheel}, *_EXTRA_LIBRARIES.get(stage, [])],
        "timeout_seconds": 6 * 3600,
        "max_retries": 2,
        "min_retry_interval_millis": 10 * 60 * 1000,
    }
    if cluster_key:
        task["job_cluster_key"] = cluster_key
    previous = UPSTREAM.get(stage)
    if previous:
        task["depends_on"] = [{"task_key": previous}]
    return task


def _cluster(values: DatabricksValues, gpu: bool, num_workers: int) -> dict[str, Any]:
    """A job cluster: the CPU runtime (stage 1, maintenance) or the ML GPU runtime (embed, neighbours)."""
    aws: dict[str, Any] = {"availability": "ON_DEMAND" if gpu else "SPOT_WITH_FALLBACK"}
    if values.instance_profile_arn is not None:
        aws["instance_profile_arn"] = values.instance_profile_arn
    spark_conf = ({"spark.task.resource.gpu.amount": "0.5", "spark.python.worker.reuse": "true"} if gpu
                  else {"spark.sql.execution.arrow.maxRecordsPerBatch": "32"})
    cluster: dict[str, Any] = {
        "spark_version": values.gpu_spark_version if gpu else values.spark_version,
        "node_type_id": values.gpu_node_type if gpu else values.cpu_node_type,
        "num_workers": num_workers, "spark_conf": spark_conf, "aws_attributes": aws}
    if values.policy_id is not None:
        cluster["policy_id"] = values.policy_id
    return cluster


def databricks_job(values: DatabricksValues) -> dict[str, Any]:
    """A Jobs API 2.2 job: ingest on a CPU job cluster, embed on a GPU job cluster, then the neighbours (on the GPU
    cluster, with embed's environment) and maintenance, both after embed, nightly at 02:00 UTC.

    Maintenance gets a small CPU cluster of its own: a job cluster lives until the last task using it ends, so
    sharing stage 1's would keep it idle through the embedding. A run started while one is active waits (queue).
    """
    return {
        "name": "image-embeddings nightly",
        "schedule": {"quartz_cron_expression": "0 0 2 * * ?", "timezone_id": "UTC",
                     "pause_status": values.pause_status},
        "max_concurrent_runs": 1,
        "queue": {"enabled": True},
        "parameters": [{"name": "run_date", "default": ""},  # "": the day before the trigger's (UTC)
                       {"name": "trailing_days", "default": values.trailing_days}],
        "job_clusters": [
            {"job_cluster_key": "cpu", "new_cluster": _cluster(values, gpu=False, num_workers=4)},
            {"job_cluster_key": "gpu", "new_cluster": _cluster(values, gpu=True, num_workers=2)},
            {"job_cluster_key": "maintenance", "new_cluster": _cluster(values, gpu=False, num_workers=2)},
        ],
        "tasks": [databricks_task("ingest", values, "cpu"), databricks_task("embed", values, "gpu"),
                  databricks_task("neighbours", values, "gpu"), databricks_task("maintain", values, "maintenance")],
    }


BUNDLE_JOB = "image_embeddings_nightly"
# Bundle variables: what a workspace must say (no default: `--var` or BUNDLE_VAR_<name> at deploy) or may change.
_VARIABLES: dict[str, dict[str, str]] = {
    "instance_profile_arn": {"description": "Instance profile ARN of the job clusters (S3 for Spark and for boto3, "
                                            "which reads and writes the index); \"\" for none"},
    "cluster_policy_id": {"description": "Cluster policy of the job clusters; \"\" for none", "default": ""},
    "cpu_node_type": {"description": "Node type of the CPU clusters (ingest, maintenance)",
                      "default": "m6i.2xlarge"},
    "gpu_node_type": {"description": "Node type of the GPU cluster (embed, neighbours)", "default": "g5.2xlarge"},
    "spark_version": {"description": "Runtime of the CPU clusters", "default": "15.4.x-scala2.12"},
    "gpu_spark_version": {"description": "ML GPU runtime of the GPU cluster", "default": "15.4.x-gpu-ml-scala2.12"},
    "pause_status": {"description": "The job's own schedule: PAUSED when Airflow triggers it, else UNPAUSED",
                     "default": "PAUSED"},
    "trailing_days": {"description": "Earlier days whose upload ingest reads again (late files)",
                      "default": str(TRAILING_DAYS)},
}


def bundle_values() -> DatabricksValues:
    """The job's settings as bundle references: the synced conf/ folder, the built wheel, the variables."""
    return DatabricksValues(
        config="${workspace.file_path}/conf/databricks.yaml", wheel="../../dist/*.whl",
        **{name: f"${{var.{name}}}" for name in ("instance_profile_arn", "cpu_node_type", "gpu_node_type",
                                                  "spark_version", "gpu_spark_version", "pause_status",
                                                  "trailing_days")},
        policy_id="${var.cluster_policy_id}")


def databricks_bundle() -> dict[str, Any]:
    """deploy/databricks/databricks.yml: the wheel artifact, conf/ synced, the nightly job, dev and prod targets.

    Paths are relative to deploy/databricks, where the file is; the wheel is built from the repository root.
    """
    return {
        "bundle": {"name": "image-embeddings"},
        "variables": _VARIABLES,
        "artifacts": {"wheel": {"type": "whl", "path": "../..", "build": "python -m build --wheel"}},
        # conf/databricks.yaml, read by the tasks from the workspace copy under ${workspace.file_path}/conf
        "sync": {"paths": ["../../conf"]},
        "resources": {"jobs": {BUNDLE_JOB: databricks_job(bundle_values())}},
        "targets": {
            # One copy per developer under their home folder; dev mode pauses the schedule and prefixes names.
            "dev": {"mode": "development", "default": True},
            # One shared copy; production mode refuses a per-user root_path.
            "prod": {"mode": "production",
                     "workspace": {"root_path": "/Workspace/Shared/.bundle/${bundle.name}/${bundle.target}"}},
        },
    }


def bundle_yaml() -> str:
    """databricks.yml as written to disk (key order kept, so the file reads top to bottom like the docs)."""
    import yaml

    header = ("# Rendered by `python -m image_embeddings.ops.deploy databricks-bundle`\n"
              "# a test keeps this file and the code equal. Deploy: databricks bundle deploy -t dev|prod \\\n"
              "#   --var instance_profile_arn=arn:aws:iam::ACCOUNT:instance-profile/NAME\n")
    return header + yaml.safe_dump(databricks_bundle(), sort_keys=False, width=120)


def marker_exists(folder: str, marker: str, endpoint: str | None, region: str | None) -> bool:
    """Whether ``folder`` (local, a /Volumes path, or S3) holds the upload's completion marker."""
    from image_embeddings.core import uri

    if uri.is_local(folder):
        return (uri.local_path(folder) / marker).is_file()
    from botocore.exceptions import ClientError

    from image_embeddings.core.storage import S3Access, s3_client

    bucket, key = uri.split_s3(f"{folder.rstrip('/')}/{marker}")
    client = s3_client(S3Access(endpoint, region))
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True






def main(argv: Sequence[str] | None = None) -> int:
    """Print the EMR steps, an EMR Serverless job run or the Databricks job as JSON, or the bundle as YAML."""
    parser = argparse.ArgumentParser(prog="python -m image_embeddings.ops.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    emr = sub.add_parser("emr-steps")
    serverless = sub.add_parser("emr-serverless-job")
    serverless.add_argument("stage", choices=SERVERLESS_STAGES)
    for command in (emr, serverless):
        command.add_argument("--s3-prefix", required=True)
        command.add_argument("--run-date", required=True)
        command.add_argument("--config", default="emr.yaml")
    dbx = sub.add_parser("databricks-job")
    dbx.add_argument("--workspace-dir", required=True)
    dbx.add_argument("--instance-profile-arn", default=None)
    dbx.add_argument("--policy-id", default=None)
    sub.add_parser("databricks-bundle")
    args = parser.parse_args(argv)
    if args.what == "databricks-bundle":
        print(bundle_yaml(), end="")
        return 0
    if args.what == "emr-steps":
        out: Any = emr_steps(args.s3_prefix, args.run_date, args.config)
    elif args.what == "emr-serverless-job":
        out = emr_serverless_job(args.stage, args.s3_prefix, args.run_date, args.config)
    else:
        out = databricks_job(workspace_values(args.workspace_dir, args.instance_profile_arn, args.policy_id))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
