"""`make demo`: a sample of real photos and their variants with a sales table, both stages on local Spark
and Delta, a short summary and the five nearest neighbours of three photos."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from image_embeddings.cli import configure_logging
from image_embeddings.config import load_config
from image_embeddings.embed import resolve_config_weights
from image_embeddings.embedder import WeightsError
from image_embeddings.pipeline import run_pipeline
from image_embeddings.sample import write_sample
from image_embeddings.similar import similar
from image_embeddings.spark import get_spark

QUERIES = ("astronaut", "coffee", "chelsea")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    configure_logging("WARNING")
    config = load_config(args.config, args.overrides)
    images = Path(config.input.images)
    if not images.is_dir():
        ids = write_sample(images.parent)
        print(f"wrote {len(ids)} sample photos (11 real photos and 3 variants of each) and a sales table "
              f"under {images.parent}")
    meaningful = True
    try:
        resolve_config_weights(config)
    except WeightsError:
        print(f"model.weights={config.model.weights} cannot be had here (no network?): running with random:0 "
              "weights instead, so the neighbours below are NOT meaningful")
        config = load_config(args.config, [*args.overrides, "model.weights=random:0"])
        meaningful = False
    spark = get_spark(config, stage="embed")
    report_file = Path(config.output.runs_table).parent / "report.json"
    combined = run_pipeline(spark, config, report_file=str(report_file))
    ingest, embed = combined["stages"]["ingest"], combined["stages"]["embed"]
    mi, me = ingest["metrics"], embed["metrics"]
    print("\nstage 1, ingest")
    print(f"  files {mi['files_listed']} (new {mi['files_new']}, unchanged {mi['files_unchanged']}), "
          f"decoded {mi['files_decoded']}, errors {mi['errors'] or 'none'}")
    print(f"  images {mi['images']}, joined with sales {mi['joined']}, images without sales "
          f"{mi['images_without_sales']}, sales rows without images {mi['sales_without_images']}")
    print(f"  {ingest['duration_s']:.1f} s, {mi['images_per_second']} images/s decoded")
    print("stage 2, embed")
    print(f"  embedded {me['embedded']}, skipped {me['skipped']} (already embedded), errors {me['errors'] or 'none'}")
    print(f"  {me['model']} on {','.join(me['device']) or '-'} in {','.join(me['precision']) or '-'}, "
          f"weights {me['weights']}, {embed['duration_s']:.1f} s, {me['images_per_second']} images/s embedded")
    print(f"tables under {Path(config.output.images_table).parent}, report {report_file}")
    print("\nnearest neighbours (cosine)" + ("" if meaningful else ", with random weights: not meaningful"))
    for query in QUERIES:
        found = similar(spark, config, k=5, image_id=query)
        print(f"  {query}: " + ", ".join(f"{n.image_id} {n.score:.3f}" for n in found))
    spark.stop()
    return 0 if combined["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
