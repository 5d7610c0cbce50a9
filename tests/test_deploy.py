"""The jobs as clusters run them: spark-submit with the packed environment, and the deployment files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from image_embeddings.sample import PHOTOS, trained_like_weights, write_sample

REPO = Path(__file__).resolve().parents[1]
PACKAGES = "io.delta:delta-spark_2.13:4.0.1,org.apache.hadoop:hadoop-aws:3.4.1"


def _spark_submit(job: str, python: str, sets: list[str], report: Path) -> subprocess.CompletedProcess[str]:
    import pyspark

    env = {**os.environ, "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python,
           "SPARK_HOME": os.path.dirname(pyspark.__file__)}
    env.pop("PYTHONPATH", None)
    command = [str(REPO / ".venv" / "bin" / "spark-submit"), "--master", "local[2]", "--packages", PACKAGES,
               "--conf", f"spark.jars.ivy={REPO / '.cache' / 'ivy'}", "--conf", "spark.ui.enabled=false",
               str(REPO / "jobs" / job), "--config", str(REPO / "conf" / "local.yaml"),
               *[a for s in sets for a in ("--set", s)], "--report", str(report)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


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

    embed = _spark_submit("embed_images.py", str(REPO / ".venv" / "bin" / "python"), sets, tmp_path / "embed.json")
    assert embed.returncode == 0, embed.stderr[-3000:]
    report = json.loads((tmp_path / "embed.json").read_text())
    assert report["status"] == "succeeded" and report["metrics"]["embedded"] == len(PHOTOS)
    assert report["metrics"]["model_loads"] == report["metrics"]["python_workers"]
