"""LayerNorm with fused residual add and dropout, bias + GELU, and GELU + LayerNorm.

Ops (BERT's notation):
  - ``layer_norm(x, weight, bias, residual, dropout_p)``: ``LayerNorm(dropout(x) + residual)``, the
    ``LayerNorm(dropout(dense(h)) + h)`` that closes every BERT sub-layer; optionally also returns
    the pre-norm sum ``dropout(x) + residual`` (the next residual stream).
  - ``bias_gelu(x, bias, approximate)``: ``GELU(x + bias)``, exact erf (``"none"``) or tanh.
  - ``gelu_layer_norm(x, bias, weight, ln_bias, eps, approximate)``: ``LayerNorm(GELU(x + bias))``,
    the transform of BERT's prediction head.

This file holds every layer of the family: the Triton kernels (``_*_kernel``), their launchers
(``*_fwd`` / ``*_bwd``), the custom ops with their autograd (``*Function``), the functional forms
that dispatch on the kernels backend, the ``LayerNorm`` module (``weight``/``bias`` keys like ``nn.LayerNorm``) and the eager
PyTorch references (``*_ref``) the kernels are tested against.

What is fused. LayerNorm forward: dropout on ``x`` (Philox, from a seed), residual add, fp32
statistics, affine, and the optional pre-norm store, in one pass over each row. LayerNorm
backward: the dropout mask is regenerated from the seed (never stored), the pre-norm sum is
reloaded (when the forward returned it) or recomputed from x and the residual, and dx, dresidual
and per-program weight/bias partial sums come out of one read of each row. GELU + LayerNorm
recomputes the GELU in its backward. Weight and bias gradients are deterministic: each program
owns a contiguous group of rows and writes fp32 partial sums to a small (programs, N) buffer that
``_weight_grad_reduce_kernel`` sums in a fixed order (no atomics). Gradients nobody asked for
(``ctx.needs_input_grad``: a frozen weight, an input that needs none) are not computed.

Launches. The forwards give each program one (BLOCK_M, BLOCK_N) tile of rows and no loop
(``_fwd_launch``: ~2,048 values per program, at least 2 programs per SM when the rows allow;
M = 4096 rows of 768 -> 2,048 programs), so each SM holds several programs and one's loads
overlap another's math. The backwards keep contiguous row groups (at most 4 programs per SM, >= 32
rows each) for their partial sums.

Dtypes: x, residual and outputs fp32 / fp16 / bf16; the residual may have another dtype than x
(autocast's bf16 branch into an fp32 residual stream): h = dropout(x) + residual takes the
promoted dtype, as eager's add does, and y h's, except under CUDA autocast, where y is fp32 as
eager's ``F.layer_norm`` returns it. Input gradients in their input's dtype; weight and biases
any of the three (their gradients in their own dtype); mean and rstd fp32; all math in fp32. The
pre-norm sum is rounded to its dtype before the statistics, so a saved pre-norm output reproduces
them exactly in the backward.

Sizes: the row kernels keep one row in registers (BLOCK_N = next power of two >= 8, ~8 values
per thread): hidden size up to ``LAYER_NORM_MAX_HIDDEN`` = 8192 for LayerNorm and
``GELU_LAYER_NORM_MAX_HIDDEN`` = 4096 for GELU + LayerNorm, whose backward holds more per row
and spills from 8192 on; the launchers raise ``ValueError`` above. No register spills on sm_80 /
sm_90 up to those sizes when the hidden size is a multiple of 16 (``compile_specs``; the JIT then
vectorises the loads); other widths load element by element and may spill above 4096.
``bias_gelu`` tiles the columns and has no limit. Any number of rows; row offsets are int64.

Dropout: one Philox-4x32-10 call per eight adjacent columns (its 128 bits as eight 16-bit
uniforms; ``_dropout_keep``), counter (col // 8, row), key = a 64-bit seed that the kernels load
from an int64 device tensor (``kernels._utils.dropout_seed``: drawn on the device from torch's
generator when not given, so there is no host read, ``torch.manual_seed`` reproduces runs, every
call and every CUDA-graph replay gets a fresh mask). p is rounded to a multiple of 2**-16. The
mask depends on (seed, row, col) only, not on block sizes, the grid or the GPU, and it is
regenerated in the backward. It is not torch's RNG stream: tests get the mask from
``_layer_norm_dropout_mask`` (same formula).

torch.compile: each op is a ``torch.library`` custom op (``minbert::layer_norm``,
``minbert::bias_gelu``, ``minbert::gelu_layer_norm`` and their ``_bwd``) with a fake
implementation and registered autograd, so ``torch.compile(fullgraph=True)`` traces them
without a graph break.

Known limits: rows must be contiguous after ``reshape(-1, N)`` (other layouts are copied); the
weight-grad partials depend on the number of programs, so dweight is bitwise reproducible for a
given device and row count, not across GPUs with different SM counts. Under Triton's CPU
interpreter (Triton 3.9) fp32 -> bf16 casts truncate instead of rounding to nearest, so bf16
outputs there carry up to 1 ulp of error unless the interpreter is corrected.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from ._backend import dispatch
from ._utils import apply_dropout, dropout_seed, fake_grad, needed_or_none, op_output
from .testing import CompileSpec, IOCase, OpCase

GeluApprox = Literal["none", "tanh"]

LAYER_NORM_MAX_HIDDEN = 8192  # one row in registers; no spills up to here (see compile_specs)
GELU_LAYER_NORM_MAX_HIDDEN = 4096  # its backward holds more per row: spills from 8192 on
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_ROWS_PER_PROGRAM = 32  # each backward program owns >= this many rows: tiny weight-grad partials
_PROGRAMS_PER_SM = 4  # at most this many backward row-group programs per SM
_FWD_TILE_ELEMENTS = 2048  # values per forward program (one tile of rows, ~8 per thread)
_FWD_PROGRAMS_PER_SM = 2  # the forwards launch at least this many programs per SM when M allows
_CPU_NUM_SMS = 132  # nominal SM count under the interpreter (an H100 SXM's), so CPU grids match GPU
_GELU_BLOCK_CHOICES = (1024, 512, 256, 128)  # column tiles of bias_gelu
_REDUCE_BLOCK_P, _REDUCE_BLOCK_N = 16, 256  # tile of the weight-grad partials reduction


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
    _check_approximate(approximate)
    if upcast:
        x, bias = x.float(), bias.float()
    return F.gelu(x + bias, approximate=approximate)


def gelu_layer_norm_ref(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                        ln_bias: torch.Tensor, eps: float = 1e-12,
                        approximate: GeluApprox = "none", upcast: bool = False) -> torch.Tensor:
    """Eager ``LayerNorm(GELU(x + bias))`` over the last dimension (BERT's prediction-head transform).

    Args:
        x: (..., N) a dense layer's output without its bias.
        bias: (N,) the dense layer's bias, added before the GELU.
        weight, ln_bias: (N,) the LayerNorm's affine parameters.
        approximate: ``"none"`` (erf GELU) or ``"tanh"``.
        upcast: compute in fp32.
    """
    _check_approximate(approximate)
    if upcast:
        x, bias, weight, ln_bias = x.float(), bias.float(), weight.float(), ln_bias.float()
    a = F.gelu(x + bias, approximate=approximate)
    return F.layer_norm(a, (a.shape[-1],), weight, ln_bias, eps)


def _check_approximate(approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


# ----------------------------------------------------------------------------- shared device code
@triton.jit
def _dropout_keep(seed, rows, drop_threshold, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: True where column ``col`` of row ``rows[i]`` (int64) survives dropout.

    One Philox-4x32-10 call (key = the 64-bit seed, counter = (col // 8, row low 32 bits, row
    high 32 bits, 0)) yields four uint32 words = eight 16-bit halves, one per column of a group
    of eight: column 8j + 2w + h takes half h of word w of counter j. A column is kept when its
    half is >= ``drop_threshold`` = round(p * 2**16), i.e. with probability 1 - p to within
    2**-17. The mask depends on (seed, row, col) only: not on block sizes, grid, or the width.
    """
    quad = tl.arange(0, BLOCK_N // 8).to(tl.uint32)  # col // 8
    zero = tl.zeros((rows.shape[0], BLOCK_N // 8), dtype=tl.uint32)
    c0 = zero + quad[None, :]
    row_lo = zero + (rows & 0xFFFFFFFF).to(tl.uint32)[:, None]
    row_hi = zero + (rows >> 32).to(tl.uint32)[:, None]
    r0, r1, r2, r3 = tl.philox(seed, c0, row_lo, row_hi, zero)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column group 4j + w
    halves = tl.interleave(words & 0xFFFF, words >> 16)  # 8j + 2w + h
    return halves >= tl.cast(drop_threshold, tl.uint32)


@triton.jit
def _tanh(u):
    # tanh(u) = 2 sigmoid(2u) - 1: saturates to +-1 without inf/inf, works compiled and interpreted
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _gelu(z, APPROX_TANH: tl.constexpr):
    """GELU(z) in fp32: z * Phi(z) (erf), or the tanh approximation."""
    if APPROX_TANH:
        # 0.7978845608 = sqrt(2 / pi)
        a = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        # 0.7071067812 = 1 / sqrt(2)
        a = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    return a


@triton.jit
def _gelu_fwd_bwd(z, APPROX_TANH: tl.constexpr):
    """GELU(z) and its derivative GELU'(z), fp32."""
    if APPROX_TANH:
        # u = sqrt(2/pi) (z + 0.044715 z^3), t = tanh(u)
        # GELU = z (1 + t) / 2;  GELU' = (1 + t) / 2 + z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2) / 2
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        a = 0.5 * z * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        # Phi(z) = (1 + erf(z / sqrt 2)) / 2, phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
        # GELU = z Phi(z);  GELU' = Phi(z) + z phi(z)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        a = z * cdf
        da = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return a, da


@triton.jit
def _prenorm(X, R, H, offs, mask, keep, dropout_scale, HAS_RESIDUAL: tl.constexpr,
             HAS_DROPOUT: tl.constexpr):
    """h = dropout(x) + residual at ``offs`` (any shape), fp32, rounded to H's dtype (the pre-norm
    sum's: x's and the residual's promoted), so a saved h and a recomputed one are equal."""
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        h += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    return h.to(H.dtype.element_ty).to(tl.float32)


@triton.jit
def _normalize_tile(h, Y, W, B, MEAN, RSTD, rows, cols, offs, row_mask, col_mask, mask, N, eps):
    """LayerNorm of a (BLOCK_M, BLOCK_N) fp32 tile ``h`` (zero outside ``mask``): stores the row
    statistics (fp32) and y = (h - mean) * rstd * w + b in Y's dtype."""
    mean = tl.sum(h, axis=1) / N
    hc = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(hc * hc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = hc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- LayerNorm kernels
@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) incoming branch x
    R,  # (M, N) residual (read when HAS_RESIDUAL); any float dtype
    Y,  # (M, N) output y = LN(h)
    H,  # (M, N) pre-norm sum h = dropout(x) + residual (written when STORE_PRENORM); its dtype,
    #     x's and the residual's promoted, is the one h is rounded to, even when not written
    W,  # (N,) LayerNorm weight
    B,  # (N,) LayerNorm bias
    MEAN,  # (M,) fp32 mean of each row of h
    RSTD,  # (M,) fp32 1 / sqrt(var + eps) of each row of h
    SEED,  # (1,) int64 Philox key of the dropout mask (read when HAS_DROPOUT)
    M, N, eps, drop_threshold, dropout_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_PRENORM: tl.constexpr,
):
    # program p normalises rows [p * BLOCK_M, (p + 1) * BLOCK_M) as one (BLOCK_M, BLOCK_N) tile:
    # thousands of programs, so the next tile's loads overlap this one's math on each SM
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * N + cols[None, :]  # int64 element offsets
    if HAS_DROPOUT:
        keep = _dropout_keep(tl.load(SEED), rows, drop_threshold, BLOCK_N)
    else:
        keep = mask
    h = _prenorm(X, R, H, offs, mask, keep, dropout_scale, HAS_RESIDUAL, HAS_DROPOUT)
    if STORE_PRENORM:
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
    _normalize_tile(h, Y, W, B, MEAN, RSTD, rows, cols, offs, row_mask, col_mask, mask, N, eps)


# Backward math, per row (h = dropout(x) + residual, xhat = (h - mean) * rstd, y = xhat * w + b):
#   g      = dy * w                                        gradient w.r.t. xhat
#   dh     = rstd * (g - mean(g) - xhat * mean(g * xhat))   (+ the upstream gradient of h when the
#                                                            forward returned it)
#   dres   = dh                                            the residual enters h with weight 1
#   dx     = dh * keep / (1 - p)                           keep regenerated from (seed, row, col)
#   dw     = sum over rows of dy * xhat,  db = sum over rows of dy
# Each program accumulates dw and db over its own rows in fp32 and writes them to row `pid` of
# the partials buffer; _weight_grad_reduce_kernel then sums the programs in a fixed order.
# Gradients nobody asked for are skipped: STORE_DX / STORE_DR / WEIGHT_GRADS off. Without
# dropout dx equals dres, so the launcher lets one tensor serve both when their dtypes agree.
@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient of y
    DH_OUT,  # (M, N) upstream gradient of the returned pre-norm sum h (read when HAS_DH)
    X,  # (M, N) x (read when RECOMPUTE_H)
    R,  # (M, N) residual (read when RECOMPUTE_H and HAS_RESIDUAL)
    H,  # (M, N) h saved by the forward, or x when h == x (read when not RECOMPUTE_H); when
    #     RECOMPUTE_H an empty tensor whose dtype is h's (the rounding of the recomputed h)
    W,  # (N,) LayerNorm weight
    MEAN,  # (M,) fp32 row means from the forward
    RSTD,  # (M,) fp32 row 1 / sqrt(var + eps) from the forward
    DX,  # (M, N) gradient w.r.t. x, x's dtype (written when STORE_DX)
    DR,  # (M, N) gradient w.r.t. the residual, its dtype (written when STORE_DR)
    PART,  # (P, 2, N) fp32 per-program partial sums: [:, 0] of dy * xhat, [:, 1] of dy
    SEED,  # (1,) int64 Philox key of the forward's dropout mask (read when HAS_DROPOUT)
    M, N, rows_per_program, drop_threshold, dropout_scale,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    RECOMPUTE_H: tl.constexpr, HAS_DH: tl.constexpr, STORE_DX: tl.constexpr,
    STORE_DR: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        offs = row * N + cols  # int64 element offsets of the row
        if HAS_DROPOUT:
            keep = tl.reshape(_dropout_keep(seed, (row + tl.arange(0, 1)).to(tl.int64),
                                            drop_threshold, BLOCK_N), (BLOCK_N,))
        else:
            keep = col_mask
        if RECOMPUTE_H:
            h = _prenorm(X, R, H, offs, col_mask, keep, dropout_scale, HAS_RESIDUAL, HAS_DROPOUT)
        else:
            h = tl.load(H + offs, mask=col_mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(col_mask, (h - mean) * rstd, 0.0)
        dy = tl.load(DY + offs, mask=col_mask, other=0.0).to(tl.float32)
        if WEIGHT_GRADS:
            dw_acc += dy * xhat
            db_acc += dy
        if STORE_DX or STORE_DR:
            g = dy * w
            c1 = tl.sum(xhat * g, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            dh = (g - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dh += tl.load(DH_OUT + offs, mask=col_mask, other=0.0).to(tl.float32)
            if STORE_DX:
                dx = dh
                if HAS_DROPOUT:
                    dx = tl.where(keep, dh * dropout_scale, 0.0)
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=col_mask)
            if STORE_DR:
                tl.store(DR + offs, dh.to(DR.dtype.element_ty), mask=col_mask)
    if WEIGHT_GRADS:
        part = PART + pid * 2 * N
        tl.store(part + cols, dw_acc, mask=col_mask)
        tl.store(part + N + cols, db_acc, mask=col_mask)


@triton.jit
def _weight_grad_reduce_kernel(
    PART,  # (P, K, N) fp32 partial sums (any K); this launch reads one [:, k, :] slice
    OUT,  # (N,) the summed gradient, in the parameter's dtype
    P, N, stride_p,  # stride_p: elements between programs' rows of PART (K * N)
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # column block per program; the programs' partials are added in a fixed order: deterministic
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        tile = tl.load(PART + rows[:, None] * stride_p + cols[None, :],
                       mask=(rows < P)[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=col_mask)


@triton.jit
def _dropout_mask_kernel(
    KEEP,  # (M, N) int8 keep-mask, 1 = kept (viewed as bool by the launcher)
    SEED,  # (1,) int64 Philox key
    N, drop_threshold,
    BLOCK_N: tl.constexpr,
):
    # debug path: one row per program, the same _dropout_keep as the LayerNorm kernels
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    cols = tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), rows, drop_threshold, BLOCK_N)
    tl.store(KEEP + rows[:, None] * N + cols[None, :], keep.to(tl.int8), mask=(cols < N)[None, :])


# ----------------------------------------------------------------------------- bias + GELU kernels
@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (M, N) input without bias
    BIAS,  # (N,) bias added before the GELU
    Y,  # (M, N) GELU(x + bias), x's dtype
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    # grid (row tiles, column tiles): program (p, c) computes one (BLOCK_M, BLOCK_N) tile
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    tl.store(Y + offs, _gelu(z, APPROX_TANH).to(Y.dtype.element_ty), mask=mask)


# Backward math (z = x + bias, y = GELU(z)):
#   dx    = dy * GELU'(z),  GELU'(z) = Phi(z) + z phi(z) (erf) or the tanh form in _gelu_fwd_bwd
#   dbias = sum over rows of dx  (per-program fp32 partials, reduced by _weight_grad_reduce_kernel)
# STORE_DX / WEIGHT_GRADS off skip the gradient nobody asked for.
@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N) upstream gradient, x's dtype
    X,  # (M, N) input without bias
    BIAS,  # (N,) bias
    DX,  # (M, N) gradient w.r.t. x, x's dtype (written when STORE_DX)
    PART,  # (P, N) fp32 per-program partial sums of dx (for dbias; written when WEIGHT_GRADS)
    M, N, rows_per_program,
    BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr, STORE_DX: tl.constexpr,
    WEIGHT_GRADS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        start = row * N
        z = tl.load(X + start + cols, mask=col_mask, other=0.0).to(tl.float32) + bias
        dy = tl.load(DY + start + cols, mask=col_mask, other=0.0).to(tl.float32)
        _, da = _gelu_fwd_bwd(z, APPROX_TANH)
        dx = dy * da
        if STORE_DX:
            tl.store(DX + start + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        if WEIGHT_GRADS:
            acc += dx
    if WEIGHT_GRADS:
        tl.store(PART + pid * N + cols, acc, mask=col_mask)


# ----------------------------------------------------------------------------- GELU + LayerNorm kernels
@triton.jit
def _gelu_layer_norm_fwd_kernel(
    X,  # (M, N) dense output without its bias
    B1,  # (N,) dense bias, added before the GELU
    Y,  # (M, N) LN(GELU(x + b1)), x's dtype
    W,  # (N,) LayerNorm weight
    B,  # (N,) LayerNorm bias
    MEAN,  # (M,) fp32 mean of each row of GELU(x + b1)
    RSTD,  # (M,) fp32 1 / sqrt(var + eps) of each row
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    # one (BLOCK_M, BLOCK_N) tile of rows per program, as in _layer_norm_fwd_kernel
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    b1 = tl.load(B1 + cols, mask=col_mask, other=0.0).to(tl.float32)
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b1[None, :]
    a = tl.where(mask, _gelu(z, APPROX_TANH), 0.0)  # fp32, recomputed in the backward
    _normalize_tile(a, Y, W, B, MEAN, RSTD, rows, cols, offs, row_mask, col_mask, mask, N, eps)


# Backward math, per row (z = x + b1, a = GELU(z), ahat = (a - mean) * rstd, y = ahat * w + b):
#   g    = dy * w
#   da   = rstd * (g - mean(g) - ahat * mean(g * ahat))     LayerNorm backward, as above
#   dx   = da * GELU'(z)                                    GELU recomputed from x, never stored
#   db1  = sum over rows of dx,  dw = sum over rows of dy * ahat,  db = sum over rows of dy
# (per-program fp32 partials, reduced by _weight_grad_reduce_kernel in a fixed order).
# STORE_DX / WEIGHT_GRADS off skip the gradients nobody asked for (db1 needs dx, not its store).
@triton.jit
def _gelu_layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient of y, x's dtype
    X,  # (M, N) dense output without its bias
    B1,  # (N,) dense bias
    W,  # (N,) LayerNorm weight
    MEAN,  # (M,) fp32 row means from the forward
    RSTD,  # (M,) fp32 row 1 / sqrt(var + eps) from the forward
    DX,  # (M, N) gradient w.r.t. x, x's dtype (written when STORE_DX)
    PART,  # (P, 3, N) fp32 per-program partials: [:, 0] dy * ahat, [:, 1] dy, [:, 2] dx
    M, N, rows_per_program,
    BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr, STORE_DX: tl.constexpr,
    WEIGHT_GRADS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b1 = tl.load(B1 + cols, mask=col_mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db1_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        start = row * N
        z = tl.load(X + start + cols, mask=col_mask, other=0.0).to(tl.float32) + b1
        a, dadz = _gelu_fwd_bwd(z, APPROX_TANH)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        ahat = tl.where(col_mask, (a - mean) * rstd, 0.0)
        dy = tl.load(DY + start + cols, mask=col_mask, other=0.0).to(tl.float32)
        g = dy * w
        c1 = tl.sum(ahat * g, axis=0) / N
        c2 = tl.sum(g, axis=0) / N
        dx = tl.where(col_mask, (g - (ahat * c1 + c2)) * rstd * dadz, 0.0)
        if STORE_DX:
            tl.store(DX + start + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        if WEIGHT_GRADS:
            dw_acc += dy * ahat
            db_acc += dy
            db1_acc += dx
    if WEIGHT_GRADS:
        part = PART + pid * 3 * N
        tl.store(part + cols, dw_acc, mask=col_mask)
        tl.store(part + N + cols, db_acc, mask=col_mask)
        tl.store(part + 2 * N + cols, db1_acc, mask=col_mask)


# ----------------------------------------------------------------------------- launch configuration
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _row_config(N: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the row kernels: the row padded to a power of two, ~8 values per thread."""
    block_n = max(8, triton.next_power_of_2(N))  # >= 8: the dropout mask works in groups of 8
    return block_n, min(16, max(1, block_n // 256))


def _gelu_config(N: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of bias_gelu: the column tile that pads N least (larger on ties)."""
    cap = triton.next_power_of_2(max(N, 1))
    choices = [b for b in _GELU_BLOCK_CHOICES if b <= cap] or [cap]
    block_n = min(choices, key=lambda b: (triton.cdiv(N, b) * b, -b))
    return block_n, min(4, max(1, block_n // 256))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_NUM_SMS


def _row_groups(M: int, device: torch.device, rows_per_program: int | None = None) -> tuple[int, int]:
    """(rows per program, programs) of the backward kernels: contiguous row groups, at most
    ``_PROGRAMS_PER_SM`` per SM and at least ``_MIN_ROWS_PER_PROGRAM`` rows each, so the
    (programs, N) fp32 weight-grad partials stay small."""
    if rows_per_program is None:
        rows_per_program = max(triton.cdiv(M, _PROGRAMS_PER_SM * _num_sms(device)),
                               _MIN_ROWS_PER_PROGRAM)
    rows_per_program = max(1, int(rows_per_program))
    return rows_per_program, max(1, triton.cdiv(M, rows_per_program))


@dataclass(frozen=True)
class FwdLaunch:
    """A forward launch: ``grid`` = (row tiles, column tiles), one (block_m, block_n) tile each."""

    grid: tuple[int, int]
    block_m: int
    block_n: int
    num_warps: int


def _fwd_launch(M: int, N: int, device: torch.device, block_n: int, max_warps: int = 16) -> FwdLaunch:
    """The forwards' launch: one (BLOCK_M, BLOCK_N) tile per program and no loop over rows, so an
    SM runs several programs at once and one's loads overlap another's math. A tile holds
    ``_FWD_TILE_ELEMENTS`` values (~8 per thread); BLOCK_M halves until the launch has at least
    ``_FWD_PROGRAMS_PER_SM`` programs per SM (M = 4096 rows of 768: 2,048 programs of 2 rows)."""
    col_tiles = triton.cdiv(N, block_n)
    block_m = max(1, _FWD_TILE_ELEMENTS // block_n)
    while block_m > 1 and triton.cdiv(M, block_m) * col_tiles < _FWD_PROGRAMS_PER_SM * _num_sms(device):
        block_m //= 2
    num_warps = min(max_warps, max(1, block_m * block_n // 256))
    return FwdLaunch((triton.cdiv(M, block_m), col_tiles), block_m, block_n, num_warps)


def _drop_threshold(p: float) -> int:
    """``_dropout_keep``'s threshold: p rounded to a multiple of 2**-16 (0.1 -> 6554 / 65536)."""
    return int(round(p * 65536))


# ----------------------------------------------------------------------------- launcher checks
def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 "
                         "or bfloat16 tensors")


def _check_device(*tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device; CPU only under Triton's interpreter (TRITON_INTERPRET=1)."""
    devices = sorted({str(t.device) for t in tensors if t is not None})
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(devices)}")
    device = next(t.device for t in tensors if t is not None)
    if device.type == "cpu" and not _interpreting():
        raise ValueError("the Triton kernels got CPU tensors; move them to a CUDA device, or run "
                         "Triton's interpreter by setting TRITON_INTERPRET=1 before triton is imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), "
                         f"got {device}")
    return device


def _check_vector(name: str, t: torch.Tensor, N: int) -> None:
    _check_dtype(name, t)
    if tuple(t.shape) != (N,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({N},): the hidden size, "
                         "the last dimension of x")


def _check_rows(name: str, x: torch.Tensor, max_hidden: int | None) -> int:
    _check_dtype(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the hidden size), got a scalar")
    N = x.shape[-1]
    if max_hidden is not None and N > max_hidden:
        raise ValueError(f"hidden size {N} is above the maximum of {max_hidden} this kernel supports "
                         "(one row is held in registers)")
    return N


def _check_like(name: str, t: torch.Tensor | None, x: torch.Tensor, x_name: str = "x",
                same_dtype: bool = True) -> None:
    if t is None:
        return
    _check_dtype(name, t)
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(x.shape)} like {x_name}")
    if same_dtype and t.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {x_name} has {x.dtype}; they must match")


def _broadcast_residual(residual: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The residual expanded to x's shape (a view; the launcher's copy to rows materialises it).
    Its dtype may differ from x's (under autocast: bf16 x, fp32 residual): h takes the promoted one."""
    if residual is None or residual.shape == x.shape:
        _check_like("residual", residual, x, same_dtype=False)
        return residual
    try:
        broadcast = torch.broadcast_shapes(residual.shape, x.shape) == x.shape
    except RuntimeError:
        broadcast = False
    if not broadcast:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)} "
                         "like x (or a shape that broadcasts to it)")
    residual = residual.expand(x.shape)
    _check_like("residual", residual, x, same_dtype=False)
    return residual


def _prenorm_dtype(x_dtype: torch.dtype, residual_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of h = dropout(x) + residual: x's and the residual's promoted, as eager adds them."""
    return x_dtype if residual_dtype is None else torch.promote_types(x_dtype, residual_dtype)


def _check_dropout(dropout_p: float) -> float:
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return dropout_p


def _as_rows(t: torch.Tensor | None, N: int) -> torch.Tensor | None:
    """(..., N) -> contiguous (M, N); a copy only when the rows are not contiguous."""
    return None if t is None else t.reshape(-1, N).contiguous()


def _reduce_partials(part: torch.Tensor, k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum ``part[:, k, :]`` (P, K, N) fp32 over programs into an (N,) tensor of ``out_dtype``."""
    P, _, N = part.shape
    out = torch.empty(N, dtype=out_dtype, device=part.device)
    if P == 0 or N == 0:
        return out.zero_()
    _weight_grad_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK_N),)](
        part[:, k], out, P, N, part.stride(0),
        BLOCK_P=_REDUCE_BLOCK_P, BLOCK_N=_REDUCE_BLOCK_N, num_warps=4)
    return out


def _partials(programs: int, k: int, N: int, device: torch.device, needed: bool) -> torch.Tensor:
    """The (programs, k, N) fp32 weight-grad partials; an empty stand-in when no weight gradient
    is needed (the kernel then writes none)."""
    return torch.empty((programs if needed else 0, k, N), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- LayerNorm launchers
def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    return_prenorm: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """Launch ``_layer_norm_fwd_kernel``: y = LN(dropout(x) + residual).

    Args:
        x: (..., N) fp32/fp16/bf16; residual: like x (or broadcasting to x's shape; any of the
            three dtypes: h = dropout(x) + residual takes the promoted dtype), or None.
        weight, bias: (N,).
        seed: the dropout mask's Philox key: an int, an int64 (1,) tensor on x's device, or None
            (drawn on the device: ``kernels._utils.dropout_seed``); unused without dropout.
        return_prenorm: also write h.
        out_dtype: y's dtype (default: h's).
    Returns:
        (y (..., N), h (..., N) or None, mean (M,) fp32, rstd (M,) fp32, the seed tensor or None).
    """
    dropout_p = _check_dropout(dropout_p)
    N = _check_rows("x", x, LAYER_NORM_MAX_HIDDEN)
    _check_vector("weight", weight, N)
    _check_vector("bias", bias, N)
    residual = _broadcast_residual(residual, x)
    device = _check_device(x, weight, bias, residual)
    h_dtype = _prenorm_dtype(x.dtype, None if residual is None else residual.dtype)
    out_dtype = h_dtype if out_dtype is None else out_dtype
    if out_dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not float32, float16 or bfloat16")
    seed_t = dropout_seed(seed, device) if dropout_p > 0 else None
    x2, r2 = _as_rows(x, N), _as_rows(residual, N)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=device)
    # h's dtype travels with H even when h is not stored (an empty tensor then)
    h = torch.empty((M, N) if return_prenorm else (0,), dtype=h_dtype, device=device)
    mean = torch.empty(M, dtype=torch.float32, device=device)
    rstd = torch.empty(M, dtype=torch.float32, device=device)
    if x2.numel() > 0:
        launch = _fwd_launch(M, N, device, _row_config(N)[0])
        _layer_norm_fwd_kernel[launch.grid](
            x2, x2 if r2 is None else r2, y, h, weight.contiguous(), bias.contiguous(), mean, rstd,
            mean if seed_t is None else seed_t,  # (SEED is not read without dropout)
            M, N, float(eps), _drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, HAS_RESIDUAL=r2 is not None,
            HAS_DROPOUT=dropout_p > 0.0, STORE_PRENORM=return_prenorm, num_warps=launch.num_warps)
    return (y.view(x.shape), h.view(x.shape) if return_prenorm else None, mean, rstd, seed_t)


def layer_norm_bwd(
    dy: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    x: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    prenorm: torch.Tensor | None = None,
    dprenorm: torch.Tensor | None = None,
    has_residual: bool | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    x_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    rows_per_program: int | None = None,
):
    """Launch ``_layer_norm_bwd_kernel`` and the weight-grad reductions.

    Give either ``x`` (and ``residual``): the pre-norm sum is recomputed, or ``prenorm``: the h the
    forward returned (then ``has_residual`` says whether a residual gradient is wanted).

    Args:
        dy: (..., N) upstream gradient of y; dprenorm: (..., N) of the returned h, or None.
        weight, bias: (N,) (bias only gives dbias its dtype); mean, rstd: (M,) fp32 from the forward.
        dropout_p, seed: the forward's (seed: its tensor, or the int it was made from).
        x_dtype, residual_dtype: the dtypes of dx and dresidual (default: x's, or h's, and the
            residual's).
        needs: which of (dx, dresidual, dweight, dbias) to compute; the others come back None.
    Returns:
        (dx, dresidual, dweight, dbias), None where not needed (dresidual also without a
        residual); without dropout dx and dresidual may be one tensor.
    """
    if (x is None) == (prenorm is None):
        raise ValueError("layer_norm_bwd takes exactly one of x (the pre-norm sum is recomputed) "
                         "and prenorm (the pre-norm sum saved by the forward)")
    if has_residual is None:
        has_residual = residual is not None
    if x is not None and has_residual != (residual is not None):
        raise ValueError("layer_norm_bwd: has_residual must match the residual given with x")
    dropout_p = _check_dropout(dropout_p)
    src = x if x is not None else prenorm
    N = _check_rows("x" if x is not None else "prenorm", src, LAYER_NORM_MAX_HIDDEN)
    _check_vector("weight", weight, N)
    _check_dtype("bias", bias)
    _check_like("dy", dy, src, "the forward's x", same_dtype=False)
    _check_like("dprenorm", dprenorm, src, "the forward's x", same_dtype=False)
    _check_like("residual", residual, src, same_dtype=False)
    device = _check_device(dy, src, weight, mean, rstd, residual, dprenorm)
    x_dtype = src.dtype if x_dtype is None else x_dtype
    if has_residual and residual_dtype is None:
        residual_dtype = residual.dtype if residual is not None else x_dtype
    h_dtype = _prenorm_dtype(x_dtype, residual_dtype if has_residual else None)
    dy2, src2, r2, dh2 = (_as_rows(t, N) for t in (dy, src, residual, dprenorm))
    M = src2.shape[0]
    if mean.shape != (M,) or rstd.shape != (M,) or mean.dtype != torch.float32 \
            or rstd.dtype != torch.float32:
        raise ValueError(f"mean and rstd must be fp32 of shape ({M},), the forward's statistics")
    has_dropout = dropout_p > 0.0
    need_dx, need_dres = needs[0], needs[1] and has_residual
    weight_grads = needs[2] or needs[3]
    # without dropout dres = dx: one tensor serves both when their dtypes agree
    share = need_dx and need_dres and not has_dropout and x_dtype == residual_dtype
    dx = torch.empty((M, N), dtype=x_dtype, device=device) if need_dx else None
    dres = dx if share else (torch.empty((M, N), dtype=residual_dtype, device=device)
                             if need_dres else None)
    rpp, programs = _row_groups(M, device, rows_per_program)
    part = _partials(programs, 2, N, device, weight_grads)
    if src2.numel() > 0 and (need_dx or need_dres or weight_grads):
        recompute = x is not None and (residual is not None or has_dropout)
        seed_t = dropout_seed(seed, device) if has_dropout else None
        block_n, num_warps = _row_config(N)
        _layer_norm_bwd_kernel[(programs,)](
            dy2, dy2 if dh2 is None else dh2, src2, src2 if r2 is None else r2,
            torch.empty(0, dtype=h_dtype, device=device) if recompute else src2,
            weight.contiguous(), mean, rstd, dy2 if dx is None else dx,
            dy2 if dres is None else dres, part, mean if seed_t is None else seed_t,
            M, N, rpp, _drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            BLOCK_N=block_n, HAS_RESIDUAL=has_residual, HAS_DROPOUT=has_dropout,
            RECOMPUTE_H=recompute, HAS_DH=dh2 is not None, STORE_DX=need_dx,
            STORE_DR=need_dres and not share, WEIGHT_GRADS=weight_grads, num_warps=num_warps)
    elif weight_grads:
        part.zero_()
    dweight = _reduce_partials(part, 0, weight.dtype) if needs[2] else None
    dbias = _reduce_partials(part, 1, bias.dtype) if needs[3] else None
    shape = src.shape
    return (None if dx is None else dx.view(shape), None if dres is None else dres.view(shape),
            dweight, dbias)


def _layer_norm_dropout_mask(shape: tuple[int, ...] | torch.Size, p: float,
                             seed: int | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Debug path: the bool keep-mask (True = kept) the LayerNorm kernels draw for (shape, p, seed).

    It runs the kernels' ``_dropout_keep`` on rows of ``shape[-1]`` columns, so passing it as
    ``layer_norm_ref(..., dropout_mask=...)`` makes the reference drop the same elements.
    """
    p = _check_dropout(p)
    device = torch.device(device)
    seed_t = dropout_seed(seed, device)
    shape = tuple(int(s) for s in shape)
    N = shape[-1] if shape else 1
    M = 1
    for s in shape[:-1]:
        M *= s
    keep = torch.empty((M, N), dtype=torch.int8, device=device)
    if keep.numel() > 0:
        _check_device(keep)
        block_n, num_warps = _row_config(N)
        _dropout_mask_kernel[(M,)](keep, seed_t, N, _drop_threshold(p), BLOCK_N=block_n,
                                   num_warps=num_warps)
    return keep.view(torch.bool).view(shape)


def _autocast_out_dtype(device: torch.device) -> torch.dtype | None:
    """y's dtype as eager's ``F.layer_norm`` gives it: fp32 under CUDA autocast (layer_norm is on
    its fp32 list), else h's (None). CPU autocast keeps layer_norm in its input's dtype."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return None


# torch.library custom ops: ``torch.compile(fullgraph=True)`` traces through them (fake
# implementations give shapes and dtypes) instead of breaking the graph at a Triton launch; their
# autograd is registered on the op. Outputs nobody needs are empty tensors (ops return no None).
@torch.library.custom_op(
    "minbert::layer_norm", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor? seed, float eps, "
           "float dropout_p, bool return_prenorm, ScalarType? out_dtype) -> (Tensor, Tensor, Tensor, Tensor)")
def _layer_norm_op(x, weight, bias, residual, seed, eps, dropout_p, return_prenorm, out_dtype):
    y, h, mean, rstd, _ = layer_norm_fwd(x, weight, bias, eps, residual, dropout_p, seed,
                                         return_prenorm, out_dtype)
    if h is None:  # an empty stand-in, of h's dtype as the fake gives it
        h = x.new_empty(0, dtype=_prenorm_dtype(x.dtype, None if residual is None else residual.dtype))
    return y, h, mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, seed, eps, dropout_p, return_prenorm, out_dtype):
    h_dtype = _prenorm_dtype(x.dtype, None if residual is None else residual.dtype)
    M = math.prod(x.shape[:-1])
    stat = x.new_empty((M,), dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=out_dtype or h_dtype),
            x.new_empty(x.shape if return_prenorm else (0,), dtype=h_dtype), stat, torch.empty_like(stat))


@torch.library.custom_op(
    "minbert::layer_norm_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor? dprenorm, Tensor? x, Tensor? residual, Tensor? prenorm, Tensor weight, "
           "Tensor bias, Tensor mean, Tensor rstd, Tensor? seed, bool has_residual, float dropout_p, "
           "ScalarType x_dtype, ScalarType? residual_dtype, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)")
def _layer_norm_bwd_op(dy, dprenorm, x, residual, prenorm, weight, bias, mean, rstd, seed,
                       has_residual, dropout_p, x_dtype, residual_dtype, needs):
    grads = layer_norm_bwd(dy, weight, bias, mean, rstd, x=x, residual=residual, prenorm=prenorm,
                           dprenorm=dprenorm, has_residual=has_residual, dropout_p=dropout_p,
                           seed=seed, x_dtype=x_dtype, residual_dtype=residual_dtype, needs=tuple(needs))
    dx, dres = grads[:2]
    if _ln_shares_dx(has_residual, dropout_p, x_dtype, residual_dtype, needs):
        dres = None  # op outputs may not alias: the autograd backward shares dx again
    return tuple(dy.new_empty(0) if g is None else g for g in (dx, dres, *grads[2:]))


@_layer_norm_bwd_op.register_fake
def _(dy, dprenorm, x, residual, prenorm, weight, bias, mean, rstd, seed, has_residual, dropout_p,
      x_dtype, residual_dtype, needs):
    shared = _ln_shares_dx(has_residual, dropout_p, x_dtype, residual_dtype, needs)
    dres_needed = needs[1] and has_residual and not shared
    return (dy.new_empty(dy.shape if needs[0] else (0,), dtype=x_dtype),
            dy.new_empty(dy.shape if dres_needed else (0,),
                         dtype=x_dtype if residual_dtype is None else residual_dtype),
            weight.new_empty(weight.shape if needs[2] else (0,)),
            bias.new_empty(bias.shape if needs[3] else (0,)))


def _ln_shares_dx(has_residual: bool, dropout_p: float, x_dtype: torch.dtype,
                  residual_dtype: torch.dtype | None, needs) -> bool:
    """Whether ``layer_norm_bwd`` returns one tensor as dx and dresidual (see there)."""
    return bool(needs[0] and needs[1] and has_residual and dropout_p == 0.0
                and x_dtype == residual_dtype)


class LayerNormFunction:
    """Autograd of the ``minbert::layer_norm`` op (``torch.library.register_autograd``): saves
    x and the residual, or h when the forward returned it (one tensor instead of two), with the
    statistics and the seed tensor; the backward computes only the gradients asked for."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, seed, eps, dropout_p, return_prenorm, out_dtype = inputs
        _, h, mean, rstd = output
        ctx.has_residual = residual is not None
        ctx.residual_shape = None if residual is None else residual.shape
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.dropout_p, ctx.return_prenorm = dropout_p, return_prenorm
        if return_prenorm:  # the backward reads h (one tensor) instead of x and the residual
            ctx.save_for_backward(None, None, h, weight, bias, mean, rstd, seed)
        else:
            ctx.save_for_backward(x, residual, None, weight, bias, mean, rstd, seed)

    @staticmethod
    def backward(ctx, dy, dh, dmean, drstd):
        x, residual, h, weight, bias, mean, rstd, seed = ctx.saved_tensors
        if residual is not None and residual.shape != x.shape:  # broadcast: expand, then sum
            residual = residual.expand(x.shape)
        nx, nw, nb, nr = ctx.needs_input_grad[:4]
        needs = [nx, nr, nw, nb]
        dx, dres, dweight, dbias = torch.ops.minbert.layer_norm_bwd(
            dy, dh if ctx.return_prenorm else None, x, residual, h, weight, bias, mean, rstd, seed,
            ctx.has_residual, ctx.dropout_p, ctx.x_dtype, ctx.residual_dtype, needs)
        if _ln_shares_dx(ctx.has_residual, ctx.dropout_p, ctx.x_dtype, ctx.residual_dtype, needs):
            dres = dx
        dx, dres, dweight, dbias = (g if need else None for g, need in zip(
            (dx, dres, dweight, dbias), (nx, nr and ctx.has_residual, nw, nb)))
        if dres is not None and dres.shape != ctx.residual_shape:  # a broadcast residual
            dres = dres.sum_to_size(ctx.residual_shape)
        return dx, dweight, dbias, dres, None, None, None, None, None


torch.library.register_autograd("minbert::layer_norm", LayerNormFunction.backward,
                                setup_context=LayerNormFunction.setup_context)


def _layer_norm_triton(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0, seed=None,
                       return_prenorm=False):
    """``LayerNorm(dropout(x) + residual)`` on the Triton kernels; see ``layer_norm_ref``.

    ``seed``: None draws the mask's key on x's device (``dropout_seed``: no host read, a fresh
    mask per call and per CUDA-graph replay); an int or an int64 (1,) device tensor fixes it.
    """
    dropout_p = _check_dropout(dropout_p)
    seed_t = dropout_seed(seed, x.device) if dropout_p > 0 else None
    y, h, _, _ = torch.ops.minbert.layer_norm(
        x, weight, bias, residual, seed_t, float(eps), dropout_p, bool(return_prenorm),
        _autocast_out_dtype(x.device))
    return (y, h) if return_prenorm else y


# ----------------------------------------------------------------------------- bias + GELU launchers
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor, approximate: GeluApprox = "none") -> torch.Tensor:
    """Launch ``_bias_gelu_fwd_kernel``: GELU(x + bias); x (..., N), bias (N,); returns (..., N)."""
    _check_approximate(approximate)
    N = _check_rows("x", x, None)
    _check_vector("bias", bias, N)
    device = _check_device(x, bias)
    x2 = _as_rows(x, N)
    M = x2.shape[0]
    y = torch.empty_like(x2)
    if x2.numel() > 0:
        launch = _fwd_launch(M, N, device, _gelu_config(N)[0], max_warps=8)
        _bias_gelu_fwd_kernel[launch.grid](
            x2, bias.contiguous(), y, M, N, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            APPROX_TANH=approximate == "tanh", num_warps=launch.num_warps)
    return y.view(x.shape)


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                  approximate: GeluApprox = "none", rows_per_program: int | None = None,
                  needs: tuple[bool, bool] = (True, True)):
    """Launch ``_bias_gelu_bwd_kernel`` and the dbias reduction.

    ``needs``: which of (dx, dbias) to compute. Returns (dx (..., N), dbias (N,)), None where
    not needed.
    """
    _check_approximate(approximate)
    N = _check_rows("x", x, None)
    _check_vector("bias", bias, N)
    _check_like("dy", dy, x)
    device = _check_device(dy, x, bias)
    dy2, x2 = _as_rows(dy, N), _as_rows(x, N)
    M = x2.shape[0]
    dx = torch.empty_like(x2) if needs[0] else None
    rpp, programs = _row_groups(M, device, rows_per_program)
    part = _partials(programs, 1, N, device, needs[1])
    if x2.numel() > 0 and any(needs):
        block_n, num_warps = _gelu_config(N)
        _bias_gelu_bwd_kernel[(programs, triton.cdiv(N, block_n))](
            dy2, x2, bias.contiguous(), dy2 if dx is None else dx, part, M, N, rpp,
            BLOCK_N=block_n, APPROX_TANH=approximate == "tanh", STORE_DX=needs[0],
            WEIGHT_GRADS=needs[1], num_warps=num_warps)
    elif needs[1]:
        part.zero_()
    return (None if dx is None else dx.view(x.shape),
            _reduce_partials(part, 0, bias.dtype) if needs[1] else None)


@torch.library.custom_op("minbert::bias_gelu", mutates_args=(),
                         schema="(Tensor x, Tensor bias, str approximate) -> Tensor")
def _bias_gelu_op(x, bias, approximate):
    return bias_gelu_fwd(x, bias, approximate)


@_bias_gelu_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("minbert::bias_gelu_bwd", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor bias, str approximate, bool[] needs) "
                                "-> (Tensor, Tensor)")
def _bias_gelu_bwd_op(dy, x, bias, approximate, needs):
    dx, dbias = bias_gelu_bwd(dy, x, bias, approximate, needs=tuple(needs))
    return op_output(dx, x), op_output(dbias, bias)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias, approximate, needs):
    return fake_grad(x, needs[0]), fake_grad(bias, needs[1])


class BiasGeluFunction:
    """Autograd of the ``minbert::bias_gelu`` op: x is saved, x + bias recomputed."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, approximate = inputs
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:2])
        dx, dbias = torch.ops.minbert.bias_gelu_bwd(dy, x, bias, ctx.approximate, needs)
        return needed_or_none(dx, needs[0]), needed_or_none(dbias, needs[1]), None


torch.library.register_autograd("minbert::bias_gelu", BiasGeluFunction.backward,
                                setup_context=BiasGeluFunction.setup_context)


def _bias_gelu_triton(x, bias, approximate="none"):
    """``GELU(x + bias)`` on the Triton kernels; see ``bias_gelu_ref``."""
    _check_approximate(approximate)
    return torch.ops.minbert.bias_gelu(x, bias, approximate)


# ----------------------------------------------------------------------------- GELU + LayerNorm launchers
def gelu_layer_norm_fwd(x, bias, weight, ln_bias, eps: float = 1e-12,
                        approximate: GeluApprox = "none"):
    """Launch ``_gelu_layer_norm_fwd_kernel``: LN(GELU(x + bias)).

    Args: x (..., N); bias, weight, ln_bias (N,). Returns (y (..., N), mean (M,) fp32, rstd (M,) fp32).
    """
    _check_approximate(approximate)
    N = _check_rows("x", x, GELU_LAYER_NORM_MAX_HIDDEN)
    for name, t in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        _check_vector(name, t, N)
    device = _check_device(x, bias, weight, ln_bias)
    x2 = _as_rows(x, N)
    M = x2.shape[0]
    y = torch.empty_like(x2)
    mean = torch.empty(M, dtype=torch.float32, device=device)
    rstd = torch.empty(M, dtype=torch.float32, device=device)
    if x2.numel() > 0:
        launch = _fwd_launch(M, N, device, _row_config(N)[0])
        _gelu_layer_norm_fwd_kernel[launch.grid](
            x2, bias.contiguous(), y, weight.contiguous(), ln_bias.contiguous(), mean, rstd,
            M, N, float(eps), BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            APPROX_TANH=approximate == "tanh", num_warps=launch.num_warps)
    return y.view(x.shape), mean, rstd


def gelu_layer_norm_bwd(dy, x, bias, weight, ln_bias, mean, rstd, approximate: GeluApprox = "none",
                        rows_per_program: int | None = None,
                        needs: tuple[bool, bool, bool, bool] = (True, True, True, True)):
    """Launch ``_gelu_layer_norm_bwd_kernel`` and the reductions.

    ``needs``: which of (dx, dbias, dweight, dln_bias) to compute.
    Returns (dx (..., N), dbias, dweight, dln_bias), each (N,) in its parameter's dtype; None
    where not needed.
    """
    _check_approximate(approximate)
    N = _check_rows("x", x, GELU_LAYER_NORM_MAX_HIDDEN)
    for name, t in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        _check_vector(name, t, N)
    _check_like("dy", dy, x)
    device = _check_device(dy, x, bias, weight, ln_bias, mean, rstd)
    dy2, x2 = _as_rows(dy, N), _as_rows(x, N)
    M = x2.shape[0]
    dx = torch.empty_like(x2) if needs[0] else None
    weight_grads = any(needs[1:])
    rpp, programs = _row_groups(M, device, rows_per_program)
    part = _partials(programs, 3, N, device, weight_grads)
    if x2.numel() > 0 and any(needs):
        block_n, num_warps = _row_config(N)
        _gelu_layer_norm_bwd_kernel[(programs,)](
            dy2, x2, bias.contiguous(), weight.contiguous(), mean, rstd,
            dy2 if dx is None else dx, part, M, N, rpp,
            BLOCK_N=block_n, APPROX_TANH=approximate == "tanh", STORE_DX=needs[0],
            WEIGHT_GRADS=weight_grads, num_warps=num_warps)
    elif weight_grads:
        part.zero_()
    reduced = [_reduce_partials(part, k, t.dtype) if need else None
               for k, t, need in ((2, bias, needs[1]), (0, weight, needs[2]), (1, ln_bias, needs[3]))]
    return (None if dx is None else dx.view(x.shape), *reduced)


@torch.library.custom_op(
    "minbert::gelu_layer_norm", mutates_args=(),
    schema="(Tensor x, Tensor bias, Tensor weight, Tensor ln_bias, float eps, str approximate) "
           "-> (Tensor, Tensor, Tensor)")
def _gelu_layer_norm_op(x, bias, weight, ln_bias, eps, approximate):
    return gelu_layer_norm_fwd(x, bias, weight, ln_bias, eps, approximate)


@_gelu_layer_norm_op.register_fake
def _(x, bias, weight, ln_bias, eps, approximate):
    stat = x.new_empty((math.prod(x.shape[:-1]),), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


@torch.library.custom_op(
    "minbert::gelu_layer_norm_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor bias, Tensor weight, Tensor ln_bias, Tensor mean, "
           "Tensor rstd, str approximate, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)")
def _gelu_layer_norm_bwd_op(dy, x, bias, weight, ln_bias, mean, rstd, approximate, needs):
    grads = gelu_layer_norm_bwd(dy, x, bias, weight, ln_bias, mean, rstd, approximate,
                                needs=tuple(needs))
    return tuple(op_output(g, t) for g, t in zip(grads, (x, bias, weight, ln_bias)))


@_gelu_layer_norm_bwd_op.register_fake
def _(dy, x, bias, weight, ln_bias, mean, rstd, approximate, needs):
    return tuple(fake_grad(t, need) for t, need in zip((x, bias, weight, ln_bias), needs))


class GeluLayerNormFunction:
    """Autograd of the ``minbert::gelu_layer_norm`` op: saves x and the statistics, not
    GELU(x + b)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, weight, ln_bias, eps, approximate = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, bias, weight, ln_bias, mean, rstd)
        ctx.approximate = approximate

    @staticmethod
    def backward(ctx, dy, dmean, drstd):
        x, bias, weight, ln_bias, mean, rstd = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        grads = torch.ops.minbert.gelu_layer_norm_bwd(dy, x, bias, weight, ln_bias, mean, rstd,
                                                      ctx.approximate, needs)
        return (*(needed_or_none(g, need) for g, need in zip(grads, needs)), None, None)


torch.library.register_autograd("minbert::gelu_layer_norm", GeluLayerNormFunction.backward,
                                setup_context=GeluLayerNormFunction.setup_context)


def _gelu_layer_norm_triton(x, bias, weight, ln_bias, eps=1e-12, approximate="none"):
    """``LayerNorm(GELU(x + bias))`` on the Triton kernels; see ``gelu_layer_norm_ref``."""
    _check_approximate(approximate)
    return torch.ops.minbert.gelu_layer_norm(x, bias, weight, ln_bias, float(eps), approximate)[0]


# ----------------------------------------------------------------------------- public functions
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    return_prenorm: bool = False,
):
    """``LayerNorm(dropout(x) + residual)`` on the backend in force; see ``layer_norm_ref``.

    ``seed`` (dropout): None draws a fresh mask per call from torch's generator (on the Triton
    backend on the device, without a host read); an int or an int64 (1,) tensor fixes it.
    """
    impl = dispatch("layer_norm", layer_norm_ref, _layer_norm_triton)
    return impl(x, weight, bias, eps=eps, residual=residual, dropout_p=dropout_p, seed=seed,
                return_prenorm=return_prenorm)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: GeluApprox = "none") -> torch.Tensor:
    """``GELU(x + bias)`` on the backend in force; see ``bias_gelu_ref``."""
    impl = dispatch("bias_gelu", bias_gelu_ref, _bias_gelu_triton)
    return impl(x, bias, approximate=approximate)


def gelu_layer_norm(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                    ln_bias: torch.Tensor, eps: float = 1e-12,
                    approximate: GeluApprox = "none") -> torch.Tensor:
    """``LayerNorm(GELU(x + bias))`` on the backend in force; see ``gelu_layer_norm_ref``."""
    impl = dispatch("gelu_layer_norm", gelu_layer_norm_ref, _gelu_layer_norm_triton)
    return impl(x, bias, weight, ln_bias, eps=eps, approximate=approximate)


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


# ----------------------------------------------------------------------------- check, compile and IO cases
def _normal(shape, gen: torch.Generator, device, dtype, scale: float = 1.0, shift: float = 0.0,
            requires_grad: bool = True) -> torch.Tensor:
    t = (torch.randn(tuple(shape), generator=gen) * scale + shift).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _shape_name(shape) -> str:
    return "x".join(str(s) for s in shape)


def _case_eps(N: int, eps: float | None) -> float:
    # BERT's 1e-12, except for rows of one element: their variance is 0, and torch's own backward
    # then amplifies its rounding noise by 1 / sqrt(eps) (~0.1 at 1e-12), so the fp32 reference
    # itself would be wrong; at 1e-5 that noise is ~1e-5
    if eps is not None:
        return eps
    return 1e-5 if N == 1 else 1e-12


def layer_norm_case(shape: tuple[int, ...], residual: bool = False, dropout_p: float = 0.0,
                    return_prenorm: bool = False, eps: float | None = None) -> OpCase:
    """An ``OpCase`` of ``layer_norm``; with dropout the reference gets the kernel's mask
    (``_layer_norm_dropout_mask``), so both drop the same elements."""
    N = shape[-1]
    eps = _case_eps(N, eps)
    parts = (["residual"] if residual else []) + ([f"dropout{dropout_p}"] if dropout_p else []) \
        + (["prenorm"] if return_prenorm else [])
    name = f"layer_norm[{'+'.join(parts) or 'plain'}] {_shape_name(shape)}"

    def make_inputs(device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        inputs = dict(
            x=_normal(shape, gen, device, dtype, scale=2.0, shift=0.5),
            weight=_normal((N,), gen, device, dtype, scale=0.5, shift=1.0),
            bias=_normal((N,), gen, device, dtype, scale=0.5),
            residual=_normal(shape, gen, device, dtype) if residual else None,
            eps=eps, dropout_p=dropout_p, seed=None, dropout_mask=None,
            return_prenorm=return_prenorm)
        if dropout_p > 0:
            inputs["seed"] = 1000 + seed
            inputs["dropout_mask"] = _layer_norm_dropout_mask(shape, dropout_p, 1000 + seed, device)
        return inputs

    def kernel_fn(dropout_mask=None, **kw):
        return _layer_norm_triton(**kw)

    return OpCase(name, make_inputs, kernel_fn, layer_norm_ref)


def bias_gelu_case(shape: tuple[int, ...], approximate: GeluApprox = "none") -> OpCase:
    """An ``OpCase`` of ``bias_gelu``."""
    N = shape[-1]

    def make_inputs(device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        return dict(x=_normal(shape, gen, device, dtype, scale=2.0),
                    bias=_normal((N,), gen, device, dtype, scale=0.5), approximate=approximate)

    return OpCase(f"bias_gelu[{approximate}] {_shape_name(shape)}", make_inputs, _bias_gelu_triton,
                  bias_gelu_ref)


def gelu_layer_norm_case(shape: tuple[int, ...], approximate: GeluApprox = "none",
                         eps: float | None = None) -> OpCase:
    """An ``OpCase`` of ``gelu_layer_norm``."""
    N = shape[-1]
    eps = _case_eps(N, eps)

    def make_inputs(device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        return dict(x=_normal(shape, gen, device, dtype, scale=2.0),
                    bias=_normal((N,), gen, device, dtype, scale=0.5),
                    weight=_normal((N,), gen, device, dtype, scale=0.5, shift=1.0),
                    ln_bias=_normal((N,), gen, device, dtype, scale=0.5),
                    eps=eps, approximate=approximate)

    return OpCase(f"gelu_layer_norm[{approximate}] {_shape_name(shape)}", make_inputs,
                  _gelu_layer_norm_triton, gelu_layer_norm_ref)


def check_cases() -> list[OpCase]:
    """The cases ``python -m kernels.check`` runs: a few odd shapes per op, every switch covered."""
    return [
        layer_norm_case((1, 1023)),
        layer_norm_case((3, 7, 29), residual=True),
        layer_norm_case((2, 13, 384), residual=True, dropout_p=0.1),
        layer_norm_case((5, 768), dropout_p=0.1, return_prenorm=True),
        layer_norm_case((3, 7, 29), residual=True, dropout_p=0.2, return_prenorm=True),
        bias_gelu_case((3, 7, 29), "none"),
        bias_gelu_case((2, 5, 1536), "tanh"),
        gelu_layer_norm_case((7, 29), "none"),
        gelu_layer_norm_case((2, 5, 384), "tanh"),
    ]


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_COMPILE_HIDDEN = (384, 768, 1024, 4096, LAYER_NORM_MAX_HIDDEN)
# (activation dtype, parameter dtype): the three pure dtypes and bf16 activations with fp32 params
_COMPILE_DTYPES = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32"))


def compile_specs() -> list[CompileSpec]:
    """One ``CompileSpec`` per (kernel, configuration the launchers can choose).

    Row kernels: the configurations of hidden sizes 384, 768, 1024, 4096 and the maximum 8192
    (4096 for GELU + LayerNorm), each with every dtype pair in its most demanding switch setting;
    the lighter switch settings of the LayerNorm kernels in bf16, and bf16 x with an fp32
    residual (what autocast produces). Forward tiles are the ones the launchers pick at M = 4096
    rows on 132 SMs (``_fwd_launch``). bias_gelu: the column tiles chosen for those widths and
    for the 4x wider feed-forward. Launches use Triton's default num_stages (3). ``attrs`` carry
    the divisibility-16 specialisation the JIT gives aligned tensors and widths that are
    multiples of 16.
    """
    specs: list[CompileSpec] = []
    stages = 3
    cpu = torch.device("cpu")  # _num_sms: the nominal 132 SMs

    def add(kernel, fn, sig, const, warps, label):
        # the JIT's specialisation at these sizes: torch allocations are 16-byte aligned and every
        # width here is a multiple of 16, so pointers and the width/stride ints get divisibility 16
        aligned = [k for k, t in sig.items() if t.startswith("*") or k in ("N", "stride_p")]
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
        specs.append(CompileSpec(kernel, fn, sig, const, warps, stages, label, attrs))

    def promoted(a, r):  # h's (and under autocast y's and dy's) dtype, of "*bf16"-style types
        return "*fp32" if "*fp32" in (a, r) else a

    def ln_fwd_sig(a, r, p):
        h = promoted(a, r)
        return dict(X=a, R=r, Y=h, H=h, W=p, B=p, MEAN="*fp32", RSTD="*fp32", SEED="*i64",
                    M="i32", N="i32", eps="fp32", drop_threshold="i32", dropout_scale="fp32",
                    BLOCK_M="constexpr", BLOCK_N="constexpr", HAS_RESIDUAL="constexpr",
                    HAS_DROPOUT="constexpr", STORE_PRENORM="constexpr")

    def ln_bwd_sig(a, r, p):
        h = promoted(a, r)
        return dict(DY=h, DH_OUT=h, X=a, R=r, H=h, W=p, MEAN="*fp32", RSTD="*fp32", DX=a, DR=r,
                    PART="*fp32", SEED="*i64", M="i32", N="i32", rows_per_program="i32",
                    drop_threshold="i32", dropout_scale="fp32", BLOCK_N="constexpr",
                    HAS_RESIDUAL="constexpr", HAS_DROPOUT="constexpr", RECOMPUTE_H="constexpr",
                    HAS_DH="constexpr", STORE_DX="constexpr", STORE_DR="constexpr",
                    WEIGHT_GRADS="constexpr")

    row_configs: dict[tuple[int, int], list[int]] = {}
    for n in _COMPILE_HIDDEN:
        row_configs.setdefault(_row_config(n), []).append(n)
    for (block_n, warps), ns in row_configs.items():
        hid = "N=" + "/".join(map(str, ns))
        fwd = _fwd_launch(4096, ns[0], cpu, block_n)
        ftile = f"BLOCK_M={fwd.block_m} BLOCK_N={block_n} warps={fwd.num_warps}"
        btile = f"BLOCK_N={block_n} warps={warps}"
        for act, par in _COMPILE_DTYPES:
            a, p = f"*{act}", f"*{par}"
            dt = act if act == par else f"{act}+{par} params"
            fwd_variants = [("residual+dropout+prenorm", a, (True, True, True))]
            bwd_variants = [("recompute residual+dropout", a, (True, True, True, False, True, True, True))]
            if (act, par) == ("bf16", "bf16"):
                fwd_variants += [("plain", a, (False, False, False)), ("residual", a, (True, False, False)),
                                 ("fp32 residual+dropout+prenorm", "*fp32", (True, True, True))]
                bwd_variants += [
                    ("saved prenorm+dropout+dh", a, (True, True, False, True, True, True, True)),
                    ("plain", a, (False, False, False, False, True, False, True)),
                    ("fp32 residual, recompute+dropout", "*fp32", (True, True, True, False, True, True, True)),
                    ("frozen weights, recompute+dropout", a, (True, True, True, False, True, True, False))]
            for vname, r, (res, drop, pre) in fwd_variants:
                add("_layer_norm_fwd_kernel", _layer_norm_fwd_kernel, ln_fwd_sig(a, r, p),
                    dict(BLOCK_M=fwd.block_m, BLOCK_N=block_n, HAS_RESIDUAL=res, HAS_DROPOUT=drop,
                         STORE_PRENORM=pre),
                    fwd.num_warps, f"layer_norm fwd {hid} {dt} {vname} {ftile}")
            for vname, r, (res, drop, rec, dh, sdx, sdr, wg) in bwd_variants:
                add("_layer_norm_bwd_kernel", _layer_norm_bwd_kernel, ln_bwd_sig(a, r, p),
                    dict(BLOCK_N=block_n, HAS_RESIDUAL=res, HAS_DROPOUT=drop, RECOMPUTE_H=rec,
                         HAS_DH=dh, STORE_DX=sdx, STORE_DR=sdr, WEIGHT_GRADS=wg),
                    warps, f"layer_norm bwd {hid} {dt} {vname} {btile}")
            approxes = ("none", "tanh") if (act, par) == ("bf16", "bf16") else ("none",)
            if max(ns) > GELU_LAYER_NORM_MAX_HIDDEN:
                approxes = ()
            for approx in approxes:
                add("_gelu_layer_norm_fwd_kernel", _gelu_layer_norm_fwd_kernel,
                    dict(X=a, B1=p, Y=a, W=p, B=p, MEAN="*fp32", RSTD="*fp32", M="i32", N="i32",
                         eps="fp32", BLOCK_M="constexpr", BLOCK_N="constexpr", APPROX_TANH="constexpr"),
                    dict(BLOCK_M=fwd.block_m, BLOCK_N=block_n, APPROX_TANH=approx == "tanh"),
                    fwd.num_warps, f"gelu_layer_norm fwd {hid} {dt} {approx} {ftile}")
                add("_gelu_layer_norm_bwd_kernel", _gelu_layer_norm_bwd_kernel,
                    dict(DY=a, X=a, B1=p, W=p, MEAN="*fp32", RSTD="*fp32", DX=a, PART="*fp32",
                         M="i32", N="i32", rows_per_program="i32", BLOCK_N="constexpr",
                         APPROX_TANH="constexpr", STORE_DX="constexpr", WEIGHT_GRADS="constexpr"),
                    dict(BLOCK_N=block_n, APPROX_TANH=approx == "tanh", STORE_DX=True, WEIGHT_GRADS=True),
                    warps, f"gelu_layer_norm bwd {hid} {dt} {approx} {btile}")

    gelu_configs: dict[tuple[int, int], list[int]] = {}
    for n in sorted({*_COMPILE_HIDDEN, *(4 * n for n in _COMPILE_HIDDEN)}):
        gelu_configs.setdefault(_gelu_config(n), []).append(n)
    for (block_n, warps), ns in gelu_configs.items():
        hid = "N=" + "/".join(map(str, ns))
        fwd = _fwd_launch(4096, ns[0], cpu, block_n, max_warps=8)
        for act, par in _COMPILE_DTYPES:
            a, p = f"*{act}", f"*{par}"
            dt = act if act == par else f"{act}+{par} params"
            approxes = ("none", "tanh") if (act, par) == ("bf16", "bf16") else ("none",)
            for approx in approxes:
                add("_bias_gelu_fwd_kernel", _bias_gelu_fwd_kernel,
                    dict(X=a, BIAS=p, Y=a, M="i32", N="i32", BLOCK_M="constexpr",
                         BLOCK_N="constexpr", APPROX_TANH="constexpr"),
                    dict(BLOCK_M=fwd.block_m, BLOCK_N=block_n, APPROX_TANH=approx == "tanh"),
                    fwd.num_warps, f"bias_gelu fwd {hid} {dt} {approx} BLOCK_M={fwd.block_m} "
                                   f"BLOCK_N={block_n} warps={fwd.num_warps}")
                add("_bias_gelu_bwd_kernel", _bias_gelu_bwd_kernel,
                    dict(DY=a, X=a, BIAS=p, DX=a, PART="*fp32", M="i32", N="i32",
                         rows_per_program="i32", BLOCK_N="constexpr", APPROX_TANH="constexpr",
                         STORE_DX="constexpr", WEIGHT_GRADS="constexpr"),
                    dict(BLOCK_N=block_n, APPROX_TANH=approx == "tanh", STORE_DX=True, WEIGHT_GRADS=True),
                    warps, f"bias_gelu bwd {hid} {dt} {approx} BLOCK_N={block_n} warps={warps}")

    for out in ("fp32", "fp16", "bf16"):
        add("_weight_grad_reduce_kernel", _weight_grad_reduce_kernel,
            dict(PART="*fp32", OUT=f"*{out}", P="i32", N="i32", stride_p="i32",
                 BLOCK_P="constexpr", BLOCK_N="constexpr"),
            dict(BLOCK_P=_REDUCE_BLOCK_P, BLOCK_N=_REDUCE_BLOCK_N), 4,
            f"weight-grad reduce -> {out} BLOCK_P={_REDUCE_BLOCK_P} BLOCK_N={_REDUCE_BLOCK_N} warps=4")
    for (block_n, warps), ns in row_configs.items():
        add("_dropout_mask_kernel", _dropout_mask_kernel,
            dict(KEEP="*i8", SEED="*i64", N="i32", drop_threshold="i32", BLOCK_N="constexpr"),
            dict(BLOCK_N=block_n), warps,
            f"dropout mask (debug) N={'/'.join(map(str, ns))} BLOCK_N={block_n} warps={warps}")
    return specs


def io_cases(tokens: int, hidden: int, dtype: torch.dtype) -> list[IOCase]:
    """Forward + backward memory-traffic cases on CPU tensors (the kernels under the interpreter).

    With T = tokens * width * itemsize (one activation tensor), p = width * itemsize (one parameter
    vector; parameters in ``dtype``) and s = tokens * 4 (one fp32 statistic), the lower bounds count
    each launch's inputs read once and outputs written once; the backward is its own launch, so it
    reads again what it needs from the forward (x, the residual, the statistics):
      - residual + dropout + LayerNorm: fwd reads x, r, w, b, writes y, mean, rstd; bwd reads dy,
        x, r, w, mean, rstd, writes dx, dr, dw, db:              8T + 5p + 4s
      - LayerNorm:     fwd x, w, b -> y, mean, rstd; bwd dy, x, w, mean, rstd -> dx, dw, db:
                                                                 5T + 5p + 4s
      - bias + GELU (width 4 * hidden, the feed-forward's): fwd x, b -> y; bwd dy, x, b -> dx, db:
                                                                 5T + 3p
      - GELU + LayerNorm: fwd x, b1, w, b -> y, mean, rstd; bwd dy, x, b1, w, mean, rstd ->
        dx, db1, dw, db:                                         5T + 8p + 4s
    The dropout mask is regenerated from the seed (no traffic). Above these bounds the kernels add
    only the parameter vectors each program loads and the (programs, k, width) fp32 weight-grad
    partials (written once, read once by the reduction): a few percent at 4096 tokens.
    flops count adds, multiplies, compares and transcendentals as one each (Philox not counted).
    """
    size = torch.empty((), dtype=dtype).element_size()
    dev = torch.device("cpu")
    cases: list[IOCase] = []

    def grads(out, inputs, dout):
        return torch.autograd.grad(out, inputs, dout)

    def make(width, seed):
        gen = torch.Generator().manual_seed(seed)
        return gen, (lambda *shape, **kw: _normal(shape, gen, dev, dtype, **kw))

    # residual + dropout(0.1) + LayerNorm
    _, rnd = make(hidden, 0)
    x, r, dy = rnd(tokens, hidden), rnd(tokens, hidden), rnd(tokens, hidden, requires_grad=False)
    w, b = rnd(hidden, shift=1.0), rnd(hidden)
    T, p, s = tokens * hidden * size, hidden * size, tokens * 4
    cases.append(IOCase(
        f"layer_norm residual+dropout0.1 {tokens}x{hidden}",
        lambda x=x, r=r, w=w, b=b, dy=dy: grads(
            _layer_norm_triton(x, w, b, 1e-12, residual=r, dropout_p=0.1, seed=1234), (x, r, w, b), dy),
        lambda x=x, r=r, w=w, b=b, dy=dy: grads(
            layer_norm_ref(x, w, b, 1e-12, residual=r, dropout_p=0.1, seed=1234), (x, r, w, b), dy),
        8 * T + 5 * p + 4 * s, (10 + 18) * tokens * hidden))

    # plain LayerNorm
    _, rnd = make(hidden, 1)
    x, dy = rnd(tokens, hidden), rnd(tokens, hidden, requires_grad=False)
    w, b = rnd(hidden, shift=1.0), rnd(hidden)
    cases.append(IOCase(
        f"layer_norm {tokens}x{hidden}",
        lambda x=x, w=w, b=b, dy=dy: grads(_layer_norm_triton(x, w, b, 1e-12), (x, w, b), dy),
        lambda x=x, w=w, b=b, dy=dy: grads(layer_norm_ref(x, w, b, 1e-12), (x, w, b), dy),
        5 * T + 5 * p + 4 * s, (7 + 15) * tokens * hidden))

    # bias + GELU on the feed-forward width
    width = 4 * hidden
    _, rnd = make(width, 2)
    x, dy, b = rnd(tokens, width), rnd(tokens, width, requires_grad=False), rnd(width)
    Tw, pw = tokens * width * size, width * size
    cases.append(IOCase(
        f"bias_gelu erf {tokens}x{width}",
        lambda x=x, b=b, dy=dy: grads(_bias_gelu_triton(x, b, "none"), (x, b), dy),
        lambda x=x, b=b, dy=dy: grads(bias_gelu_ref(x, b, "none"), (x, b), dy),
        5 * Tw + 3 * pw, (10 + 16) * tokens * width))

    # GELU + LayerNorm (prediction-head transform)
    _, rnd = make(hidden, 3)
    x, dy = rnd(tokens, hidden), rnd(tokens, hidden, requires_grad=False)
    b1, w, b = rnd(hidden), rnd(hidden, shift=1.0), rnd(hidden)
    cases.append(IOCase(
        f"gelu_layer_norm erf {tokens}x{hidden}",
        lambda x=x, b1=b1, w=w, b=b, dy=dy: grads(
            _gelu_layer_norm_triton(x, b1, w, b, 1e-12, "none"), (x, b1, w, b), dy),
        lambda x=x, b1=b1, w=w, b=b, dy=dy: grads(
            gelu_layer_norm_ref(x, b1, w, b, 1e-12, "none"), (x, b1, w, b), dy),
        5 * T + 8 * p + 4 * s, (16 + 30) * tokens * hidden))
    return cases
