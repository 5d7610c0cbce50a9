"""Tables written by the previous release (thumbnails in two tables, no change feed) are upgraded in place."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from image_embeddings.core.tables import table_version
from image_embeddings.pipeline import run_pipeline
from image_embeddings.testing.sample import encode, photo, write_sales

REPO = Path(__file__).resolve().parents[1]
# The last commit of the release that stored each thumbnail in both the files and the images table.
PREVIOUS_RELEASE = "4b56e39d6553eaf436552f1bf566bd25d5a6705f"
NAMES = ["astronaut", "coffee", "rocket", "chelsea"]


def _previous_release(tmp_path: Path) -> Path:
    """The previous release's ``src`` and ``conf``, taken from this repository's history."""
    archive = tmp_path / "previous.tar"
    done = subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), PREVIOUS_RELEASE, "src", "conf"],
                          capture_output=True, text=True)
    assert done.returncode == 0, (
        f"the upgrade test needs this repository's git history (commit {PREVIOUS_RELEASE}): {done.stderr}")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "previous", filter="data")
    return tmp_path / "previous"


def _props(spark: Any, path: str) -> dict[str, str]:
    return {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES delta.`{path}`").collect()}


def test_tables_of_the_previous_release_are_upgraded_in_place_and_nothing_is_lost(
        spark: Any, make_config: Any, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in NAMES:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name)))
    write_sales(tmp_path / "sales", NAMES, seed=3)
    config = make_config(folder, tmp_path / "sales", "model.weights=random:0", "model.precision=fp32")
    out = config.output

    previous = _previous_release(tmp_path)
    sets = [f"input.images={folder}", f"input.sales={tmp_path / 'sales'}", f"output.images_table={out.images_table}",
            f"output.embeddings_table={out.embeddings_table}", f"output.runs_table={out.runs_table}",
            f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", "model.weights=random:0", "model.precision=fp32"]
    env = {**os.environ, "PYTHONPATH": str(previous / "src")}
    old = subprocess.run([sys.executable, "-m", "image_embeddings", "run", "--config",
                          str(previous / "conf" / "local.yaml"), *(a for s in sets for a in ("--set", s))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert old.returncode == 0, old.stderr[-3000:]
    stored = {r["image_id"]: r for r in spark.read.format("delta").load(out.images_table).collect()}
    assert set(stored) == set(NAMES) and all(r["image"] for r in stored.values()), "the old layout, thumbnails twice"
    embedded = {r["image_id"]: r for r in spark.read.format("delta").load(out.embeddings_table).collect()}

    upgraded = run_pipeline(spark, config)
    assert upgraded["status"] == "succeeded"
    ingest, embed = upgraded["stages"]["ingest"]["metrics"], upgraded["stages"]["embed"]["metrics"]
    assert ingest["images_sync"].startswith("full: upgrade") and ingest["files_decoded"] == 0
    images = {r["image_id"]: r for r in spark.read.format("delta").load(out.images_table).collect()}
    assert "image" not in next(iter(images.values())), "the images table no longer holds thumbnails"
    for name in NAMES:
        for column in ("path", "sha256", "units_sold", "width", "height", "duplicate_files"):
            assert images[name][column] == stored[name][column], (name, column)
    files = {r["path"]: r["image"] for r in spark.read.format("delta").load(out.files_table_path).collect()}
    assert all(files[images[n]["path"]] == stored[n]["image"] for n in NAMES), "each thumbnail kept, once"
    assert embed["embedded"] == 0, "the embeddings of the old release are kept, not made again"
    after = {r["image_id"]: r for r in spark.read.format("delta").load(out.embeddings_table).collect()}
    assert {k: v["embedding"] for k, v in after.items()} == {k: v["embedding"] for k, v in embedded.items()}
    assert _props(spark, out.files_table_path)["delta.enableChangeDataFeed"] == "true"
    assert _props(spark, out.images_table)["delta.enableChangeDataFeed"] == "true"
    assert _props(spark, out.embeddings_table)["delta.enableDeletionVectors"] == "true"

    versions = [table_version(spark, p) for p in (out.files_table_path, out.images_table, out.embeddings_table)]
    assert run_pipeline(spark, config)["status"] == "succeeded"
    assert [table_version(spark, p) for p in (out.files_table_path, out.images_table,
                                              out.embeddings_table)] == versions, "a rerun writes nothing"

    # From here on, runs read only what changed.
    (folder / "camera.jpg").write_bytes(encode(photo("camera")))
    write_sales(tmp_path / "sales", [*NAMES, "camera"], seed=3)
    grown = run_pipeline(spark, config)
    ingest, embed = grown["stages"]["ingest"]["metrics"], grown["stages"]["embed"]["metrics"]
    # New sales files: every image is compared once (their sales values all changed here), but only the new
    # photo is decoded and embedded.
    assert (ingest["images_sync"], ingest["images_upserted"], ingest["images"]) == ("full: sales files changed", 5, 5)
    assert ingest["files_decoded"] == 1
    assert (embed["images_sync"], embed["rows_considered"], embed["embedded"]) == ("incremental", 5, 1)
    (folder / "rocket.jpg").unlink()
    shrunk = run_pipeline(spark, config)
    ingest, embed = shrunk["stages"]["ingest"]["metrics"], shrunk["stages"]["embed"]["metrics"]
    assert (ingest["images_sync"], ingest["images_deleted"], ingest["images"]) == ("incremental", 1, 4)
    assert (embed["images_sync"], embed["removed"], embed["embedded"]) == ("incremental", 1, 0)
    final = {r["image_id"] for r in spark.read.format("delta").load(out.embeddings_table).collect()}
    assert final == {"astronaut", "coffee", "chelsea", "camera"}
