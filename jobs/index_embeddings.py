"""spark-submit entry point of the index and neighbours table, after stage 2 (the same environment):
``spark-submit jobs/index_embeddings.py --config conf/emr.yaml``."""

import sys

from image_embeddings.cli import main

if __name__ == "__main__":
    sys.exit(main(["neighbours", *sys.argv[1:]]))
