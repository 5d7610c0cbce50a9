"""Run with the Airflow environment (.venv-airflow): load the DAG folder and print what a test checks, as JSON."""

from __future__ import annotations

import json
import sys


def main() -> int:
    from airflow.models import DagBag

    bag = DagBag(dag_folder=sys.argv[1], include_examples=False)
    out: dict = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids)}
    dag = bag.dags.get("image_embeddings_nightly")
    if dag is not None:
        context = {"ds": "2026-11-23", "task_instance": None}
        env = dag.get_template_env()
        out["tasks"] = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
        out["retries"] = {t.task_id: t.retries for t in dag.tasks}
        out["timeouts"] = {t.task_id: t.execution_timeout.total_seconds() for t in dag.tasks if t.execution_timeout}
        out["rendered"] = {}
        for task in dag.tasks:
            for field in task.template_fields:
                if field in ("steps", "json", "bucket_key"):
                    out["rendered"][f"{task.task_id}.{field}"] = task.render_template(
                        getattr(task, field), context, jinja_env=env)
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
