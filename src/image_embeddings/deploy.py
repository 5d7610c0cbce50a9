"""Deployment definitions built in one place: EMR steps (exact spark-submit arguments), the Databricks job.

Each night runs ingest, then embed, then table maintenance (OPTIMIZE and VACUUM). Maintenance never changes a
table's rows and its failure leaves the data as it was, so it never holds back the data steps or the next night.

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
STAGES = ("ingest", "embed", "maintain")
_JOBS = {"ingest": "ingest_images.py", "embed": "embed_images.py", "maintain": "maintain_tables.py"}


def spark_submit_args(stage: str, s3_prefix: str, run_date: str, config: str = "emr.yaml") -> list[str]:
    """The spark-submit command of one stage on EMR (cluster mode, the packed environment from S3).

    Maintenance needs no torch: it runs with the stage 1 environment.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    prefix = s3_prefix.rstrip("/")
    env = "env-embed" if stage == "embed" else "env-ingest"
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


def emr_steps(s3_prefix: str, run_date: str, config: str = "emr.yaml") -> list[dict[str, Any]]:
    """The three EMR steps (``aws emr add-steps --steps file://...`` and Airflow's EmrAddStepsOperator).

    A failed ingest cancels the steps behind it; a failed embed or maintenance step lets the cluster go on (the
    tables keep their last good version), and the cluster stays up for the next night.
    """
    return [{
        "Name": f"image-embeddings {stage} {run_date}",
        "ActionOnFailure": "CANCEL_AND_WAIT" if stage == "ingest" else "CONTINUE",
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": spark_submit_args(stage, s3_prefix, run_date, config)},
    } for stage in STAGES]


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
    previous = {"embed": "ingest", "maintain": "embed"}.get(stage)
    if previous:
        task["depends_on"] = [{"task_key": previous}]
    return task


_PROFILE = "<instance-profile-arn>"


def _cpu_cluster(num_workers: int) -> dict[str, Any]:
    return {"spark_version": "15.4.x-scala2.12", "node_type_id": "m6i.2xlarge", "num_workers": num_workers,
            "spark_conf": {"spark.sql.execution.arrow.maxRecordsPerBatch": "32"},
            "aws_attributes": {"availability": "SPOT_WITH_FALLBACK", "instance_profile_arn": _PROFILE}}


def databricks_job(workspace_dir: str, run_date: str = "{{job.start_time.iso_date}}") -> dict[str, Any]:
    """A Jobs API 2.1 job: ingest on a CPU job cluster, embed on a GPU job cluster, then maintenance, nightly.

    Maintenance gets a small CPU cluster of its own: a job cluster lives until the last task using it ends, so
    sharing stage 1's would keep it idle through the embedding.
    """
    return {
        "name": "image-embeddings nightly",
        "schedule": {"quartz_cron_expression": "0 0 2 * * ?", "timezone_id": "UTC", "pause_status": "PAUSED"},
        "max_concurrent_runs": 1,
        "job_clusters": [
            {"job_cluster_key": "cpu", "new_cluster": _cpu_cluster(4)},
            {"job_cluster_key": "gpu", "new_cluster": {
                "spark_version": "15.4.x-gpu-ml-scala2.12", "node_type_id": "g5.2xlarge", "num_workers": 2,
                "spark_conf": {"spark.task.resource.gpu.amount": "0.5", "spark.python.worker.reuse": "true"},
                "aws_attributes": {"availability": "ON_DEMAND", "instance_profile_arn": _PROFILE}}},
            {"job_cluster_key": "maintenance", "new_cluster": _cpu_cluster(2)},
        ],
        "tasks": [databricks_task("ingest", workspace_dir, run_date, "cpu"),
                  databricks_task("embed", workspace_dir, run_date, "gpu"),
                  databricks_task("maintain", workspace_dir, run_date, "maintenance")],
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
