"""``python -m image_embeddings``."""

import sys

from image_embeddings.cli import main

sys.exit(main())
