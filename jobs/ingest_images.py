"""spark-submit entry point of stage 1: ``spark-submit jobs/ingest_images.py --config conf/emr.yaml``."""

import sys

from image_embeddings.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
