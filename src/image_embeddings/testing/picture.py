"""A picture of search results: each query's thumbnail, then its nearest neighbours with their scores."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageDraw

TILE = 112  # pixels per thumbnail
CAPTION = 30  # pixels of text under each thumbnail
GAP = 6


@dataclass(frozen=True)
class Tile:
    """One thumbnail of the picture: its JPEG bytes, the image_id, and the cosine to the query (None for it)."""

    image_id: str
    image: bytes | None
    score: float | None = None


def neighbours_picture(rows: list[list[Tile]], title: str = "") -> Image.Image:
    """One row per query: the query tile first (framed), then its neighbours left to right."""
    columns = max((len(r) for r in rows), default=1)
    header = 24 if title else 0
    width = GAP + columns * (TILE + GAP)
    height = header + GAP + len(rows) * (TILE + CAPTION + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, 6), title, fill="black")
    for i, row in enumerate(rows):
        top = header + GAP + i * (TILE + CAPTION + GAP)
        for j, tile in enumerate(row):
            left = GAP + j * (TILE + GAP)
            if tile.image is not None:
                with Image.open(io.BytesIO(tile.image)) as im:
                    canvas.paste(im.convert("RGB").resize((TILE, TILE), Image.Resampling.LANCZOS), (left, top))
            else:
                draw.rectangle((left, top, left + TILE - 1, top + TILE - 1), outline="gray")
            if j == 0:
                draw.rectangle((left - 3, top - 3, left + TILE + 2, top + TILE + 2), outline=(200, 30, 30), width=3)
            draw.text((left, top + TILE + 2), tile.image_id[:18], fill="black")
            caption = "query" if tile.score is None else f"{tile.score:.3f}"
            draw.text((left, top + TILE + 15), caption, fill=(200, 30, 30) if j == 0 else (60, 60, 60))
    return canvas
