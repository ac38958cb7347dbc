"""Multi-head self-attention with a key-padding mask and dropout on the attention probabilities.

``attention(q, k, v, key_padding_mask, dropout_p, softmax_scale, seed)`` with q, k, v of shape
(B, H, L, D) and ``key_padding_mask`` (B, L) bool, True = keep. A query row whose keys are all
padding gives zeros (never NaN).

This file holds the eager reference ``attention_ref`` (it materialises the (B, H, L, L) scores)
and the functional form that dispatches on the kernels backend. The fused FlashAttention-style
Triton kernel is added by the attention issue; until then the ``triton`` backend runs the
reference.
"""
from __future__ import annotations

import torch

from ._backend import dispatch
from ._utils import apply_dropout


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Eager ``softmax(q k^T * scale, masked) -> dropout -> @ v``.

    Args:
        q, k, v: (B, H, L, D).
        key_padding_mask: (B, L) bool, True = a real token; None = no padding.
        dropout_p: dropout probability on the attention probabilities.
        softmax_scale: defaults to D ** -0.5.
        seed: seeds the drawn dropout mask (a local generator); None uses torch's global RNG.
        dropout_mask: (B, H, L, L) bool, True = keep; given, it is used instead of drawing one.
        upcast: compute in fp32 (the accuracy reference for the kernels' error budget).
    Returns:
        (B, H, L, D) in q's dtype (fp32 when ``upcast``).
    """
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, L, L)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
        # A finite fill keeps all-padding rows free of NaN; the probabilities of padded keys are
        # exp(min - max) = 0 anyway and are zeroed below, so all-padding rows give zeros.
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).masked_fill(~keep, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = apply_dropout(probs, dropout_p, dropout_mask, seed)
    return torch.matmul(probs, v)  # (B, H, L, D)


_attention_triton = None  # set by the Triton implementation (attention issue)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Self-attention on the backend in force; see ``attention_ref``. Returns (B, H, L, D)."""
    impl = dispatch("attention", attention_ref, _attention_triton)
    return impl(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                softmax_scale=softmax_scale, seed=seed)
