"""Small helpers shared by the ops in this package."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def apply_dropout(x: torch.Tensor, p: float, mask: torch.Tensor | None, seed: int | None) -> torch.Tensor:
    """Inverted dropout with keep-probability 1 - p; ``mask`` (bool, True = keep) wins over ``seed``."""
    if p <= 0.0:
        return x
    if mask is None:
        if seed is None:
            return F.dropout(x, p=p, training=True)
        g = dropout_generator(seed, x.device)
        mask = torch.rand(x.shape, generator=g, device=x.device) >= p
    return x * mask.to(x.dtype) * (1.0 / (1.0 - p))
