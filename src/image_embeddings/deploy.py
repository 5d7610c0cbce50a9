"""Deployment definitions built in one place: EMR steps (exact spark-submit arguments), the Databricks job.

The files under ``deploy/`` are rendered from these functions (a test checks they match), and the Airflow
DAG calls them, so the arguments a cluster receives cannot drift apart. Nothing here imports Spark or torch.

    python -m image_embeddings.deploy emr-steps --s3-prefix s3://bucket/image-embeddings --run-date 2026-11-23
    python -m image_embeddings.deploy databricks-job --workspace-dir /Workspace/Shared/image-embeddings
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from image_embeddings import __version__

WHEEL = f"spark_image_embeddings-{__version__}-py3-none-any.whl"


def spark_submit_args(stage: str, s3_prefix: str, run_date: str, config: str = "emr.yaml") -> list[str]:
    """The spark-submit command of one stage on EMR (cluster mode, the packed environment from S3)."""
    if stage not in ("ingest", "embed"):
        raise ValueError(f"unknown stage {stage!r}")
    prefix = s3_prefix.rstrip("/")
    env = "env-ingest" if stage == "ingest" else "env-embed"
    job = "ingest_images.py" if stage == "ingest" else "embed_images.py"
    return [
        "spark-submit", "--deploy-mode", "cluster",
        "--archives", f"{prefix}/dist/{env}.tar.gz#environment",
        "--conf", "spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python",
        "--conf", "spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python",
        "--files", f"{prefix}/conf/{config}",
        f"{prefix}/jobs/{job}",
        "--config", config, "--run-date", run_date,
    ]  # the report goes to the log and to output.runs_table


def emr_steps(s3_prefix: str, run_date: str, config: str = "emr.yaml") -> list[dict[str, Any]]:
    """The two EMR steps (``aws emr add-steps --steps file://...`` and Airflow's EmrAddStepsOperator)."""
    return [{
        "Name": f"image-embeddings {stage} {run_date}",
        # A failed ingest cancels the embed step behind it; the cluster stays up for the next night.
        "ActionOnFailure": "CANCEL_AND_WAIT" if stage == "ingest" else "CONTINUE",
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": spark_submit_args(stage, s3_prefix, run_date, config)},
    } for stage in ("ingest", "embed")]


def databricks_task(stage: str, workspace_dir: str, run_date: str, cluster_key: str | None = None,
                    wheel: str | None = None) -> dict[str, Any]:
    """One Databricks task: the console entry point of the wheel (``python_wheel_task``)."""
    task: dict[str, Any] = {
        "task_key": stage,
        "python_wheel_task": {
            "package_name": "spark_image_embeddings",
            "entry_point": "image-embeddings",
            "parameters": [stage, "--config", f"{workspace_dir}/conf/databricks.yaml", "--run-date", run_date],
        },
        "libraries": [{"whl": wheel or f"{workspace_dir}/dist/{WHEEL}"}],
        "timeout_seconds": 6 * 3600,
        "max_retries": 2,
        "min_retry_interval_millis": 10 * 60 * 1000,
    }
    if cluster_key:
        task["job_cluster_key"] = cluster_key
    if stage == "embed":
        task["depends_on"] = [{"task_key": "ingest"}]
    return task


_PROFILE = "<instance-profile-arn>"


def databricks_job(workspace_dir: str, run_date: str = "{{job.start_time.iso_date}}") -> dict[str, Any]:
    """A Jobs API 2.1 job: ingest on a CPU job cluster, then embed on a GPU job cluster, nightly."""
    return {
        "name": "image-embeddings nightly",
        "schedule": {"quartz_cron_expression": "0 0 2 * * ?", "timezone_id": "UTC", "pause_status": "PAUSED"},
        "max_concurrent_runs": 1,
        "job_clusters": [
            {"job_cluster_key": "cpu", "new_cluster": {
                "spark_version": "15.4.x-scala2.12", "node_type_id": "m6i.2xlarge", "num_workers": 4,
                "spark_conf": {"spark.sql.execution.arrow.maxRecordsPerBatch": "32"},
                "aws_attributes": {"availability": "SPOT_WITH_FALLBACK", "instance_profile_arn": _PROFILE}}},
            {"job_cluster_key": "gpu", "new_cluster": {
                "spark_version": "15.4.x-gpu-ml-scala2.12", "node_type_id": "g5.2xlarge", "num_workers": 2,
                "spark_conf": {"spark.task.resource.gpu.amount": "0.5", "spark.python.worker.reuse": "true"},
                "aws_attributes": {"availability": "ON_DEMAND", "instance_profile_arn": _PROFILE}}},
        ],
        "tasks": [databricks_task("ingest", workspace_dir, run_date, "cpu"),
                  databricks_task("embed", workspace_dir, run_date, "gpu")],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the EMR steps or the Databricks job as JSON."""
    parser = argparse.ArgumentParser(prog="python -m image_embeddings.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    emr = sub.add_parser("emr-steps")
    emr.add_argument("--s3-prefix", required=True)
    emr.add_argument("--run-date", required=True)
    emr.add_argument("--config", default="emr.yaml")
    dbx = sub.add_parser("databricks-job")
    dbx.add_argument("--workspace-dir", required=True)
    args = parser.parse_args(argv)
    if args.what == "emr-steps":
        out: Any = emr_steps(args.s3_prefix, args.run_date, args.config)
    else:
        out = databricks_job(args.workspace_dir)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
