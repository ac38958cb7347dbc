"""LayerNorm with fused residual add and dropout, and bias + GELU.

Ops (BERT's notation):
  - ``layer_norm(x, weight, bias, residual, dropout_p)``: ``LayerNorm(dropout(x) + residual)``, the
    ``LayerNorm(dropout(dense(h)) + h)`` that closes every BERT sub-layer; optionally also returns
    the pre-norm sum ``dropout(x) + residual``.
  - ``bias_gelu(x, bias, approximate)``: ``GELU(x + bias)``, exact erf (``"none"``) or tanh.

This file holds the eager PyTorch references (``*_ref``), the functional forms that dispatch on the
kernels backend, and the ``LayerNorm`` module (``weight``/``bias`` keys like ``nn.LayerNorm``).
The Triton kernels are added by the kernel issue; until then the ``triton`` backend runs the
reference (see ``kernels._backend.dispatch``).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._backend import dispatch
from ._utils import apply_dropout

GeluApprox = Literal["none", "tanh"]


# ----------------------------------------------------------------------------- eager references
def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    seed: int | None = None,
    return_prenorm: bool = False,
    upcast: bool = False,
):
    """Eager ``LayerNorm(dropout(x) + residual)`` over the last dimension.

    Args:
        x: (..., N) the incoming branch (e.g. a dense layer's output).
        weight, bias: (N,) affine parameters.
        residual: (..., N) or None, added after dropout.
        dropout_p: probability of zeroing an element of ``x``.
        dropout_mask: (..., N) bool, True = keep; given, it is used instead of drawing one.
        seed: seeds the drawn mask (a local generator); None uses torch's global RNG.
        return_prenorm: also return ``dropout(x) + residual`` (the next residual stream).
        upcast: compute in fp32 (the accuracy reference for the kernels' error budget).
    Returns:
        y (..., N) in x's dtype (fp32 when ``upcast``), and the pre-norm sum if asked.
    """
    if upcast:
        x, weight, bias = x.float(), weight.float(), bias.float()
        residual = None if residual is None else residual.float()
    h = apply_dropout(x, dropout_p, dropout_mask, seed)
    if residual is not None:
        h = h + residual
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return (y, h) if return_prenorm else y


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor, approximate: GeluApprox = "none",
                  upcast: bool = False) -> torch.Tensor:
    """Eager ``GELU(x + bias)``; x (..., N), bias (N,); ``approximate`` is ``"none"`` (erf) or ``"tanh"``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if upcast:
        x, bias = x.float(), bias.float()
    return F.gelu(x + bias, approximate=approximate)


# ----------------------------------------------------------------------------- public functions
_layer_norm_triton = None  # set by the Triton implementation (kernel issue)
_bias_gelu_triton = None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_prenorm: bool = False,
):
    """``LayerNorm(dropout(x) + residual)`` on the backend in force; see ``layer_norm_ref``."""
    impl = dispatch("layer_norm", layer_norm_ref, _layer_norm_triton)
    return impl(x, weight, bias, eps=eps, residual=residual, dropout_p=dropout_p, seed=seed,
                return_prenorm=return_prenorm)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: GeluApprox = "none") -> torch.Tensor:
    """``GELU(x + bias)`` on the backend in force; see ``bias_gelu_ref``."""
    impl = dispatch("bias_gelu", bias_gelu_ref, _bias_gelu_triton)
    return impl(x, bias, approximate=approximate)


class LayerNorm(nn.Module):
    """``LayerNorm(dropout(x) + residual)`` with the state-dict keys of ``nn.LayerNorm``."""

    def __init__(self, hidden_size: int, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, dropout_p: float = 0.0,
                return_prenorm: bool = False):
        p = dropout_p if self.training else 0.0
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, dropout_p=p,
                          return_prenorm=return_prenorm)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
