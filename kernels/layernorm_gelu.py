"""LayerNorm with fused residual add and dropout, bias + GELU, and GELU + LayerNorm.

Ops (BERT's notation):
  - ``layer_norm(x, weight, bias, residual, dropout_p)``: ``LayerNorm(dropout(x) + residual)``, the
    ``LayerNorm(dropout(dense(h)) + h)`` that closes every BERT sub-layer; optionally also returns
    the pre-norm sum ``dropout(x) + residual`` (the next residual stream).
  - ``bias_gelu(x, bias, approximate)``: ``GELU(x + bias)``, exact erf (``"none"``) or tanh.
  - ``gelu_layer_norm(x, bias, weight, ln_bias, eps, approximate)``: ``LayerNorm(GELU(x + bias))``,
    the transform of BERT's prediction head.

This file holds every layer of the family: the Triton kernels (``_*_kernel``), their launchers
(``*_fwd`` / ``*_bwd``), the autograd Functions, the functional forms that dispatch on the kernels
backend, the ``LayerNorm`` module (``weight``/``bias`` keys like ``nn.LayerNorm``) and the eager
PyTorch references (``*_ref``) the kernels are tested against.

What is fused. LayerNorm forward: dropout on ``x`` (Philox, from a seed), residual add, fp32
statistics, affine, and the optional pre-norm store, in one pass over each row. LayerNorm
backward: the dropout mask is regenerated from the seed (never stored), the pre-norm sum is
reloaded (when the forward returned it) or recomputed from x and the residual, and dx, dresidual
and per-program weight/bias partial sums come out of one read of each row. GELU + LayerNorm
recomputes the GELU in its backward. Weight and bias gradients are deterministic: each program
owns a contiguous group of rows and writes fp32 partial sums to a small (programs, N) buffer that
``_weight_grad_reduce_kernel`` sums in a fixed order (no atomics).

Dtypes: x, residual and outputs fp32 / fp16 / bf16 (outputs and input gradients in x's dtype;
residual must have x's dtype); weight and biases any of the three (their gradients in their own
dtype); mean and rstd fp32; all math in fp32. The pre-norm sum is rounded to x's dtype before the
statistics, so a saved pre-norm output reproduces them exactly in the backward.

Sizes: the row kernels keep one row in registers (BLOCK_N = next power of two >= 4, num_warps =
BLOCK_N / 256, 1 to 16): hidden size up to ``LAYER_NORM_MAX_HIDDEN`` = 8192 for LayerNorm and
``GELU_LAYER_NORM_MAX_HIDDEN`` = 4096 for GELU + LayerNorm, whose backward holds more per row
and spills from 8192 on; the launchers raise ``ValueError`` above. No register spills on sm_80 /
sm_90 up to those sizes when the hidden size is a multiple of 16 (``compile_specs``; the JIT then
vectorises the loads); other widths load element by element and may spill above 4096.
``bias_gelu`` tiles the columns and has no limit. Any number of rows; row offsets are int64.
Each program owns a contiguous group of >= 32 rows (at most 4 programs per SM), so the weight-grad
partials are a few hundred rows of fp32 at most.

Dropout: a Philox-4x32-10 call per four adjacent columns, counter (col // 4, row), key = seed
(``_dropout_keep``); the mask depends on (seed, row, col) only, not on block sizes, the grid or the
GPU, and it is regenerated in the backward. One call per four elements (not one per element, as
``tl.rand`` would do) quarters the Philox work and keeps the sm_90 backward free of spills. It is
not torch's RNG stream: tests get the mask from ``_layer_norm_dropout_mask`` (same formula).

Known limits: rows must be contiguous after ``reshape(-1, N)`` (other layouts are copied); the
weight-grad partials depend on the number of programs, so dweight is bitwise reproducible for a
given device and row count, not across GPUs with different SM counts. Under Triton's CPU
interpreter (Triton 3.9) fp32 -> bf16 casts truncate instead of rounding to nearest, so bf16
outputs there carry up to 1 ulp of error unless the interpreter is corrected.
"""
from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from ._backend import dispatch
from ._utils import apply_dropout
from .testing import CompileSpec, IOCase, OpCase

GeluApprox = Literal["none", "tanh"]

LAYER_NORM_MAX_HIDDEN = 8192  # one row in registers; no spills up to here (see compile_specs)
GELU_LAYER_NORM_MAX_HIDDEN = 4096  # its backward holds more per row: spills from 8192 on
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_ROWS_PER_PROGRAM = 32  # each program owns >= this many rows: tiny weight-grad partials
_PROGRAMS_PER_SM = 4  # at most this many row-group programs per SM (enough warps to hide latency)
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
def _dropout_keep(seed, row, dropout_p, BLOCK_N: tl.constexpr):
    """(BLOCK_N,) bool: True where column ``col`` of ``row`` (int64) survives dropout.

    One Philox-4x32-10 call (key = seed, counter = (col // 4, row low 32 bits, row high 32 bits,
    0)) yields four uint32 words, word ``col % 4`` for each of four adjacent columns; its top 24
    bits as a uniform u in [0, 1) keep the element when u >= p. The mask depends on (seed, row,
    col) only: not on block sizes, grid, or the hidden size.
    """
    row = tl.cast(row, tl.int64)  # (the interpreter's loop counters are Python ints)
    quad = tl.arange(0, BLOCK_N // 4).to(tl.uint32)  # col // 4
    zero = tl.zeros((BLOCK_N // 4,), dtype=tl.uint32)
    row_lo = zero + (row & 0xFFFFFFFF).to(tl.uint32)
    row_hi = zero + (row >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, quad, row_lo, row_hi, zero)
    # column 4j + k takes word k of counter j
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24: exact, in [0, 1)
    return u >= dropout_p


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
def _prenorm_row(X_row, R_row, cols, col_mask, keep, dropout_scale,
                 HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """One row of h = dropout(x) + residual, fp32, rounded to x's dtype (the residual stream's)."""
    h = tl.load(X_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        h += tl.load(R_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    return h.to(X_row.dtype.element_ty).to(tl.float32)


# ----------------------------------------------------------------------------- LayerNorm kernels
@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) incoming branch x; its dtype is the I/O dtype
    R,  # (M, N) residual, x's dtype (read when HAS_RESIDUAL)
    Y,  # (M, N) output y = LN(h), x's dtype
    H,  # (M, N) pre-norm sum h = dropout(x) + residual, x's dtype (written when STORE_PRENORM)
    W,  # (N,) LayerNorm weight
    B,  # (N,) LayerNorm bias
    MEAN,  # (M,) fp32 mean of each row of h
    RSTD,  # (M,) fp32 1 / sqrt(var + eps) of each row of h
    M, N, rows_per_program, eps, dropout_p, dropout_scale, seed,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_PRENORM: tl.constexpr,
):
    # program p normalises rows [p * rows_per_program, (p + 1) * rows_per_program), one at a time
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        start = row * N  # int64 element offset of the row
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row, dropout_p, BLOCK_N)
        else:
            keep = col_mask
        h = _prenorm_row(X + start, R + start, cols, col_mask, keep, dropout_scale,
                         HAS_RESIDUAL, HAS_DROPOUT)
        if STORE_PRENORM:
            tl.store(H + start + cols, h.to(H.dtype.element_ty), mask=col_mask)
        mean = tl.sum(h, axis=0) / N
        hc = tl.where(col_mask, h - mean, 0.0)
        var = tl.sum(hc * hc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        y = hc * rstd * w + b
        tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=col_mask)


# Backward math, per row (h = dropout(x) + residual, xhat = (h - mean) * rstd, y = xhat * w + b):
#   g      = dy * w                                        gradient w.r.t. xhat
#   dh     = rstd * (g - mean(g) - xhat * mean(g * xhat))   (+ the upstream gradient of h when the
#                                                            forward returned it)
#   dres   = dh                                            the residual enters h with weight 1
#   dx     = dh * keep / (1 - p)                           keep regenerated from (seed, row*N+col)
#   dw     = sum over rows of dy * xhat,  db = sum over rows of dy
# Each program accumulates dw and db over its own rows in fp32 and writes them to row `pid` of
# the partials buffer; _weight_grad_reduce_kernel then sums the programs in a fixed order.
# Without dropout dx equals dres, so one tensor serves both (DR is not written).
@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient of y, x's dtype
    DH_OUT,  # (M, N) upstream gradient of the returned pre-norm sum h (read when HAS_DH)
    X,  # (M, N) x (read when RECOMPUTE_H)
    R,  # (M, N) residual (read when RECOMPUTE_H and HAS_RESIDUAL)
    H,  # (M, N) h saved by the forward, or x when h == x (read when not RECOMPUTE_H)
    W,  # (N,) LayerNorm weight
    MEAN,  # (M,) fp32 row means from the forward
    RSTD,  # (M,) fp32 row 1 / sqrt(var + eps) from the forward
    DX,  # (M, N) gradient w.r.t. x, x's dtype
    DR,  # (M, N) gradient w.r.t. residual (written when HAS_DROPOUT and HAS_RESIDUAL)
    PART,  # (P, 2, N) fp32 per-program partial sums: [:, 0] of dy * xhat, [:, 1] of dy
    M, N, rows_per_program, dropout_p, dropout_scale, seed,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    RECOMPUTE_H: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        start = row * N
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row, dropout_p, BLOCK_N)
        else:
            keep = col_mask
        if RECOMPUTE_H:
            h = _prenorm_row(X + start, R + start, cols, col_mask, keep, dropout_scale,
                             HAS_RESIDUAL, HAS_DROPOUT)
        else:
            h = tl.load(H + start + cols, mask=col_mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(col_mask, (h - mean) * rstd, 0.0)
        dy = tl.load(DY + start + cols, mask=col_mask, other=0.0).to(tl.float32)
        g = dy * w
        c1 = tl.sum(xhat * g, axis=0) / N
        c2 = tl.sum(g, axis=0) / N
        dh = (g - (xhat * c1 + c2)) * rstd
        if HAS_DH:
            dh += tl.load(DH_OUT + start + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc += dy * xhat
        db_acc += dy
        if HAS_DROPOUT:
            dx = tl.where(keep, dh * dropout_scale, 0.0)
            tl.store(DX + start + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
            if HAS_RESIDUAL:
                tl.store(DR + start + cols, dh.to(DR.dtype.element_ty), mask=col_mask)
        else:
            tl.store(DX + start + cols, dh.to(DX.dtype.element_ty), mask=col_mask)
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
    N, dropout_p, seed,
    BLOCK_N: tl.constexpr,
):
    # debug path: one row per program, the same _dropout_keep as the LayerNorm kernels
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, row, dropout_p, BLOCK_N)
    tl.store(KEEP + row * N + cols, keep.to(tl.int8), mask=cols < N)


# ----------------------------------------------------------------------------- bias + GELU kernels
@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (M, N) input without bias
    BIAS,  # (N,) bias added before the GELU
    Y,  # (M, N) GELU(x + bias), x's dtype
    M, N, rows_per_program,
    BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    # grid (row groups, column tiles): program (p, c) covers rows of group p, columns of tile c
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        start = row * N
        z = tl.load(X + start + cols, mask=col_mask, other=0.0).to(tl.float32) + bias
        tl.store(Y + start + cols, _gelu(z, APPROX_TANH).to(Y.dtype.element_ty), mask=col_mask)


# Backward math (z = x + bias, y = GELU(z)):
#   dx    = dy * GELU'(z),  GELU'(z) = Phi(z) + z phi(z) (erf) or the tanh form in _gelu_fwd_bwd
#   dbias = sum over rows of dx  (per-program fp32 partials, reduced by _weight_grad_reduce_kernel)
@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N) upstream gradient, x's dtype
    X,  # (M, N) input without bias
    BIAS,  # (N,) bias
    DX,  # (M, N) gradient w.r.t. x, x's dtype
    PART,  # (P, N) fp32 per-program partial sums of dx (for dbias)
    M, N, rows_per_program,
    BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
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
        tl.store(DX + start + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        acc += dx
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
    M, N, rows_per_program, eps,
    BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b1 = tl.load(B1 + cols, mask=col_mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        start = row * N
        z = tl.load(X + start + cols, mask=col_mask, other=0.0).to(tl.float32) + b1
        a = tl.where(col_mask, _gelu(z, APPROX_TANH), 0.0)  # fp32, recomputed in the backward
        mean = tl.sum(a, axis=0) / N
        ac = tl.where(col_mask, a - mean, 0.0)
        var = tl.sum(ac * ac, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        tl.store(Y + start + cols, (ac * rstd * w + b).to(Y.dtype.element_ty), mask=col_mask)


# Backward math, per row (z = x + b1, a = GELU(z), ahat = (a - mean) * rstd, y = ahat * w + b):
#   g    = dy * w
#   da   = rstd * (g - mean(g) - ahat * mean(g * ahat))     LayerNorm backward, as above
#   dx   = da * GELU'(z)                                    GELU recomputed from x, never stored
#   db1  = sum over rows of dx,  dw = sum over rows of dy * ahat,  db = sum over rows of dy
# (per-program fp32 partials, reduced by _weight_grad_reduce_kernel in a fixed order)
@triton.jit
def _gelu_layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient of y, x's dtype
    X,  # (M, N) dense output without its bias
    B1,  # (N,) dense bias
    W,  # (N,) LayerNorm weight
    MEAN,  # (M,) fp32 row means from the forward
    RSTD,  # (M,) fp32 row 1 / sqrt(var + eps) from the forward
    DX,  # (M, N) gradient w.r.t. x, x's dtype
    PART,  # (P, 3, N) fp32 per-program partials: [:, 0] dy * ahat, [:, 1] dy, [:, 2] dx
    M, N, rows_per_program,
    BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
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
        tl.store(DX + start + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        dw_acc += dy * ahat
        db_acc += dy
        db1_acc += dx
    part = PART + pid * 3 * N
    tl.store(part + cols, dw_acc, mask=col_mask)
    tl.store(part + N + cols, db_acc, mask=col_mask)
    tl.store(part + 2 * N + cols, db1_acc, mask=col_mask)


# ----------------------------------------------------------------------------- launch configuration
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _row_config(N: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the row kernels: the row padded to a power of two, ~8 values per thread."""
    block_n = max(4, triton.next_power_of_2(N))  # >= 4: the dropout mask works in groups of 4
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
    """(rows per program, programs): contiguous row groups, at most ``_PROGRAMS_PER_SM`` per SM and
    at least ``_MIN_ROWS_PER_PROGRAM`` rows each, so the (programs, N) fp32 partials stay small."""
    if rows_per_program is None:
        rows_per_program = max(triton.cdiv(M, _PROGRAMS_PER_SM * _num_sms(device)),
                               _MIN_ROWS_PER_PROGRAM)
    rows_per_program = max(1, int(rows_per_program))
    return rows_per_program, max(1, triton.cdiv(M, rows_per_program))


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


def _check_like(name: str, t: torch.Tensor | None, x: torch.Tensor, x_name: str = "x") -> None:
    if t is None:
        return
    _check_dtype(name, t)
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(x.shape)} like {x_name}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {x_name} has {x.dtype}; they must match")


def _broadcast_residual(residual: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The residual expanded to x's shape (a view; the launcher's copy to rows materialises it)."""
    if residual is None or residual.shape == x.shape:
        _check_like("residual", residual, x)
        return residual
    try:
        broadcast = torch.broadcast_shapes(residual.shape, x.shape) == x.shape
    except RuntimeError:
        broadcast = False
    if not broadcast:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)} "
                         "like x (or a shape that broadcasts to it)")
    residual = residual.expand(x.shape)
    _check_like("residual", residual, x)
    return residual


def _check_dropout(dropout_p: float) -> float:
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return dropout_p


def _resolve_seed(seed: int | None, dropout_p: float) -> int:
    """The Philox seed: the caller's, or drawn from torch's (CPU) RNG so each call gets a fresh mask."""
    if seed is not None:
        _check_seed(seed)
    if dropout_p == 0.0:
        return 0
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    return int(seed)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


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


# ----------------------------------------------------------------------------- LayerNorm launchers
def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_prenorm: bool = False,
    rows_per_program: int | None = None,
):
    """Launch ``_layer_norm_fwd_kernel``: y = LN(dropout(x) + residual).

    Args:
        x: (..., N) fp32/fp16/bf16; residual: like x (or broadcasting to x's shape), or None.
        weight, bias: (N,).
        seed: Philox seed of the dropout mask; None draws one from torch's RNG (when dropout_p > 0).
        return_prenorm: also write h = dropout(x) + residual.
        rows_per_program: rows each program owns (default: see ``_row_groups``).
    Returns:
        (y (..., N) in x's dtype, h (..., N) or None, mean (M,) fp32, rstd (M,) fp32, the seed used).
    """
    dropout_p = _check_dropout(dropout_p)
    N = _check_rows("x", x, LAYER_NORM_MAX_HIDDEN)
    _check_vector("weight", weight, N)
    _check_vector("bias", bias, N)
    residual = _broadcast_residual(residual, x)
    device = _check_device(x, weight, bias, residual)
    seed = _resolve_seed(seed, dropout_p)
    x2, r2 = _as_rows(x, N), _as_rows(residual, N)
    M = x2.shape[0]
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if return_prenorm else None
    mean = torch.empty(M, dtype=torch.float32, device=device)
    rstd = torch.empty(M, dtype=torch.float32, device=device)
    if x2.numel() > 0:
        rpp, programs = _row_groups(M, device, rows_per_program)
        block_n, num_warps = _row_config(N)
        _layer_norm_fwd_kernel[(programs,)](
            x2, x2 if r2 is None else r2, y, y if h is None else h,
            weight.contiguous(), bias.contiguous(), mean, rstd,
            M, N, rpp, float(eps), dropout_p, 1.0 / (1.0 - dropout_p), seed,
            BLOCK_N=block_n, HAS_RESIDUAL=r2 is not None, HAS_DROPOUT=dropout_p > 0.0,
            STORE_PRENORM=return_prenorm, num_warps=num_warps)
    return y.view(x.shape), None if h is None else h.view(x.shape), mean, rstd, seed


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
    seed: int = 0,
    rows_per_program: int | None = None,
):
    """Launch ``_layer_norm_bwd_kernel`` and the weight-grad reduction.

    Give either ``x`` (and ``residual``): the pre-norm sum is recomputed, or ``prenorm``: the h the
    forward returned (then ``has_residual`` says whether a residual gradient is wanted).

    Args:
        dy: (..., N) upstream gradient of y; dprenorm: (..., N) of the returned h, or None.
        weight, bias: (N,) (bias only gives dbias its dtype); mean, rstd: (M,) fp32 from the forward.
        dropout_p, seed: the forward's; the mask is regenerated from them.
    Returns:
        (dx, dresidual or None, dweight, dbias); without dropout dx and dresidual are one tensor.
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
    _check_like("dy", dy, src, "the forward's x")
    _check_like("dprenorm", dprenorm, src, "the forward's x")
    _check_like("residual", residual, src)
    device = _check_device(dy, src, weight, mean, rstd, residual, dprenorm)
    dy2, src2, r2, dh2 = (_as_rows(t, N) for t in (dy, src, residual, dprenorm))
    M = src2.shape[0]
    if mean.shape != (M,) or rstd.shape != (M,) or mean.dtype != torch.float32 \
            or rstd.dtype != torch.float32:
        raise ValueError(f"mean and rstd must be fp32 of shape ({M},), the forward's statistics")
    has_dropout = dropout_p > 0.0
    recompute = x is not None and (residual is not None or has_dropout)
    dx = torch.empty_like(src2)
    if has_residual:
        dres = torch.empty_like(src2) if has_dropout else dx
    else:
        dres = None
    rpp, programs = _row_groups(M, device, rows_per_program)
    part = torch.empty((programs, 2, N), dtype=torch.float32, device=device)
    if src2.numel() > 0:
        block_n, num_warps = _row_config(N)
        _layer_norm_bwd_kernel[(programs,)](
            dy2, dy2 if dh2 is None else dh2, src2, src2 if r2 is None else r2, src2,
            weight.contiguous(), mean, rstd, dx, dx if dres is None else dres, part,
            M, N, rpp, dropout_p, 1.0 / (1.0 - dropout_p), seed,
            BLOCK_N=block_n, HAS_RESIDUAL=has_residual, HAS_DROPOUT=has_dropout,
            RECOMPUTE_H=recompute, HAS_DH=dh2 is not None, num_warps=num_warps)
    else:
        part.zero_()
    dweight = _reduce_partials(part, 0, weight.dtype)
    dbias = _reduce_partials(part, 1, bias.dtype)
    shape = src.shape
    return dx.view(shape), None if dres is None else dres.view(shape), dweight, dbias


def _layer_norm_dropout_mask(shape: tuple[int, ...] | torch.Size, p: float, seed: int,
                             device: torch.device | str = "cpu") -> torch.Tensor:
    """Debug path: the bool keep-mask (True = kept) the LayerNorm kernels draw for (shape, p, seed).

    It runs the kernels' ``_dropout_keep`` on rows of ``shape[-1]`` columns, so passing it as
    ``layer_norm_ref(..., dropout_mask=...)`` makes the reference drop the same elements.
    """
    p = _check_dropout(p)
    _check_seed(seed)
    shape = tuple(int(s) for s in shape)
    N = shape[-1] if shape else 1
    M = 1
    for s in shape[:-1]:
        M *= s
    keep = torch.empty((M, N), dtype=torch.int8, device=torch.device(device))
    if keep.numel() > 0:
        _check_device(keep)
        block_n, num_warps = _row_config(N)
        _dropout_mask_kernel[(M,)](keep, N, p, seed, BLOCK_N=block_n, num_warps=num_warps)
    return keep.view(torch.bool).view(shape)


class LayerNormFunction(torch.autograd.Function):
    """Autograd for ``layer_norm_fwd`` / ``layer_norm_bwd``; returns y, or (y, h) with return_prenorm."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, dropout_p, seed, return_prenorm):
        y, h, mean, rstd, seed = layer_norm_fwd(x, weight, bias, eps, residual, dropout_p, seed,
                                                return_prenorm)
        ctx.set_materialize_grads(False)
        ctx.has_residual = residual is not None
        ctx.residual_shape = None if residual is None else residual.shape
        residual = _broadcast_residual(residual, x)  # (a view: the backward copies it again)
        ctx.dropout_p, ctx.seed, ctx.return_prenorm = dropout_p, seed, return_prenorm
        if return_prenorm:  # the backward reads h (one tensor) instead of x and the residual
            ctx.save_for_backward(None, None, h, weight, bias, mean, rstd)
        else:
            ctx.save_for_backward(x, residual, None, weight, bias, mean, rstd)
        return (y, h) if return_prenorm else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        x, residual, h, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the pre-norm output was used
            dy = torch.zeros_like(h)
        dx, dres, dweight, dbias = layer_norm_bwd(
            dy, weight, bias, mean, rstd, x=x, residual=residual, prenorm=h, dprenorm=dh,
            has_residual=ctx.has_residual, dropout_p=ctx.dropout_p, seed=ctx.seed)
        if dres is not None and dres.shape != ctx.residual_shape:  # a broadcast residual
            dres = dres.sum_to_size(ctx.residual_shape)
        return dx, dweight, dbias, dres, None, None, None, None


def _layer_norm_triton(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0, seed=None,
                       return_prenorm=False):
    """``LayerNorm(dropout(x) + residual)`` on the Triton kernels; see ``layer_norm_ref``."""
    return LayerNormFunction.apply(x, weight, bias, residual, eps, dropout_p, seed, return_prenorm)


# ----------------------------------------------------------------------------- bias + GELU launchers
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor, approximate: GeluApprox = "none",
                  rows_per_program: int | None = None) -> torch.Tensor:
    """Launch ``_bias_gelu_fwd_kernel``: GELU(x + bias); x (..., N), bias (N,); returns (..., N)."""
    _check_approximate(approximate)
    N = _check_rows("x", x, None)
    _check_vector("bias", bias, N)
    device = _check_device(x, bias)
    x2 = _as_rows(x, N)
    M = x2.shape[0]
    y = torch.empty_like(x2)
    if x2.numel() > 0:
        rpp, programs = _row_groups(M, device, rows_per_program)
        block_n, num_warps = _gelu_config(N)
        _bias_gelu_fwd_kernel[(programs, triton.cdiv(N, block_n))](
            x2, bias.contiguous(), y, M, N, rpp,
            BLOCK_N=block_n, APPROX_TANH=approximate == "tanh", num_warps=num_warps)
    return y.view(x.shape)


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                  approximate: GeluApprox = "none", rows_per_program: int | None = None):
    """Launch ``_bias_gelu_bwd_kernel`` and the dbias reduction; returns (dx (..., N), dbias (N,))."""
    _check_approximate(approximate)
    N = _check_rows("x", x, None)
    _check_vector("bias", bias, N)
    _check_like("dy", dy, x)
    device = _check_device(dy, x, bias)
    dy2, x2 = _as_rows(dy, N), _as_rows(x, N)
    M = x2.shape[0]
    dx = torch.empty_like(x2)
    rpp, programs = _row_groups(M, device, rows_per_program)
    part = torch.empty((programs, 1, N), dtype=torch.float32, device=device)
    if x2.numel() > 0:
        block_n, num_warps = _gelu_config(N)
        _bias_gelu_bwd_kernel[(programs, triton.cdiv(N, block_n))](
            dy2, x2, bias.contiguous(), dx, part, M, N, rpp,
            BLOCK_N=block_n, APPROX_TANH=approximate == "tanh", num_warps=num_warps)
    else:
        part.zero_()
    return dx.view(x.shape), _reduce_partials(part, 0, bias.dtype)


class BiasGeluFunction(torch.autograd.Function):
    """Autograd for ``bias_gelu_fwd`` / ``bias_gelu_bwd`` (x is saved, x + bias recomputed)."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        y = bias_gelu_fwd(x, bias, approximate)
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = bias_gelu_bwd(dy, x, bias, ctx.approximate)
        return dx, dbias, None


def _bias_gelu_triton(x, bias, approximate="none"):
    """``GELU(x + bias)`` on the Triton kernels; see ``bias_gelu_ref``."""
    _check_approximate(approximate)
    return BiasGeluFunction.apply(x, bias, approximate)


# ----------------------------------------------------------------------------- GELU + LayerNorm launchers
def gelu_layer_norm_fwd(x, bias, weight, ln_bias, eps: float = 1e-12,
                        approximate: GeluApprox = "none", rows_per_program: int | None = None):
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
        rpp, programs = _row_groups(M, device, rows_per_program)
        block_n, num_warps = _row_config(N)
        _gelu_layer_norm_fwd_kernel[(programs,)](
            x2, bias.contiguous(), y, weight.contiguous(), ln_bias.contiguous(), mean, rstd,
            M, N, rpp, float(eps),
            BLOCK_N=block_n, APPROX_TANH=approximate == "tanh", num_warps=num_warps)
    return y.view(x.shape), mean, rstd


def gelu_layer_norm_bwd(dy, x, bias, weight, ln_bias, mean, rstd, approximate: GeluApprox = "none",
                        rows_per_program: int | None = None):
    """Launch ``_gelu_layer_norm_bwd_kernel`` and the reductions.

    Returns (dx (..., N), dbias, dweight, dln_bias), each (N,) in its parameter's dtype.
    """
    _check_approximate(approximate)
    N = _check_rows("x", x, GELU_LAYER_NORM_MAX_HIDDEN)
    for name, t in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        _check_vector(name, t, N)
    _check_like("dy", dy, x)
    device = _check_device(dy, x, bias, weight, ln_bias, mean, rstd)
    dy2, x2 = _as_rows(dy, N), _as_rows(x, N)
    M = x2.shape[0]
    dx = torch.empty_like(x2)
    rpp, programs = _row_groups(M, device, rows_per_program)
    part = torch.empty((programs, 3, N), dtype=torch.float32, device=device)
    if x2.numel() > 0:
        block_n, num_warps = _row_config(N)
        _gelu_layer_norm_bwd_kernel[(programs,)](
            dy2, x2, bias.contiguous(), weight.contiguous(), mean, rstd, dx, part, M, N, rpp,
            BLOCK_N=block_n, APPROX_TANH=approximate == "tanh", num_warps=num_warps)
    else:
        part.zero_()
    return (dx.view(x.shape), _reduce_partials(part, 2, bias.dtype),
            _reduce_partials(part, 0, weight.dtype), _reduce_partials(part, 1, ln_bias.dtype))


class GeluLayerNormFunction(torch.autograd.Function):
    """Autograd for ``gelu_layer_norm_fwd`` / ``_bwd``: saves x and the statistics, not GELU(x + b)."""

    @staticmethod
    def forward(ctx, x, bias, weight, ln_bias, eps, approximate):
        y, mean, rstd = gelu_layer_norm_fwd(x, bias, weight, ln_bias, eps, approximate)
        ctx.save_for_backward(x, bias, weight, ln_bias, mean, rstd)
        ctx.approximate = approximate
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias, weight, ln_bias, mean, rstd = ctx.saved_tensors
        dx, dbias, dweight, dln_bias = gelu_layer_norm_bwd(dy, x, bias, weight, ln_bias, mean, rstd,
                                                           ctx.approximate)
        return dx, dbias, dweight, dln_bias, None, None


def _gelu_layer_norm_triton(x, bias, weight, ln_bias, eps=1e-12, approximate="none"):
    """``LayerNorm(GELU(x + bias))`` on the Triton kernels; see ``gelu_layer_norm_ref``."""
    _check_approximate(approximate)
    return GeluLayerNormFunction.apply(x, bias, weight, ln_bias, eps, approximate)


# ----------------------------------------------------------------------------- public functions
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

    Row kernels: the (BLOCK_N, num_warps) of hidden sizes 384, 768, 1024, 4096 and the maximum 8192
    (4096 for GELU + LayerNorm), each with every dtype pair in its most demanding switch setting;
    the lighter switch settings of the LayerNorm kernels in bf16. bias_gelu: the column tiles
    chosen for those widths and for the 4x wider feed-forward. Launches use Triton's default
    num_stages (3; the row loops have nothing to pipeline). ``attrs`` carry the divisibility-16
    specialisation the JIT gives aligned tensors and widths that are multiples of 16.
    """
    specs: list[CompileSpec] = []
    stages = 3

    def add(kernel, fn, sig, const, warps, label):
        # the JIT's specialisation at these sizes: torch allocations are 16-byte aligned and every
        # width here is a multiple of 16, so pointers and the width/stride ints get divisibility 16
        aligned = [k for k, t in sig.items() if t.startswith("*") or k in ("N", "stride_p")]
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
        specs.append(CompileSpec(kernel, fn, sig, const, warps, stages, label, attrs))

    row_configs: dict[tuple[int, int], list[int]] = {}
    for n in _COMPILE_HIDDEN:
        row_configs.setdefault(_row_config(n), []).append(n)
    for (block_n, warps), ns in row_configs.items():
        hid = "N=" + "/".join(map(str, ns))
        for act, par in _COMPILE_DTYPES:
            a, p = f"*{act}", f"*{par}"
            dt = act if act == par else f"{act}+{par} params"
            ln_fwd_sig = dict(X=a, R=a, Y=a, H=a, W=p, B=p, MEAN="*fp32", RSTD="*fp32", M="i32",
                              N="i32", rows_per_program="i32", eps="fp32", dropout_p="fp32",
                              dropout_scale="fp32", seed="i32", BLOCK_N="constexpr",
                              HAS_RESIDUAL="constexpr", HAS_DROPOUT="constexpr",
                              STORE_PRENORM="constexpr")
            ln_bwd_sig = dict(DY=a, DH_OUT=a, X=a, R=a, H=a, W=p, MEAN="*fp32", RSTD="*fp32", DX=a,
                              DR=a, PART="*fp32", M="i32", N="i32", rows_per_program="i32",
                              dropout_p="fp32", dropout_scale="fp32", seed="i32",
                              BLOCK_N="constexpr", HAS_RESIDUAL="constexpr",
                              HAS_DROPOUT="constexpr", RECOMPUTE_H="constexpr", HAS_DH="constexpr")
            fwd_variants = [("residual+dropout+prenorm", (True, True, True))]
            bwd_variants = [("recompute residual+dropout", (True, True, True, False))]
            if (act, par) == ("bf16", "bf16"):
                fwd_variants += [("plain", (False, False, False)), ("residual", (True, False, False))]
                bwd_variants += [("saved prenorm+dropout+dh", (True, True, False, True)),
                                 ("plain", (False, False, False, False))]
            for vname, (res, drop, pre) in fwd_variants:
                add("_layer_norm_fwd_kernel", _layer_norm_fwd_kernel, ln_fwd_sig,
                    dict(BLOCK_N=block_n, HAS_RESIDUAL=res, HAS_DROPOUT=drop, STORE_PRENORM=pre),
                    warps, f"layer_norm fwd {hid} {dt} {vname} BLOCK_N={block_n} warps={warps}")
            for vname, (res, drop, rec, dh) in bwd_variants:
                add("_layer_norm_bwd_kernel", _layer_norm_bwd_kernel, ln_bwd_sig,
                    dict(BLOCK_N=block_n, HAS_RESIDUAL=res, HAS_DROPOUT=drop, RECOMPUTE_H=rec,
                         HAS_DH=dh),
                    warps, f"layer_norm bwd {hid} {dt} {vname} BLOCK_N={block_n} warps={warps}")
            approxes = ("none", "tanh") if (act, par) == ("bf16", "bf16") else ("none",)
            if max(ns) > GELU_LAYER_NORM_MAX_HIDDEN:
                approxes = ()
            for approx in approxes:
                const = dict(BLOCK_N=block_n, APPROX_TANH=approx == "tanh")
                add("_gelu_layer_norm_fwd_kernel", _gelu_layer_norm_fwd_kernel,
                    dict(X=a, B1=p, Y=a, W=p, B=p, MEAN="*fp32", RSTD="*fp32", M="i32", N="i32",
                         rows_per_program="i32", eps="fp32", BLOCK_N="constexpr",
                         APPROX_TANH="constexpr"),
                    const, warps, f"gelu_layer_norm fwd {hid} {dt} {approx} BLOCK_N={block_n} warps={warps}")
                add("_gelu_layer_norm_bwd_kernel", _gelu_layer_norm_bwd_kernel,
                    dict(DY=a, X=a, B1=p, W=p, MEAN="*fp32", RSTD="*fp32", DX=a, PART="*fp32",
                         M="i32", N="i32", rows_per_program="i32", BLOCK_N="constexpr",
                         APPROX_TANH="constexpr"),
                    const, warps, f"gelu_layer_norm bwd {hid} {dt} {approx} BLOCK_N={block_n} warps={warps}")

    gelu_configs: dict[tuple[int, int], list[int]] = {}
    for n in sorted({*_COMPILE_HIDDEN, *(4 * n for n in _COMPILE_HIDDEN)}):
        gelu_configs.setdefault(_gelu_config(n), []).append(n)
    for (block_n, warps), ns in gelu_configs.items():
        hid = "N=" + "/".join(map(str, ns))
        for act, par in _COMPILE_DTYPES:
            a, p = f"*{act}", f"*{par}"
            dt = act if act == par else f"{act}+{par} params"
            approxes = ("none", "tanh") if (act, par) == ("bf16", "bf16") else ("none",)
            for approx in approxes:
                const = dict(BLOCK_N=block_n, APPROX_TANH=approx == "tanh")
                add("_bias_gelu_fwd_kernel", _bias_gelu_fwd_kernel,
                    dict(X=a, BIAS=p, Y=a, M="i32", N="i32", rows_per_program="i32",
                         BLOCK_N="constexpr", APPROX_TANH="constexpr"),
                    const, warps, f"bias_gelu fwd {hid} {dt} {approx} BLOCK_N={block_n} warps={warps}")
                add("_bias_gelu_bwd_kernel", _bias_gelu_bwd_kernel,
                    dict(DY=a, X=a, BIAS=p, DX=a, PART="*fp32", M="i32", N="i32",
                         rows_per_program="i32", BLOCK_N="constexpr", APPROX_TANH="constexpr"),
                    const, warps, f"bias_gelu bwd {hid} {dt} {approx} BLOCK_N={block_n} warps={warps}")

    for out in ("fp32", "fp16", "bf16"):
        add("_weight_grad_reduce_kernel", _weight_grad_reduce_kernel,
            dict(PART="*fp32", OUT=f"*{out}", P="i32", N="i32", stride_p="i32",
                 BLOCK_P="constexpr", BLOCK_N="constexpr"),
            dict(BLOCK_P=_REDUCE_BLOCK_P, BLOCK_N=_REDUCE_BLOCK_N), 4,
            f"weight-grad reduce -> {out} BLOCK_P={_REDUCE_BLOCK_P} BLOCK_N={_REDUCE_BLOCK_N} warps=4")
    for (block_n, warps), ns in row_configs.items():
        add("_dropout_mask_kernel", _dropout_mask_kernel,
            dict(KEEP="*i8", N="i32", dropout_p="fp32", seed="i32", BLOCK_N="constexpr"),
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
