"""GPU benchmark of the embedding stage, pure Python (no Spark, no Java): run it on a machine with a GPU.

    PYTHONPATH=src python bench/gpu.py [--images 20000] [--batch 256] [--precision bf16]

From 224x224 JPEG bytes (what stage 1 writes) to embeddings: ours (nvjpeg decode on the GPU, and Pillow in
CPU threads) against the article's per-row loop and against the model-only ceiling (the same model on
ready uint8 tensors already on the GPU). Random weights: this measures speed; equivalence with torchvision
is tested on CPU by `make test`.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import article_embed, article_transform  # noqa: E402


def thumbnails(count: int, size: int = 224, distinct: int = 64) -> list[bytes]:
    """Synthetic photo-like 224x224 JPEGs (smooth colour fields plus texture), quality 90."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(distinct):
        noise = rng.integers(0, 255, size=(size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC).filter(ImageFilter.DETAIL)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    return [pool[i % distinct] for i in range(count)]


def timed(fn, *args):  # type: ignore[no-untyped-def]
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    return out, time.perf_counter() - started


def main() -> int:
    import torch

    from image_embeddings.embed.embedder import Embedder, EmbedderSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--baseline-images", type=int, default=1000)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible: run this on the GPU machine")
        return 2
    data = thumbnails(args.images)
    rows = []

    settings = EmbedderSettings("resnet50", "random:0", device="cuda", precision=args.precision,
                                batch_size=args.batch, decode="gpu")
    ours = Embedder(settings)
    chunk = args.batch * 4

    def run(embedder: Embedder, items: list[bytes]) -> None:
        for start in range(0, len(items), chunk):
            embedder.embed(items[start:start + chunk])

    run(ours, data[: chunk * 2])  # warm-up: cuDNN autotuning, nvjpeg handles
    _, gpu_seconds = timed(run, ours, data)
    rows.append(("ours, nvjpeg decode on the GPU", args.images / gpu_seconds))
    cpu_decode = Embedder(EmbedderSettings("resnet50", "random:0", device="cuda", precision=args.precision,
                                           batch_size=args.batch, decode="cpu"), weights=ours.weights)
    run(cpu_decode, data[:chunk])
    _, cpu_seconds = timed(run, cpu_decode, data)
    rows.append(("ours, Pillow decode in CPU threads", args.images / cpu_seconds))

    pixels = torch.from_numpy(np.stack([np.asarray(__import__("PIL.Image").Image.open(io.BytesIO(d)).convert("RGB"))
                                        for d in data[: args.batch]])).permute(0, 3, 1, 2).cuda()
    repeats = max(1, args.images // args.batch)
    ours.embed_pixels(pixels)
    _, model_seconds = timed(lambda: [ours.embed_pixels(pixels) for _ in range(repeats)])
    ceiling = repeats * args.batch / model_seconds
    rows.append(("model only (same model and precision, uint8 tensors already on the GPU)", ceiling))

    import torchvision

    resnet = torch.nn.Sequential(*list(torchvision.models.resnet50().children())[:-1]).eval().cuda()
    _, base_seconds = timed(article_embed, data[: args.baseline_images], resnet, article_transform(), "cuda")
    base = args.baseline_images / base_seconds
    rows.append(("article's per-row loop (fp32, one image at a time)", base))

    name = torch.cuda.get_device_name(0)
    lines = [f"GPU benchmark on {name}, torch {torch.__version__}, {args.images} JPEGs of 224x224, batch "
             f"{args.batch}, {args.precision}", "",
             "| pipeline | images/s | vs per-row | vs model-only ceiling |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {value:,.0f} | {value / base:.1f}x | {value / ceiling:.0%} |" for label, value in rows]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
