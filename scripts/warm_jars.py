"""Resolve the Spark jars named in a config (Delta, hadoop-aws, AWS SDK) once into the local Ivy cache."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile

from image_embeddings.core.config import load_config
from image_embeddings.core.spark import get_spark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/local.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    # Every jar the config may need, S3 ones included, so later runs (and tests against MinIO) start offline.
    config = dataclasses.replace(config, spark=dataclasses.replace(
        config.spark, packages=config.spark.packages + config.spark.s3_packages))
    spark = get_spark(config)
    with tempfile.TemporaryDirectory() as tmp:
        spark.range(3).write.format("delta").save(tmp + "/t")
        rows = spark.read.format("delta").load(tmp + "/t").count()
    spark.stop()
    print(f"spark jars ready in the ivy cache; delta round trip read {rows} rows", file=sys.stderr)
    return 0 if rows == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
