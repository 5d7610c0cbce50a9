"""spark-submit entry point of stage 2: ``spark-submit jobs/embed_images.py --config conf/emr.yaml``."""

import sys

from image_embeddings.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
