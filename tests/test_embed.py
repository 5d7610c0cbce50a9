"""Stage 2 end to end: ingest real photos, embed them under local Spark, compare with torchvision."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from image_embeddings.core.tables import table_version
from image_embeddings.embed.stage import EmbedError, run_embed
from image_embeddings.embed.weights import file_sha256, resolve_weights
from image_embeddings.ingest.sales import embeddings_with_sales
from image_embeddings.ingest.stage import run_ingest
from image_embeddings.testing.sample import encode, photo, write_sales

from reference import assert_same_embeddings, make_weights, reference_embeddings

NAMES = ("astronaut", "coffee", "rocket", "chelsea", "camera", "retina", "coins", "moon")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_weights(tmp_path_factory.mktemp("weights") / "resnet50-test.pth")


def test_torch_threads_in_a_spark_task_follow_spark_task_cpus(spark: Any) -> None:
    import pandas as pd

    from image_embeddings.embed.embedder import EmbedderSettings

    def probe(batches: Any) -> Any:
        import torch

        from image_embeddings.embed.stage import worker_settings
        from image_embeddings.embed.workers import cached_embedder

        for _ in batches:
            default = worker_settings(EmbedderSettings("resnet50", "random:0", device="cpu"))
            cached_embedder(default)
            threads = torch.get_num_threads()
            chosen = worker_settings(EmbedderSettings("resnet50", "random:0", threads=3)).threads
            yield pd.DataFrame({"default": [default.threads], "torch": [threads], "chosen": [chosen]})

    rows = spark.range(0, 2, 1, 2).mapInPandas(probe, "default INT, torch INT, chosen INT").collect()
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    assert [tuple(r) for r in rows] == [(task_cpus, task_cpus, 3)] * 2
    assert os.cpu_count() != task_cpus  # else this would not tell torch's default from the task's CPUs


def _rows(spark: Any, path: str) -> list[dict[str, Any]]:
    return [r.asDict() for r in spark.read.format("delta").load(path).collect()]


def test_ingest_then_embed_matches_torchvision_and_is_incremental(spark: Any, make_config: Any, s3_server: Any,
                                                                  weights: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in NAMES:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name)))
    write_sales(tmp_path / "sales", list(NAMES))
    client = s3_server.client()
    client.create_bucket(Bucket="models-e2e")
    client.upload_file(str(weights), "models-e2e", "resnet50.pth")
    config = make_config(folder, tmp_path / "sales", "model.weights=s3a://models-e2e/resnet50.pth",
                         "model.precision=fp32", f"model.cache_dir={tmp_path / 'cache'}", "model.partitions=4",
                         "model.arrow_batch_rows=2", "model.batch_size=2")
    run_ingest(spark, config)

    first = run_embed(spark, config)
    m = first.metrics
    assert (m["rows_considered"], m["embedded"], m["skipped"], m["errors"]) == (len(NAMES), len(NAMES), 0, {})
    assert m["device"] == ["cpu"] and m["precision"] == ["fp32"]
    assert m["weights_checksum"] == "sha256:" + file_sha256(str(weights))
    # Four tasks of two batches each ran in at most two Python workers, and each loaded the model once.
    assert m["batches"] >= 4 > m["python_workers"] >= 1
    assert m["model_loads"] == m["python_workers"]

    rows = {r["image_id"]: r for r in _rows(spark, config.output.embeddings_table)}
    assert set(rows) == set(NAMES)
    images = {r["image_id"]: r for r in _rows(spark, config.output.images_table)}
    ours = np.array([rows[n]["embedding"] for n in NAMES], dtype=np.float32)
    assert ours.shape == (len(NAMES), 2048)
    thumbnails = {r["path"]: r["image"] for r in _rows(spark, config.output.files_table_path)}
    ref = reference_embeddings(weights, [thumbnails[images[n]["path"]] for n in NAMES])
    assert_same_embeddings(ours, ref, 0.9999)
    row = rows["astronaut"]
    assert (row["model"], row["precision"], row["device"], row["normalized"], row["error"]) == (
        "resnet50", "fp32", "cpu", True, None)
    assert row["sha256"] == images["astronaut"]["sha256"]
    assert row["preprocess_id"] == config.preprocess.preprocess_id
    with_sales = {r["image_id"]: r for r in embeddings_with_sales(spark, config).collect()}
    assert with_sales["coffee"]["units_sold"] == images["coffee"]["units_sold"]

    version = table_version(spark, config.output.embeddings_table)
    rerun = run_embed(spark, config)
    assert (rerun.metrics["rows_considered"], rerun.metrics["embedded"]) == (0, 0), "nothing changed: nothing read"
    assert rerun.metrics["images_sync"] == "incremental"
    assert table_version(spark, config.output.embeddings_table) == version, "a rerun writes nothing"

    # A changed image is embedded again, replacing its row; a removed one loses its row.
    (folder / "coffee.jpg").write_bytes(encode(photo("astronaut")[:, ::-1]))
    os.utime(folder / "coffee.jpg", (time.time() + 5, time.time() + 5))
    (folder / "moon.jpg").unlink()
    run_ingest(spark, config)
    changed = run_embed(spark, config)
    assert (changed.metrics["embedded"], changed.metrics["removed"]) == (1, 1)
    # The drift figure: this run's embedding against the model's earlier ones (the first run had none to compare).
    assert first.metrics["drift"] == {"new_rows": len(NAMES), "reference_rows": 0, "note": "too few rows to compare"}
    drift = changed.metrics["drift"]
    assert (drift["new_rows"], drift["reference_rows"]) == (1, len(NAMES))
    assert -1 <= drift["mean_cosine"] <= 1 and drift["nearest_similarity_reference"] > 0
    runs = spark.read.format("delta").load(config.output.runs_table).where(f"run_id = '{changed.run_id}'")
    assert json.loads(runs.first()["report"])["metrics"]["drift"] == drift
    # Only the two images the change data feed names are looked at, not the whole images table.
    assert (changed.metrics["images_sync"], changed.metrics["rows_considered"]) == ("incremental", 1)
    after = {r["image_id"]: r for r in _rows(spark, config.output.embeddings_table)}
    assert set(after) == set(NAMES) - {"moon"}
    assert after["coffee"]["sha256"] != rows["coffee"]["sha256"] and after["coffee"]["run_id"] == changed.run_id
    assert after["rocket"]["run_id"] == first.run_id

    # A second model side by side: its own rows, the first model's rows untouched.
    other = make_config(folder, tmp_path / "sales", "model.weights=random:1", "model.precision=bf16")
    second = run_embed(spark, other)
    assert second.metrics["embedded"] == len(NAMES) - 1
    both = _rows(spark, config.output.embeddings_table)
    assert len(both) == 2 * (len(NAMES) - 1)
    keys = {r["model_key"] for r in both}
    assert keys == {first.metrics["model_key"], second.metrics["model_key"]}
    assert {r["weights_checksum"] for r in both if r["model_key"] == second.metrics["model_key"]} == {"random:1"}
    kept = {r["image_id"]: r["embedding"] for r in both if r["model_key"] == first.metrics["model_key"]}
    assert kept["rocket"] == after["rocket"]["embedding"]


def test_a_broken_row_among_good_ones_and_clear_failures(spark: Any, make_config: Any, weights: Path,
                                                         tmp_path: Path) -> None:
    from image_embeddings.ingest.images import downscale

    good = [downscale(encode(photo(n))).image for n in ("astronaut", "rocket")]
    thumbnails = [("a", "s1", good[0], None), ("b", "s2", b"\xff\xd8 broken jpeg", None), ("c", "s3", good[1], None),
                  ("d", "s4", None, "truncated: image file is truncated")]
    files = spark.createDataFrame([(f"file:/in/{i}.jpg", sha, image) for i, sha, image, _ in thumbnails],
                                  "path STRING, sha256 STRING, image BINARY")
    images = spark.createDataFrame([(i, sha, f"file:/in/{i}.jpg", error) for i, sha, _, error in thumbnails],
                                   "image_id STRING, sha256 STRING, path STRING, error STRING")
    config = make_config(tmp_path / "unused", tmp_path / "unused", f"model.weights={weights}",
                         "model.precision=fp32")
    with pytest.raises(EmbedError, match="output.images_table: no Delta table"):
        run_embed(spark, config)
    images.write.format("delta").save(config.output.images_table)
    with pytest.raises(EmbedError, match="output.files_table: no Delta table"):
        run_embed(spark, config)
    files.write.format("delta").save(config.output.files_table_path)
    report = run_embed(spark, config)
    assert (report.metrics["rows_considered"], report.metrics["embedded"]) == (4, 2)
    assert report.metrics["errors"] == {"decode_error": 1}
    rows = {r["image_id"]: r for r in _rows(spark, config.output.embeddings_table)}
    assert set(rows) == {"a", "b", "c"}, "a row without pixels is not embedded"
    assert rows["b"]["embedding"] is None and rows["b"]["error"].startswith("decode_error: ")
    assert len(rows["a"]["embedding"]) == 2048 and rows["a"]["error"] is None

    wrong = make_config(tmp_path / "unused", tmp_path / "unused", "preprocess.size=160", "model.weights=random:0",
                        tables=tmp_path / "delta")
    with pytest.raises(EmbedError, match="preprocess.size: resnet50 takes 224x224 images"):
        run_embed(spark, wrong)
    runs = [r.status for r in spark.read.format("delta").load(config.output.runs_table).collect()]
    assert sorted(runs) == ["failed", "failed", "failed", "succeeded"]


def test_run_with_efficientnet_lite0_imagenet_writes_what_an_independent_implementation_computes(
        spark: Any, make_config: Any, tmp_path: Path) -> None:
    """`image-embeddings run --set model.name=efficientnet_lite0 --set model.weights=imagenet --set
    model.precision=fp32`: 1280-d embeddings equal to efficientnet-lite-pytorch's on the stored thumbnails."""
    import io

    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    from image_embeddings.core.backbones import model_spec
    from image_embeddings.pipeline import run_pipeline

    names = NAMES[:5]
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name)))
    write_sales(tmp_path / "sales", list(names))
    config = make_config(folder, tmp_path / "sales", "model.name=efficientnet_lite0", "model.weights=imagenet",
                         "model.precision=fp32")
    combined = run_pipeline(spark, config)
    assert combined["status"] == "succeeded"
    m = combined["stages"]["embed"]["metrics"]
    assert (m["model"], m["embedded"], m["precision"]) == ("efficientnet_lite0", len(names), ["fp32"])
    spec = model_spec("efficientnet_lite0")
    weights = resolve_weights("imagenet", spec, str(tmp_path))
    assert m["weights_checksum"] == weights.checksum

    rows = {r["image_id"]: r for r in _rows(spark, config.output.embeddings_table)}
    images = {r["image_id"]: r for r in _rows(spark, config.output.images_table)}
    thumbnails = {r["path"]: r["image"] for r in _rows(spark, config.output.files_table_path)}
    ours = np.array([rows[n]["embedding"] for n in names], dtype=np.float32)
    assert ours.shape == (len(names), 1280)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(thumbnails[images[n]["path"]])).convert("RGB"))
                       for n in names]).astype(np.float32)
    batch = (torch.from_numpy(pixels).permute(0, 3, 1, 2) - 127.0) / 128.0  # TF-Lite's input, as the weights'
    theirs_net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights.path).eval()
    with torch.inference_mode():
        theirs = torch.nn.functional.normalize(theirs_net.extract_features(batch).mean((2, 3)), dim=1).numpy()
    assert_same_embeddings(ours, theirs, 0.99999)
