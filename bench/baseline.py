"""The article's pipeline, as its two scripts do it: the baselines every benchmark figure is a ratio against."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def article_downscale(content: bytes, size: tuple[int, int] = (224, 224)) -> bytes | None:
    """The article's stage 1 UDF body: full decode, convert, resize, JPEG save."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(content)).convert("RGB")
        img = img.resize(size)
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        return buf.getvalue()
    except Exception:
        return None


def article_model(weights_file: str) -> Any:
    """The article's stage 2 model: ResNet50 without its last layer, fp32, eval."""
    import torch
    import torchvision.models as models

    resnet = models.resnet50(weights=None)
    resnet.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    resnet = torch.nn.Sequential(*list(resnet.children())[:-1])
    return resnet.eval()


def article_transform() -> Any:
    import torchvision.transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


def article_embed(contents: list[bytes], resnet: Any, transform: Any, device: str = "cpu") -> list[Any]:
    """The article's stage 2 UDF body: one image at a time, fp32."""
    import torch
    from PIL import Image

    embeddings = []
    with torch.no_grad():
        for content in contents:
            try:
                img = Image.open(io.BytesIO(content)).convert("RGB")
                img_t = transform(img).unsqueeze(0).to(device)
                emb = resnet(img_t).squeeze().cpu().numpy()
                embeddings.append(emb.tolist())
            except Exception:
                embeddings.append(None)
    return embeddings


def run_article_scripts(spark: Any, images: str, sales: str, stage1_table: str, stage2_table: str,
                        weights_file: str) -> tuple[float, float]:
    """Run the article's two scripts in ``spark`` (its UDFs, its joins, its overwrites); return their seconds."""
    import time

    import pandas as pd
    import torch
    from pyspark.sql.functions import pandas_udf, regexp_extract, udf
    from pyspark.sql.types import ArrayType, BinaryType, FloatType

    started = time.perf_counter()
    downscale_udf = udf(lambda content: article_downscale(content), BinaryType())
    images_df = (spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg")
                 .option("recursiveFileLookup", "true").load(images))
    images_df = images_df.withColumn("image_id", regexp_extract("path", r"([^/]+)\.jpg$", 1))
    images_df = images_df.withColumn("downscaled", downscale_udf(images_df["content"])).select("image_id", "downscaled")
    sales_df = spark.read.format("parquet").load(sales)
    joined_df = images_df.join(sales_df, on="image_id", how="inner")
    joined_df.write.format("delta").mode("overwrite").save(stage1_table)
    stage1 = time.perf_counter() - started

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resnet = article_model(weights_file).to(device)
    transform = article_transform()

    def generate_embeddings(content_series: pd.Series) -> pd.Series:
        return pd.Series(article_embed(list(content_series), resnet, transform, device))

    generate_embeddings.__annotations__ = {"content_series": pd.Series, "return": pd.Series}
    generate_embeddings_udf = pandas_udf(generate_embeddings, ArrayType(FloatType()))  # type: ignore[call-overload]
    df = spark.read.format("delta").load(stage1_table)
    embed_df = df.withColumn("embedding", generate_embeddings_udf(df["downscaled"]))
    embed_df.write.format("delta").mode("overwrite").save(stage2_table)
    stage2 = time.perf_counter() - started
    return stage1, stage2


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)
