"""The backbones' builders, one module each, imported only when that model is built (registry:
:mod:`image_embeddings.core.backbones`)."""
