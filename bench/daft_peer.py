"""The article's Daft pipeline ("Image embedding generation with Daft"): the benchmark's second peer.

One Daft query, as the article writes it: ``from_glob_path`` over the photos, ``download`` + ``decode_image`` +
``resize(224, 224)``, ``image_id`` by ``regexp_extract``, ``read_parquet`` of the sales folder, an inner join on
``image_id``, a ``@daft.cls`` ImageEmbedder with a ``@daft.method.batch(batch_size=64)`` method (the article's
transform, torchvision's ResNet50 with ``fc = Identity()``), then ``write_deltalake(..., mode="overwrite")``.

Changed from the article only where it has to be, to run here (daft 0.7.26, deltalake 1.6.6):

- Local folders instead of S3: the photo folder's ``*.jpg`` and the sales folder.
- The model's weights: ``models.resnet50(weights=None)`` then ``load_state_dict`` of the file every peer of the
  benchmark uses (as ``baseline.article_model`` loads it), not ``ResNet50_Weights.DEFAULT`` (ImageNet weights
  cannot be downloaded here). So ``ImageEmbedder.__init__`` takes the file's path, which ``@daft.cls`` passes to
  each instance when the query runs (``ImageEmbedder(weights)`` instead of ``ImageEmbedder()``).
- CPU only: ``device = "cpu"`` and ``@daft.cls(gpus=0)`` (the article picks CUDA when there is one).
- The article selects ``"image_id", "sales", "embedding"``; the sales table here has no ``sales`` column but
  ``product_id``, ``units_sold`` and ``revenue``: the query keeps every sales column, as the article's Spark
  scripts do.
- Daft's telemetry and progress bars are off (``DO_NOT_TRACK``, ``DAFT_PROGRESS_BAR``): no network here, and the
  bars would only write to stderr.

Every call the article makes exists in daft 0.7.26 with the article's signature (``Expression.download``,
``.decode_image(on_error=, mode=)``, ``.resize(w, h)``, ``daft.functions.regexp_extract``, ``daft.cls(gpus=)``,
``daft.method.batch(return_dtype=, batch_size=)``, ``DataType.embedding``, ``DataFrame.write_deltalake``).
In this version ``Series.to_pylist()`` of an image column gives each image as an ``H x W x 3`` uint8 numpy array,
which the article's ``T.ToTensor()`` takes as it would a PIL image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DAFT_ANALYTICS_ENABLED", "0")
os.environ.setdefault("DAFT_PROGRESS_BAR", "0")

import daft  # noqa: E402
import torch  # noqa: E402
import torchvision.models as models  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from daft import DataType, Series, col  # noqa: E402
from daft.functions import regexp_extract  # noqa: E402

device = "cpu"  # the article: "cuda" if torch.cuda.is_available() else "cpu"


@daft.cls(gpus=0)  # the article: gpus=1 if torch.cuda.is_available() else 0
class ImageEmbedder:
    def __init__(self, weights_file: str) -> None:
        # The article: model = models.resnet50(weights=models.ResNet50_Weights.DEFAULT)
        model = models.resnet50(weights=None)
        model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        model.fc = torch.nn.Identity()
        self.device = device
        self.model = model.eval().to(self.device)
        self.transform = T.Compose(
            [
                T.ToTensor(),
                T.Normalize(
                    mean=[0.485, 0.456, 0.406],
                    std=[0.229, 0.224, 0.225],
                ),
            ]
        )

    @daft.method.batch(
        return_dtype=DataType.embedding(DataType.float32(), 2048),
        batch_size=64,
    )
    def embed(self, batch: Series) -> list[Any]:
        tensors = []
        valid_idx = []
        outputs: list[Any] = [None] * len(batch)

        for idx, image in enumerate(batch.to_pylist()):
            if image is None:
                continue
            tensors.append(self.transform(image))
            valid_idx.append(idx)

        if not tensors:
            return outputs

        with torch.no_grad():
            embeddings = (
                self.model(torch.stack(tensors).to(self.device))
                .cpu()
                .numpy()
                .astype("float32")
            )

        for idx, embedding in zip(valid_idx, embeddings, strict=True):
            outputs[idx] = embedding.tolist()

        return outputs


def run_daft_pipeline(images: Path, sales: Path, table: str, weights: Path) -> None:
    """The article's Daft script, from reading the photos to the written Delta table."""
    images_df = daft.from_glob_path(f"{images}/*.jpg")

    # 1. Download images and resize
    images_df = images_df.with_column(
        "image",
        col("path").download(on_error="null").decode_image(on_error="null", mode="RGB")
    ).where(col("image").not_null())

    images_df = images_df.with_column("image", col("image").resize(224, 224))

    # 2. Extract image_id from filename
    images_df = images_df.with_column(
        "image_id",
        regexp_extract(col("path"), r"([^/]+)\.[^.]+$", 1)
    )

    # 3. Read sales data
    sales_df = daft.read_parquet(str(sales))

    # 4. Join images with sales data
    joined_df = images_df.join(sales_df, on="image_id", how="inner")

    embedder = ImageEmbedder(str(weights))

    # 6. Compute embeddings (the article selects "image_id", "sales", "embedding": here every sales column)
    sales_columns = [name for name in sales_df.column_names if name != "image_id"]
    result_df = (
        joined_df
        .with_column("embedding", embedder.embed(col("image")))
        .select("image_id", *sales_columns, "embedding")
    )

    # 7. Write final dataset to Delta Lake
    result_df.write_deltalake(table, mode="overwrite")
