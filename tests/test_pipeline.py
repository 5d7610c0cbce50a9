"""The main job end to end: `run`, `similar`, re-running one day, the demo and the example notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from image_embeddings import load_config, run_ingest
from image_embeddings.cli import main
from image_embeddings.pipeline import run_pipeline
from image_embeddings.search.rows import SimilarError, model_rows
from image_embeddings.search.similar import similar, top_k
from image_embeddings.testing.sample import PHOTOS, encode, photo, write_sales, write_sample

from reference import make_weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(spark: Any, tmp_path_factory: pytest.TempPathFactory, base_overrides: list[str]) -> dict[str, Any]:
    """The sample (photos and variants) through `image-embeddings run`, in-process, with test weights."""
    root = tmp_path_factory.mktemp("pipeline")
    write_sample(root / "sample")
    weights = make_weights(root / "w.pth")
    sets = [*base_overrides, f"input.images={root}/sample/images", f"input.sales={root}/sample/sales",
            f"output.images_table={root}/delta/images", f"output.embeddings_table={root}/delta/embeddings",
            f"output.runs_table={root}/delta/runs", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}",
            f"model.weights={weights}", "model.precision=fp32"]
    args = [a for s in sets for a in ("--set", s)]
    code = main(["run", "--config", str(REPO / "conf" / "local.yaml"), *args, "--report", str(root / "run.json")])
    return {"root": root, "sets": sets, "args": args, "code": code, "weights": weights,
            "config": load_config(REPO / "conf" / "local.yaml", sets)}


def test_run_writes_one_combined_report(spark: Any, built: dict[str, Any]) -> None:
    assert built["code"] == 0
    report = json.loads((built["root"] / "run.json").read_text())
    assert report["status"] == "succeeded" and set(report["stages"]) == {"ingest", "embed"}
    assert report["stages"]["ingest"]["metrics"]["files_decoded"] == 4 * len(PHOTOS)
    assert report["stages"]["embed"]["metrics"]["embedded"] == 4 * len(PHOTOS)
    assert report["stages"]["ingest"]["run_id"] == report["run_id"] + "-ingest"
    runs = spark.read.format("delta").load(built["config"].output.runs_table).collect()
    assert sorted(r.stage for r in runs) == ["embed", "ingest"]

    again = run_pipeline(spark, built["config"])
    assert again["status"] == "succeeded"
    assert again["stages"]["ingest"]["metrics"]["files_decoded"] == 0
    assert again["stages"]["embed"]["metrics"]["embedded"] == 0


def test_similar_by_id_by_image_and_in_spark(spark: Any, built: dict[str, Any], capsys: Any) -> None:
    config = built["config"]
    found = similar(spark, config, k=5, image_id="astronaut")
    assert len(found) == 5 and "astronaut" not in [n.image_id for n in found]
    assert [n.score for n in found] == sorted((n.score for n in found), reverse=True)
    assert all(-1.0 <= n.score <= 1.0001 for n in found)

    original = (built["root"] / "sample" / "images" / "astronaut.jpg").read_bytes()
    by_image = similar(spark, config, k=3, image=original)
    assert by_image[0].image_id == "astronaut" and by_image[0].score > 0.9999

    rows = model_rows(spark, config)
    stored = [r.embedding for r in rows.where("image_id = 'coffee'").collect()][0]
    in_numpy = top_k(rows, stored, 6)
    in_spark = top_k(rows, stored, 6, small_table_rows=0)
    assert [n.image_id for n in in_spark] == [n.image_id for n in in_numpy]
    assert [round(n.score, 4) for n in in_spark] == [round(n.score, 4) for n in in_numpy]
    assert in_numpy[0].image_id == "coffee"

    code = main(["similar", "--config", str(REPO / "conf" / "local.yaml"), *built["args"], "--id", "rocket",
                 "--k", "3", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["image_id"] for p in printed] == [n.image_id for n in similar(spark, config, k=3, image_id="rocket")]


def test_similar_refuses_another_model(spark: Any, built: dict[str, Any]) -> None:
    other = load_config(REPO / "conf" / "local.yaml", [*built["sets"], "model.weights=random:5"])
    with pytest.raises(SimilarError, match="has no rows for this config's model .*weights checksum=random:5"):
        similar(spark, other, k=3, image_id="astronaut")
    with pytest.raises(SimilarError, match="image_id 'nope' has no embedding"):
        similar(spark, built["config"], k=3, image_id="nope")


def test_rerun_one_day_leaves_other_days_alone(spark: Any, make_config: Any, tmp_path: Path) -> None:
    days = {"2026-11-22": PHOTOS[:3], "2026-11-23": PHOTOS[3:5]}
    for day, names in days.items():
        (tmp_path / day).mkdir()
        for name in names:
            (tmp_path / day / f"{name}.jpg").write_bytes(encode(photo(name)))
    write_sales(tmp_path / "sales", [n for names in days.values() for n in names])
    template = make_config(tmp_path / "2026-11-22", tmp_path / "sales", tables=tmp_path / "delta")
    with pytest.raises(Exception, match=r"input.images: contains \{run_date\}; pass --run-date"):
        load_config(REPO / "conf" / "local.yaml", [f"input.images={tmp_path}/{{run_date}}"])
    for day in days:
        cfg = load_config(REPO / "conf" / "local.yaml", [
            f"input.images={tmp_path}/{{run_date}}", f"input.sales={tmp_path / 'sales'}",
            f"output.images_table={template.output.images_table}",
            f"output.embeddings_table={template.output.embeddings_table}",
            f"output.runs_table={template.output.runs_table}", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}"],
            run_date=day)
        report = run_ingest(spark, cfg, run_date=day)
        assert report.metrics["files_decoded"] == len(days[day]) and report.metrics["files_removed"] == 0
    rerun = run_ingest(spark, cfg, run_date="2026-11-23")
    assert (rerun.metrics["files_decoded"], rerun.metrics["files_removed"]) == (0, 0)
    images = spark.read.format("delta").load(template.output.images_table)
    assert images.count() == 5
    runs = spark.read.format("delta").load(template.output.runs_table).collect()
    assert sorted(r.run_date for r in runs) == ["2026-11-22", "2026-11-23", "2026-11-23"]


@pytest.mark.xdist_group("pipelines")
def test_demo_prints_the_summary_and_neighbours(tmp_path: Path) -> None:
    # Relative paths, as conf/local.yaml has them: the demo runs in tmp_path as `make demo` runs in the checkout.
    sets = ["input.images=sample/images", "input.sales=sample/sales", "output.images_table=delta/images",
            "output.embeddings_table=delta/embeddings", "output.runs_table=delta/runs",
            f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", "model.cache_dir=models"]
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9"}
    demo = [sys.executable, str(REPO / "scripts" / "demo.py"), "--config", str(REPO / "conf" / "local.yaml"),
            *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(demo, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out, n = done.stdout, 4 * len(PHOTOS)
    assert f"wrote {n} sample photos" in out
    # A quiet console: Spark's and the JVM's own output goes to a file the demo names.
    noise = ("Ivy Default Cache", ":: resolution report", "WARNING: Using incubator modules", "NativeCodeLoader",
             "SparkStringUtils", "log4j", "WARN ")
    assert not [line for line in (out + done.stderr).splitlines() if any(n in line for n in noise)]
    assert "Spark's output spark.log" in out
    assert "Ivy Default Cache" in (tmp_path / "spark.log").read_text()
    assert "resnet50 (model.weights=imagenet) is left out: its weights cannot be had here" in out
    assert "not meaningful" not in out and "random" not in out
    assert f"files {n} (new {n}, unchanged 0), decoded {n}, errors none" in out
    assert "stage 2, embed with efficientnet_lite0, weights imagenet (sha256:57934424" in out
    assert f"embedded {n}, skipped 0" in out
    for query in ("astronaut", "coffee", "chelsea"):  # trained weights: each photo's three copies come first
        line = next(line for line in out.splitlines() if line.startswith(f"    {query}: "))
        found = [part.split()[0] for part in line.split(": ", 1)[1].split(", ")]
        assert len(found) == 5 and set(found[:3]) == {f"{query}_flip", f"{query}_crop", f"{query}_bright"}, line
    assert f"copies are its 3 nearest neighbours for {len(PHOTOS)} of {len(PHOTOS)} photos" in out
    picture = tmp_path / "neighbours-efficientnet_lite0.png"
    assert "picture: neighbours-efficientnet_lite0.png" in out
    from PIL import Image

    with Image.open(picture) as im:
        assert im.format == "PNG" and im.height > len(PHOTOS) * 112 and im.width > 6 * 112

    # `image-embeddings evaluate` on the demo's table: recall figures, printed and written as JSON.
    report = tmp_path / "evaluate.json"
    evaluated = subprocess.run([sys.executable, "-m", "image_embeddings", "evaluate", "--config",
                                str(REPO / "conf" / "local.yaml"), *[a for s in sets for a in ("--set", s)],
                                "--set", "model.name=efficientnet_lite0", "--set", "model.weights=imagenet",
                                "--report", str(report), "--log-level", "WARNING"],
                               capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "recall@1 " in evaluated.stdout and f"written to {report}" in evaluated.stdout
    figures = json.loads(report.read_text())
    assert figures["sample"] == n and figures["statistics"]["rows"] == n and figures["statistics"]["dim"] == 1280
    # Each stored photo has three near-copies in the demo's sample, so its augmented copy may find one of those
    # first; within five it finds its own original.
    assert figures["recall_at_5"] == 1.0 and figures["recall_at_1"] >= 0.25 and figures["gap"] > 0.5
    # A fresh process, as `make demo` runs: stage 1's Python workers loaded the model for stage 2 in the background.
    embed = json.loads((tmp_path / "delta" / "report.json").read_text())["stages"]["embed"]["metrics"]
    assert embed["workers_warmed_up"] >= 1 and embed["model_loads"] == embed["python_workers"]

    # `make demo` again in the same place: nothing new, nothing written, the same neighbours.
    again = subprocess.run(demo, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"files {n} (new 0, unchanged {n}), decoded 0, errors none" in again.stdout
    assert "  embedded 0, " in again.stdout
    assert "wrote" not in again.stdout.split("stage 1")[0], "the sample is written once"


@pytest.mark.xdist_group("pipelines")
def test_run_twice_with_the_relative_paths_of_conf_local_yaml(tmp_path: Path) -> None:
    """conf/local.yaml as shipped, in a fresh folder: `run` twice, the second finds nothing to do."""
    import shutil

    from image_embeddings.testing.sample import write_sample

    (tmp_path / "conf").mkdir()
    shutil.copy(REPO / "conf" / "local.yaml", tmp_path / "conf" / "local.yaml")
    ids = write_sample(tmp_path / "demo" / "sample", with_variants=False)
    command = [sys.executable, "-m", "image_embeddings", "run", "--config", "conf/local.yaml", "--report",
               "report.json", "--set", "model.name=efficientnet_lite0", "--set", "model.weights=imagenet",
               "--set", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", "--set", "model.cache_dir=.cache/models"]
    env = {**os.environ, "IMAGE_EMBEDDINGS_LOG_DIR": str(tmp_path / "logs")}
    for attempt, (decoded, embedded) in enumerate([(len(ids), len(ids)), (0, 0)]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        assert done.returncode == 0, (attempt, done.stderr[-3000:])
        stages = json.loads((tmp_path / "report.json").read_text())["stages"]
        assert stages["ingest"]["metrics"]["files_decoded"] == decoded, attempt
        assert stages["embed"]["metrics"].get("embedded", 0) == embedded, attempt
    assert (tmp_path / "demo" / "delta" / "images" / "_delta_log").is_dir()


@pytest.mark.xdist_group("processes")
def test_example_notebook_runs(tmp_path: Path) -> None:
    import nbclient
    import nbformat

    notebook = nbformat.read(REPO / "examples" / "rerun_one_day.ipynb", as_version=4)
    os.environ["EXAMPLE_WORKDIR"] = str(tmp_path)
    os.environ["EXAMPLE_REPO"] = str(REPO)
    try:
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO / "examples")}}).execute()
    finally:
        del os.environ["EXAMPLE_WORKDIR"], os.environ["EXAMPLE_REPO"]
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "stage=ingest status=succeeded" in outputs and "stage=embed status=succeeded" in outputs
    assert "2026-11-23" in outputs


def test_each_stage_uses_its_own_arrow_batch_size_and_restores_the_session(spark: Any, built: dict[str, Any]) -> None:
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    spark.conf.set(key, "4096")  # what a notebook might have set
    run_pipeline(spark, built["config"])
    assert spark.conf.get(key) == "4096", "the stages put the session's setting back"
    from image_embeddings.core.spark import session_conf

    with session_conf(spark, {key: "7"}):
        assert spark.conf.get(key) == "7"
    assert spark.conf.get(key) == "4096"
