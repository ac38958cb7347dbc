"""SimCSE contrastive loss (InfoNCE over cosine similarities) without the N x M logits in memory.

``simcse_loss(z1, z2, temperature, hard_negatives)``: row i of ``z1`` (N, d) is scored against
every row of ``z2`` (N, d) and, when given, every row of ``hard_negatives`` (N, d): the columns
are c = cat(z2, hard_negatives) (M = N or 2N of them). With a_i = z1_i / max(||z1_i||, eps) and
b_j = c_j / max(||c_j||, eps)::

    s_ij = a_i . b_j / temperature                   (N, M) logits, never stored
    loss = mean_i [ logsumexp_j s_ij - s_ii ]        cross-entropy, row i's positive is z2 row i

``eps`` = ``NORM_EPS`` = 1e-8 everywhere (the reference uses ``F.normalize(x, dim=-1, eps=1e-8)``;
the gradient follows its clamp: below eps a row is divided by eps and its Jacobian term is 0).

This file holds every layer of the op: the Triton kernels (``_simcse_*_kernel``), their launchers
(``simcse_loss_fwd`` / ``simcse_loss_bwd``), the custom ops (``minbert::simcse_loss``, with their
autograd in ``SimCSELossFunction``; torch.compile traces them), the functional form that
dispatches on the kernels backend, the ``SimCSELoss`` module and the eager reference
``simcse_loss_ref`` (it materialises the (N, M) logits) the kernels are tested against.

What is fused. The inputs are never normalised into copies: ``_row_norm_kernel`` writes the
fp32 row norms (N + M floats) and the tile kernels dot the raw rows (``tl.dot``, fp32
accumulation), scaling each (row, column) tile by 1 / (tau max(||z1_i||, eps) max(||c_j||, eps))
on the fly. Forward (``_simcse_fwd_kernel``): each program owns BLOCK_M rows of z1 and streams the
columns in tiles of BLOCK_N with an online log-sum-exp (base 2, fp32); it writes the row LSE and
the row losses lse_i - s_ii ((N,) fp32 each; the mean is a torch sum of N floats). Backward (two
launches, no atomics, so the gradients are bitwise reproducible; math above
``_simcse_bwd_dz1_kernel``): ``_simcse_bwd_dz1_kernel``: each program owns a row block of z1
and one BLOCK_D-wide chunk of d, streams the column tiles and recomputes P from the LSE;
``_simcse_bwd_dc_kernel``: each program owns a column block (of z2 or of the hard negatives, a
tile never straddles the two) and one chunk of d, and streams the row tiles. A program's
gradient accumulator is (block, BLOCK_D) fp32: a (64, 768) one would not fit in registers, so
the backward is split over d and recomputes the logits once per chunk (NUM_D = cdiv(d, BLOCK_D)
times). MMA work, in units of 2 N M d: 1 forward + 2 (NUM_D + 1) backward (9 at d = 768 in bf16,
against 5 without the split).

Resident and streamed blocks (``_CONFIGS``). 16-bit inputs with d a multiple of 16: a program's
own block is loaded once and stays in shared memory (all NUM_D chunks; the chunk it multiplies
into its gradient is picked from them, nothing is reloaded), so the forward reads z1 once and the
columns once per row block. fp32 inputs (tf32x3 splits every operand in three, which does not fit
next to a resident fp32 block) and d not a multiple of 16 (unvectorised loads cost registers):
the own block is reloaded per streamed tile through a K loop of BLOCK_K columns.

Dtypes: z1, z2, hard negatives fp32 / fp16 / bf16 (one dtype); the loss and the gradients in that
dtype; norms, logits, LSE and every accumulator fp32. 16-bit inputs: the backward rounds the
weights (P - delta) / max(||c_j||, eps) to the input dtype for the second product (as
FlashAttention does with P), so in fp16 row norms must stay within about [1.5e-5, 1.6e4] (1 / norm
in fp16's normal range): a zero row makes its own gradient inf, as in eager fp16, and here also
the gradients of the rows scored against it.
fp32 inputs: products in ``input_precision="tf32x3"`` (``FP32_INPUT_PRECISION``, ~fp32 accuracy
on the tensor cores; plain tf32 would break the fp32 error budget).

Sizes: any N >= 1 (offsets int64), d from 1 to ``SIMCSE_MAX_DIM`` = 768 (at d = 1024 the
resident 16-bit blocks no longer fit sm_80's shared memory without spills). d need not be a power
of two: chunk tails are masked (d = 1 is degenerate: the exact gradient is 0, and in 16-bit both
the kernels and eager return rounding noise). No configuration spills registers on sm_80 or
sm_90 and on sm_90 every ``tl.dot`` becomes wgmma (``compile_specs()``, ``python -m bench.compile
--op simcse_loss``). Inputs that are not contiguous or not 16-byte aligned are copied first.

Memory traffic (``python -m bench.io --op simcse_loss``): unique bytes are the lower bound
(inputs read once, gradients written once, ``simcse_lower_bound_bytes``) plus 4 (3N + M) + 4
bytes of fp32 scratch; the total without any cache is exactly ``simcse_tiled_bytes`` (the
streamed operand is read once per owned block and d-chunk). At N = 4096, d = 768, bf16 with hard
negatives: unique 37.8 MB (1.00x the bound), total 5.76 GB, eager 1.54 GB. The re-reads are of
c (12.6 MB) and z1 (6.3 MB), which fit in an H100's 50 MB L2, so DRAM traffic should stay near the
unique bytes; the kernels are then bound by their MMA work (see above), not by memory.

References:
    SimCSE: https://arxiv.org/abs/2104.08821
    FlashAttention-2 (online softmax, recomputation in the backward): https://arxiv.org/abs/2307.08691
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from ._backend import dispatch
from ._utils import fake_grad, needed_or_none, op_output
from .testing import CompileSpec, IOCase, OpCase

NORM_EPS = 1e-8  # the normalisation's eps: x / max(||x||, eps), reference and kernels alike
SIMCSE_MAX_DIM = 768  # largest embedding size d with a configuration in _CONFIGS
# Largest N that ``io_cases`` measures. N is the contrastive batch (SimCSE uses 64-512), and the
# interpreter's cost grows as N^2: N = 4096 takes ~19 minutes on 2 cores, N = 16384 (bench.io's
# other default token count) would take hours, so it is left out rather than left to hang.
SIMCSE_IO_MAX_N = 4096
FP32_INPUT_PRECISION = "tf32x3"  # fp32 inputs: ~fp32-accurate products on the tensor cores
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
_NORM_BLOCK_R, _NORM_BLOCK_D = 16, 128  # tile of the row-norm kernel


# ----------------------------------------------------------------------------- eager reference
def simcse_loss_ref(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.05,
    hard_negatives: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Eager SimCSE loss: ``F.cross_entropy(cos(z1, cat(z2, hn)) / temperature, arange(N))``.

    Args:
        z1: (N, d) anchors; z2: (N, d) their positives (row i of z2 for row i of z1).
        temperature: divides the cosine similarities.
        hard_negatives: (N, d) extra negative columns for every row, or None.
        upcast: compute in fp32 (the accuracy reference for the kernels' error budget).
    Returns:
        The mean loss over the N rows, a 0-d tensor in z1's dtype (fp32 when ``upcast``).
    """
    if upcast:
        z1, z2 = z1.float(), z2.float()
        hard_negatives = None if hard_negatives is None else hard_negatives.float()
    cols = z2 if hard_negatives is None else torch.cat([z2, hard_negatives], dim=0)  # (M, d)
    a = F.normalize(z1, dim=-1, eps=NORM_EPS)
    b = F.normalize(cols, dim=-1, eps=NORM_EPS)
    logits = a @ b.T / temperature  # (N, M)
    labels = torch.arange(z1.shape[0], device=z1.device)
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- shared device code
@triton.jit
def _column_tile(t, N, BLOCK_N: tl.constexpr, HAS_HN: tl.constexpr):
    """Column tile ``t`` of c = cat(z2, hn): tiles 0 .. cdiv(N, BLOCK_N) - 1 cover z2, the next
    ones hn, so no tile straddles the two tensors (its rows sit at one base pointer, affine).
    Returns (in_hn: whether the tile is in hn, (BLOCK_N,) int32 rows within z2 or hn,
    (BLOCK_N,) int32 column indices j in [0, M))."""
    if HAS_HN:
        tiles_z2 = tl.cdiv(N, BLOCK_N)
        in_hn = t >= tiles_z2
        t = tl.where(in_hn, t - tiles_z2, t)
        first_col = tl.where(in_hn, N, 0)
    else:
        in_hn = t < 0  # never
        first_col = 0
    local = t * BLOCK_N + tl.arange(0, BLOCK_N)
    return in_hn, local, first_col + local


@triton.jit
def _num_column_tiles(N, BLOCK_N: tl.constexpr, HAS_HN: tl.constexpr):
    """Column tiles of c: cdiv(N, BLOCK_N) over z2, as many again over hn."""
    n = tl.cdiv(N, BLOCK_N)
    if HAS_HN:
        n = 2 * n
    return n


@triton.jit
def _load_chunks(X, idx, valid, D, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
                 EVEN_D: tl.constexpr):
    """Rows ``idx`` (B,) int32 of X (R, D) as a tuple of NUM_D (B, BLOCK_D) tiles, chunk c holding
    columns [c * BLOCK_D, (c + 1) * BLOCK_D); rows with ``valid`` False and columns past D are 0."""
    ptrs = X + idx.to(tl.int64)[:, None] * D + tl.arange(0, BLOCK_D)[None, :]
    chunks = ()
    for c in tl.static_range(NUM_D):
        if EVEN_D:
            mask = valid[:, None]
        else:
            mask = valid[:, None] & ((c * BLOCK_D + tl.arange(0, BLOCK_D)) < D)[None, :]
        chunks = chunks + (tl.load(ptrs + c * BLOCK_D, mask=mask, other=0.0),)
    return chunks


@triton.jit
def _dots(x, y, NUM_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """sum_c x[c] @ y[c]^T over the d-chunks: (Bx, By) raw dot products, fp32."""
    acc = tl.dot(x[0], tl.trans(y[0]), input_precision=INPUT_PRECISION)
    for c in tl.static_range(1, NUM_D):
        acc = tl.dot(x[c], tl.trans(y[c]), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _dot_chunk(w, y, chunk, acc, NUM_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + w @ y[chunk] for a runtime ``chunk``: the tiles stay in their natural order (their
    addresses then differ by constants, which keeps the loads cheap) and the chunk is selected."""
    if NUM_D == 1:
        acc = tl.dot(w, y[0], acc, input_precision=INPUT_PRECISION)
    else:
        for c in tl.static_range(NUM_D):
            if chunk == c:
                acc = tl.dot(w, y[c], acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _load_chunk(X, idx, valid, chunk, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Chunk ``chunk`` (a runtime index) of rows ``idx`` of X: one (B, BLOCK_D) tile."""
    k = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    if EVEN_D:
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (k < D)[None, :]
    return tl.load(X + idx.to(tl.int64)[:, None] * D + k[None, :], mask=mask, other=0.0)


@triton.jit
def _own_block(X, idx, valid, D, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
               EVEN_D: tl.constexpr, RESIDENT: tl.constexpr):
    """The block a program owns: its NUM_D chunks kept on chip when RESIDENT, else nothing (the
    scores then reload it chunk by chunk, ``_scores``)."""
    if RESIDENT:
        chunks = _load_chunks(X, idx, valid, D, BLOCK_D, NUM_D, EVEN_D)
    else:
        chunks = ()
    return chunks


@triton.jit
def _scores(x, X, xidx, xvalid, Y, yidx, yvalid, D, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_D: tl.constexpr, RESIDENT: tl.constexpr,
            INPUT_PRECISION: tl.constexpr):
    """Raw dot products (Bx, By) of the owned rows ``xidx`` of X with the streamed rows ``yidx``
    of Y, fp32, and the streamed tile's chunks (an empty tuple when not RESIDENT).

    RESIDENT: x holds the owned chunks; all NUM_D chunks of the streamed tile are loaded and
    multiplied. Otherwise a K loop loads BLOCK_K columns of each side at a time (fp32: its owned
    block does not fit on chip next to tf32x3's operand splits)."""
    if RESIDENT:
        y = _load_chunks(Y, yidx, yvalid, D, BLOCK_D, NUM_D, EVEN_D)
        s = _dots(x, y, NUM_D, INPUT_PRECISION)
    else:
        y = ()
        s = tl.zeros((xidx.shape[0], yidx.shape[0]), dtype=tl.float32)
        for c in range(tl.cdiv(D, BLOCK_K)):
            s = tl.dot(_load_chunk(X, xidx, xvalid, c, D, BLOCK_K, EVEN_D),
                       tl.trans(_load_chunk(Y, yidx, yvalid, c, D, BLOCK_K, EVEN_D)), s,
                       input_precision=INPUT_PRECISION)
    return s, y


@triton.jit
def _accumulate(w, y, Y, yidx, yvalid, chunk, acc, D, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
                EVEN_D: tl.constexpr, RESIDENT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + w @ (chunk ``chunk`` of rows ``yidx`` of Y): from the chunks ``y`` on chip when
    RESIDENT, else loaded."""
    if RESIDENT:
        acc = _dot_chunk(w, y, chunk, acc, NUM_D, INPUT_PRECISION)
    else:
        acc = tl.dot(w, _load_chunk(Y, yidx, yvalid, chunk, D, BLOCK_D, EVEN_D), acc,
                     input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _minus_kappa(acc, kappa, x, X, idx, valid, chunk, D, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
                 EVEN_D: tl.constexpr, RESIDENT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc - kappa[:, None] * (chunk ``chunk`` of the owned rows): as the MMA diag(-kappa) @ chunk
    from the chunks on chip when RESIDENT (acc keeps the MMA layout, nothing is reloaded), else
    elementwise on the reloaded chunk."""
    if RESIDENT:
        acc = _dot_chunk(_diag(-kappa, idx.shape[0]).to(X.dtype.element_ty), x, chunk, acc, NUM_D,
                         INPUT_PRECISION)
    else:
        acc -= kappa[:, None] * _load_chunk(X, idx, valid, chunk, D, BLOCK_D, EVEN_D).to(tl.float32)
    return acc


@triton.jit
def _diag(v, B: tl.constexpr):
    """(B, B) fp32 matrix with ``v`` (B,) on its diagonal."""
    i = tl.arange(0, B)
    return tl.where(i[:, None] == i[None, :], v[:, None], 0.0)


@triton.jit
def _row_norm_kernel(
    X,  # (R, D) rows whose norms are taken
    NORM,  # (R,) fp32 ||x_r||_2
    R, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    ptrs = X + rows.to(tl.int64)[:, None] * D
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        k = start + offs
        x = tl.load(ptrs + k[None, :], mask=row_ok[:, None] & (k < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        acc += x * x
    tl.store(NORM + rows, tl.sqrt(tl.sum(acc, axis=1)), mask=row_ok)


# ----------------------------------------------------------------------------- forward kernel
# Logits in base 2: s2_ij = s_ij log2(e) = (z1_i . c_j) * u_i * rc_j with u_i = log2(e) / (tau
# max(||z1_i||, eps)) and rc_j = 1 / max(||c_j||, eps). Online log-sum-exp per row over the column
# tiles: m = running max, l = running sum of 2^(s2 - m); lse = (m + log2 l) ln 2.
@triton.jit
def _simcse_fwd_kernel(
    Z1,  # (N, D) anchors; its dtype is the I/O dtype
    Z2,  # (N, D) positives: columns 0..N-1
    HN,  # (N, D) hard negatives: columns N..2N-1 (read when HAS_HN)
    NORM1,  # (N,) fp32 ||z1_i||
    NORMC,  # (M,) fp32 ||c_j||: z2 rows, then hn rows (M = N, or 2N with HAS_HN)
    LSE,  # (N,) fp32 natural-log logsumexp_j s_ij
    ROW_LOSS,  # (N,) fp32 lse_i - s_ii
    N, D, scale2, eps,  # scale2 = log2(e) / tau
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_D: tl.constexpr, HAS_HN: tl.constexpr, RESIDENT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_M),): program m owns rows [m * BLOCK_M, (m + 1) * BLOCK_M) (on chip
    # when RESIDENT) and streams every column tile
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    a = _own_block(Z1, rows, row_ok, D, BLOCK_D, NUM_D, EVEN_D, RESIDENT)  # (BLOCK_M, BLOCK_D) each
    u = scale2 / tl.maximum(tl.load(NORM1 + rows, mask=row_ok, other=1.0), eps)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)  # s2_ii, picked from the tile holding column i
    for t in range(_num_column_tiles(N, BLOCK_N, HAS_HN)):
        in_hn, local, cols = _column_tile(t, N, BLOCK_N, HAS_HN)
        col_ok = local < N
        C = tl.where(in_hn, HN, Z2)
        s, _ = _scores(a, Z1, rows, row_ok, C, local, col_ok, D, BLOCK_D, NUM_D, BLOCK_K, EVEN_D,
                       RESIDENT, INPUT_PRECISION)
        rc = 1.0 / tl.maximum(tl.load(NORMC + cols, mask=col_ok, other=1.0), eps)
        s = s * u[:, None] * rc[None, :]  # (BLOCK_M, BLOCK_N)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        pos += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)
    tl.store(LSE + rows, lse2 * 0.6931471805599453, mask=row_ok)
    tl.store(ROW_LOSS + rows, (lse2 - pos) * 0.6931471805599453, mask=row_ok)


# ----------------------------------------------------------------------------- backward kernels
# Backward math. With G the upstream gradient of the loss, P_ij = exp(s_ij - lse_i) and
# delta_ij = 1 when j == i (the positive, j < N), the logits' gradient is
#   dL/ds_ij = (G / N) (P_ij - delta_ij).
# s_ij = (z1_i . c_j) r1_i rc_j / tau with r = 1 / max(||x||, eps); d r / d x = -r^3 x where
# ||x|| >= eps and 0 below (the clamp). Hence
#   dz1_i = G/N (r1_i / tau) [ sum_j (P_ij - delta_ij) rc_j c_j  - kappa_i z1_i ]
#   dc_j  = G/N (rc_j / tau) [ sum_i (P_ij - delta_ij) r1_i z1_i - kappa'_j c_j ]
# with kappa_i = tau r1_i sigma_i, sigma_i = sum_j (P_ij - delta_ij) s_ij (a row sum), and
# kappa'_j = tau rc_j sigma'_j, sigma'_j = sum_i (P_ij - delta_ij) s_ij (a column sum); kappa = 0
# where ||x|| < eps. This is the normalisation's Jacobian (I - a a^T) / ||x|| applied to the
# gradient of the unit vector, without forming that gradient in full.
# A program owns a block (rows for dz1, columns for dc) and one BLOCK_D chunk of d: it recomputes
# the logits of each streamed tile over all of d, accumulates the first term for its chunk as an
# MMA of the weights (P - delta) * r (rounded to the input dtype) with the streamed chunk, and
# sigma over all tiles. After the loop the kappa term is subtracted (resident: one more MMA,
# diag(-kappa) @ own chunk, which keeps acc in its MMA layout and reloads nothing; streamed: on
# the reloaded chunk), then the row scale G/N r / tau is applied.
@triton.jit
def _simcse_bwd_dz1_kernel(
    Z1,  # (N, D) anchors
    Z2,  # (N, D) positives
    HN,  # (N, D) hard negatives (read when HAS_HN)
    NORM1,  # (N,) fp32 ||z1_i||
    NORMC,  # (M,) fp32 ||c_j||
    LSE,  # (N,) fp32 row logsumexp from the forward
    G,  # () fp32 upstream gradient of the loss
    DZ1,  # (N, D) gradient w.r.t. z1, z1's dtype
    N, D, inv_tau, inv_n, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_D: tl.constexpr, HAS_HN: tl.constexpr, RESIDENT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_M), NUM_D): program (m, k) owns the rows of block m, d-chunk k of dz1
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1)
    row_ok = rows < N
    a = _own_block(Z1, rows, row_ok, D, BLOCK_D, NUM_D, EVEN_D, RESIDENT)  # (BLOCK_M, BLOCK_D) each
    n1 = tl.load(NORM1 + rows, mask=row_ok, other=1.0)
    r1 = 1.0 / tl.maximum(n1, eps)
    u = (inv_tau * 1.4426950408889634) * r1  # base-2 logit scale of each row
    lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # sum_j (P - delta)_ij rc_j c_j, one chunk
    ps = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_j P_ij s2_ij
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)  # s2_ii
    for t in range(_num_column_tiles(N, BLOCK_N, HAS_HN)):
        in_hn, local, cols = _column_tile(t, N, BLOCK_N, HAS_HN)
        col_ok = local < N
        C = tl.where(in_hn, HN, Z2)
        s, b = _scores(a, Z1, rows, row_ok, C, local, col_ok, D, BLOCK_D, NUM_D, BLOCK_K, EVEN_D,
                       RESIDENT, INPUT_PRECISION)
        rc = 1.0 / tl.maximum(tl.load(NORMC + cols, mask=col_ok, other=1.0), eps)
        s = s * u[:, None] * rc[None, :]  # (BLOCK_M, BLOCK_N)
        p = tl.where(col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        is_pos = rows[:, None] == cols[None, :]
        ps += tl.sum(p * s, axis=1)
        pos += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
        w = (p - is_pos.to(tl.float32)) * rc[None, :]
        acc = _accumulate(w.to(Z1.dtype.element_ty), b, C, local, col_ok, chunk, acc, D, BLOCK_D,
                          NUM_D, EVEN_D, RESIDENT, INPUT_PRECISION)
    kappa = tl.where(n1 >= eps, (ps - pos) * (0.6931471805599453 / inv_tau) * r1, 0.0)
    acc = _minus_kappa(acc, kappa, a, Z1, rows, row_ok, chunk, D, BLOCK_D, NUM_D, EVEN_D, RESIDENT,
                       INPUT_PRECISION)
    dz1 = acc * ((tl.load(G) * inv_n * inv_tau) * r1)[:, None]
    k = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    tl.store(DZ1 + rows.to(tl.int64)[:, None] * D + k[None, :], dz1.to(DZ1.dtype.element_ty),
             mask=row_ok[:, None] & (k < D)[None, :])


@triton.jit
def _simcse_bwd_dc_kernel(
    Z1,  # (N, D) anchors
    Z2,  # (N, D) positives
    HN,  # (N, D) hard negatives (read when HAS_HN)
    NORM1,  # (N,) fp32 ||z1_i||
    NORMC,  # (M,) fp32 ||c_j||
    LSE,  # (N,) fp32 row logsumexp from the forward
    G,  # () fp32 upstream gradient of the loss
    DZ2,  # (N, D) gradient w.r.t. z2 (columns 0..N-1)
    DHN,  # (N, D) gradient w.r.t. the hard negatives (columns N..2N-1; written when HAS_HN)
    N, D, inv_tau, inv_n, eps, tile0,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_D: tl.constexpr, HAS_HN: tl.constexpr, RESIDENT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # grid (column tiles, NUM_D): program (n, k) owns the columns of tile tile0 + n
    # (``_column_tile``: tile0 > 0 skips z2's tiles when only the hard negatives need a
    # gradient), d-chunk k of their gradient
    in_hn, local, cols = _column_tile(tl.program_id(0) + tile0, N, BLOCK_N, HAS_HN)
    chunk = tl.program_id(1)
    col_ok = local < N
    C = tl.where(in_hn, HN, Z2)
    b = _own_block(C, local, col_ok, D, BLOCK_D, NUM_D, EVEN_D, RESIDENT)  # (BLOCK_N, BLOCK_D) each
    nc = tl.load(NORMC + cols, mask=col_ok, other=1.0)
    rc = 1.0 / tl.maximum(nc, eps)
    v = (inv_tau * 1.4426950408889634) * rc  # base-2 logit scale of each column
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # sum_i (P - delta)_ij r1_i z1_i (chunk)
    ps = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_i P_ij s2_ij
    pos = tl.zeros((BLOCK_N,), dtype=tl.float32)  # s2_jj (columns j < N)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        st, a = _scores(b, C, local, col_ok, Z1, rows, row_ok, D, BLOCK_D, NUM_D, BLOCK_K, EVEN_D,
                        RESIDENT, INPUT_PRECISION)
        r1 = 1.0 / tl.maximum(tl.load(NORM1 + rows, mask=row_ok, other=1.0), eps)
        lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        st = st * v[:, None] * r1[None, :]  # (BLOCK_N, BLOCK_M): s2^T
        pt = tl.where(row_ok[None, :], tl.exp2(st - lse2[None, :]), 0.0)
        is_pos = (cols[:, None] == rows[None, :]) & row_ok[None, :]
        ps += tl.sum(pt * st, axis=1)
        pos += tl.sum(tl.where(is_pos, st, 0.0), axis=1)
        wt = (pt - is_pos.to(tl.float32)) * r1[None, :]
        acc = _accumulate(wt.to(Z1.dtype.element_ty), a, Z1, rows, row_ok, chunk, acc, D, BLOCK_D,
                          NUM_D, EVEN_D, RESIDENT, INPUT_PRECISION)
    kappa = tl.where(nc >= eps, (ps - pos) * (0.6931471805599453 / inv_tau) * rc, 0.0)
    acc = _minus_kappa(acc, kappa, b, C, local, col_ok, chunk, D, BLOCK_D, NUM_D, EVEN_D, RESIDENT,
                       INPUT_PRECISION)
    dc = acc * ((tl.load(G) * inv_n * inv_tau) * rc)[:, None]
    k = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    out = tl.where(in_hn, DHN, DZ2)
    tl.store(out + local.to(tl.int64)[:, None] * D + k[None, :], dc.to(DZ2.dtype.element_ty),
             mask=col_ok[:, None] & (k < D)[None, :])


# ----------------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class _Tile:
    """One kernel's launch configuration."""

    block_m: int  # rows of z1 per tile
    block_n: int  # columns of c per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class _SimCSEConfig:
    block_d: int  # the d-chunk: a backward program's output width (the K step too if resident)
    fwd: _Tile  # block_m: the row block a program owns; block_n: the column tile it streams
    dz1: _Tile  # the same roles as fwd
    dc: _Tile  # block_n: the column block a program owns; block_m: the row tile it streams
    resident: bool = True  # owned block kept on chip (16-bit), or reloaded per tile (fp32)
    block_k: int = 0  # K step of the logits when not resident


# (largest d, kind) -> tiles; kind is "16" (fp16 / bf16) or "32" (fp32), with "u" appended when d
# is not a multiple of 16 (the JIT then cannot vectorise the row loads, which costs registers).
# The first entry of the kind whose d is >= the embedding size is used. Chosen with bench.compile
# (compile_specs): no spills on sm_80 / sm_90, shared memory within both, wgmma on sm_90.
# Resident (16-bit, aligned d): the owned block (block x d x itemsize) stays in shared memory next
# to num_stages streamed tiles, which bounds the owned block to 64 rows at d = 768. fp32 and
# unaligned d: the owned block is reloaded per tile through a K loop of BLOCK_K columns (tf32x3
# splits each operand into three, which does not fit next to a resident fp32 block).
_CONFIGS: dict[tuple[int, str], _SimCSEConfig] = {
    (128, "16"): _SimCSEConfig(128, _Tile(128, 64, 8, 2), _Tile(128, 32, 8, 2),
                               _Tile(16, 128, 8, 2)),
    (384, "16"): _SimCSEConfig(128, _Tile(128, 64, 8, 2), _Tile(128, 16, 8, 2),
                               _Tile(16, 128, 8, 2)),
    (768, "16"): _SimCSEConfig(256, _Tile(64, 32, 4, 2), _Tile(64, 16, 8, 2), _Tile(16, 64, 8, 2)),
    (768, "32"): _SimCSEConfig(128, _Tile(64, 64, 8, 2), _Tile(64, 16, 8, 2), _Tile(16, 64, 8, 2),
                               resident=False, block_k=32),
    (768, "16u"): _SimCSEConfig(128, _Tile(64, 32, 8, 2), _Tile(64, 16, 8, 2), _Tile(16, 64, 8, 2),
                                resident=False, block_k=16),
    (768, "32u"): _SimCSEConfig(128, _Tile(64, 32, 8, 2), _Tile(64, 16, 8, 2), _Tile(16, 64, 8, 2),
                                resident=False, block_k=16),
}


def _block_d(d: int) -> int:
    """The smallest power of two >= d (and >= 16): a d-chunk never exceeds the row."""
    return max(16, triton.next_power_of_2(d))


def _kind(d: int, dtype: torch.dtype) -> str:
    return ("32" if dtype == torch.float32 else "16") + ("" if d % 16 == 0 else "u")


def _config(d: int, dtype: torch.dtype) -> _SimCSEConfig:
    kind = _kind(d, dtype)
    for (max_d, k), cfg in sorted(_CONFIGS.items()):
        if k == kind and d <= max_d:
            return cfg
    raise ValueError(f"embedding size {d} is above the maximum of {SIMCSE_MAX_DIM} the SimCSE "
                     "kernels support")


def _input_precision(dtype: torch.dtype) -> str:
    # only fp32 operands read it; 16-bit products are exact in fp32 accumulation either way
    return FP32_INPUT_PRECISION if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- checks
def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
            temperature = temperature.item()
        else:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def _check_shapes(z1, z2, hard_negatives) -> tuple[int, int]:
    """(N, d) of valid inputs: 2-D floating tensors of one shape, dtype and device, N, d >= 1."""
    named = [("z1", z1), ("z2", z2)] + ([] if hard_negatives is None else
                                         [("hard_negatives", hard_negatives)])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (N, d), got {t.dim()} dimensions "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}; SimCSE takes floating-point embeddings")
    N, d = z1.shape
    for name, t in named[1:]:
        if t.shape != z1.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but z1 has {tuple(z1.shape)}; "
                             "row i of z2 (and of hard_negatives) pairs with row i of z1")
        if t.dtype != z1.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but z1 has {z1.dtype}; they must match")
        if t.device != z1.device:
            raise ValueError(f"{name} is on {t.device} but z1 is on {z1.device}; they must match")
    if N == 0:
        raise ValueError("SimCSE needs at least one pair: z1 has 0 rows")
    if d == 0:
        raise ValueError("the embeddings have size 0 (z1 has shape (N, 0))")
    return N, d


def _check_kernel_inputs(z1, z2, hard_negatives, temperature) -> tuple[int, int, float]:
    """The launchers' checks: ``_check_shapes`` and the temperature, plus what the kernels need."""
    temperature = _check_temperature(temperature)
    N, d = _check_shapes(z1, z2, hard_negatives)
    if z1.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"z1 has dtype {z1.dtype}; the SimCSE kernels take float32, float16 or "
                         "bfloat16")
    if d > SIMCSE_MAX_DIM:
        raise ValueError(f"embedding size {d} is above the maximum of {SIMCSE_MAX_DIM} the SimCSE "
                         "kernels support")
    if z1.device.type == "cpu" and not _interpreting():
        raise ValueError("the Triton SimCSE kernels got CPU tensors; move them to a CUDA device, "
                         "or run Triton's interpreter by setting TRITON_INTERPRET=1 before "
                         "triton is imported")
    if z1.device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton SimCSE kernels run on CUDA devices (or CPU under "
                         f"TRITON_INTERPRET=1), got {z1.device}")
    return N, d, temperature


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is contiguous and 16-byte aligned (the alignment the compiled kernels
    are specialised for), else a contiguous, aligned copy."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- launchers
def _row_norms(x: torch.Tensor, out: torch.Tensor) -> None:
    R, d = x.shape
    _row_norm_kernel[(triton.cdiv(R, _NORM_BLOCK_R),)](
        x, out, R, d, BLOCK_R=_NORM_BLOCK_R,
        BLOCK_D=max(16, min(_NORM_BLOCK_D, triton.next_power_of_2(d))), num_warps=4)


def _meta(d: int, dtype: torch.dtype, cfg: _SimCSEConfig, has_hn: bool) -> dict:
    block_d = min(cfg.block_d, _block_d(d))
    block_k = block_d if cfg.resident else min(cfg.block_k, _block_d(d))
    num_d = triton.cdiv(d, block_d)
    return dict(BLOCK_D=block_d, NUM_D=num_d, BLOCK_K=block_k,
                EVEN_D=d % block_d == 0 and d % block_k == 0, HAS_HN=has_hn,
                RESIDENT=cfg.resident, INPUT_PRECISION=_input_precision(dtype))


def simcse_loss_fwd(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05,
                    hard_negatives: torch.Tensor | None = None):
    """Launch the row-norm and forward kernels.

    Args:
        z1, z2: (N, d); hard_negatives: (N, d) or None; all one dtype (fp32 / fp16 / bf16).
    Returns:
        (loss: 0-d in z1's dtype, norms: (N + M,) fp32 row norms of z1 then of the M columns,
        lse: (N,) fp32 row log-sum-exp of the logits).
    """
    N, d, temperature = _check_kernel_inputs(z1, z2, hard_negatives, temperature)
    z1, z2 = _rows(z1), _rows(z2)
    hn = None if hard_negatives is None else _rows(hard_negatives)
    M = N if hn is None else 2 * N
    device = z1.device
    norms = torch.empty(N + M, dtype=torch.float32, device=device)
    for i, t in enumerate((z1, z2, hn)):
        if t is not None:
            _row_norms(t, norms[i * N:(i + 1) * N])
    lse = torch.empty(N, dtype=torch.float32, device=device)
    row_loss = torch.empty(N, dtype=torch.float32, device=device)
    cfg = _config(d, z1.dtype)
    t = cfg.fwd
    _simcse_fwd_kernel[(triton.cdiv(N, t.block_m),)](
        z1, z2, z2 if hn is None else hn, norms, norms[N:], lse, row_loss,
        N, d, _LOG2E / temperature, NORM_EPS,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, **_meta(d, z1.dtype, cfg, hn is not None),
        num_warps=t.num_warps, num_stages=t.num_stages)
    loss = (row_loss.sum() / N).to(z1.dtype)
    return loss, norms, lse


def simcse_loss_bwd(grad: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                    hard_negatives: torch.Tensor | None, norms: torch.Tensor, lse: torch.Tensor,
                    need_dz1: bool = True, need_dz2: bool = True, need_dhn: bool = True):
    """Launch the backward kernels (no atomics: each gradient element is written by one program).

    Args:
        grad: the upstream gradient of the loss (one element, any float dtype, on z1's device).
        z1, z2, hard_negatives, temperature: the forward's inputs.
        norms, lse: the forward's fp32 row norms (N + M,) and row log-sum-exp (N,).
        need_dz1, need_dz2, need_dhn: skip the dz1 launch, and the column tiles of z2 or of the
            hard negatives in the dc launch, when their gradient is not needed.
    Returns:
        (dz1 or None, dz2 or None, dhn or None), each (N, d) in z1's dtype.
    """
    N, d, temperature = _check_kernel_inputs(z1, z2, hard_negatives, temperature)
    z1, z2 = _rows(z1), _rows(z2)
    hn = None if hard_negatives is None else _rows(hard_negatives)
    M = N if hn is None else 2 * N
    if norms.shape != (N + M,) or lse.shape != (N,) or norms.dtype != torch.float32 \
            or lse.dtype != torch.float32:
        raise ValueError(f"norms and lse must be fp32 of shapes ({N + M},) and ({N},), the "
                         "forward's statistics")
    if grad.numel() != 1:
        raise ValueError(f"grad must hold one element (the loss is a scalar), got shape "
                         f"{tuple(grad.shape)}")
    g = grad.detach().reshape(()).to(device=z1.device, dtype=torch.float32)
    cfg = _config(d, z1.dtype)
    meta = _meta(d, z1.dtype, cfg, hn is not None)
    hn_arg = z2 if hn is None else hn
    args = (N, d, 1.0 / temperature, 1.0 / N, NORM_EPS)
    dz1 = dz2 = dhn = None
    if need_dz1:
        dz1 = torch.empty_like(z1)
        t = cfg.dz1
        _simcse_bwd_dz1_kernel[(triton.cdiv(N, t.block_m), meta["NUM_D"])](
            z1, z2, hn_arg, norms, norms[N:], lse, g, dz1, *args,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, **meta,
            num_warps=t.num_warps, num_stages=t.num_stages)
    need_dhn = need_dhn and hn is not None
    if need_dz2 or need_dhn:
        dz2 = torch.empty_like(z2) if need_dz2 else None
        dhn = torch.empty_like(hn) if need_dhn else None
        t = cfg.dc
        tiles_z2 = triton.cdiv(N, t.block_n)  # column tiles of z2, then as many of hn
        tile0 = 0 if need_dz2 else tiles_z2
        tiles = tiles_z2 * (int(need_dz2) + int(need_dhn))
        _simcse_bwd_dc_kernel[(tiles, meta["NUM_D"])](
            z1, z2, hn_arg, norms, norms[N:], lse, g, dhn if dz2 is None else dz2,
            dz2 if dhn is None else dhn, *args, tile0,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, **meta,
            num_warps=t.num_warps, num_stages=t.num_stages)
    return dz1, dz2, dhn


# torch.library custom ops: torch.compile(fullgraph=True) traces through them (fake
# implementations give shapes and dtypes); gradients nobody needs come back as empty tensors.
@torch.library.custom_op(
    "minbert::simcse_loss", mutates_args=(),
    schema="(Tensor z1, Tensor z2, Tensor? hard_negatives, float temperature) -> (Tensor, Tensor, Tensor)")
def _simcse_loss_op(z1, z2, hard_negatives, temperature):
    return simcse_loss_fwd(z1, z2, temperature, hard_negatives)


@_simcse_loss_op.register_fake
def _(z1, z2, hard_negatives, temperature):
    N = z1.shape[0]
    M = N if hard_negatives is None else 2 * N
    return (z1.new_empty(()), z1.new_empty((N + M,), dtype=torch.float32),
            z1.new_empty((N,), dtype=torch.float32))


@torch.library.custom_op(
    "minbert::simcse_loss_bwd", mutates_args=(),
    schema="(Tensor grad, Tensor z1, Tensor z2, Tensor? hard_negatives, float temperature, "
           "Tensor norms, Tensor lse, bool[] needs) -> (Tensor, Tensor, Tensor)")
def _simcse_loss_bwd_op(grad, z1, z2, hard_negatives, temperature, norms, lse, needs):
    grads = simcse_loss_bwd(grad, z1, z2, temperature, hard_negatives, norms, lse, *needs)
    return tuple(op_output(g, z1) for g in grads)


@_simcse_loss_bwd_op.register_fake
def _(grad, z1, z2, hard_negatives, temperature, norms, lse, needs):
    like = (z1, z2, z2 if hard_negatives is None else hard_negatives)
    return tuple(fake_grad(t, need and (i < 2 or hard_negatives is not None))
                 for i, (t, need) in enumerate(zip(like, needs)))


class SimCSELossFunction:
    """Autograd of the ``minbert::simcse_loss`` op (``torch.library.register_autograd``): saves
    the inputs, the fp32 norms and row LSE (N + M + N floats), nothing of size N x M; the
    backward launches only what the needed gradients take."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        z1, z2, hard_negatives, temperature = inputs
        _, norms, lse = output
        ctx.save_for_backward(z1, z2, hard_negatives, norms, lse)
        ctx.temperature = temperature

    @staticmethod
    def backward(ctx, grad, dnorms, dlse):
        z1, z2, hn, norms, lse = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 ctx.needs_input_grad[2] and hn is not None]
        grads = torch.ops.minbert.simcse_loss_bwd(grad, z1, z2, hn, ctx.temperature, norms, lse, needs)
        return (*(needed_or_none(g, need) for g, need in zip(grads, needs)), None)


torch.library.register_autograd("minbert::simcse_loss", SimCSELossFunction.backward,
                                setup_context=SimCSELossFunction.setup_context)


def _simcse_loss_triton(z1, z2, temperature=0.05, hard_negatives=None):
    """The SimCSE loss on the Triton kernels; see ``simcse_loss_ref``. Returns a 0-d tensor."""
    _, _, temperature = _check_kernel_inputs(z1, z2, hard_negatives, temperature)  # (before the
    # op: a meta tensor would send it to its fake implementation, which checks nothing)
    return torch.ops.minbert.simcse_loss(z1, z2, hard_negatives, temperature)[0]


# ----------------------------------------------------------------------------- public functions
def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05,
                hard_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """SimCSE loss on the backend in force; see ``simcse_loss_ref``.

    Args:
        z1: (N, d) anchors; z2: (N, d) positives; hard_negatives: (N, d) or None.
        temperature: > 0, divides the cosine similarities.
    Returns:
        The mean cross-entropy over the N rows (0-d, z1's dtype).
    Raises:
        ValueError: mismatched shapes, dtypes or devices, N = 0, a non-positive temperature (and,
            on the Triton backend, an unsupported dtype, device or embedding size).
    """
    temperature = _check_temperature(temperature)
    _check_shapes(z1, z2, hard_negatives)
    impl = dispatch("simcse_loss", simcse_loss_ref, _simcse_loss_triton)
    return impl(z1, z2, temperature=temperature, hard_negatives=hard_negatives)


class SimCSELoss(nn.Module):
    """The SimCSE contrastive loss: ``loss = SimCSELoss(0.05)(z1, z2, hard_negatives=None)``."""

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor,
                hard_negatives: torch.Tensor | None = None) -> torch.Tensor:
        return simcse_loss(z1, z2, self.temperature, hard_negatives)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# ------------------------------------------------------------------------ check, compile, IO cases
def _normal(shape, gen: torch.Generator, device, dtype, scale: float = 1.0,
            requires_grad: bool = True) -> torch.Tensor:
    t = (torch.randn(tuple(shape), generator=gen) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def simcse_case(N: int, d: int, temperature: float = 0.05, hard_negatives: bool = False,
                zero_row: bool = False) -> OpCase:
    """An ``OpCase`` of the SimCSE loss on embeddings that keep every term of the gradient alive:
    z2 = 0.4 z1 + noise and hn = 0.25 z1 + noise (positives and hard negatives somewhat like their
    anchors, so P is spread and not saturated), each row scaled by a factor in [0.5, 2] (the
    normalisation's gradient matters). With ``zero_row`` row 0 of z1 and of the hard negatives is
    zero (the eps clamp; not for fp16, where 1 / eps overflows)."""
    parts = ["hn" if hard_negatives else "plain", f"tau={temperature:g}"]
    parts += ["zero row"] if zero_row else []
    name = f"simcse_loss[{' '.join(parts)}] N={N} d={d}"

    def make_inputs(device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)

        def rows(t):  # each row scaled by 2^u, u uniform in [-1, 1]
            return t * torch.exp2(2 * torch.rand((N, 1), generator=gen) - 1)

        z1 = torch.randn((N, d), generator=gen)
        z2 = rows(0.4 * z1 + torch.randn((N, d), generator=gen))
        hn = rows(0.25 * z1 + torch.randn((N, d), generator=gen)) if hard_negatives else None
        z1 = rows(z1)
        if zero_row:
            z1[0] = 0.0
            if hn is not None:
                hn[0] = 0.0

        def leaf(t):
            return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()

        return dict(z1=leaf(z1), z2=leaf(z2), temperature=temperature, hard_negatives=leaf(hn))

    return OpCase(name, make_inputs, _simcse_loss_triton, simcse_loss_ref)


def check_cases() -> list[OpCase]:
    """The cases ``python -m kernels.check`` runs: odd sizes, every d bucket, both switches."""
    return [
        simcse_case(1, 32),  # one pair: the loss is 0 and so are the gradients
        simcse_case(7, 32, hard_negatives=True),
        simcse_case(13, 100, temperature=1.0, hard_negatives=True),  # d not a power of two
        simcse_case(33, 384),
        simcse_case(70, 768, hard_negatives=True),  # partial row and column tiles
        simcse_case(9, 300, hard_negatives=True),  # d = 300: a masked chunk tail
    ]


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_CONSTEXPR_ARGS = {"BLOCK_M", "BLOCK_N", "BLOCK_D", "NUM_D", "BLOCK_K", "EVEN_D", "HAS_HN",
                   "RESIDENT", "INPUT_PRECISION", "BLOCK_R"}


def _signature(fn, dt: str) -> dict[str, str]:
    """Triton types of every argument of a SimCSE kernel with I/O dtype ``dt``."""
    types = {}
    for name in fn.arg_names:
        if name in ("Z1", "Z2", "HN", "DZ1", "DZ2", "DHN", "X"):
            types[name] = f"*{dt}"
        elif name in ("NORM1", "NORMC", "LSE", "ROW_LOSS", "G", "NORM"):
            types[name] = "*fp32"
        elif name in ("scale2", "eps", "inv_tau", "inv_n"):
            types[name] = "fp32"
        elif name in _CONSTEXPR_ARGS:
            types[name] = "constexpr"
        else:  # N, D, R
            types[name] = "i32"
    return types


# the embedding sizes compiled per _CONFIGS entry: the largest d of its range (most chunks, most
# shared memory), d = 32, 128, 384 where the range has them, and a d that is not a multiple of the
# chunk (masked chunk tails, EVEN_D False)
_COMPILE_DIMS = {(128, "16"): (32, 128, 80), (384, "16"): (384, 272), (768, "16"): (768, 720),
                 (768, "32"): (32, 128, 384, 768, 720), (768, "16u"): (100, 751),
                 (768, "32u"): (100, 751)}


def compile_specs() -> list[CompileSpec]:
    """One ``CompileSpec`` per (kernel, configuration the launcher can choose).

    For every ``_CONFIGS`` entry (a range of d, a dtype family, aligned or not), each d of
    ``_COMPILE_DIMS`` and each dtype of the family: the forward, dz1 and dc kernels with hard
    negatives (the heavier switch: the column tiles pick their tensor); without them too at the
    largest d in bf16 and fp32. The row-norm kernel per dtype and every BLOCK_D. ``attrs`` carry the
    divisibility-16 specialisation the JIT gives aligned pointers and widths that are multiples of
    16 (D, when it is one).
    """
    specs: list[CompileSpec] = []

    def add(kernel, fn, dt, const, warps, stages, label, d):
        sig = _signature(fn, dt)
        aligned = [k for k, t in sig.items() if t.startswith("*") or (k == "D" and d % 16 == 0)]
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
        specs.append(CompileSpec(kernel, fn, sig, const, warps, stages, label, attrs))

    for (max_d, kind), cfg in _CONFIGS.items():
        dtypes = (torch.float32,) if kind.startswith("32") else (torch.float16, torch.bfloat16)
        for d in _COMPILE_DIMS[(max_d, kind)]:
            for dtype in dtypes:
                dt = _TRITON_DTYPE[dtype]
                variants = [(True, "hn")]
                if d == max_d and dtype != torch.float16:
                    variants.append((False, "plain"))
                for has_hn, vname in variants:
                    meta = _meta(d, dtype, cfg, has_hn)
                    k_step = "" if cfg.resident else f" BLOCK_K={meta['BLOCK_K']}"
                    for fn, tile in ((_simcse_fwd_kernel, cfg.fwd),
                                     (_simcse_bwd_dz1_kernel, cfg.dz1),
                                     (_simcse_bwd_dc_kernel, cfg.dc)):
                        kernel = fn.__name__
                        const = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **meta)
                        add(kernel, fn, dt, const, tile.num_warps, tile.num_stages,
                            f"{kernel[8:-7]} d={d} {dt} {vname} BLOCK_M={tile.block_m} "
                            f"BLOCK_N={tile.block_n} BLOCK_D={meta['BLOCK_D']} "
                            f"NUM_D={meta['NUM_D']}{k_step} warps={tile.num_warps} "
                            f"stages={tile.num_stages}", d)
    for dtype in _SUPPORTED_DTYPES:
        dt = _TRITON_DTYPE[dtype]
        for block_d in (16, 32, 64, _NORM_BLOCK_D):  # every max(16, min(128, next_pow2(d)))
            add("_row_norm_kernel", _row_norm_kernel, dt,
                dict(BLOCK_R=_NORM_BLOCK_R, BLOCK_D=block_d), 4, 3,
                f"row_norm {dt} BLOCK_R={_NORM_BLOCK_R} BLOCK_D={block_d} warps=4", block_d)
    return specs


def simcse_lower_bound_bytes(N: int, d: int, dtype: torch.dtype, hard_negatives: bool) -> int:
    """Inputs read once and gradients written once: 2 (N + M) d itemsize, M = N or 2N."""
    size = torch.empty((), dtype=dtype).element_size()
    M = 2 * N if hard_negatives else N
    return 2 * (N + M) * d * size


def simcse_tiled_bytes(N: int, d: int, dtype: torch.dtype, hard_negatives: bool) -> int:
    """Global-memory bytes of forward + backward under the ``_CONFIGS`` tiling (no cache).

    With s = itemsize, T1 = N d s (z1), TC = M d s (the M columns: z2, hn), K = NUM_D d-chunks;
    n_f, n_1 = row blocks of the forward and dz1 kernels (cdiv(N, BLOCK_M)), n_c = column blocks
    of the dc kernel (cdiv(N, BLOCK_N) per column tensor); fp32 vectors count 4 bytes a row. A
    program reads its own block ``own`` bytes in all, the streamed operand once per own block:
      row norms: z1, z2, hn read once, norms written:                  T1 + TC + 4 (N + M)
      forward:   own rows + norms, the columns + norms once per row block, LSE and row losses
                 written:                                      own_f + 4N + n_f (TC + 4M) + 8N
      dz1:       per d-chunk: own rows + norms + LSE, the columns + norms once per row block, G
                 once per program; dz1 written:
                                         K (own_1 + 8N + n_1 (TC + 4M + 4)) + extra_1 + T1
      dc:        per d-chunk: own columns + norms, z1 + norms + LSE once per column block, G once
                 per program; dz2, dhn written:
                                         K (own_c + 4M + n_c (T1 + 8N + 4)) + extra_c + TC
    Resident (16-bit, d a multiple of 16): the own block is read once, own_f = own_1 = T1,
    own_c = TC, extra = 0. Otherwise (fp32, other d) the K loop rereads it for every streamed
    tile, own_f = c_f T1, own_1 = c_1 T1, own_c = m_c TC (c_f, c_1: column tiles of the forward
    and dz1, m_c: row tiles of dc), and the gradient products reload their chunks:
    extra_1 = n_1 TC + T1, extra_c = n_c T1 + TC. Masked-off lanes (padding rows, columns and
    chunk tails) move nothing, so these counts are exact.
    """
    size = torch.empty((), dtype=dtype).element_size()
    M = 2 * N if hard_negatives else N
    cfg = _config(d, dtype)
    K = _meta(d, dtype, cfg, hard_negatives)["NUM_D"]
    T1, TC = N * d * size, M * d * size

    def row_tiles(block):
        return triton.cdiv(N, block)

    def col_tiles(block):
        return triton.cdiv(N, block) * (M // N)

    n_f, n_1 = row_tiles(cfg.fwd.block_m), row_tiles(cfg.dz1.block_m)
    n_c = col_tiles(cfg.dc.block_n)
    if cfg.resident:
        own_f, own_1, own_c, extra_1, extra_c = T1, T1, TC, 0, 0
    else:
        own_f = col_tiles(cfg.fwd.block_n) * T1
        own_1 = col_tiles(cfg.dz1.block_n) * T1
        own_c = row_tiles(cfg.dc.block_m) * TC
        extra_1, extra_c = n_1 * TC + T1, n_c * T1 + TC
    norms = T1 + TC + 4 * (N + M)
    fwd = own_f + 4 * N + n_f * (TC + 4 * M) + 8 * N
    dz1 = K * (own_1 + 8 * N + n_1 * (TC + 4 * M + 4)) + extra_1 + T1
    dc = K * (own_c + 4 * M + n_c * (T1 + 8 * N + 4)) + extra_c + TC
    return norms + fwd + dz1 + dc


def io_cases(tokens: int, hidden: int, dtype: torch.dtype) -> list[IOCase]:
    """Forward + backward memory traffic of the SimCSE loss with N = tokens pairs of d = hidden.

    Two cases: unsupervised (z1, z2) and supervised (with hard negatives); none above
    ``SIMCSE_IO_MAX_N`` pairs or ``SIMCSE_MAX_DIM`` dims. Lower bound:
    ``simcse_lower_bound_bytes`` (inputs read once, gradients written once; the kernels' fp32
    scratch, 4 (2N + M) bytes, and the scalar loss are not in it); the kernels' total should not
    exceed ``simcse_tiled_bytes`` (formula there). flops: the products the kernels run, 2 N M d
    each: 1 in the forward, K + 1 in dz1 and K + 1 in dc (the logits recomputed per d-chunk):
    2 N M d (2 K + 3).
    """
    if hidden > SIMCSE_MAX_DIM or tokens > SIMCSE_IO_MAX_N:
        return []
    dev = torch.device("cpu")
    cases = []
    for hn in (False, True):
        gen = torch.Generator().manual_seed(hidden + hn)
        z1, z2, h = (_normal((tokens, hidden), gen, dev, dtype) for _ in range(3))
        h = h if hn else None
        inputs = (z1, z2) + ((h,) if hn else ())
        grad = torch.ones((), dtype=dtype)
        M = 2 * tokens if hn else tokens
        K = _meta(hidden, dtype, _config(hidden, dtype), hn)["NUM_D"]

        def run_kernel(z1=z1, z2=z2, h=h, inputs=inputs, grad=grad):
            return torch.autograd.grad(_simcse_loss_triton(z1, z2, 0.05, h), inputs, grad)

        def run_eager(z1=z1, z2=z2, h=h, inputs=inputs, grad=grad):
            return torch.autograd.grad(simcse_loss_ref(z1, z2, 0.05, h), inputs, grad)

        tiled = simcse_tiled_bytes(tokens, hidden, dtype, hn)
        cases.append(IOCase(
            f"simcse_loss fwd+bwd N={tokens} d={hidden} {'hard negatives' if hn else 'plain'} "
            f"(tiled {tiled / 1e6:.1f} MB)",
            run_kernel, run_eager, simcse_lower_bound_bytes(tokens, hidden, dtype, hn),
            2 * tokens * M * hidden * (2 * K + 3)))
    return cases
