"""Stage 2 (GPU when there is one): the model identity, the embedder and its weights, the Python workers that hold
it, the backbones' builders (``models``), the drift figure and the stage that writes the embeddings table.
Imports only ``core``."""
