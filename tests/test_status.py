"""``image-embeddings status`` on tables after a failed and a succeeded run, locally and on S3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from image_embeddings.cli import main
from image_embeddings.embed.embedder import WeightsError
from image_embeddings.embed.stage import run_embed
from image_embeddings.ingest.stage import run_ingest
from image_embeddings.ops.status import collect_status
from image_embeddings.testing.sample import encode, photo, write_sales

NAMES = ("astronaut", "coffee", "chelsea")


def _photos(folder: Path, sales: Path) -> None:
    folder.mkdir(parents=True)
    for name in NAMES:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name)))
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    write_sales(sales, [*NAMES, "broken"])


def _failed_then_succeeded(spark: Any, make_config: Any, tmp_path: Path, tables: str | Path | None = None) -> Any:
    _photos(tmp_path / "images", tmp_path / "sales")
    config = make_config(tmp_path / "images", tmp_path / "sales", "model.precision=fp32", tables=tables)
    run_ingest(spark, config)
    bad = make_config(tmp_path / "images", tmp_path / "sales", f"model.weights={tmp_path / 'missing.pth'}",
                      tables=tables)
    with pytest.raises(WeightsError):
        run_embed(spark, bad)
    good = make_config(tmp_path / "images", tmp_path / "sales", "model.weights=random:0", "model.precision=fp32",
                       tables=tables)
    run_embed(spark, good)
    return good


def test_status_after_a_failed_and_a_succeeded_run(spark: Any, make_config: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = _failed_then_succeeded(spark, make_config, tmp_path)
    status = collect_status(spark, config)
    assert [(r["stage"], r["status"]) for r in status["runs"]] == [
        ("embed", "succeeded"), ("embed", "failed"), ("ingest", "succeeded")]
    embedded, failed, ingested = status["runs"]
    assert embedded["counts"]["embedded"] == len(NAMES) and embedded["error"] is None
    assert ingested["counts"]["files_decoded"] == len(NAMES) + 1 and ingested["counts"]["errors"] == {
        "not_an_image": 1}
    assert "missing.pth" in failed["error"] and status["last_failure"] == failed
    tables = {t["table"]: t for t in status["tables"]}
    # The broken file has a files row and an images row (with its error) but nothing to embed.
    assert (tables["files"]["rows"], tables["images"]["rows"], tables["embeddings"]["rows"]) == (4, 4, 3)
    assert tables["runs"]["rows"] == 3 and all(t["version"] is not None for t in tables.values())
    [model] = status["models"]
    assert (model["model"], model["weights_checksum"], model["rows"], model["without_embedding"]) == (
        "resnet50", "random:0", 3, 0)

    # The command prints the same, for people and (with --json) for machines.
    args = ["status", "--config", str(Path(__file__).resolve().parents[1] / "conf" / "local.yaml"),
            "--set", f"output.images_table={config.output.images_table}",
            "--set", f"output.embeddings_table={config.output.embeddings_table}",
            "--set", f"output.runs_table={config.output.runs_table}"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "embed    failed" in text and "newest failure: " in text and "missing.pth" in text.split("newest failure")[1]
    assert f"embeddings version {tables['embeddings']['version']}, 3 rows" in " ".join(text.split())
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last_failure"]["run_id"] == failed["run_id"]


def test_status_of_tables_on_s3_and_of_nothing_yet(spark: Any, make_config: Any, s3_server: Any,
                                                  tmp_path: Path) -> None:
    s3_server.client().create_bucket(Bucket="status")
    config = _failed_then_succeeded(spark, make_config, tmp_path, tables="s3a://status/delta")
    status = collect_status(spark, config, runs=2)
    assert [r["status"] for r in status["runs"]] == ["succeeded", "failed"]
    assert {t["table"]: t["rows"] for t in status["tables"]} == {"files": 4, "images": 4, "embeddings": 3,
                                                                 "runs": 3}
    empty = collect_status(spark, make_config(tmp_path / "none", tmp_path / "none", tables=tmp_path / "nothing"))
    assert empty["runs"] == [] and empty["models"] == [] and empty["last_failure"] is None
    assert not any(t["exists"] for t in empty["tables"])
