"""Variable-length (unpadded) self-attention: the tokens of all sequences packed back to back.

``attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)`` with q, k, v
of shape (T, H, D) and ``cu_seqlens`` int32 (B + 1,) the cumulative sequence lengths (0, l0,
l0 + l1, ..., T). Token t of sequence b attends only to the tokens of sequence b. This is the
layout minBERT runs in when a batch holds padding: no GEMM, LayerNorm or GELU sees a pad token.

This file holds the eager reference ``attention_varlen_ref`` (it scatters the packed tokens into a
(B, H, max_seqlen, D) batch, runs ``attention_ref`` with a key-padding mask and gathers the real
rows back, through row gather/scatter functions whose backward never accumulates) and the
functional form that dispatches on the kernels backend. The Triton kernels
come in a later change; until then the ``triton`` backend runs the reference (and says so once).
"""
from __future__ import annotations

import torch

from ._backend import dispatch
from ._utils import gather_rows, scatter_rows
from .attention import attention_ref


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` is int32 (B + 1,) on ``device``, starts at 0,
    never decreases and ends at ``total``. Reads the values (a host sync on CUDA)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor (B + 1,) of cumulative lengths")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {device}")
    c = cu_seqlens.to("cpu", torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(c[0])}")
    if (c[1:] < c[:-1]).any():
        raise ValueError("cu_seqlens must not decrease (it holds cumulative lengths)")
    if int(c[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(c[-1])} but q holds {total} tokens")


def varlen_index(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) row of each packed token in a flattened (B * max_seqlen) padded batch, and the (B,
    max_seqlen) bool key-padding mask of that batch. Device ops only (no host read)."""
    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(total, device=device)
    seq = torch.searchsorted(cu[1:], t, right=True)  # (T,) sequence of each token
    pos = t - cu[seq]  # (T,) position inside its sequence
    lens = cu[1:] - cu[:-1]  # (B,)
    mask = torch.arange(max_seqlen, device=device)[None, :] < lens[:, None]  # (B, max_seqlen)
    return seq * max_seqlen + pos, mask


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Eager variable-length attention.

    Args:
        q, k, v: (T, H, D), the tokens of all sequences back to back.
        cu_seqlens: (B + 1,) int32 cumulative lengths, starting at 0 and ending at T.
        max_seqlen: the longest sequence (an upper bound works too).
        dropout_p, softmax_scale, seed, dropout_mask, upcast: as ``attention_ref`` (the mask is
            (B, H, max_seqlen, max_seqlen) bool, True = keep).
    Returns:
        (T, H, D) in q's dtype (fp32 when ``upcast``).
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (T, H, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    T, H, D = q.shape
    check_cu_seqlens(cu_seqlens, T, q.device)
    B = cu_seqlens.numel() - 1
    if T == 0:  # an empty batch (B may be 0 too): an empty output that still joins the graph
        return (q.float() if upcast else q) * 0
    L = int(max_seqlen)
    index, mask = varlen_index(cu_seqlens, T, L)

    def pad(t: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (B, H, L, D), zeros at the padding
        return scatter_rows(t, index, B * L).view(B, L, H, D).transpose(1, 2)

    o = attention_ref(pad(q), pad(k), pad(v), key_padding_mask=mask, dropout_p=dropout_p,
                      softmax_scale=softmax_scale, seed=seed, dropout_mask=dropout_mask,
                      upcast=upcast)  # (B, H, L, D)
    return gather_rows(o.transpose(1, 2).reshape(B * L, H, D), index)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Variable-length self-attention on the backend in force; see ``attention_varlen_ref``."""
    impl = dispatch("attention_varlen", attention_varlen_ref, None)
    return impl(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                seed=seed)
