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


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for an ``index`` without repeats. Its backward writes the
    gradient rows back with ``index_copy_`` into zeros: no accumulation, so no atomics on a GPU
    and none of the slow CPU ``scatter_add_`` path ``index_select``'s own backward takes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad.contiguous())
        return out, None


class _ScatterRows(torch.autograd.Function):
    """Zeros of ``rows`` rows with ``x``'s rows written at ``index`` (no repeats); the backward
    is the gather of those rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return x.new_zeros(rows, *x.shape[1:]).index_copy_(0, index, x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (len(index), ...): the rows at ``index`` (int64, no repeats)."""
    return _GatherRows.apply(x, index)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """(len(index), ...) -> (rows, ...): ``x``'s rows at ``index`` (int64, no repeats), zeros
    elsewhere. The inverse of ``gather_rows``."""
    return _ScatterRows.apply(x, index, rows)
