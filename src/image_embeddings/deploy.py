"""Deployment definitions built in one place: EMR steps (exact spark-submit arguments), the Databricks job.

Each night runs ingest, then embed, then two steps that each follow embed: ``neighbours`` (the nearest-neighbour
index and the neighbours table, brought to the embeddings table's new version) and table maintenance (OPTIMIZE and
VACUUM). Neither changes the embeddings table's rows, and a failure of either leaves the data as it was, so neither
holds back the other, the data steps or the next night.

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
STAGES = ("ingest", "embed", "neighbours", "maintain")
# The stage each one runs after (Databricks' depends_on, the Airflow DAG's edges); EMR runs its steps in this order.
UPSTREAM = {"embed": "ingest", "neighbours": "embed", "maintain": "embed"}
_JOBS = {"ingest": "ingest_images.py", "embed": "embed_images.py", "neighbours": "index_embeddings.py",
         "maintain": "maintain_tables.py"}
# Stages that need the stage 2 environment: torch (the model key comes from the weights) and faiss ([embed]).
EMBED_ENV_STAGES = ("embed", "neighbours")
# Databricks: what a stage needs beyond the wheel and the runtime (the ML GPU runtime brings torch, not faiss).
_EXTRA_LIBRARIES: dict[str, list[dict[str, Any]]] = {"neighbours": [{"pypi": {"package": "faiss-cpu>=1.8,<2"}}]}


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


def emr_steps(s3_prefix: str, run_date: str, config: str = "emr.yaml") -> list[dict[str, Any]]:
    """The four EMR steps (``aws emr add-steps --steps file://...`` and Airflow's EmrAddStepsOperator).

    A failed ingest cancels the steps behind it; a failed embed, neighbours or maintenance step lets the cluster go
    on (the tables keep their last good version), and the cluster stays up for the next night.
    """
    return [{
        "Name": f"image-embeddings {stage} {run_date}",
        "ActionOnFailure": "CANCEL_AND_WAIT" if stage == "ingest" else "CONTINUE",
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": spark_submit_args(stage, s3_prefix, run_date, config)},
    } for stage in STAGES]


def databricks_task(stage: str, workspace_dir: str, run_date: str, cluster_key: str | None = None,
                    wheel: str | None = None) -> dict[str, Any]:
    """One Databricks task: the console entry point of the wheel (``python_wheel_task``).

    ``neighbours`` also installs faiss-cpu from PyPI (the ``[embed]`` extra's; a wheel library brings only the base
    dependencies, and the ML runtime brings torch).
    """
    task: dict[str, Any] = {
        "task_key": stage,
        "python_wheel_task": {
            "package_name": "spark_image_embeddings",
            "entry_point": "image-embeddings",
            "parameters": [stage, "--config", f"{workspace_dir}/conf/databricks.yaml", "--run-date", run_date],
        },
        "libraries": [{"whl": wheel or f"{workspace_dir}/dist/{WHEEL}"}, *_EXTRA_LIBRARIES.get(stage, [])],
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


_PROFILE = "<instance-profile-arn>"


def _cpu_cluster(num_workers: int) -> dict[str, Any]:
    return {"spark_version": "15.4.x-scala2.12", "node_type_id": "m6i.2xlarge", "num_workers": num_workers,
            "spark_conf": {"spark.sql.execution.arrow.maxRecordsPerBatch": "32"},
            "aws_attributes": {"availability": "SPOT_WITH_FALLBACK", "instance_profile_arn": _PROFILE}}


def databricks_job(workspace_dir: str, run_date: str = "{{job.start_time.iso_date}}") -> dict[str, Any]:
    """A Jobs API 2.1 job: ingest on a CPU job cluster, embed on a GPU job cluster, then the neighbours (on the GPU
    cluster, with embed's environment) and maintenance, both after embed, nightly.

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
                  databricks_task("neighbours", workspace_dir, run_date, "gpu"),
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
