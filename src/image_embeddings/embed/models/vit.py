"""torchvision's ViT-B/16 (imported from torchvision: this one backbone needs it)."""

from __future__ import annotations

from typing import Any


def build() -> Any:
    """A randomly initialized ``torchvision.models.vit_b_16``."""
    from torchvision.models import vit_b_16

    return vit_b_16(weights=None)


def headless(model: Any) -> Any:
    """Replace the classification heads with the identity: the output is the class token's features."""
    import torch

    model.heads = torch.nn.Identity()
    return model
