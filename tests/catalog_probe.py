"""One Spark driver against a Hive metastore (embedded Derby, from pyspark's jars); prints what a test checks, as JSON
on its last line. Embedded Derby admits one JVM at a time: the test runs these one after the other.

    catalog_probe.py write ROOT   create the database, then `image-embeddings run` three times by name: on the
                                  sample, again with nothing new, and after one more photo arrived; `neighbours`
                                  after the first and the third
    catalog_probe.py read ROOT    a second driver: the tables by name from the metastore, time travel, change
                                  feed, then `image-embeddings status --json` and `maintain`

ROOT holds ``sets.json`` (the ``--set`` overrides, written by the test), the photos, the metastore and warehouse.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "conf" / "local.yaml")


def _session(sets: list[str]) -> Any:
    from image_embeddings.core.config import load_config
    from image_embeddings.core.spark import get_spark

    return get_spark(load_config(CONFIG, sets))


def _cli(sets: list[str], *command: str) -> tuple[int, str]:
    from image_embeddings.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*command, "--config", CONFIG, *[a for s in sets for a in ("--set", s)]])
    return code, printed.getvalue()


def _versions(spark: Any) -> dict[str, int | None]:
    from image_embeddings.core.tables import table_version

    return {name: table_version(spark, f"shop.{name}")
            for name in ("images", "images_files", "embeddings", "runs", "embeddings_neighbours")}


def write(root: Path, sets: list[str]) -> dict[str, Any]:
    """Three runs by name in one driver; the table versions after each."""
    from image_embeddings.testing.sample import encode, photo

    spark = _session(sets)
    spark.sql("CREATE DATABASE shop")
    out: dict[str, Any] = {"runs": []}
    for i, late in enumerate((None, None, "rocket"), 1):
        if late is not None:  # a photo arrives for the third run: its rows come through the change feeds
            (root / "images" / f"{late}.jpg").write_bytes(encode(photo(late)))
        code, _ = _cli(sets, "run", "--report", str(root / f"run{i}.json"))
        out["runs"].append({"code": code})
        if i != 2:
            code, _ = _cli(sets, "neighbours", "--k", "2", "--report", str(root / f"neighbours{i}.json"))
            out["runs"][-1]["neighbours_code"] = code
        out["runs"][-1]["versions"] = _versions(spark)
    return out


def read(root: Path, sets: list[str]) -> dict[str, Any]:
    """What a second driver finds in the same metastore, by name only; then status and maintain by name."""
    spark = _session(sets)
    tables = {t.name: t.tableType for t in spark.catalog.listTables("shop")}
    runs_detail = spark.sql("DESCRIBE DETAIL shop.runs").select("location", "properties").first()
    embeddings = spark.read.table("shop.embeddings")
    changes = spark.sql("SELECT image_id, _change_type FROM table_changes('shop.images', 1)").collect()
    status_code, status = _cli(sets, "status", "--json")
    maintain_code, maintained = _cli(sets, "maintain")
    return {
        "tables": tables,
        "runs_location": runs_detail["location"],
        "embedded": sorted(r["image_id"] for r in embeddings.where("embedding IS NOT NULL").collect()),
        "neighbours": {r["image_id"]: len(r["neighbours"]) for r in spark.read.table("shop.embeddings_neighbours")
                       .collect()},
        "images_at_version_0": spark.sql("SELECT count(*) FROM shop.images VERSION AS OF 0").first()[0],
        "images_now": spark.read.table("shop.images").count(),
        "image_changes_after_0": sorted({(r["image_id"], r["_change_type"]) for r in changes}),
        "status_code": status_code, "status": json.loads(status) if status_code == 0 else status,
        "maintain_code": maintain_code, "maintain": maintained,
        "history_after_maintain": [r["operation"] for r in spark.sql("DESCRIBE HISTORY shop.embeddings").collect()],
    }


def main() -> None:
    mode, root = sys.argv[1], Path(sys.argv[2])
    sets = json.loads((root / "sets.json").read_text())
    result = {"write": write, "read": read}[mode](root, sets)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
