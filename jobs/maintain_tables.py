"""spark-submit entry point of table maintenance: ``spark-submit jobs/maintain_tables.py --config conf/emr.yaml``."""

import sys

from image_embeddings.cli import main

if __name__ == "__main__":
    sys.exit(main(["maintain", *sys.argv[1:]]))
