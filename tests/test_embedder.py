"""The pure-Python embedder: registry, weights, precision, per-row errors, equivalence with torchvision."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from image_embeddings.core.backbones import MODELS, model_spec
from image_embeddings.core.storage import S3Access
from image_embeddings.embed.embedder import Embedder, EmbedderSettings
from image_embeddings.embed.weights import WeightsError, file_sha256, resolve_weights
from image_embeddings.embed.workers import cached_embedder, is_loaded_or_loading, load_count, warm_up_in_background
from image_embeddings.ingest.images import downscale
from image_embeddings.testing.sample import PHOTOS, encode, photo

from reference import assert_same_embeddings, make_weights, reference_embeddings

SOME = ("astronaut", "coffee", "rocket", "chelsea", "camera", "retina")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_weights(tmp_path_factory.mktemp("w") / "resnet50-test.pth")


@pytest.fixture(scope="module")
def thumbs() -> list[bytes]:
    """Stage 1 output for real photos: 224x224 JPEG bytes."""
    out = []
    for name in SOME:
        result = downscale(encode(photo(name)))
        assert result.image is not None
        out.append(result.image)
    return out


def test_registry_has_resnet50_and_a_second_backbone_is_one_entry() -> None:
    assert (model_spec("resnet50").dim, model_spec("vit_b_16").dim) == (2048, 768)
    registered = "efficientnet_lite0, resnet50, vit_b_16"
    with pytest.raises(ValueError, match=f"unknown model 'resnet18'; registered: {registered}"):
        model_spec("resnet18")
    vit = Embedder(EmbedderSettings("vit_b_16", "random:0", device="cpu", precision="fp32"))
    result = vit.embed([downscale(encode(photo("astronaut"))).image])
    assert result.embeddings.shape == (1, 768) and result.errors == [None]
    assert abs(float(np.linalg.norm(result.embeddings[0])) - 1.0) < 1e-5


@pytest.mark.parametrize(("precision", "min_cosine"), [("fp32", 0.9999), ("bf16", 0.999)])
def test_equivalent_to_torchvision_on_the_same_weights_and_pixels(weights: Path, thumbs: list[bytes],
                                                                  precision: str, min_cosine: float) -> None:
    embedder = Embedder(EmbedderSettings("resnet50", str(weights), device="cpu", precision=precision,
                                         batch_size=4))
    result = embedder.embed(thumbs)
    assert result.errors == [None] * len(thumbs)
    assert result.embeddings.shape == (len(thumbs), 2048) and result.embeddings.dtype == np.float32
    assert_same_embeddings(result.embeddings, reference_embeddings(weights, thumbs), min_cosine)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_onednn_engine_agrees_with_eager_and_is_the_cpu_default(weights: Path, thumbs: list[bytes],
                                                                precision: str) -> None:
    def embedder(engine: str) -> Embedder:
        return Embedder(EmbedderSettings("resnet50", str(weights), device="cpu", precision=precision, batch_size=4,
                                         engine=engine))

    auto, eager = embedder("auto"), embedder("eager")
    assert (auto.engine, eager.engine) == ("onednn", "eager")
    ours = auto.embed(thumbs).embeddings
    assert_same_embeddings(ours, eager.embed(thumbs).embeddings, 0.9999 if precision == "fp32" else 0.999)
    assert_same_embeddings(ours, reference_embeddings(weights, thumbs), 0.9999 if precision == "fp32" else 0.999)


def test_onednn_engine_is_refused_where_it_cannot_run() -> None:
    vit = Embedder(EmbedderSettings("vit_b_16", "random:0", device="cpu", precision="fp32"))
    assert vit.engine == "eager"  # auto: no oneDNN form for a transformer, so eager
    with pytest.raises(RuntimeError, match=r"model.engine=onednn needs .* \(vit_b_16 on cpu in fp32 has none\)"):
        Embedder(EmbedderSettings("vit_b_16", "random:0", device="cpu", precision="fp32", engine="onednn"))


def test_raw_features_when_normalize_is_off(weights: Path, thumbs: list[bytes]) -> None:
    embedder = Embedder(EmbedderSettings("resnet50", str(weights), device="cpu", precision="fp32",
                                         normalize=False))
    ours = embedder.embed(thumbs[:3]).embeddings
    ref = reference_embeddings(weights, thumbs[:3], normalize=False)
    assert np.allclose(ours, ref, rtol=1e-3, atol=1e-4)
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0)


def test_a_broken_row_among_good_ones(weights: Path, thumbs: list[bytes]) -> None:
    embedder = Embedder(EmbedderSettings("resnet50", str(weights), device="cpu", precision="fp32"))
    wrong_size = encode(photo("coffee"))  # 600x400: not what stage 1 writes
    result = embedder.embed([thumbs[0], b"junk", None, wrong_size, thumbs[1]])
    assert result.errors[0] is None and result.errors[4] is None
    assert result.errors[1].startswith("decode_error: ")
    assert result.errors[2] == "empty: no bytes"
    assert result.errors[3] == "wrong_size: 600x400, resnet50 expects 224x224"
    assert np.isnan(result.embeddings[1:4]).all()
    alone = embedder.embed([thumbs[0], thumbs[1]]).embeddings
    assert np.allclose(result.embeddings[[0, 4]], alone, atol=1e-5)


def test_weights_from_a_file_are_checked_and_never_replaced(weights: Path, tmp_path: Path) -> None:
    resolved = resolve_weights(str(weights), MODELS["resnet50"], str(tmp_path))
    assert resolved.checksum == "sha256:" + file_sha256(str(weights))
    with pytest.raises(WeightsError, match="no weights file at"):
        resolve_weights(str(tmp_path / "missing.pth"), MODELS["resnet50"], str(tmp_path))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="is not a loadable PyTorch weights file"):
        Embedder(EmbedderSettings("resnet50", str(tmp_path / "junk.pth"), device="cpu"))
    vit = make_weights(tmp_path / "vit.pth", model="vit_b_16")
    with pytest.raises(WeightsError, match="does not fit resnet50: missing"):
        Embedder(EmbedderSettings("resnet50", str(vit), device="cpu"))
    with pytest.raises(WeightsError, match="the weights changed during the run"):
        Embedder(EmbedderSettings("resnet50", str(weights), device="cpu", checksum="sha256:0000"))


def test_weights_files_in_other_forms_load_as_the_same_float32_model(weights: Path, thumbs: list[bytes],
                                                                     tmp_path: Path) -> None:
    import torch

    state = torch.load(weights, weights_only=True)
    variants = {
        "headless": {k: v for k, v in state.items() if not k.startswith("fc.")},
        "fp16": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        "wrapped": {"state_dict": state},
    }
    for name, variant in variants.items():
        torch.save(variant, tmp_path / f"{name}.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # cannot be memory-mapped

    def embed(path: Path) -> np.ndarray:
        embedder = Embedder(EmbedderSettings("resnet50", str(path), device="cpu", precision="fp32"))
        return embedder.embed(thumbs).embeddings

    expected = embed(weights)
    for name in ("headless", "wrapped", "legacy"):
        assert np.allclose(embed(tmp_path / f"{name}.pth"), expected, atol=1e-6), name
    assert_same_embeddings(embed(tmp_path / "fp16.pth"), expected, 0.9999)  # float32 maths on fp16-rounded weights
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:, :32]
    torch.save(state, tmp_path / "misshapen.pth")
    with pytest.raises(WeightsError, match=r"misshapen.pth does not fit resnet50: .*layer1.0.conv1.weight"):
        Embedder(EmbedderSettings("resnet50", str(tmp_path / "misshapen.pth"), device="cpu"))


def test_batch_norms_are_folded_without_changing_outputs() -> None:
    import torch

    from image_embeddings.embed.speedups import fuse_conv_bn
    from image_embeddings.embed.weights import load_model, resolve_weights

    spec = MODELS["resnet50"]
    net = load_model(spec, resolve_weights("random:3", spec, "unused"))
    for norm in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # not the identity of a fresh init
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
    pixels = torch.rand((2, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = net(pixels)
        folded = fuse_conv_bn(net)  # ResNet: folded in place, found by structure
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(pixels), expected, rtol=1e-4, atol=1e-4)

        class Odd(torch.nn.Module):  # a BatchNorm that follows no convolution by name or order: torch.fx folds it
            def __init__(self) -> None:
                super().__init__()
                self.first, self.norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

            def forward(self, x: Any) -> Any:
                return torch.relu(self.norm(self.first(x)))

        odd = Odd().eval()
        odd.norm.running_mean.uniform_(-0.5, 0.5)
        want = odd(pixels)
        fused = fuse_conv_bn(odd)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        assert torch.allclose(fused(pixels), want, rtol=1e-4, atol=1e-5)


def test_imagenet_without_network_fails_with_how_to_pass_a_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Route any download to a closed local port, so the outcome is the same with or without network.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsError) as info:
        resolve_weights("imagenet", MODELS["resnet50"], str(tmp_path))
    message = str(info.value)
    assert "model.weights=imagenet: cannot download https://download.pytorch.org/models/resnet50-" in message
    assert f"put it at {tmp_path / 'torch' / 'hub' / 'checkpoints'}/resnet50-" in message
    assert "model.weights=/path/to/file.pth or model.weights=s3://bucket/key" in message


def test_imagenet_weights_are_read_from_the_torch_cache(weights: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(
        torchvision.models.ResNet50_Weights.DEFAULT.url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    resolved = resolve_weights("imagenet", MODELS["resnet50"], str(tmp_path))
    assert (resolved.kind, resolved.path) == ("imagenet", str(cached))
    assert resolved.checksum == "sha256:" + file_sha256(str(weights))


def test_weights_from_s3_are_downloaded_once(s3_server: Any, weights: Path, tmp_path: Path) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="models")
    client.upload_file(str(weights), "models", "resnet/weights.pth")
    access = S3Access(endpoint=s3_server.endpoint)
    first = resolve_weights("s3a://models/resnet/weights.pth", MODELS["resnet50"], str(tmp_path), access)
    assert first.checksum == "sha256:" + file_sha256(str(weights))
    assert Path(first.path).read_bytes() == weights.read_bytes()
    mtime = os.stat(first.path).st_mtime_ns
    again = resolve_weights("s3://models/resnet/weights.pth", MODELS["resnet50"], str(tmp_path), access)
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == mtime, "served from the cache"
    with pytest.raises(WeightsError, match="cannot download s3://models/nothing.pth"):
        resolve_weights("s3://models/nothing.pth", MODELS["resnet50"], str(tmp_path), access)


def test_cached_embedder_loads_once_per_process() -> None:
    settings = EmbedderSettings("resnet50", "random:3", device="cpu", precision="fp32")
    first = cached_embedder(settings)
    assert cached_embedder(settings) is first
    assert load_count(settings) == 1
    assert first.weights.checksum == "random:3"


def test_a_loaded_model_is_left_out_of_later_garbage_collections(weights: Path) -> None:
    """Spark runs gc.collect() in a reused Python worker after every task: the model's objects must not be walked."""
    import json
    import subprocess
    import sys

    script = """
import gc, json, sys
from image_embeddings.embed.embedder import EmbedderSettings
from image_embeddings.embed.workers import cached_embedder
before = gc.get_freeze_count()
import torch
tracked_with_torch = len(gc.get_objects())
embedder = cached_embedder(EmbedderSettings("resnet50", sys.argv[1], device="cpu", precision="fp32"))
cycle = []
cycle.append(cycle)  # garbage made after the load is still collected
del cycle
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "torch": tracked_with_torch,
                  "walked": len(gc.get_objects()), "collected": gc.collect(),
                  "imported": [m for m in ("torchvision", "torch._dynamo") if m in sys.modules]}))
"""
    done = subprocess.run([sys.executable, "-c", script, str(weights)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == 0
    assert seen["frozen"] > seen["torch"] > 10_000  # torch's and the model's objects: frozen, skipped by collections
    assert seen["walked"] < 1_000  # what a collection still walks
    assert seen["collected"] >= 1
    # Loading ResNet50 from a file for CPU imports neither (together 1.2 s of CPU in every Python worker).
    assert seen["imported"] == []


def test_our_resnet50_is_torchvision_resnet50() -> None:
    """Same parameter names and shapes, the same random initialization for a seed, the same outputs."""
    import torch
    import torchvision

    from image_embeddings.embed.models.resnet import resnet50

    torch.manual_seed(11)
    ours = resnet50().eval()
    torch.manual_seed(11)
    theirs = torchvision.models.resnet50(weights=None).eval()
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    for name, tensor in reference.items():
        assert torch.equal(mine[name], tensor), name
    # Other weights loaded into both (BatchNorm statistics included) give the same outputs.
    trained = {k: (torch.rand_like(v) + 0.5 if v.is_floating_point() else v) for k, v in reference.items()}
    ours.load_state_dict(trained)
    theirs.load_state_dict(trained)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_imagenet_weights_are_torchvision_defaults() -> None:
    from torchvision.models import get_model_weights

    torchvision_models = [spec for spec in MODELS.values() if not spec.imagenet.startswith("package:")]
    assert [spec.name for spec in torchvision_models] == ["resnet50", "vit_b_16"]
    for spec in torchvision_models:
        assert spec.imagenet == get_model_weights(spec.name).DEFAULT.url, spec.name


def test_warm_up_in_background_loads_once_and_the_next_request_gets_that_model() -> None:
    import threading

    settings = EmbedderSettings("resnet50", "random:77", device="cpu", precision="fp32")
    assert not is_loaded_or_loading(settings)
    assert warm_up_in_background(settings) is True
    assert is_loaded_or_loading(settings)
    assert warm_up_in_background(settings) is False  # already loading: no second thread
    for thread in threading.enumerate():
        if thread.name == "embedder-warm-up":
            thread.join(timeout=120)
    assert load_count(settings) == 1
    assert is_loaded_or_loading(settings)  # loaded now, no longer loading
    embedder = cached_embedder(settings)  # what stage 2's first batch asks for: no second load
    assert load_count(settings) == 1 and embedder.embed([downscale(encode(photo("coffee"))).image]).errors == [None]


def test_a_failed_warm_up_is_not_counted_as_warm() -> None:
    import threading

    settings = EmbedderSettings("resnet50", "/nonexistent/weights.pth", device="cpu", precision="fp32")
    assert warm_up_in_background(settings) is True
    for thread in threading.enumerate():
        if thread.name == "embedder-warm-up":
            thread.join(timeout=120)
    assert not is_loaded_or_loading(settings) and load_count(settings) == 0


def test_random_weights_are_deterministic() -> None:
    image = downscale(encode(photo(PHOTOS[0]))).image
    a = Embedder(EmbedderSettings("resnet50", "random:7", device="cpu", precision="fp32")).embed([image])
    b = Embedder(EmbedderSettings("resnet50", "random:7", device="cpu", precision="fp32")).embed([image])
    c = Embedder(EmbedderSettings("resnet50", "random:8", device="cpu", precision="fp32")).embed([image])
    assert np.array_equal(a.embeddings, b.embeddings)
    assert not np.allclose(a.embeddings, c.embeddings)
