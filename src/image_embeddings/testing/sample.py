"""A small sample of real photographs (scikit-image's ``data`` module) with a generated sales table."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

# Real photographs that scikit-image ships inside its wheel (no download needed).
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "coins", "moon", "clock")


def photo(name: str) -> np.ndarray:
    """Return one of :data:`PHOTOS` as an RGB uint8 array."""
    import numpy as np

    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - dev extra missing
        raise RuntimeError("scikit-image is needed for the sample photos: run `make setup`") from exc
    if name not in PHOTOS:
        raise ValueError(f"unknown sample photo {name!r}; choose from {', '.join(PHOTOS)}")
    array = np.asarray(getattr(data, name)())
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", size: tuple[int, int] | None = None, **save: object) -> bytes:
    """Encode an RGB array as image bytes, optionally resized to ``size`` (width, height) first."""
    from PIL import Image

    image = Image.fromarray(array)
    if size is not None:
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def variants(array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Yield transformed copies of a photo (flip, crop, brightness) so that similar images exist."""
    import numpy as np

    height, width = array.shape[:2]
    yield "flip", np.ascontiguousarray(array[:, ::-1])
    yield "crop", np.ascontiguousarray(array[height // 8: height - height // 8, width // 8: width - width // 8])
    yield "bright", np.clip(array.astype(np.int16) + 40, 0, 255).astype(np.uint8)


def write_sample(folder: str | Path, with_variants: bool = True, seed: int = 0) -> list[str]:
    """Write the sample photos as JPEGs under ``folder/images`` and sales Parquet under ``folder/sales``.

    Returns the image ids written. Every image has one sales row; two extra sales rows have no image.
    """

    root = Path(folder)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for name in PHOTOS:
        array = photo(name)
        (images / f"{name}.jpg").write_bytes(encode(array, quality=92))
        ids.append(name)
        if with_variants:
            (images / "variants").mkdir(exist_ok=True)
            for suffix, variant in variants(array):
                image_id = f"{name}_{suffix}"
                (images / "variants" / f"{image_id}.jpg").write_bytes(encode(variant, quality=92))
                ids.append(image_id)
    write_sales(root / "sales", [*ids, "no_such_image_1", "no_such_image_2"], seed=seed)
    return ids


def write_sales(folder: str | Path, image_ids: list[str], seed: int = 0) -> None:
    """Write a one-file sales Parquet table with one row per image id."""
    import pandas as pd

    rng = random.Random(seed)
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.parquet"):
        old.unlink()
    frame = pd.DataFrame({
        "image_id": image_ids,
        "product_id": [f"P{i:05d}" for i in range(len(image_ids))],
        "units_sold": [rng.randint(0, 500) for _ in image_ids],
        "revenue": [round(rng.uniform(0, 10_000), 2) for _ in image_ids],
    })
    frame.to_parquet(path / "part-00000.parquet", index=False)


def trained_like_weights(path: str | Path, model: str = "resnet50", seed: int = 0) -> Path:
    """Save a full torchvision state dict of random weights shaped like trained ones, for tests and benchmarks.

    Pure random init makes every photo's embedding nearly parallel (cosine 0.995+), which no equivalence
    check can work with. Here the BatchNorm statistics are measured on the sample photos and each residual
    branch is scaled down (its last BatchNorm's gain set to 0.2), as training leaves them: different photos
    then have cosines of 0.96 or less, and bf16 stays within 1e-4 of fp32, as with real ImageNet weights.
    """
    import torch
    import torchvision

    from image_embeddings.core.backbones import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    net = {"resnet50": torchvision.models.resnet50, "vit_b_16": torchvision.models.vit_b_16}[model]()
    for block in net.modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            torch.nn.init.constant_(block.bn3.weight, 0.2)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if norms:
        for norm in norms:
            norm.momentum = None
            norm.reset_running_stats()
        from PIL import Image

        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        arrays = [np.asarray(Image.fromarray(photo(n)).resize((224, 224))) for n in PHOTOS]
        batch = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255 - mean) / std
        net.train()
        with torch.no_grad():
            net(batch)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), target)
    return target


def clustered_vector(row: int, clusters: int, dim: int = 2048, spread: float = 0.6, seed: int = 0,
                     group: int = 1) -> np.ndarray:
    """Row ``row``'s synthetic unit embedding: its cluster's centre plus noise.

    Deterministic per row, so Spark tasks and the driver compute the same vectors. With ``group=1`` row ``row``
    belongs to cluster ``row % clusters``; rows of one cluster have a cosine of about ``1 / (1 + spread**2)``
    with each other, rows of different clusters about 0. With ``group > 1``, consecutive rows form groups (a
    product's photos and their augmentations: cosine about 0.94 with each other) and groups form clusters
    (about 0.7): neighbourhood structure, unlike uniform noise, in which every row is about as far from every
    other.
    """
    if group <= 1:
        centre = np.random.default_rng((seed, row % clusters)).standard_normal(dim)
        noise = np.random.default_rng((seed, row % clusters, row)).standard_normal(dim)
        vector = centre / np.linalg.norm(centre) + spread * noise / np.linalg.norm(noise)
    else:
        cluster = (row // group) % clusters
        centre = np.random.default_rng((seed, cluster)).standard_normal(dim)
        member = np.random.default_rng((seed, cluster, row // group, 1)).standard_normal(dim)
        noise = np.random.default_rng((seed, cluster, row, 2)).standard_normal(dim)
        vector = (centre / np.linalg.norm(centre) + spread * member / np.linalg.norm(member)
                  + spread / 2 * noise / np.linalg.norm(noise))
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def synthetic_embeddings(spark: SparkSession, model_key: str, start: int, count: int, clusters: int,
                         dim: int = 2048, seed: int = 0, group: int = 1) -> DataFrame:
    """Rows ``start`` to ``start + count`` of a synthetic embeddings table with the real schema (image_id
    ``syn00000042``, :func:`clustered_vector` embeddings), computed by Spark tasks."""
    import pandas as pd

    def rows(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for b in batches:
            ids = b["id"].tolist()
            yield pd.DataFrame({
                "image_id": [f"syn{i:08d}" for i in ids], "sha256": [f"{i:064x}" for i in ids],
                "embedding": [clustered_vector(i, clusters, dim, seed=seed, group=group) for i in ids]})

    from pyspark.sql import functions as F

    vectors = spark.range(start, start + count, numPartitions=max(1, count // 20_000)).mapInPandas(
        rows, "image_id string, sha256 string, embedding array<float>")  # type: ignore[arg-type]
    return vectors.select(
        "image_id", F.lit(model_key).alias("model_key"), "sha256", "embedding",
        F.lit(model_key.split("-")[0]).alias("model"), F.lit("synthetic").alias("weights_checksum"),
        F.lit("synthetic").alias("preprocess_id"), F.lit(True).alias("normalized"), F.lit("fp32").alias("precision"),
        F.lit("cpu").alias("device"), F.lit(None).cast("string").alias("error"), F.lit("synthetic").alias("run_id"),
        F.current_timestamp().alias("embedded_at"))
