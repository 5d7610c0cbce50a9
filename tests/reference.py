"""Test weights made here (no model hub), and an independent torchvision computation to compare against."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from image_embeddings.testing.sample import trained_like_weights as make_weights  # noqa: F401 - re-exported for the tests

_BUILDERS = {"resnet50": torchvision.models.resnet50, "vit_b_16": torchvision.models.vit_b_16}


_TRANSFORM = T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


def _article_transform(image: Image.Image) -> torch.Tensor:
    return _TRANSFORM(image.convert("RGB"))


def reference_embeddings(weights: Path, images: list[bytes], model: str = "resnet50",
                         normalize: bool = True) -> np.ndarray:
    """fp32 torchvision embeddings of JPEG bytes, computed the article's way (ToTensor + Normalize)."""
    net = _BUILDERS[model]()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    if model == "resnet50":
        net.fc = torch.nn.Identity()
    else:
        net.heads = torch.nn.Identity()
    net.eval()
    batch = torch.stack([_article_transform(Image.open(io.BytesIO(b))) for b in images])
    with torch.no_grad():
        out = net(batch)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out.numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def assert_same_embeddings(ours: np.ndarray, ref: np.ndarray, min_cosine: float) -> None:
    """Each row matches its reference to ``min_cosine``, also after removing the batch mean, and is nearer
    to its own reference than any other image's reference is (so the check can tell images apart)."""
    raw = cosines(ours, ref)
    assert raw.min() >= min_cosine, raw
    centre = ref.mean(axis=0, keepdims=True)
    centred = cosines(ours - centre, ref - centre)
    assert centred.min() >= min_cosine - 10 * (1 - min_cosine), centred
    cross = cosines(np.repeat(ref, len(ref), axis=0), np.tile(ref, (len(ref), 1))).reshape(len(ref), len(ref))
    np.fill_diagonal(cross, -1)
    assert raw.min() > cross.max(), (raw.min(), cross.max())
