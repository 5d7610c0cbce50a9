"""Similar products: the vector index and its folder, exact and indexed search, the neighbours table. Depends on
stage 2's model identity (:mod:`image_embeddings.embed.identity`), never on the embed stage."""
