"""Variable-length (unpadded) self-attention: the tokens of all sequences packed back to back.

``attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)`` with q, k, v
of shape (T, H, D) and ``cu_seqlens`` int32 (B + 1,) the cumulative sequence lengths (0, l0,
l0 + l1, ..., T). Token t of sequence b attends only to the tokens of sequence b. This is the
layout minBERT runs in when a batch holds padding: no GEMM, LayerNorm or GELU sees a pad token.

Kernels: the FlashAttention-2-style kernels of ``kernels/attention.py`` with ``VARLEN=True``
(one kernel family, no copy): the 1-D grid is cdiv(max_seqlen, BLOCK) * B * H tiles; a program
reads its sequence's [start, end) from ``cu_seqlens`` and returns at once when its tile lies past
the end of a shorter sequence (one long sequence among short ones costs the short ones a few
empty programs, not compute). Forward with online softmax and the log-sum-exp saved ((H, T)
fp32), backward as delta preprocess + dK/dV + dQ launches recomputing P, no atomics (bitwise
deterministic). Dtypes, head dims (any 1..128), tiles and the compile report are the padded
kernels' (``python -m bench.compile --op attention_varlen``).

Dropout: element (b, h, i, j) is kept by the padded kernels' rule (``_dropout_keep``) with i, j
the positions inside sequence b, so for one seed the mask equals ``attention``'s on the real
tokens of a right-padded batch (BERT's layout): unpadding on or off gives the same dropped
probabilities. The seed is a (1,) int64 device tensor the kernels load (``seed=None`` draws it on
the device): no host read. ``attention_varlen_dropout_mask`` is the debug path for tests.

Validation. Shapes, dtypes and devices are checked on every call (no host read). The values of
``cu_seqlens`` (starts at 0, never decreases, ends at T, no sequence longer than ``max_seqlen``)
need a host read, a sync on CUDA, so ``check=None`` (the default) checks them only when
``cu_seqlens`` is on the CPU (where reading costs nothing); ``check=True`` forces the check on
CUDA (debugging), ``check=False`` skips it. Unchecked bad values give wrong results, not errors
(as in FlashAttention's varlen API): ``max_seqlen`` must be at least the longest sequence.

This file holds the launchers (``attention_varlen_fwd`` / ``attention_varlen_bwd``), the autograd
Function, the functional form that dispatches on the kernels backend, and the eager reference
``attention_varlen_ref`` (it scatters the packed tokens into a (B, H, max_seqlen, D) batch, runs
``attention_ref`` with a key-padding mask and gathers the real rows back, through row
gather/scatter functions whose backward never accumulates).
"""
from __future__ import annotations

import operator

import torch
import triton

from ._backend import dispatch
from ._utils import gather_rows, op_output, scatter_rows
from .attention import (
    COMPILE_HEAD_DIMS,
    _attention_dropout_mask,
    _check_device,
    _check_dropout,
    _check_length,
    _check_qkv,
    _check_saved,
    _check_scale,
    _check_seed_tensor,
    _config,
    _empty_like,
    _launch_bwd,
    _launch_fwd,
    _grad_args,
    _kernel_seed,
    _op_seed,
    _seed_arg,
    attention_dropout_p,
    attention_ref,
    fa2_head_bytes,
    kernel_compile_specs,
)
from .testing import CompileSpec, IOCase, OpCase

_PACKED_DIMS = ("tokens", "heads", "head_dim")


# ----------------------------------------------------------------------------- cu_seqlens
def _check_cu_layout(cu_seqlens: torch.Tensor, device: torch.device) -> int:
    """Shape, dtype and device of ``cu_seqlens`` (no value read); returns B."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor (B + 1,) of cumulative lengths")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {device}")
    return cu_seqlens.numel() - 1


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device,
                     max_seqlen: int | None = None) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` is int32 (B + 1,) on ``device``, starts at 0,
    never decreases, ends at ``total`` and (given ``max_seqlen``) holds no longer sequence.
    Reads the values (a host sync on CUDA)."""
    _check_cu_layout(cu_seqlens, device)
    c = cu_seqlens.to("cpu", torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(c[0])}")
    if (c[1:] < c[:-1]).any():
        raise ValueError("cu_seqlens must not decrease (it holds cumulative lengths)")
    if int(c[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(c[-1])} but q holds {total} tokens")
    if max_seqlen is not None and c.numel() > 1:
        longest = int((c[1:] - c[:-1]).max())
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen is {max_seqlen} but cu_seqlens holds a sequence of "
                             f"{longest} tokens")


def _check_max_seqlen(max_seqlen: int, total: int) -> int:
    if isinstance(max_seqlen, torch.Tensor) or isinstance(max_seqlen, bool):
        raise ValueError(f"max_seqlen must be a Python int (the grid size; a tensor would need a "
                         f"host read), got {type(max_seqlen).__name__}")
    try:
        max_seqlen = operator.index(max_seqlen)
    except TypeError:
        raise ValueError(f"max_seqlen must be an int, got {max_seqlen!r}") from None
    if max_seqlen < 0 or (total > 0 and max_seqlen == 0):
        raise ValueError(f"max_seqlen must be at least the longest sequence (>= 1 when q holds "
                         f"tokens), got {max_seqlen}")
    _check_length(max_seqlen, "max_seqlen")
    return max_seqlen


def _value_check(check: bool | None, cu_seqlens: torch.Tensor) -> bool:
    """Whether to read ``cu_seqlens``'s values: ``check``, or when None, only on the CPU."""
    return cu_seqlens.device.type == "cpu" if check is None else bool(check)


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


# ----------------------------------------------------------------------------- eager reference
def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = False,
    check: bool | None = None,
) -> torch.Tensor:
    """Eager variable-length attention.

    Args:
        q, k, v: (T, H, D), the tokens of all sequences back to back.
        cu_seqlens: (B + 1,) int32 cumulative lengths, starting at 0 and ending at T.
        max_seqlen: the longest sequence (an upper bound works too).
        dropout_p, softmax_scale, seed, dropout_mask, upcast: as ``attention_ref`` (the mask is
            (B, H, max_seqlen, max_seqlen) bool, True = keep).
        check: read and check ``cu_seqlens``'s values (None: only when it is on the CPU).
    Returns:
        (T, H, D) in q's dtype (fp32 when ``upcast``).
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (T, H, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    T, H, D = q.shape
    B = _check_cu_layout(cu_seqlens, q.device)
    L = _check_max_seqlen(max_seqlen, T)
    if _value_check(check, cu_seqlens):
        check_cu_seqlens(cu_seqlens, T, q.device, L)
    if T == 0:  # an empty batch (B may be 0 too): an empty output that still joins the graph
        return (q.float() if upcast else q) * 0
    index, mask = varlen_index(cu_seqlens, T, L)

    def pad(t: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (B, H, L, D), zeros at the padding
        return scatter_rows(t, index, B * L).view(B, L, H, D).transpose(1, 2)

    o = attention_ref(pad(q), pad(k), pad(v), key_padding_mask=mask, dropout_p=dropout_p,
                      softmax_scale=softmax_scale, seed=seed, dropout_mask=dropout_mask,
                      upcast=upcast)  # (B, H, L, D)
    return gather_rows(o.transpose(1, 2).reshape(B * L, H, D), index)


# ----------------------------------------------------------------------------- launchers
def _packed_layout(t: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous and in-sequence offsets fit in int32, else a
    contiguous copy."""
    ok = _dense_rows(t) and max(max_seqlen - 1, 0) * t.stride(0) + t.shape[-1] < 2**31
    return t if ok else t.contiguous()


def _dense_rows(t: torch.Tensor) -> bool:
    """The last dim contiguous (or of size 1) and no negative stride: read in place."""
    return (t.stride(-1) == 1 or t.shape[-1] == 1) and all(s >= 0 for s in t.stride())


def _strides_packed(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a packed (T, H, D) tensor as the kernels read them."""
    return 0, t.stride(1), t.stride(0)


def attention_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | torch.Tensor | None = None,
    check: bool | None = None,
):
    """Launch ``_attention_fwd_kernel`` on packed sequences (``VARLEN``).

    Args:
        q, k, v: (T, H, D), one dtype (fp32/fp16/bf16), 1 <= D <= 128; strided views are read in
            place when their last dimension is contiguous.
        cu_seqlens: (B + 1,) int32 on q's device. max_seqlen: an int >= the longest sequence.
        dropout_p, softmax_scale, seed: as ``attention_fwd``. check: see the module docstring.
    Returns:
        (o (T, H, D) in q's dtype, lse (H, T) fp32, the (1,) int64 seed tensor used, the scale).
    """
    T, D, B, max_seqlen, device = _check_packed(q, k, v, cu_seqlens, max_seqlen)
    if _value_check(check, cu_seqlens):
        check_cu_seqlens(cu_seqlens, T, device, max_seqlen)
    elif B == 0 and T > 0:
        raise ValueError(f"cu_seqlens holds no sequence but q holds {T} tokens")
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(softmax_scale, D)
    seed = _seed_arg(seed, dropout_p, device)
    o, lse = _varlen_fwd_checked(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed)
    return o, lse, seed, scale


def _check_packed(q, k, v, cu_seqlens, max_seqlen):
    """Shapes, dtypes and devices of a packed call (no value of ``cu_seqlens`` read):
    (T, D, B, max_seqlen, device)."""
    T, _, D = _check_qkv(q, k, v, _PACKED_DIMS)
    device = _check_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    return T, D, _check_cu_layout(cu_seqlens, device), _check_max_seqlen(max_seqlen, T), device


def _varlen_fwd_checked(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """``attention_varlen_fwd`` past its checks: ``seed`` is the (1,) int64 device tensor the
    kernels read (any placeholder without dropout); returns (o, lse)."""
    T, H, D = q.shape
    B = cu_seqlens.numel() - 1
    q, k, v = (_packed_layout(t, max_seqlen) for t in (q, k, v))
    o = _empty_like(q)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    if o.numel() > 0:
        _launch_fwd(q, k, v, o, lse, None, cu_seqlens, seed, _strides_packed, (0, T), B, H,
                    max_seqlen, D, scale, dropout_p, varlen=True)
    return o, lse


def attention_varlen_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float,
    softmax_scale: float | None,
    seed: torch.Tensor,
    needs: tuple[bool, bool, bool] = (True, True, True),
):
    """Launch the delta preprocess, dK/dV and dQ kernels on packed sequences (``VARLEN``).

    Args:
        do: (T, H, D) upstream gradient (any strides; copied when its last dim is not contiguous).
        q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale: the forward's (``cu_seqlens``'s
            values were checked there, if at all).
        o, lse, seed: the forward's output, (H, T) log-sum-exp and (1,) int64 seed tensor.
        needs: which of (dq, dk, dv) to compute; the others are returned as None.
    Returns:
        (dq, dk, dv), each (T, H, D) in its input's dtype, or None when not needed.
    """
    T, H, D = _check_qkv(q, k, v, _PACKED_DIMS)
    _check_saved(q, do, o, lse, (H, T))
    device = _check_device(do=do, q=q, k=k, v=v, o=o, lse=lse, cu_seqlens=cu_seqlens)
    B = _check_cu_layout(cu_seqlens, device)
    max_seqlen = _check_max_seqlen(max_seqlen, T)
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(softmax_scale, D)
    _check_seed_tensor(seed, device)
    q, k, v, o, do = (_packed_layout(t, max_seqlen) for t in (q, k, v, o, do))
    dq, dk, dv = (_empty_like(t) if need else None for t, need in zip((q, k, v), needs))
    if q.numel() > 0 and any(needs):
        _launch_bwd(do, q, k, v, o, lse, None, cu_seqlens, seed, *_grad_args(dq, dk, dv),
                    _strides_packed, (0, T), B, H, max_seqlen, D, scale, dropout_p, varlen=True,
                    rows=(1, T), needs=needs)
    return dq, dk, dv


def attention_varlen_dropout_mask(cu_seqlens: torch.Tensor, num_heads: int, max_seqlen: int,
                                  p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """Debug path: the (B, H, max_seqlen, max_seqlen) bool keep-mask (True = kept) the varlen
    kernels draw; entry [b, h, i, j] is used for tokens i, j < length of sequence b. Pass it to
    ``attention_varlen_ref(..., dropout_mask=...)``. It is ``attention``'s debug mask of (B, H,
    max_seqlen): both layouts drop the same probabilities for one seed."""
    B = _check_cu_layout(cu_seqlens, cu_seqlens.device)
    return _attention_dropout_mask((B, num_heads, max_seqlen), p, seed, cu_seqlens.device)


# torch.library custom ops, as ``minbert::attention`` (kernels/attention.py): fakes for
# torch.compile, autograd registered on the op, the seed drawn outside it. ``max_seqlen`` is a
# SymInt: under dynamic shapes one graph serves every batch's longest sequence.
@torch.library.custom_op(
    "minbert::attention_varlen", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, Tensor? seed, "
           "float dropout_p, float softmax_scale, bool? check) -> (Tensor, Tensor)")
def _attention_varlen_op(q, k, v, cu_seqlens, max_seqlen, seed, dropout_p, softmax_scale, check):
    if _value_check(check, cu_seqlens):  # real values: read here, never in the fake
        check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
    return _varlen_fwd_checked(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                               _kernel_seed(seed, q.device))


@_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, seed, dropout_p, softmax_scale, check):
    T, H, D = _check_qkv(q, k, v, _PACKED_DIMS)
    return _fake_packed_like(q), q.new_empty((H, T), dtype=torch.float32)


def _fake_packed_like(t: torch.Tensor) -> torch.Tensor:
    """The fakes' output like ``t``: ``_empty_like`` of ``_packed_layout(t)``, taking the int32
    offsets as fitting (the layout must not depend on max_seqlen's value)."""
    return _empty_like(t if _dense_rows(t) else t.contiguous())


@torch.library.custom_op(
    "minbert::attention_varlen_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor cu_seqlens, "
           "SymInt max_seqlen, Tensor? seed, float dropout_p, float softmax_scale, bool[] needs) "
           "-> (Tensor, Tensor, Tensor)")
def _attention_varlen_bwd_op(do, q, k, v, o, lse, cu_seqlens, max_seqlen, seed, dropout_p,
                             softmax_scale, needs):
    grads = attention_varlen_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, dropout_p,
                                 softmax_scale, _kernel_seed(seed, q.device), tuple(needs))
    return tuple(op_output(g, q) for g in grads)


@_attention_varlen_bwd_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, seed, dropout_p, softmax_scale, needs):
    return tuple(_fake_packed_like(t) if need else t.new_empty(0) for t, need in zip((q, k, v), needs))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, seed, dropout_p, softmax_scale, check = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, seed)
    ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale


def _varlen_backward(ctx, do, dlse):
    """dq, dk, dv of ``minbert::attention_varlen``, only those autograd asks for."""
    q, k, v, o, lse, cu_seqlens, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = torch.ops.minbert.attention_varlen_bwd(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen,
                                                   seed, ctx.dropout_p, ctx.softmax_scale, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None, None)


torch.library.register_autograd("minbert::attention_varlen", _varlen_backward,
                                setup_context=_varlen_setup_context)


def _attention_varlen_triton(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                             seed=None, check=None):
    """Variable-length attention on the Triton kernels (the ``minbert::attention_varlen`` op);
    see ``attention_varlen_ref``. (T, H, D) in and out."""
    T, D, B, max_seqlen, device = _check_packed(q, k, v, cu_seqlens, max_seqlen)
    if B == 0 and T > 0:
        raise ValueError(f"cu_seqlens holds no sequence but q holds {T} tokens")
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(softmax_scale, D)
    o, _ = torch.ops.minbert.attention_varlen(q, k, v, cu_seqlens, max_seqlen,
                                              _op_seed(seed, dropout_p, device), dropout_p, scale,
                                              check)
    return o


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | torch.Tensor | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """Variable-length self-attention on the backend in force; see ``attention_varlen_ref``.

    Returns (T, H, D). ``seed``: an int, a (1,) int64 tensor on q's device, or None (drawn on the
    device). ``check``: read ``cu_seqlens``'s values (None: only when it is on the CPU; on CUDA
    that read would be a host sync).
    """
    impl = dispatch("attention_varlen", attention_varlen_ref, _attention_varlen_triton)
    return impl(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                seed=seed, check=check)


# ----------------------------------------------------------------------------- check, compile and IO cases
def _lengths_name(lengths: tuple[int, ...]) -> str:
    shown = ",".join(map(str, lengths[:6])) + (",..." if len(lengths) > 6 else "")
    return f"B{len(lengths)} lens({shown})"


def attention_varlen_case(lengths: tuple[int, ...], H: int, D: int, dropout_p: float = 0.0,
                          layout: str = "thd", softmax_scale: float | None = None,
                          max_seqlen: int | None = None) -> OpCase:
    """An ``OpCase`` of ``attention_varlen`` on sequences of the given lengths.

    Args:
        dropout_p: with dropout the reference gets the kernels' mask
            (``attention_varlen_dropout_mask``) and both sides p as the kernels apply it
            (``attention_dropout_p``).
        layout: ``"thd"``: contiguous (T, H, D); ``"htd"``: (H, T, D) memory seen as (T, H, D)
            (a token stride of D, a head stride of T * D).
        max_seqlen: default the longest length (an upper bound is allowed).
    """
    parts = ([f"dropout{dropout_p}"] if dropout_p else []) + ([layout] if layout != "thd" else []) \
        + ([f"scale{softmax_scale}"] if softmax_scale else []) \
        + ([f"max{max_seqlen}"] if max_seqlen is not None else [])
    name = f"attention_varlen[{'+'.join(parts) or 'plain'}] {_lengths_name(lengths)} H{H} D{D}"
    T = sum(lengths)
    L = max(lengths, default=0) if max_seqlen is None else max_seqlen

    def make_inputs(device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)

        def qkv():
            t = torch.randn((T, H, D), generator=gen)
            if layout == "htd":
                t = t.transpose(0, 1).contiguous().transpose(0, 1)
            return t.to(device=device, dtype=dtype).requires_grad_()

        cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()],
                          dtype=torch.int32, device=device)
        inputs = dict(q=qkv(), k=qkv(), v=qkv(), cu_seqlens=cu, max_seqlen=L,
                      dropout_p=attention_dropout_p(dropout_p), softmax_scale=softmax_scale,
                      seed=None, dropout_mask=None)
        if dropout_p > 0:
            inputs["seed"] = 1000 + seed
            inputs["dropout_mask"] = attention_varlen_dropout_mask(cu, H, L, dropout_p, 1000 + seed)
        return inputs

    def kernel_fn(dropout_mask=None, **kw):
        return _attention_varlen_triton(**kw)

    case = OpCase(name, make_inputs, kernel_fn, attention_varlen_ref)
    case.lengths, case.shape = tuple(lengths), (T, H, D)
    return case


def check_cases() -> list[OpCase]:
    """The cases ``python -m kernels.check`` runs: B = 1, length 1, lengths that are not multiples
    of a block, one long sequence among short ones, an empty sequence, masked head dims, a
    strided layout, dropout."""
    return [
        attention_varlen_case((1,), 2, 32),
        attention_varlen_case((5, 1, 17), 2, 32, dropout_p=0.1),
        attention_varlen_case((3, 70, 2, 9), 2, 64, dropout_p=0.2),
        attention_varlen_case((4, 0, 33), 3, 80, layout="htd", softmax_scale=0.3),
        attention_varlen_case((130, 7), 1, 128, dropout_p=0.1),
    ]


def compile_specs() -> list[CompileSpec]:
    """The forward, dK/dV and dQ kernels with ``VARLEN`` for every BLOCK_D in fp32, fp16 and bf16,
    and the masked head dim 80 in fp32 and bf16, with dropout on and off (no key-padding mask in
    this layout). The delta preprocess and the debug mask kernel are the padded op's (``python -m
    bench.compile --op attention``): the packed layout launches them unchanged."""
    variants = (("dropout", False, True), ("plain", False, False))
    return kernel_compile_specs(COMPILE_HEAD_DIMS, (torch.float32, torch.float16, torch.bfloat16),
                                variants, varlen=True, op="varlen ") \
        + kernel_compile_specs((80,), (torch.float32, torch.bfloat16), variants, varlen=True,
                               op="varlen ")


# Real SST micro-batches: token counts (special tokens included) of 4 random micro-batches of 16
# training sentences (embedded tokenizer, cut at 64 tokens), each chosen with a padding fraction
# near the mean over all micro-batches (46.4%; its own longest sequence sets each one's L).
SST_MICRO_BATCHES = (
    (36, 33, 20, 23, 33, 46, 9, 30, 13, 16, 11, 28, 27, 41, 15, 14),
    (23, 33, 16, 13, 37, 16, 34, 17, 20, 36, 31, 41, 34, 29, 15, 52),
    (27, 26, 38, 14, 40, 33, 9, 45, 16, 14, 7, 13, 31, 10, 31, 31),
    (29, 23, 42, 20, 36, 12, 50, 14, 27, 29, 25, 18, 26, 21, 28, 30),
)


def varlen_tiled_bytes(lengths: tuple[int, ...], H: int, D: int, dtype: torch.dtype,
                       max_seqlen: int | None = None) -> int:
    """Global-memory bytes of the varlen forward + backward: ``fa2_head_bytes`` (the padded
    kernels' FA2 tiling formula, no mask) for each (sequence, head) at its own length, plus the
    two int32 of ``cu_seqlens`` each program of the forward, dK/dV and dQ grids reads (8 bytes,
    empty programs past a sequence's end included)."""
    L = max(lengths, default=0) if max_seqlen is None else max_seqlen
    cfg = _config(D, dtype)
    programs = len(lengths) * H * (triton.cdiv(L, cfg.fwd.block_m) + triton.cdiv(L, cfg.dq.block_m)
                                   + len(cfg.dkdv_grads) * triton.cdiv(L, cfg.dkdv.block_n))
    return H * sum(fa2_head_bytes(n, D, dtype, False) for n in lengths) + 8 * programs


def varlen_lower_bound_bytes(lengths: tuple[int, ...], H: int, D: int, dtype: torch.dtype) -> int:
    """Distinct bytes a fused varlen forward + backward must touch: q, k, v, dO read and O, dQ, dK,
    dV written for the T real tokens, the fp32 LSE (H, T) and ``cu_seqlens``, each once."""
    size = torch.empty((), dtype=dtype).element_size()
    T = sum(lengths)
    return H * T * (8 * D * size + 4) + 4 * (len(lengths) + 1)


def io_cases(tokens: int, hidden: int, dtype: torch.dtype) -> list[IOCase]:
    """Traffic per real token of minBERT's attention on SST batches, packed vs padded.

    Micro-batches from ``SST_MICRO_BATCHES`` (46% padding), min(4, tokens // 1024) of them (a
    micro-batch holds at most 16 x 64 = 1024 token slots); D = 64 when it divides ``hidden``,
    else 32. Two cases over the same micro-batches, one launch per micro-batch as training runs:
    ``attention_varlen`` on the packed real tokens, and ``attention`` on the right-padded (16,
    longest) batch with its key-padding mask. Both have the packed lower bound
    (``varlen_lower_bound_bytes``: real tokens only), so total/LB shows what padding costs; the
    case names give the real token count T (bytes per real token = total / T). The varlen total
    should equal ``varlen_tiled_bytes``. flops: 18 H D sum(l^2) (packed) and 18 H D B L^2 (padded:
    the kernels compute the padded rows and key blocks too).
    """
    from .attention import _attention_triton  # the padded op, for the comparison case

    D = 64 if hidden % 64 == 0 else 32
    if hidden % D:
        return []
    H = hidden // D
    batches = [SST_MICRO_BATCHES[i % len(SST_MICRO_BATCHES)]
               for i in range(min(len(SST_MICRO_BATCHES), max(1, tokens // 1024)))]
    gen = torch.Generator().manual_seed(0)
    packed, padded = [], []
    for lens in batches:
        B, L, T = len(lens), max(lens), sum(lens)
        q, k, v, do = (torch.randn((T, H, D), generator=gen).to(dtype) for _ in range(4))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        packed.append(((q, k, v), do, cu, L))
        mask = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]  # (B, L)
        index = (torch.arange(B)[:, None] * L + torch.arange(L)[None, :])[mask]  # real rows

        def pad(t, B=B, L=L, index=index):  # (T, H, D) -> (B, H, L, D), zeros on padding
            return t.new_zeros(B * L, H, D).index_copy(0, index, t).view(B, L, H, D).transpose(1, 2)

        padded.append(((pad(q), pad(k), pad(v)), pad(do), mask))
    T = sum(sum(lens) for lens in batches)

    def leaves(ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    def run_packed(fn):
        for qkv, do, cu, L in packed:
            qkv = leaves(qkv)
            torch.autograd.grad(fn(*qkv, cu, L), qkv, do)

    def run_padded(fn):
        for qkv, do, mask in padded:
            qkv = leaves(qkv)
            torch.autograd.grad(fn(*qkv, mask), qkv, do)

    lower = sum(varlen_lower_bound_bytes(lens, H, D, dtype) for lens in batches)
    label = f"{len(batches)} SST micro-batches of 16, T={T} real tokens, H{H} D{D}"
    return [
        IOCase(f"attention_varlen fwd+bwd packed, {label} "
               f"(tiled {sum(varlen_tiled_bytes(b, H, D, dtype) for b in batches) / 1e6:.2f} MB)",
               lambda: run_packed(_attention_varlen_triton), lambda: run_packed(attention_varlen_ref),
               lower, 18 * H * D * sum(n * n for lens in batches for n in lens)),
        IOCase(f"attention fwd+bwd padded (mask), {label}",
               lambda: run_padded(_attention_triton), lambda: run_padded(attention_ref),
               lower, 18 * H * D * sum(len(lens) * max(lens) ** 2 for lens in batches)),
    ]
