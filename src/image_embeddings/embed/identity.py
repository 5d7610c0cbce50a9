"""The model identity: which backbone, weights, preprocessing and output a row of embeddings comes from.

Search and evaluation depend on this module, never on the embed stage itself."""

from __future__ import annotations

import hashlib

from image_embeddings.core.backbones import model_spec
from image_embeddings.core.config import AppConfig
from image_embeddings.core.storage import S3Access
from image_embeddings.embed.embedder import EmbedderSettings, Weights
from image_embeddings.embed.weights import resolve_weights


def embedder_settings(config: AppConfig, weights: Weights) -> EmbedderSettings:
    """The picklable settings every Python worker builds its embedder from."""
    m = config.model
    return EmbedderSettings(model=m.name, weights=m.weights, device=m.device, precision=m.precision,
                            batch_size=m.batch_size, normalize=m.normalize, cache_dir=m.cache_dir,
                            threads=m.threads, s3=S3Access(config.s3.endpoint, config.s3.region),
                            checksum=weights.checksum, decode=m.decode, engine=m.engine)


def resolve_config_weights(config: AppConfig) -> Weights:
    """Find or fetch the weights named by ``model.weights`` (S3 through ``s3.endpoint`` when set)."""
    mc = config.model
    return resolve_weights(mc.weights, model_spec(mc.name), mc.cache_dir,
                           S3Access(config.s3.endpoint, config.s3.region))


def model_key(model: str, weights_checksum: str, preprocess_id: str, normalized: bool) -> str:
    """A short identity of everything that decides an embedding's value, stored with every row."""
    text = f"{model}|{weights_checksum}|{preprocess_id}|{'l2' if normalized else 'raw'}"
    return f"{model}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
