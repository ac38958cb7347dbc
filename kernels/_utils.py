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


def dropout_seed(seed: "int | torch.Tensor | None", device: torch.device) -> torch.Tensor:
    """The dropout seed of one call (the kernels feed it to Philox): an int64 tensor of shape (1,) on ``device`` that the
    kernels load (never a Python int: no host read, and a CUDA graph replays a fresh draw).

    None: drawn on ``device`` from torch's generator for that device (``torch.randint``), so
    ``torch.manual_seed`` makes runs reproducible and each call gets its own mask. An int: that
    value (in [0, 2**63)). A tensor: used as it is (one int64 element on ``device``).
    """
    if seed is None:
        return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
    check_seed(seed, device)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def check_seed(seed: "int | torch.Tensor", device: torch.device) -> None:
    """Raise ``ValueError`` unless ``seed`` is an int in [0, 2**63) or one int64 on ``device``
    (reads no tensor value)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != torch.device(device):
            raise ValueError(f"a seed tensor must hold one int64 on {device}, got {seed.dtype} "
                             f"{tuple(seed.shape)} on {seed.device}")
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


# torch.library custom ops return tensors, never None: an output nobody asked for (a gradient
# not needed) is an empty tensor, mapped back to None by the op's autograd.
def op_output(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t``, or an empty tensor on ``like``'s device when ``t`` is None."""
    return like.new_empty(0) if t is None else t


def fake_grad(t: torch.Tensor, needed: bool) -> torch.Tensor:
    """A fake implementation's gradient of ``t``: contiguous like ``t``, or empty when not needed."""
    return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)


def needed_or_none(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return t if needed else None
