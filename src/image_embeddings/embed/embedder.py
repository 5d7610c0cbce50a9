"""Stage 2's model side in plain Python: an :class:`Embedder` turns JPEG bytes into float32 embeddings in
batches, on the CPU or a GPU. Nothing here imports Spark; torch is imported only when a model is built.

The backbones are in :mod:`image_embeddings.core.backbones`, their weights in :mod:`image_embeddings.embed.weights`,
the CPU speed-ups in :mod:`image_embeddings.embed.speedups`, one embedder per worker process in
:mod:`image_embeddings.embed.workers`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from image_embeddings.core.backbones import MODELS, ModelSpec, model_spec
from image_embeddings.core.errors import EMPTY, as_error, error
from image_embeddings.core.storage import S3Access
from image_embeddings.embed.speedups import fuse_conv_bn, to_onednn
from image_embeddings.embed.weights import Weights, WeightsError, load_model, resolve_weights

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
__all__ = ["DEVICES", "MODELS", "PRECISIONS", "EmbedResult", "Embedder", "EmbedderSettings", "ModelSpec",
           "S3Access", "Weights", "WeightsError", "model_spec"]


@dataclass(frozen=True)
class EmbedderSettings:
    """Everything an executor needs to build the same embedder as the driver (plain, picklable values)."""

    model: str
    weights: str
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    normalize: bool = True
    cache_dir: str = "~/.cache/image-embeddings"
    threads: int | None = None
    s3: S3Access = field(default_factory=S3Access)
    checksum: str | None = None  # when set, the weights found must have this checksum
    decode: str = "auto"  # auto: nvjpeg on the GPU when the device is cuda, else Pillow; cpu; gpu
    engine: str = "auto"  # auto: oneDNN tensors for CNNs on CPU when they check out, else eager; eager; onednn


@dataclass
class EmbedResult:
    """``embeddings`` is (n, dim) float32 with NaN rows where ``errors`` holds a message."""

    embeddings: np.ndarray
    errors: list[str | None]


def has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (Intel's AMX tiles or AVX512-BF16, as on AMD Zen 4): there
    bf16 ran ResNet50 1.6 (AVX512-BF16) to 2.9 (AMX) times as fast as fp32 on two cores."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(device: str) -> str:
    """Resolve ``auto`` to cuda when a GPU is visible, else cpu; ``cuda:N`` (the GPU Spark gave a task) must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if is_cuda(device) and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={device} but no CUDA device is visible to this process")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise RuntimeError(f"Spark assigned GPU {device[5:]} to this task, but this process sees "
                           f"{torch.cuda.device_count()} CUDA device(s) (check CUDA_VISIBLE_DEVICES and the discovery "
                           "script)")
    return device


def is_cuda(device: str) -> bool:
    """True for ``cuda`` and ``cuda:N``."""
    return device == "cuda" or device.startswith("cuda:")


def task_device(device: str, resources: dict[str, Any]) -> str:
    """The device of one Spark task: ``cuda:N`` for the GPU Spark assigned it when Spark schedules GPUs
    (``TaskContext.resources()["gpu"]``) and the model may use one; ``device`` unchanged otherwise. Without this
    every Python worker of a multi-GPU node would use device 0."""
    gpu = resources.get("gpu")
    addresses = list(getattr(gpu, "addresses", None) or [])
    if device not in ("auto", "cuda") or not addresses:
        return device
    return f"cuda:{addresses[0]}"


def pick_precision(precision: str, device: str, spec: ModelSpec | None = None) -> str:
    """Resolve ``auto``: fp32 for models whose registry entry says bf16 costs them fidelity; else bf16 on CUDA GPUs
    that support it (fp16 on older ones) and on CPUs with bf16 instructions, fp32 elsewhere."""
    import torch

    if precision != "auto":
        return precision
    if spec is not None and not spec.auto_bf16:
        return "fp32"
    if is_cuda(device):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if has_fast_bf16() else "fp32"


class Embedder:
    """A loaded model that embeds JPEG (or any Pillow-readable) image bytes in batches."""

    def __init__(self, settings: EmbedderSettings, weights: Weights | None = None) -> None:
        import torch

        self.settings = settings
        self.spec = model_spec(settings.model)
        self.weights = weights or resolve_weights(settings.weights, self.spec, settings.cache_dir, settings.s3)
        if settings.checksum and settings.checksum != self.weights.checksum:
            raise WeightsError(f"model.weights: {settings.weights} has checksum {self.weights.checksum} here but "
                               f"{settings.checksum} where the run started; the weights changed during the run")
        self.device = pick_device(settings.device)
        self.precision = pick_precision(settings.precision, self.device, self.spec)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        net = self._fold(load_model(self.spec, self.weights)).to(self.device)
        self.model = net.to(memory_format=torch.channels_last)
        self.engine = "eager"  # or onednn: see _use_onednn
        self._use_onednn(net)
        self.calls = 0  # batches embedded so far by this instance
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(shape) * 255.0
        self._std = torch.tensor(self.spec.std, device=self.device).view(shape) * 255.0

    def _probe(self) -> torch.Tensor:
        import torch

        size = self.spec.input_size
        return torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(0))

    def _fold(self, net: Any) -> Any:
        """BatchNorm folded into the convolutions when the registry says it applies and the folded model's fp32
        outputs match the loaded model's on a probe batch; else the model as loaded."""
        import torch

        if not self.spec.fold_bn:
            return net
        probe = self._probe()
        with torch.inference_mode():
            expected = net(probe)
        folded = fuse_conv_bn(net)
        with torch.inference_mode():
            got = folded(probe)
        cosine = float(torch.nn.functional.cosine_similarity(expected, got).min())
        if cosine >= 0.99999:
            return folded
        log.warning("%s runs without BatchNorm folding: the folded model's outputs differ (cosine %.6f)",
                    self.spec.name, cosine)
        return load_model(self.spec, self.weights)

    def _use_onednn(self, net: Any) -> None:
        """On CPU, run a CNN on oneDNN tensors when its outputs match the eager model's (checked on one batch)."""
        import torch

        if not (self.device == "cpu" and self.spec.onednn and self.precision in ("bf16", "fp32")
                and self.settings.engine in ("auto", "onednn") and torch.backends.mkldnn.is_available()):
            if self.settings.engine == "onednn":
                raise RuntimeError(f"model.engine=onednn needs a CPU, bf16 or fp32, and a model with a oneDNN form "
                                   f"({self.spec.name} on {self.device} in {self.precision} has none)")
            return
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        try:
            candidate = to_onednn(net, dtype)
            probe = self._probe()
            with torch.inference_mode():
                with self._autocast():
                    expected = self.model(probe.contiguous(memory_format=torch.channels_last)).float()
                got = candidate(probe)
            cosine = float(torch.nn.functional.cosine_similarity(expected, got).min())
            if not cosine >= 0.999:
                raise ValueError(f"its outputs differ from the eager model's (cosine {cosine:.5f})")
        except Exception as exc:
            if self.settings.engine == "onednn":
                raise RuntimeError(f"model.engine=onednn: {self.spec.name} fails on oneDNN tensors: {exc}") from exc
            log.warning("running %s eagerly: the oneDNN form failed its check (%s)", self.spec.name, exc)
            return
        self.model, self.engine = candidate, "onednn"

    @property
    def dim(self) -> int:
        """Size of one embedding."""
        return self.spec.dim

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def _decode(self, data: bytes | None) -> np.ndarray:
        from PIL import Image

        if data is None or len(data) == 0:
            raise ValueError(EMPTY)
        size = self.spec.input_size
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (size, size):
                found = f"{im.size[0]}x{im.size[1]}"
                raise ValueError(error("wrong_size", f"{found}, {self.spec.name} expects {size}x{size}"))
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed a uint8 (n, 3, H, W) tensor; returns float32 (n, dim) on the CPU."""
        import torch

        if self.settings.threads and torch.get_num_threads() != self.settings.threads:
            # OpenMP's thread count belongs to the calling thread: a model loaded in a warm-up thread set it there.
            torch.set_num_threads(self.settings.threads)
        outputs = []
        with torch.inference_mode():
            for start in range(0, pixels.shape[0], self.settings.batch_size):
                chunk = pixels[start: start + self.settings.batch_size]
                chunk = chunk.to(self.device, non_blocking=True).float()
                chunk = (chunk - self._mean) / self._std
                if self.engine == "onednn":  # its own precision, no autocast
                    features = self.model(chunk)
                else:
                    with self._autocast():
                        features = self.model(chunk.contiguous(memory_format=torch.channels_last))
                features = features.float()
                if self.settings.normalize:
                    features = torch.nn.functional.normalize(features, dim=1)
                outputs.append(features.cpu())
        return torch.cat(outputs) if outputs else torch.empty((0, self.dim))

    def embed(self, images: Sequence[bytes | None]) -> EmbedResult:
        """Embed image bytes; a row that cannot be decoded gets a NaN embedding and an error, never an exception."""

        self.calls += 1
        images = list(images)  # a pandas Series indexes by label; positions are wanted here
        errors: list[str | None] = [None] * len(images)
        use_gpu = is_cuda(self.device) and self.settings.decode in ("auto", "gpu")
        pixels, good = self._decode_gpu(images, errors) if use_gpu else self._decode_cpu(images, errors)
        out = np.full((len(images), self.dim), np.nan, dtype=np.float32)
        if good:
            if is_cuda(self.device) and pixels.device.type == "cpu":
                pixels = pixels.pin_memory()
            out[good] = self.embed_pixels(pixels).numpy()
        return EmbedResult(out, errors)

    def _decode_cpu(self, images: Sequence[bytes | None], errors: list[str | None]) -> tuple[Any, list[int]]:
        """Decode with Pillow (in threads when a GPU waits: Pillow releases the GIL while decoding)."""
        import torch

        def one(data: bytes | None) -> np.ndarray | str:
            try:
                return self._decode(data)
            except Exception as exc:
                return as_error(exc)

        if is_cuda(self.device) and len(images) > 16:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                decoded = list(pool.map(one, images))
        else:
            decoded = [one(data) for data in images]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        for i, d in enumerate(decoded):
            if isinstance(d, str):
                errors[i] = d
        if not good:
            return None, good
        return torch.from_numpy(np.stack([decoded[i] for i in good])).permute(0, 3, 1, 2), good

    def _decode_gpu(self, images: Sequence[bytes | None], errors: list[str | None]) -> tuple[Any, list[int]]:
        """Decode JPEGs on the GPU with nvjpeg in one batched call; a file nvjpeg refuses goes through Pillow."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        size = self.spec.input_size
        candidates = [i for i, d in enumerate(images) if d]
        tensors: dict[int, Any] = {}
        if candidates:
            data = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in candidates]  # type: ignore[arg-type]
            try:
                batch = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                tensors = dict(zip(candidates, batch, strict=True))
            except RuntimeError:
                for i, one in zip(candidates, data, strict=True):
                    with contextlib.suppress(RuntimeError):
                        tensors[i] = decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device)
        good: list[int] = []
        rest: list[int] = []
        for i in range(len(images)):
            t = tensors.get(i)
            if t is not None and tuple(t.shape) == (3, size, size):
                good.append(i)
            else:
                rest.append(i)
        if rest:  # not a JPEG nvjpeg takes, a wrong size or a broken file: Pillow decides, with its error
            sub_errors: list[str | None] = [None] * len(rest)
            cpu_pixels, cpu_good = self._decode_cpu([images[i] for i in rest], sub_errors)
            for j, i in enumerate(rest):
                errors[i] = sub_errors[j]
            for j, k in enumerate(cpu_good):
                tensors[rest[k]] = cpu_pixels[j].to(self.device, non_blocking=True)
            good = sorted(good + [rest[k] for k in cpu_good])
        if not good:
            return None, good
        return torch.stack([tensors[i] for i in good]), good
