"""Embedding quality figures on tiny arrays (no Spark): retrieval of augmented copies, drift, augmentations, and
the picture of neighbours."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from image_embeddings.embed.drift import drift_figures
from image_embeddings.ingest.images import downscale
from image_embeddings.ops.evaluate import AUGMENTATIONS, augment, retrieval_figures
from image_embeddings.testing.picture import TILE, Tile, neighbours_picture
from image_embeddings.testing.sample import encode, photo


def test_retrieval_figures_count_where_each_query_finds_its_original() -> None:
    originals = np.eye(6, dtype=np.float32)
    queries = originals[[0, 1, 2]] + 0.1 * originals[[1, 2, 3]]  # near their own, a little toward the next
    figures = retrieval_figures(originals, queries, np.array([0, 1, 2]))
    assert (figures["recall_at_1"], figures["recall_at_5"]) == (1.0, 1.0)
    assert figures["same_image_cosine"] == pytest.approx(1 / np.sqrt(1.01), abs=1e-4)
    assert figures["different_image_cosine"] == pytest.approx(0.1 / np.sqrt(1.01) / 5, abs=1e-4)
    # A query nearer another original is a miss at 1; one with five originals above it a miss at 5 as well.
    swapped = retrieval_figures(originals, queries, np.array([1, 1, 2]))
    assert swapped["recall_at_1"] == pytest.approx(2 / 3, abs=1e-4)
    lost = retrieval_figures(originals, np.ones((1, 6)) - originals[[5]], np.array([5]))
    assert (lost["recall_at_1"], lost["recall_at_5"]) == (0.0, 0.0)
    assert lost["gap"] < 0


def test_drift_is_low_for_more_of_the_same_and_high_for_something_else() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 64))
    def draw(n: int, which: np.ndarray) -> np.ndarray:
        return centres[which[rng.integers(0, len(which), n)]] + 0.3 * rng.normal(size=(n, 64))

    earlier = draw(400, np.arange(6))
    same = drift_figures(draw(100, np.arange(6)), earlier)
    other = drift_figures(draw(100, np.array([6, 7])), earlier)
    assert same["mean_cosine"] > 0.9 > other["mean_cosine"]
    assert same["nearest_similarity"] == pytest.approx(same["nearest_similarity_reference"], abs=0.05)
    assert other["nearest_similarity"] < other["nearest_similarity_reference"] - 0.3
    assert (same["new_rows"], same["reference_rows"]) == (100, 400)
    assert drift_figures(np.zeros((0, 64)), earlier)["note"] == "too few rows to compare"
    assert "mean_cosine" not in drift_figures(earlier[:3], earlier[:1])


def test_augmented_copies_keep_the_size_and_differ_from_the_thumbnail() -> None:
    thumbnail = downscale(encode(photo("coffee"))).image
    assert thumbnail is not None
    copies = augment(thumbnail)
    assert tuple(copies) == AUGMENTATIONS
    original = np.asarray(Image.open(io.BytesIO(thumbnail)).convert("RGB"), dtype=np.float32)
    for name, data in copies.items():
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.size) == ("JPEG", (224, 224)), name
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert np.abs(pixels - original).mean() > 5, name
    flipped = np.asarray(Image.open(io.BytesIO(copies["flip"])).convert("RGB"), dtype=np.float32)
    assert np.abs(flipped[:, ::-1] - original).mean() < 3  # mirrored back, the same photo
    bright = np.asarray(Image.open(io.BytesIO(copies["brightness"])).convert("RGB"), dtype=np.float32)
    assert bright.mean() > original.mean() + 10


def test_the_picture_puts_each_query_first_with_its_neighbours_in_order() -> None:
    red = encode(np.full((224, 224, 3), (250, 0, 0), dtype=np.uint8))
    blue = encode(np.full((224, 224, 3), (0, 0, 250), dtype=np.uint8))
    rows = [[Tile("a", red), Tile("b", blue, 0.91), Tile("c", None, 0.5)], [Tile("b", blue), Tile("a", red, 0.91)]]
    picture = neighbours_picture(rows, "title")
    assert picture.size == (6 + 3 * (TILE + 6), 24 + 6 + 2 * (TILE + 30 + 6))
    pixels = np.asarray(picture)
    centre = TILE // 2
    row0, row1 = 24 + 6 + centre, 24 + 6 + TILE + 30 + 6 + centre
    assert pixels[row0, 6 + centre, 0] > 200 and pixels[row0, 6 + TILE + 6 + centre, 2] > 200
    assert (pixels[row0, 6 + 2 * (TILE + 6) + centre] == 255).all()  # no thumbnail: left blank, outlined
    assert pixels[row1, 6 + centre, 2] > 200 and pixels[row1, 6 + TILE + 6 + centre, 0] > 200
