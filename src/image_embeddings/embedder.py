"""The model side of stage 2, in plain Python: a registry of headless torchvision backbones, weights
resolution (ImageNet, local file, S3, random), and an :class:`Embedder` that turns JPEG bytes into
float32 embeddings in batches. Nothing here imports Spark; torch is imported only when a model is built.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


class WeightsError(RuntimeError):
    """Model weights cannot be found, fetched or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One backbone: how to build it (with its head), the head to strip, its output size and input."""

    name: str
    dim: int
    build: Callable[[], Any]
    strip_head: Callable[[Any], Any]
    head_prefixes: tuple[str, ...]
    imagenet_url: str  # torchvision's DEFAULT ImageNet weights (a test checks it against torchvision's registry)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    onednn: bool = False  # a CNN whose every op runs on oneDNN tensors: see :func:`to_onednn`


def _identity() -> Any:
    import torch

    return torch.nn.Identity()


def _resnet50() -> Any:
    from image_embeddings.resnet import resnet50  # torchvision's architecture without importing torchvision

    return resnet50()


def _resnet50_headless(model: Any) -> Any:
    model.fc = _identity()
    return model


def _vit_b_16() -> Any:
    from torchvision.models import vit_b_16

    return vit_b_16(weights=None)


def _vit_headless(model: Any) -> Any:
    model.heads = _identity()
    return model


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("resnet50", 2048, _resnet50, _resnet50_headless, ("fc.",),
                          "https://download.pytorch.org/models/resnet50-11ad3fa6.pth", onednn=True),
    "vit_b_16": ModelSpec("vit_b_16", 768, _vit_b_16, _vit_headless, ("heads.",),
                          "https://download.pytorch.org/models/vit_b_16-c867db91.pth"),
}


def model_spec(name: str) -> ModelSpec:
    """Return the registered model ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None


# ---------------------------------------------------------------------------------------------------------
# weights


@dataclass(frozen=True)
class Weights:
    """Resolved weights: ``kind`` is imagenet, file or random; ``checksum`` identifies them."""

    kind: str
    checksum: str
    source: str
    path: str | None = None
    seed: int | None = None


_RANDOM = re.compile(r"^random:(\d+)$")


def is_weights_spec(spec: str) -> bool:
    """Return True when ``spec`` has one of the accepted forms (imagenet, random:SEED, path, s3 URI)."""
    if spec == "imagenet" or _RANDOM.match(spec) or spec.startswith(("s3://", "s3a://")):
        return True
    return bool(spec) and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", spec)


def resolve_weights(spec: str, model: ModelSpec, cache_dir: str, s3: S3Access | None = None) -> Weights:
    """Find or fetch the weights named by ``spec``; never falls back to other weights."""
    seed = _RANDOM.match(spec)
    if seed:
        return Weights("random", f"random:{seed.group(1)}", spec, seed=int(seed.group(1)))
    if spec == "imagenet":
        path = _imagenet_file(model)
        return Weights("imagenet", "sha256:" + file_sha256(path), spec, path=path)
    if spec.startswith(("s3://", "s3a://")):
        path = fetch_s3(spec, cache_dir, s3 or S3Access())
        return Weights("file", "sha256:" + file_sha256(path), spec, path=path)
    local = Path(spec[len("file:"):] if spec.startswith("file:") else spec).expanduser()
    if not local.is_file():
        raise WeightsError(f"model.weights: no weights file at {local}")
    return Weights("file", "sha256:" + file_sha256(str(local)), spec, path=str(local))


def _imagenet_file(model: ModelSpec) -> str:
    """Return torchvision's published weights file from its cache (``$TORCH_HOME``), downloading it once."""
    import torch.hub

    url = model.imagenet_url
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not target.is_file():
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=None, progress=False)
        except Exception as exc:
            raise WeightsError(
                f"model.weights=imagenet: cannot download {url} ({type(exc).__name__}: {exc}). "
                f"Without network, download it elsewhere and either put it at {target} (TORCH_HOME is "
                "respected) or pass it with model.weights=/path/to/file.pth or model.weights=s3://bucket/key"
            ) from exc
    return str(target)


def file_sha256(path: str) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class S3Access:
    """How boto3 reaches S3 (credentials always from the default provider chain)."""

    endpoint: str | None = None
    region: str | None = None


def fetch_s3(uri: str, cache_dir: str, s3: S3Access) -> str:
    """Download ``s3://bucket/key`` once per machine into ``cache_dir``; concurrent workers wait on a lock."""
    import boto3
    from botocore.config import Config

    match = re.match(r"^s3a?://([^/]+)/(.+)$", uri)
    if not match:
        raise WeightsError(f"model.weights: not an s3://bucket/key URI: {uri}")
    bucket, key = match.groups()
    folder = Path(cache_dir).expanduser() / hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / os.path.basename(key)
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name=s3.region,
                          config=Config(s3={"addressing_style": "path"} if s3.endpoint else {},
                                        retries={"max_attempts": 5, "mode": "standard"}))
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            etag = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
            stamp = folder / ".etag"
            if target.is_file() and stamp.is_file() and stamp.read_text() == etag:
                return str(target)
            partial = folder / (target.name + ".part")
            client.download_file(bucket, key, str(partial))
            partial.replace(target)
            stamp.write_text(etag)
            log.info("downloaded %s into %s (sha256 %s)", uri, target, file_sha256(str(target)))
        except WeightsError:
            raise
        except Exception as exc:
            raise WeightsError(f"model.weights: cannot download {uri}: {type(exc).__name__}: {exc}") from exc
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)


def load_model(model: ModelSpec, weights: Weights) -> Any:
    """Build the headless backbone with ``weights`` loaded (strictly: no missing or unexpected keys)."""
    import torch

    if weights.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed or 0)
            net = model.build()
        return model.strip_head(net).eval()
    # Built without memory or random initialization (0.5 s of CPU for ResNet50): the file's tensors are assigned.
    with torch.device("meta"):
        net = model.build()
    assert weights.path is not None
    try:
        try:  # mapped, not read into a copy; files in the legacy (pre-zip) format cannot be mapped
            state = torch.load(weights.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"model.weights: {weights.source} is not a loadable PyTorch weights file: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights: {weights.source} holds {type(state).__name__}, not a state dict")
    try:
        result = net.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of the wrong shape
        reason = " ".join(str(exc).split()).split(": ", 1)[-1]  # one line, without "Error(s) in loading ..."
        raise WeightsError(f"model.weights: {weights.source} does not fit {model.name}: {reason}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(model.head_prefixes)]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"model.weights: {weights.source} does not fit {model.name}: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}")
    net = model.strip_head(net)  # the head, left unloaded when the file has none, goes with it
    unset = [name for name, t in (*net.named_parameters(), *net.named_buffers()) if t.is_meta]
    if unset:
        raise WeightsError(f"model.weights: {weights.source} leaves {model.name} without values for {unset[:5]}")
    return net.float().eval()  # float32 as if built normally, whatever precision the file was saved in


def fuse_conv_bn(model: Any) -> Any:
    """Fold each inference BatchNorm into the convolution before it (about 20% faster on CPU, same outputs).

    Models without BatchNorm, or that torch.fx cannot trace, are returned as they are.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        return model
    pairs = _conv_bn_pairs(model)
    if len(pairs) == len(norms):  # every BatchNorm follows a known convolution: fold them in place
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        for parent, conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            setattr(parent, bn_name, torch.nn.Identity())
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model.eval())
    except Exception as exc:  # an optimization only: the unfused model computes the same embeddings
        log.warning("could not fold BatchNorm into convolutions (%s); using the model as it is", exc)
        return model


def _conv_bn_pairs(model: Any) -> list[tuple[Any, str, str]]:
    """(parent, conv, bn) names where the BatchNorm is known to take the convolution's output directly.

    In a Sequential, a BatchNorm right after a convolution; in ResNets and their blocks (ours and torchvision's),
    ``bnN`` after ``convN`` (their forward applies them so). Tracing with torch.fx finds the rest, at about three
    times the cost.
    """
    import torch

    from image_embeddings import resnet

    blocks: tuple[type, ...] = (resnet.ResNet, resnet.Bottleneck)
    if "torchvision" in sys.modules:  # torchvision's own ResNets, when a caller built one
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

        blocks += (ResNet, Bottleneck, BasicBlock)
    pairs = []
    for parent in model.modules():
        if isinstance(parent, torch.nn.Sequential):
            names = list(parent._modules)
            pairs += [(parent, a, b) for a, b in zip(names, names[1:], strict=False)
                      if isinstance(parent._modules[a], torch.nn.Conv2d)
                      and isinstance(parent._modules[b], torch.nn.BatchNorm2d)]
        elif type(parent) in blocks:
            pairs += [(parent, f"conv{i}", f"bn{i}") for i in range(1, 4)
                      if isinstance(getattr(parent, f"conv{i}", None), torch.nn.Conv2d)
                      and isinstance(getattr(parent, f"bn{i}", None), torch.nn.BatchNorm2d)]
    return pairs


def to_onednn(model: Any, dtype: Any) -> Any:
    """The same CNN running on oneDNN ("mkldnn") tensors end to end, for CPUs.

    Each convolution keeps its weights pre-reordered into oneDNN's blocked layout, and activations stay in that
    layout from the first layer to the pooled output, so no layer converts them back and forth. With bf16 on
    this machine's AMX that ran ResNet50 at about 2.3 times the speed of eager channels_last autocast. Takes
    float32 NCHW input, returns dense float32.
    """
    import copy

    import torch

    class OneDnnConv2d(torch.nn.Module):
        def __init__(self, conv: Any) -> None:
            super().__init__()
            if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                raise ValueError(f"convolution with padding {conv.padding!r}/{conv.padding_mode} has no oneDNN form")
            self.stride, self.padding = conv.stride, conv.padding
            self.dilation, self.groups = conv.dilation, conv.groups
            weight = conv.weight.detach().float().to_mkldnn(dtype)
            reorder = getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None)
            if reorder is not None:  # pre-packed once, instead of at every call
                weight = reorder(weight, self.padding, self.stride, self.dilation, self.groups)
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
            self.weight: torch.Tensor
            self.bias: torch.Tensor
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias.float().to_mkldnn())  # fp32 bias: oneDNN's choice for accuracy

        def forward(self, x: Any) -> Any:
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)

    class OneDnnModel(torch.nn.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            return self.net(x.contiguous().to_mkldnn(dtype)).to_dense().float()

    net = copy.deepcopy(model).float().eval()
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Conv2d):
                setattr(parent, name, OneDnnConv2d(child))
            elif isinstance(child, (torch.nn.Linear, torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                raise ValueError(f"{type(child).__name__} layers are not converted to oneDNN here")
    return OneDnnModel(net)


# ---------------------------------------------------------------------------------------------------------
# the embedder


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


def has_amx() -> bool:
    """True when the CPU has AMX bf16 tiles (bf16 matrix maths as fast as or faster than fp32)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return any("amx_bf16" in line for line in handle if line.startswith("flags"))
    except OSError:
        return False


def pick_device(device: str) -> str:
    """Resolve ``auto`` to cuda when a GPU is visible, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but no CUDA device is visible to this process")
    return device


def pick_precision(precision: str, device: str) -> str:
    """Resolve ``auto``: bf16 on CUDA GPUs that support it and on CPUs with AMX, fp32 elsewhere."""
    import torch

    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if has_amx() else "fp32"


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
        self.precision = pick_precision(settings.precision, self.device)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        net = fuse_conv_bn(load_model(self.spec, self.weights)).to(self.device)
        self.model = net.to(memory_format=torch.channels_last)
        self.engine = "eager"  # or onednn: see _use_onednn
        self._use_onednn(net)
        self.calls = 0  # batches embedded so far by this instance
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(shape) * 255.0
        self._std = torch.tensor(self.spec.std, device=self.device).view(shape) * 255.0

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
            size = self.spec.input_size
            probe = torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(0))
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
        return torch.autocast(device_type=self.device, dtype=dtype)

    def _decode(self, data: bytes | None) -> np.ndarray:
        from PIL import Image

        if data is None or len(data) == 0:
            raise ValueError("empty: no image bytes")
        size = self.spec.input_size
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (size, size):
                raise ValueError(f"wrong_size: {im.size[0]}x{im.size[1]}, {self.spec.name} expects {size}x{size}")
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
        use_gpu = self.device == "cuda" and self.settings.decode in ("auto", "gpu")
        pixels, good = self._decode_gpu(images, errors) if use_gpu else self._decode_cpu(images, errors)
        out = np.full((len(images), self.dim), np.nan, dtype=np.float32)
        if good:
            if self.device == "cuda" and pixels.device.type == "cpu":
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
                message = str(exc)
                return message if re.match(r"^[a-z_]+: ", message) else f"decode_error: {message}"

        if self.device == "cuda" and len(images) > 16:
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
                batch = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
                tensors = dict(zip(candidates, batch, strict=True))
            except RuntimeError:
                for i, one in zip(candidates, data, strict=True):
                    with contextlib.suppress(RuntimeError):
                        tensors[i] = decode_jpeg(one, mode=ImageReadMode.RGB, device="cuda")
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
                tensors[rest[k]] = cpu_pixels[j].to("cuda", non_blocking=True)
            good = sorted(good + [rest[k] for k in cpu_good])
        if not good:
            return None, good
        return torch.stack([tensors[i] for i in good]), good


# ---------------------------------------------------------------------------------------------------------
# one model per Python worker process

_LOCK = threading.Lock()
_EMBEDDERS: dict[EmbedderSettings, Embedder] = {}
_LOADS: dict[EmbedderSettings, int] = {}


def cached_embedder(settings: EmbedderSettings) -> Embedder:
    """Return this process's embedder for ``settings``, loading the model only the first time."""
    with _LOCK:
        embedder = _EMBEDDERS.get(settings)
        if embedder is None:
            embedder = Embedder(settings)
            _EMBEDDERS[settings] = embedder
            _LOADS[settings] = _LOADS.get(settings, 0) + 1
            # A reused Spark Python worker runs a full gc.collect() after every task; with torch and the model
            # loaded (hundreds of thousands of objects) each took about 0.1 s of CPU, about 3 s for a run of 600
            # photos on local[2]. Frozen, the objects that exist now are skipped by every later collection.
            gc.freeze()
            log.info("loaded %s (%s, %s, %s) in process %d", settings.model, embedder.weights.checksum[:19],
                     embedder.device, embedder.precision, os.getpid())
        return embedder


_WARMING: set[EmbedderSettings] = set()
_WARMING_LOCK = threading.Lock()


def warm_up_in_background(settings: EmbedderSettings) -> bool:
    """Start loading this process's embedder for ``settings`` in a daemon thread, once; True if started now.

    For a Python worker of stage 1 that stage 2 will reuse (``run``): torch's import and the model load then
    overlap stage 1's remaining work instead of delaying stage 2's first batch. Only on CPU: on a GPU machine
    stage 1's many workers would each open a CUDA context, so the thread stops after importing torch. A load
    that fails here is logged and left to stage 2, which loads again and reports the error.
    """
    with _WARMING_LOCK:
        if settings in _WARMING or settings in _EMBEDDERS:
            return False
        _WARMING.add(settings)

    def load() -> None:
        try:
            if pick_device(settings.device) == "cpu":
                cached_embedder(settings)
        except Exception as exc:
            log.warning("warming up %s in process %d failed (stage 2 will load it again): %s", settings.model,
                        os.getpid(), exc)
        finally:  # loaded (then in _EMBEDDERS), failed or skipped: no longer loading
            with _WARMING_LOCK:
                _WARMING.discard(settings)

    threading.Thread(target=load, name="embedder-warm-up", daemon=True).start()
    return True


def is_loaded_or_loading(settings: EmbedderSettings) -> bool:
    """True when this process has the embedder for ``settings`` or is loading it in the background."""
    return settings in _EMBEDDERS or settings in _WARMING


def load_count(settings: EmbedderSettings) -> int:
    """How many times this process has loaded the model for ``settings`` (1 once loaded: it is kept)."""
    return _LOADS.get(settings, 0)
