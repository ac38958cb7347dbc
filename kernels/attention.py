"""Multi-head self-attention with a key-padding mask and dropout on the attention probabilities.

``attention(q, k, v, key_padding_mask, dropout_p, softmax_scale, seed)`` with q, k, v of shape
(B, H, L, D) and ``key_padding_mask`` (B, L) bool, True = keep. A query row whose keys are all
padding gives zeros (never NaN), in the forward and in every gradient.

This file holds every layer of the op: the FlashAttention-2-style Triton kernels (``_attention_*
_kernel``), their launchers (``attention_fwd`` / ``attention_bwd``), the autograd Function, the
functional form that dispatches on the kernels backend, and the eager reference ``attention_ref``
(it materialises the (B, H, L, L) scores) the kernels are tested against.

What is fused. Forward: ``softmax(q k^T * scale, key-padding masked) -> dropout -> @ v`` in one
kernel; each program owns BLOCK_M query rows of one (batch, head) and streams the keys in blocks
of BLOCK_N with the online softmax (running max and sum in fp32), so nothing of size L x L is
ever written to global memory; it also stores the row log-sum-exp (natural log, fp32, (B, H, L)).
Backward (three launches, no atomics, so gradients are bitwise reproducible):
``_attention_bwd_preprocess_kernel`` writes delta = rowsum(dO * O) (fp32, (B, H, L));
``_attention_bwd_dkdv_kernel``: each program owns a key block and loops over the query blocks,
recomputing P from q, k and the LSE; ``_attention_bwd_dq_kernel``: each program owns a query
block and loops over the key blocks. The dropout mask is regenerated from the seed everywhere.

Dtypes: q, k, v fp32 / fp16 / bf16 (all three alike); outputs and gradients in that dtype; scores,
softmax statistics and every accumulator fp32. 16-bit inputs: P and dS are rounded to the input
dtype for their matrix products (as FlashAttention does). fp32 inputs: the products run as
"tf32x3" (``FP32_INPUT_PRECISION``): three TF32 tensor-core products per product (each operand
split into a TF32 high part and a TF32 remainder; ``_mma`` writes them out), ~fp32 accuracy
(~1e-6 relative vs ~1e-3 for plain TF32) while staying on the tensor cores (wgmma on sm_90).
Plain "tf32" would break the fp32 error budget (2 x eager fp32's error, ``kernels.testing``) by
~100x, and "ieee" compiles to scalar FMAs (slower, and it spills at these tiles). The interpreter
computes every TF32 product exactly (so only the dropped lo x lo term differs there).

Sizes: any head dim 1 <= D <= 128, tiled as BLOCK_D = the next power of two >= max(16, D) (a
``tl.dot`` needs 16 columns): the head dim runs in D_CHUNK-column chunks and only a chunk that
runs past D masks its columns (``_chunk_mask``), so D = 16, 32, 64, 128 load whole rows as before
and D = 40, 80, 96 pay the padding in the products (80 and 96 compute 128 columns); D > 128 is a
``ValueError``. Any length 1 <= L <= 65536 (the dropout offset packs query and key index in 16
bits each); any B and H. q, k, v, dO may be strided
(the (B, L, H, D) -> (B, H, L, D) transpose minBERT makes is used in place); only the last
dimension must be contiguous (other layouts are copied). The output and the gradients take the
layout of their input (``empty_like``): in minBERT, O lands in (B, L, H, D) order, so the
model's ``out.transpose(1, 2).reshape(B, L, -1)`` is a view. Block sizes per (BLOCK_D, dtype) are in
``_CONFIGS`` (``compile_specs()``, ``python -m bench.compile --op attention``): on sm_90 every
``tl.dot`` becomes ``wgmma`` (num_warps a multiple of 4, the M side of each product 64 rows per
warpgroup), and no kernel spills registers on sm_80 or sm_90, for every head dim and dtype and
all four mask / dropout variants. fp32 gets there by three measures (the note above ``_mma``):
one accumulator for the three TF32 products, the head dim in ``D_CHUNK``-column chunks, and a
second load of the tile a backward iteration uses first and last (k in dQ, q in dK); at D=128
dK and dV also run as two launches (``GRADS``), because their two fp32 accumulators alone take
128 registers a thread. The tightest fp32 kernels sit at 240-255 registers on sm_80 (dK/dV at
every head dim, dQ at D=32, 40 and 64); on sm_90 the fp32 kernels use at most 194 (2026-12).
Loading the dropout seed from memory instead of a kernel argument (``_dropout_keep``) left most
kernels within a few registers of the int-seed build; the exceptions are 16-bit dQ with mask and
dropout on sm_80 (D=32: 128 -> 171, D=64: 183 -> 236) and 16-bit dQ with dropout at D=128 on
sm_90 (168 -> 187).

Dropout: one Philox-4x32-7 call decides 16 elements of P (``_dropout_keep``): the counter
(i * 2**12 + j // 16, b * H + h, seed) under a constant key (the seed in the counter, not the key,
keeps the round keys out of registers) gives 16 random bytes, and element (b, h, i, 16 * (j // 16)
+ t) is kept when byte t >= round(256 p). So p is applied in steps of 1/256
(``attention_dropout_p``: 0.1 -> 0.1015625, the scale 1 / (1 - that)), as FlashAttention's 8-bit
thresholds. One Philox-4x32-10 call per element had cost the forward at D=64 bf16 on sm_90 2.9x
the non-MMA SASS instructions of the mask-only build; this is 1.33x (dK/dV 1.32x, dQ 1.39x;
``python -m bench.compile --arch sm_90 --op attention``). The mask depends on (seed, b, h, i, j)
only, not on block sizes, the grid or L, so the backward regenerates it
exactly. The seed is a (1,) int64 tensor on the device that the kernels load (SEED pointer;
``kernels._utils.dropout_seed``): ``seed=None`` draws it there from torch's generator for that
device, an int is copied there, a tensor is used as given; no launcher reads a tensor value back
to the host, so a CUDA graph replays a fresh draw and ``torch.manual_seed`` reproduces runs. It is
not torch's dropout stream: tests get the mask from ``_attention_dropout_mask`` (same formula, a
tiny kernel) and hand it to ``attention_ref(..., dropout_mask=...)``.

Variable-length sequences: the kernels also run on packed (T, H, D) tokens with ``cu_seqlens``
(``VARLEN``), the layout of ``kernels.attention_varlen`` (kernels/attention_varlen.py holds its
launchers and reference); i and j are then positions inside each sequence, so both layouts drop
the same probabilities on real tokens.

Known limits: self-attention only (q, k, v of one shape); no causal mask or attention bias.

References:
    FlashAttention-2: https://arxiv.org/abs/2307.08691
    Triton fused-attention tutorial: https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._backend import dispatch
from ._utils import apply_dropout, check_seed, dropout_seed, op_output
from .testing import CompileSpec, IOCase, OpCase

ATTENTION_MAX_HEAD_DIM = 128  # any head dim 1..128 (tiled as BLOCK_D = next power of two >= 16)
ATTENTION_MAX_LEN = 1 << 16  # dropout offsets hold the query and the key index in 16 bits each
FP32_INPUT_PRECISION = "tf32x3"  # fp32 inputs: ~fp32-accurate products on the tensor cores
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
_PRE_BLOCK_M = 64  # rows per program of the delta preprocess
_MASK_BLOCK = 64  # tile of the debug dropout-mask kernel


# ----------------------------------------------------------------------------- eager reference
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


# ----------------------------------------------------------------------------- shared device code
# Philox-4x32-10 key of the dropout stream: a constant (the first two SHA-256 initial hash words),
# so the ten round keys are immediates. The seed goes into the counter instead (below). A key
# loaded from the SEED pointer would sit in ordinary registers with its ten derived round keys
# (a kernel argument sits in the constant bank, the round keys in uniform registers): that cost
# 20-85 registers per thread in the dropout kernels (bench.compile 2026-12: 16-bit dQ at D=32 on
# sm_80 128 -> 172, at D=64 on sm_90 128 -> 168; fp32 dK at D=128 on sm_80 168 -> 252), where
# the constant key keeps them at the registers of an int seed argument.
_PHILOX_KEY0 = tl.constexpr(0x6A09E667)
_PHILOX_KEY1 = tl.constexpr(0xBB67AE85)
# Philox-4x32-7, as FlashAttention's dropout (and Composable Kernel's port of it): seven rounds pass
# TestU01's BigCrush (Salmon et al., SC 2011, "Parallel random numbers: as easy as 1, 2, 3"; ten is
# their default safety margin). Three rounds fewer cut about 36 instructions a thread from each
# dropout kernel (two calls a thread per 128 x 64 tile).
_PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def _dropout_keep(seed, bh, q_start, k_start, drop_threshold, BLOCK_Q: tl.constexpr,
                  BLOCK_K: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
    """Bool tile, True where P[b, h, i, j] survives dropout, for queries i in [q_start, q_start +
    BLOCK_Q) and keys j in [k_start, k_start + BLOCK_K): shape (BLOCK_Q, BLOCK_K), or (BLOCK_K,
    BLOCK_Q) when ``KEYS_ON_ROWS`` (the transposed tiles of dK/dV).

    One Philox-4x32-7 call decides 16 elements: the counter (i << 12 | j // 16, bh = b * H + h,
    seed low word, seed high word) under the constant key gives 4 x 32 bits, and byte t of them
    (word t // 4, bits 8 * (t % 4) and up) keeps element (i, 16 * (j // 16) + t) when it is >=
    ``drop_threshold`` = round(256 p) (``attention_dropout_p``: p in steps of 1/256, as
    FlashAttention's 8-bit thresholds). Distinct (seed, b, h, i, j // 16) give distinct counters;
    the mask depends on (seed, b, h, i, j) only, not on block sizes (multiples of 16, tiles start
    at multiples of their size), on L or on the layout (padded or packed).
    """
    G: tl.constexpr = BLOCK_K // 16
    rows = q_start + tl.arange(0, BLOCK_Q)
    groups = k_start // 16 + tl.arange(0, G)
    if KEYS_ON_ROWS:
        c0 = (rows[None, :].to(tl.uint32) << 12) | groups[:, None].to(tl.uint32)  # (G, BLOCK_Q)
    else:
        c0 = (rows[:, None].to(tl.uint32) << 12) | groups[None, :].to(tl.uint32)  # (BLOCK_Q, G)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox_impl(c0, zero + bh.to(tl.uint32), zero + seed.to(tl.uint32),
                                    zero + (seed >> 32).to(tl.uint32), _PHILOX_KEY0, _PHILOX_KEY1,
                                    n_rounds=_PHILOX_ROUNDS)
    # words[..., w] = r_w (join's new axis is the last; join(join(r0, r2), join(r1, r3))[..., a,
    # b] = r_(2a + b)). Byte t of word w decides: shifted left by 24 - 8t it is the top byte, and
    # (word << (24 - 8t)) >= threshold << 24 (unsigned) iff byte t >= threshold (the bytes below
    # add less than 2**24): one shift and one compare per element.
    ups = (24 - tl.arange(0, 4) * 8).to(tl.uint32)
    cut = drop_threshold.to(tl.uint32) << 24
    if KEYS_ON_ROWS:
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (G, BLOCK_Q, 4))
        words = tl.permute(words, (0, 2, 1))  # (G, 4, BLOCK_Q)
        tops = words[:, :, None, :] << ups[None, None, :, None]  # (G, 4, 4, BLOCK_Q)
        tops = tl.reshape(tops, (BLOCK_K, BLOCK_Q))
    else:
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_Q, G, 4))
        tops = words[:, :, :, None] << ups[None, None, None, :]  # (BLOCK_Q, G, 4, 4)
        tops = tl.reshape(tops, (BLOCK_Q, BLOCK_K))
    return tops >= cut


@triton.jit
def _program_tile(CU_SEQLENS, H, L, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """Where program ``tl.program_id(0)`` of a 1-D grid of ``cdiv(L, BLOCK) * B * H`` works.

    Returns (b, h, bh = b * H + h, start, seq_start, seq_len): the program owns rows
    [start, start + BLOCK) (positions inside the sequence) of sequence b, head h. The tiles of one
    head are neighbours, so its K and V stay in L2, and no grid dimension meets the 65535 limit.
    Padded: every sequence has length L and is found through the batch stride (seq_start 0).
    VARLEN: L is the longest length, sequence b is rows [cu[b], cu[b + 1]) of the packed tensors;
    a tile with start >= seq_len lies past the end of a shorter sequence and has nothing to do.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(L, BLOCK)
    start = (pid % n_tiles) * BLOCK
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    if VARLEN:
        first = tl.load(CU_SEQLENS + b)
        seq_len = tl.load(CU_SEQLENS + b + 1) - first
        seq_start = first.to(tl.int64)
    else:
        seq_start = b * 0
        seq_len = L
    return b, h, bh, start, seq_start, seq_len


@triton.jit
def _base(b, h, seq_start, stride_b, stride_h, stride_l):
    """Element offset (int64) of row 0 of sequence b, head h: padded, b * stride_b + h * stride_h;
    packed (stride_b = 0), seq_start * stride_l + h * stride_h."""
    return b * stride_b + h * stride_h + seq_start * stride_l


@triton.jit
def _chunk_mask(rows_ok, c: tl.constexpr, D_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr,
                COLS_FIRST: tl.constexpr):
    """Load/store mask of head-dim chunk ``c`` (columns [c * D_CHUNK, (c + 1) * D_CHUNK)) of a tile
    whose row mask is ``rows_ok`` (already 2-D). Only the chunk that runs past HEAD_DIM (a head dim
    that is not a multiple of D_CHUNK: BLOCK_D padding) adds a column mask; whole chunks keep the
    row mask alone, so their loads stay as vectorised as before. COLS_FIRST: a transposed tile
    (D_CHUNK, rows)."""
    mask = rows_ok
    if (c + 1) * D_CHUNK > HEAD_DIM:
        cols = c * D_CHUNK + tl.arange(0, D_CHUNK) < HEAD_DIM
        if COLS_FIRST:
            mask = mask & cols[:, None]
        else:
            mask = mask & cols[None, :]
    return mask


# fp32 products and registers. tf32x3 splits each fp32 operand into a TF32 high part and a
# remainder, so an operand takes twice its registers, and with Triton's own "tf32x3" fp32 dK/dV
# at D=64 spilled and every D=128 tile spilled 0.5-25 KB. Three measures keep every fp32 kernel
# free of spills on sm_80 and sm_90 (bench.compile, 2026-11, Triton 3.9):
#   1. ``_mma`` writes the three products out into the caller's accumulator. Triton's "tf32x3"
#      sums the two small products in a second accumulator that, on sm_90, is converted between
#      wgmma layouts every iteration (fp32 forward at D=64 on sm_80: 228 -> 199 registers).
#   2. The kernels take the head dim in D_CHUNK-column chunks (tuples of tiles; 16-bit inputs use
#      one chunk, D_CHUNK = BLOCK_D), so the split halves of one product are D_CHUNK wide (fp32
#      forward at D=64: 199 -> 158 registers on sm_80, 154 -> 102 on sm_90).
#   3. A tile used by the first and the last product of a loop iteration (k^T in dQ: S and dQ;
#      q^T in dK/dV: S^T and dK) is loaded a second time, in the other orientation, for the last
#      one (an L1 hit, ``fa2_tiled_bytes`` counts it) instead of keeping its split halves live
#      across the iteration: fp32 dQ at D=128 on sm_80 goes from 255 registers + 180 B of spills
#      to 168 registers. 16-bit inputs keep the single load.
# At D=128 the two fp32 dK/dV accumulators alone are 128 registers a thread (16 rows x 128
# columns per warp each), so there dK and dV run as two launches (``_AttentionConfig.split_dkdv``,
# GRADS "dk" and "dv"), one accumulator each; S^T is computed twice (5 products instead of 4).
@triton.jit
def _tf32_split(x):
    """fp32 ``x`` as ``hi + lo``: hi is x rounded to TF32 (10 mantissa bits, ties away from zero,
    like ``cvt.rna.tf32.f32``), lo = x - hi exactly (|lo| <= 2**-11 |x|)."""
    hi = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b``. "tf32x3" (fp32 operands): hi*hi + lo*hi + hi*lo as three TF32 tensor-core
    products accumulated into ``acc`` (lo*lo, ~2**-22 relative, is dropped), the scheme of Triton's
    own "tf32x3", written out so that the three products share one accumulator and its layout
    (Triton's keeps the two small products in a separate accumulator, converted between wgmma
    layouts every iteration). Any other precision: one ``tl.dot``."""
    if INPUT_PRECISION == "tf32x3":
        a_hi, a_lo = _tf32_split(a)
        b_hi, b_lo = _tf32_split(b)
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _last_operand(ptrs, mask, tile_t, INPUT_PRECISION: tl.constexpr):
    """``tile_t^T`` for the last product of a backward iteration (k in dQ, q in dK). fp32 loads it
    again from ``ptrs`` (an L1 hit; measure 3 of the note above ``_mma``), 16-bit transposes the
    tile it holds."""
    if INPUT_PRECISION == "tf32x3":
        tile = tl.load(ptrs, mask=mask, other=0.0)
    else:
        tile = tl.trans(tile_t)
    return tile


# Every kernel below serves both layouts. Padded (VARLEN=False): q, k, v, o and their gradients
# are (B, H, L, D) strided, LSE and delta (B, H, L). Packed (VARLEN=True, ``kernels.
# attention_varlen``): (T, H, D) tensors passed with stride_b = 0 and stride_l = the token stride,
# LSE and delta (H, T), sequence b is rows [cu[b], cu[b + 1]) (``_program_tile``), L is the
# longest length (it sizes the grid), HAS_MASK is off (keys past a sequence's end are out of its
# range). The head dim runs in N_CHUNKS = cdiv(HEAD_DIM, D_CHUNK) column chunks (tuples of
# tiles), the last one masked when D_CHUNK does not divide HEAD_DIM (``_chunk_mask``).
@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, H, L, D) queries, strided, last dim contiguous (packed: (T, H, D)); the I/O dtype
    K,  # keys, like Q
    V,  # values, like Q
    MASK,  # (B, L) uint8 key keep-mask, 1 = real token (read when HAS_MASK)
    CU_SEQLENS,  # (B + 1,) int32 cumulative sequence lengths (read when VARLEN)
    SEED,  # (1,) int64 dropout seed (read when HAS_DROPOUT)
    O,  # output like Q, q's dtype, strided
    LSE,  # fp32 natural-log log-sum-exp of each row's scaled scores: (B, H, L) or (H, T)
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_mb,
    stride_lb, stride_lh,  # LSE: (H * L, L) padded, (0, T) packed
    H, L, qk_scale, drop_threshold, dropout_scale,  # qk_scale = softmax_scale * log2(e)
    HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # program (bh, m) owns query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of one sequence and head
    N_CHUNKS: tl.constexpr = (HEAD_DIM + D_CHUNK - 1) // D_CHUNK
    b, h, bh, start_m, seq_start, seq_len = _program_tile(CU_SEQLENS, H, L, BLOCK_M, VARLEN)
    if VARLEN:
        if start_m >= seq_len:  # past the end of a shorter sequence
            return
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_CHUNK)
    m_valid = offs_m < seq_len
    q_ptrs = Q + _base(b, h, seq_start, stride_qb, stride_qh, stride_ql) \
        + offs_m[:, None] * stride_ql + offs_d[None, :]
    k_ptrs = K + _base(b, h, seq_start, stride_kb, stride_kh, stride_kl) \
        + offs_n[None, :] * stride_kl + offs_d[:, None]  # K^T
    v_ptrs = V + _base(b, h, seq_start, stride_vb, stride_vh, stride_vl) \
        + offs_n[:, None] * stride_vl + offs_d[None, :]
    q = ()
    acc = ()
    for c in tl.static_range(N_CHUNKS):
        # (BLOCK_M, D_CHUNK)
        q += (tl.load(q_ptrs + c * D_CHUNK, mask=_chunk_mask(m_valid[:, None], c, D_CHUNK, HEAD_DIM,
                                                            False), other=0.0),)
        acc += (tl.zeros([BLOCK_M, D_CHUNK], dtype=tl.float32),)
    # running max (log2 units) starts finite: a row whose keys are all masked keeps m = -1e30,
    # p = exp2(-inf) = 0 and alpha = 1, never inf - inf
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        kn = start_n + offs_n
        n_valid = kn < seq_len
        if HAS_MASK:
            keep_key = tl.load(MASK + b * stride_mb + kn, mask=n_valid, other=0) != 0
        else:
            keep_key = n_valid
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):
            k = tl.load(k_ptrs + start_n * stride_kl + c * D_CHUNK,
                        mask=_chunk_mask(n_valid[None, :], c, D_CHUNK, HEAD_DIM, True),
                        other=0.0)  # (D_CHUNK, BLOCK_N)
            s = _mma(q[c], k, s, INPUT_PRECISION)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(keep_key[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator: before dropout
        scaled = ()
        for c in tl.static_range(N_CHUNKS):
            scaled += (acc[c] * alpha[:, None],)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, False)
            p = tl.where(keep, p, 0.0)
        acc = ()
        for c in tl.static_range(N_CHUNKS):
            v = tl.load(v_ptrs + start_n * stride_vl + c * D_CHUNK,
                        mask=_chunk_mask(n_valid[:, None], c, D_CHUNK, HEAD_DIM, False),
                        other=0.0)  # (BLOCK_N, D_CHUNK)
            acc += (_mma(p.to(v.dtype), v, scaled[c], INPUT_PRECISION),)
        m_i = m_new
    empty = l_i == 0.0  # every key of the row is padding
    out = ()
    for c in tl.static_range(N_CHUNKS):  # acc = 0 on empty rows: zeros
        out += (acc[c] * (dropout_scale / tl.where(empty, 1.0, l_i))[:, None],)
    lse = tl.where(empty, float("inf"),
                   (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln 2
    o_ptrs = O + _base(b, h, seq_start, stride_ob, stride_oh, stride_ol) \
        + offs_m[:, None] * stride_ol + offs_d[None, :]
    for c in tl.static_range(N_CHUNKS):
        tl.store(o_ptrs + c * D_CHUNK, out[c].to(O.dtype.element_ty),
                 mask=_chunk_mask(m_valid[:, None], c, D_CHUNK, HEAD_DIM, False))
    tl.store(LSE + _base(b, h, seq_start, stride_lb, stride_lh, 1) + offs_m, lse, mask=m_valid)


# Backward math, per (batch, head); S = scale * Q K^T, P = softmax(S) over unpadded keys,
# Z = keep / (1 - p) (dropout), O = (P * Z) V, dO the upstream gradient:
#   dV    = (P * Z)^T dO
#   dP    = (dO V^T) * Z
#   delta = rowsum(P * dP) = rowsum(dO * O)        (the preprocess kernel; it holds with dropout)
#   dS    = P * (dP - delta[:, None])
#   dQ    = scale * dS K,   dK = scale * dS^T Q
# P is recomputed as exp(S - LSE); an all-padding row has LSE = +inf, so its P, dS, dQ and its
# contributions to dK and dV are exactly 0. Queries past L load LSE = +inf: also P = 0.
@triton.jit
def _attention_bwd_preprocess_kernel(
    O,  # (B, H, L, D) forward output, strided (packed: (T, H, D) seen as B = 1, L = T)
    DO,  # (B, H, L, D) upstream gradient, strided
    DELTA,  # (B, H, L) fp32 contiguous: rowsum(dO * O) (packed: (H, T))
    stride_ob, stride_oh, stride_ol,
    stride_dob, stride_doh, stride_dol,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)  # 1-D grid over (bh, row tile), as in the forward
    n_tiles = tl.cdiv(L, BLOCK_M)
    start_m = (pid % n_tiles) * BLOCK_M
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _chunk_mask((offs_m < L)[:, None], 0, BLOCK_D, HEAD_DIM, False)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, axis=1), mask=offs_m < L)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, L, D) queries, strided (packed: (T, H, D))
    K,  # keys, like Q
    V,  # values, like Q
    MASK,  # (B, L) uint8 key keep-mask (read when HAS_MASK)
    CU_SEQLENS,  # (B + 1,) int32 cumulative sequence lengths (read when VARLEN)
    SEED,  # (1,) int64 dropout seed (read when HAS_DROPOUT)
    DO,  # upstream gradient of O, like Q
    LSE,  # (B, H, L) or (H, T) fp32 from the forward
    DELTA,  # like LSE: fp32 rowsum(dO * O)
    DK,  # gradient of k, k's dtype, strided like Q
    DV,  # gradient of v
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    stride_mb,
    stride_lb, stride_lh,  # LSE and DELTA
    H, L, qk_scale, sm_scale, drop_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    GRADS: tl.constexpr,  # "dkdv": both; "dk" or "dv": one of them (one accumulator)
):
    # program (bh, n) owns keys [n * BLOCK_N, (n + 1) * BLOCK_N) of one sequence and head and
    # loops over all its query blocks. Tiles are transposed (keys x queries) so that the key block
    # is the M side of every product (the 64-row wgmma tile on sm_90). k, v, dK, dV, q and dO are
    # tuples of N_CHUNKS column chunks.
    N_CHUNKS: tl.constexpr = (HEAD_DIM + D_CHUNK - 1) // D_CHUNK
    b, h, bh, start_n, seq_start, seq_len = _program_tile(CU_SEQLENS, H, L, BLOCK_N, VARLEN)
    if VARLEN:
        if start_n >= seq_len:  # past the end of a shorter sequence
            return
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_CHUNK)
    n_valid = offs_n < seq_len
    if HAS_MASK:
        keep_key = tl.load(MASK + b * stride_mb + offs_n, mask=n_valid, other=0) != 0
    else:
        keep_key = n_valid
    k_ptrs = K + _base(b, h, seq_start, stride_kb, stride_kh, stride_kl) \
        + offs_n[:, None] * stride_kl + offs_d[None, :]
    v_ptrs = V + _base(b, h, seq_start, stride_vb, stride_vh, stride_vl) \
        + offs_n[:, None] * stride_vl + offs_d[None, :]
    k = ()
    v = ()
    dk = ()
    dv = ()
    for c in tl.static_range(N_CHUNKS):
        # (BLOCK_N, D_CHUNK)
        kv_mask = _chunk_mask(n_valid[:, None], c, D_CHUNK, HEAD_DIM, False)
        k += (tl.load(k_ptrs + c * D_CHUNK, mask=kv_mask, other=0.0),)
        if GRADS != "dv":
            v += (tl.load(v_ptrs + c * D_CHUNK, mask=kv_mask, other=0.0),)
        dk += (tl.zeros([BLOCK_N, D_CHUNK], dtype=tl.float32),)
        dv += (tl.zeros([BLOCK_N, D_CHUNK], dtype=tl.float32),)
    q_base = Q + _base(b, h, seq_start, stride_qb, stride_qh, stride_ql)
    qT_ptrs = q_base + offs_m[None, :] * stride_ql + offs_d[:, None]
    q_ptrs = q_base + offs_m[:, None] * stride_ql + offs_d[None, :]
    do_ptrs = DO + _base(b, h, seq_start, stride_dob, stride_doh, stride_dol) \
        + offs_m[:, None] * stride_dol + offs_d[None, :]
    row_base = _base(b, h, seq_start, stride_lb, stride_lh, 1)
    # a block of padding keys has dK = dV = 0: skip the loop
    hi = tl.where(tl.sum(keep_key.to(tl.int32), 0) > 0, seq_len, 0)
    for start_m in range(0, hi, BLOCK_M):
        qm = start_m + offs_m
        m_valid = qm < seq_len
        qT = ()
        sT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):
            qT += (tl.load(qT_ptrs + start_m * stride_ql + c * D_CHUNK,
                           mask=_chunk_mask(m_valid[None, :], c, D_CHUNK, HEAD_DIM, True),
                           other=0.0),)  # (D_CHUNK, BLOCK_M)
        lse = tl.load(LSE + row_base + qm, mask=m_valid, other=float("inf")) * 1.4426950408889634
        for c in tl.static_range(N_CHUNKS):
            sT = _mma(k[c], qT[c], sT, INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(tl.fma(sT, qk_scale, -lse[None, :]))  # log2 units, one rounding
        pT = tl.where(keep_key[:, None], pT, 0.0)
        do = ()
        dpT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):
            do += (tl.load(do_ptrs + start_m * stride_dol + c * D_CHUNK,
                           mask=_chunk_mask(m_valid[:, None], c, D_CHUNK, HEAD_DIM, False),
                           other=0.0),)  # (BLOCK_M, D_CHUNK)
            if GRADS != "dv":
                dpT = _mma(v[c], tl.trans(do[c]), dpT, INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, True)
            pdT = tl.where(keep, pT * dropout_scale, 0.0)
            dpT = tl.where(keep, dpT * dropout_scale, 0.0)
        else:
            pdT = pT
        if GRADS != "dk":
            new_dv = ()
            for c in tl.static_range(N_CHUNKS):
                new_dv += (_mma(pdT.to(do[c].dtype), do[c], dv[c], INPUT_PRECISION),)
            dv = new_dv
        if GRADS != "dv":
            delta = tl.load(DELTA + row_base + qm, mask=m_valid, other=0.0)
            dsT = pT * (dpT - delta[None, :])
            new_dk = ()
            for c in tl.static_range(N_CHUNKS):
                q = _last_operand(q_ptrs + start_m * stride_ql + c * D_CHUNK,
                                  _chunk_mask(m_valid[:, None], c, D_CHUNK, HEAD_DIM, False),
                                  qT[c], INPUT_PRECISION)  # (BLOCK_M, D_CHUNK)
                new_dk += (_mma(dsT.to(q.dtype), q, dk[c], INPUT_PRECISION),)
            dk = new_dk
    dk_ptrs = DK + _base(b, h, seq_start, stride_dkb, stride_dkh, stride_dkl) \
        + offs_n[:, None] * stride_dkl + offs_d[None, :]
    dv_ptrs = DV + _base(b, h, seq_start, stride_dvb, stride_dvh, stride_dvl) \
        + offs_n[:, None] * stride_dvl + offs_d[None, :]
    for c in tl.static_range(N_CHUNKS):
        kv_mask = _chunk_mask(n_valid[:, None], c, D_CHUNK, HEAD_DIM, False)
        if GRADS != "dv":
            tl.store(dk_ptrs + c * D_CHUNK, (dk[c] * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        if GRADS != "dk":
            tl.store(dv_ptrs + c * D_CHUNK, dv[c].to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (B, H, L, D) queries, strided (packed: (T, H, D))
    K,  # keys, like Q
    V,  # values, like Q
    MASK,  # (B, L) uint8 key keep-mask (read when HAS_MASK)
    CU_SEQLENS,  # (B + 1,) int32 cumulative sequence lengths (read when VARLEN)
    SEED,  # (1,) int64 dropout seed (read when HAS_DROPOUT)
    DO,  # upstream gradient of O, like Q
    LSE,  # (B, H, L) or (H, T) fp32 from the forward
    DELTA,  # like LSE: fp32 rowsum(dO * O)
    DQ,  # gradient of q, q's dtype, strided like Q
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dqb, stride_dqh, stride_dql,
    stride_mb,
    stride_lb, stride_lh,  # LSE and DELTA
    H, L, qk_scale, sm_scale, drop_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # program (bh, m) owns query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of one sequence and head and
    # loops over all its key blocks; q, dO, dQ, k and v are tuples of N_CHUNKS column chunks
    N_CHUNKS: tl.constexpr = (HEAD_DIM + D_CHUNK - 1) // D_CHUNK
    b, h, bh, start_m, seq_start, seq_len = _program_tile(CU_SEQLENS, H, L, BLOCK_M, VARLEN)
    if VARLEN:
        if start_m >= seq_len:  # past the end of a shorter sequence
            return
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_CHUNK)
    m_valid = offs_m < seq_len
    q_ptrs = Q + _base(b, h, seq_start, stride_qb, stride_qh, stride_ql) \
        + offs_m[:, None] * stride_ql + offs_d[None, :]
    do_ptrs = DO + _base(b, h, seq_start, stride_dob, stride_doh, stride_dol) \
        + offs_m[:, None] * stride_dol + offs_d[None, :]
    q = ()
    do = ()
    dq = ()
    for c in tl.static_range(N_CHUNKS):
        # (BLOCK_M, D_CHUNK)
        row_mask = _chunk_mask(m_valid[:, None], c, D_CHUNK, HEAD_DIM, False)
        q += (tl.load(q_ptrs + c * D_CHUNK, mask=row_mask, other=0.0),)
        do += (tl.load(do_ptrs + c * D_CHUNK, mask=row_mask, other=0.0),)
        dq += (tl.zeros([BLOCK_M, D_CHUNK], dtype=tl.float32),)
    row_base = _base(b, h, seq_start, stride_lb, stride_lh, 1)
    lse = tl.load(LSE + row_base + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_valid, other=0.0)
    k_base = K + _base(b, h, seq_start, stride_kb, stride_kh, stride_kl)
    kT_ptrs = k_base + offs_n[None, :] * stride_kl + offs_d[:, None]
    k_ptrs = k_base + offs_n[:, None] * stride_kl + offs_d[None, :]
    vT_ptrs = V + _base(b, h, seq_start, stride_vb, stride_vh, stride_vl) \
        + offs_n[None, :] * stride_vl + offs_d[:, None]
    for start_n in range(0, seq_len, BLOCK_N):
        kn = start_n + offs_n
        n_valid = kn < seq_len
        if HAS_MASK:
            keep_key = tl.load(MASK + b * stride_mb + kn, mask=n_valid, other=0) != 0
        else:
            keep_key = n_valid
        kT = ()
        vT = ()
        for c in tl.static_range(N_CHUNKS):
            col_mask = _chunk_mask(n_valid[None, :], c, D_CHUNK, HEAD_DIM, True)
            kT += (tl.load(kT_ptrs + start_n * stride_kl + c * D_CHUNK, mask=col_mask,
                           other=0.0),)  # (D_CHUNK, BLOCK_N)
            vT += (tl.load(vT_ptrs + start_n * stride_vl + c * D_CHUNK, mask=col_mask, other=0.0),)
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):
            s = _mma(q[c], kT[c], s, INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(tl.fma(s, qk_scale, -lse[:, None]))  # log2 units, one rounding
        p = tl.where(keep_key[None, :], p, 0.0)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):
            dp = _mma(do[c], vT[c], dp, INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, False)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        new_dq = ()
        for c in tl.static_range(N_CHUNKS):
            k = _last_operand(k_ptrs + start_n * stride_kl + c * D_CHUNK,
                              _chunk_mask(n_valid[:, None], c, D_CHUNK, HEAD_DIM, False), kT[c],
                              INPUT_PRECISION)  # (BLOCK_N, D_CHUNK)
            new_dq += (_mma(ds.to(k.dtype), k, dq[c], INPUT_PRECISION),)
        dq = new_dq
    dq_ptrs = DQ + _base(b, h, seq_start, stride_dqb, stride_dqh, stride_dql) \
        + offs_m[:, None] * stride_dql + offs_d[None, :]
    for c in tl.static_range(N_CHUNKS):
        tl.store(dq_ptrs + c * D_CHUNK, (dq[c] * sm_scale).to(DQ.dtype.element_ty),
                 mask=_chunk_mask(m_valid[:, None], c, D_CHUNK, HEAD_DIM, False))


@triton.jit
def _attention_dropout_mask_kernel(
    KEEP,  # (B * H, L, L) int8 keep-mask, 1 = kept (viewed as bool by the launcher)
    SEED,  # (1,) int64 dropout seed
    L, drop_threshold,
    BLOCK: tl.constexpr,
):
    # debug path: grid (cdiv(L, BLOCK), cdiv(L, BLOCK), B * H), the kernels' _dropout_keep
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(2).to(tl.int64)
    keep = _dropout_keep(tl.load(SEED), bh, tl.program_id(0) * BLOCK, tl.program_id(1) * BLOCK,
                          drop_threshold, BLOCK, BLOCK, False)
    tl.store(KEEP + bh * L * L + offs_m[:, None] * L + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < L) & (offs_n[None, :] < L))

# ----------------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class _Tile:
    """One kernel's launch configuration."""

    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    d_chunk: int | None = None  # head-dim columns per chunk (D_CHUNK); None: the whole BLOCK_D
    dropout_stages: int | None = None  # num_stages with dropout on; None: num_stages

    def stages(self, has_dropout: bool) -> int:
        """num_stages of a launch with or without dropout."""
        return self.dropout_stages if has_dropout and self.dropout_stages else self.num_stages

    def chunk(self, head_dim: int) -> int:
        """D_CHUNK for ``head_dim``: the padded head (``block_d``), or d_chunk columns when smaller."""
        bd = block_d(head_dim)
        return bd if self.d_chunk is None else min(self.d_chunk, bd)


@dataclass(frozen=True)
class _AttentionConfig:
    fwd: _Tile
    dkdv: _Tile  # block_n: the key block a program owns; block_m: the query tile it loops over
    dq: _Tile  # block_m: the query block a program owns; block_n: the key tile it loops over
    split_dkdv: bool = False  # dK and dV in two launches (GRADS "dk", "dv"), one accumulator each

    @property
    def dkdv_grads(self) -> tuple[str, ...]:
        return ("dk", "dv") if self.split_dkdv else ("dkdv",)


# (BLOCK_D, "16" for fp16/bf16 or "32" for fp32) -> tiles, chosen with bench.compile over all
# four switch settings (2026-11, Triton 3.9): no spills on sm_80 / sm_90, shared memory within
# both, wgmma on sm_90 (num_warps a multiple of 4 and the products' M side, BLOCK_M in the
# forward and dQ and BLOCK_N in dK/dV, 64 rows per warpgroup). Larger tiles spill (e.g. 16-bit dQ
# at 128 x 64 on sm_80; fp32 dK/dV at 32 x 64, 208-272 B on sm_80); the register counts of the
# chosen ones are in the compile report. fp32 (the note above ``_mma``): d_chunk 16 for dK/dV
# (255 registers with dropout on sm_80 at D=64, 76 B of spills with d_chunk 64), 32 elsewhere;
# D=128 keeps the M side at 64 rows on 4 warps (a 128-row dQ tile needs 268 KB of shared memory)
# and splits dK/dV (one launch holding both spilled 168-588 B on sm_80 at every tile tried).
# BLOCK_D = 16 (head dims 1-16) takes the D = 32 tiles, but for fp32 dQ at 64 x 16 (64 x 32
# spilled 8 B on sm_80). Dropout (16 decisions per Philox call, ``_dropout_keep``) runs at
# num_stages 1 (``dropout_stages``) where two stages spilled 8-20 B on sm_80: 16-bit dK/dV at
# BLOCK_D = 128 and the fp32 forward at D = 80 and 96; every other launch keeps its stages.
_CONFIGS: dict[tuple[int, str], _AttentionConfig] = {
    (16, "16"): _AttentionConfig(_Tile(128, 64, 8, 3), _Tile(64, 128, 8, 2), _Tile(128, 32, 8, 2)),
    (32, "16"): _AttentionConfig(_Tile(128, 64, 8, 3), _Tile(64, 128, 8, 2), _Tile(128, 32, 8, 2)),
    (64, "16"): _AttentionConfig(_Tile(128, 64, 8, 3), _Tile(32, 128, 8, 2), _Tile(128, 32, 8, 2)),
    (128, "16"): _AttentionConfig(_Tile(128, 32, 8, 2), _Tile(16, 128, 8, 2, dropout_stages=1),
                                  _Tile(64, 32, 4, 2)),
    (16, "32"): _AttentionConfig(_Tile(64, 16, 4, 2), _Tile(16, 64, 4, 2), _Tile(64, 16, 4, 2)),
    (32, "32"): _AttentionConfig(_Tile(64, 16, 4, 2), _Tile(16, 64, 4, 2), _Tile(64, 32, 4, 2)),
    (64, "32"): _AttentionConfig(_Tile(64, 16, 4, 2, d_chunk=32), _Tile(16, 64, 4, 2, d_chunk=16),
                                 _Tile(64, 16, 8, 2)),
    (128, "32"): _AttentionConfig(_Tile(64, 16, 4, 2, d_chunk=32, dropout_stages=1),
                                  _Tile(16, 64, 4, 2, d_chunk=16),
                                  _Tile(64, 16, 4, 2, d_chunk=32), split_dkdv=True),
}


def block_d(head_dim: int) -> int:
    """The padded head dim the kernels tile: the next power of two >= max(16, head_dim) (a
    ``tl.dot`` needs 16 columns or more); columns past ``head_dim`` are masked off."""
    return max(16, triton.next_power_of_2(head_dim))


def _config(head_dim: int, dtype: torch.dtype) -> _AttentionConfig:
    return _CONFIGS[(block_d(head_dim), "32" if dtype == torch.float32 else "16")]


def _input_precision(dtype: torch.dtype) -> str:
    # only fp32 operands read it; 16-bit products are exact in fp32 accumulation either way
    return FP32_INPUT_PRECISION if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- launcher checks
def _check_device(**tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device; CPU only under Triton's interpreter (TRITON_INTERPRET=1)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"attention inputs must be on one device, got {listed}")
    device = next(iter(devices.values()))
    if device.type == "cpu" and not _interpreting():
        raise ValueError("the Triton attention kernels got CPU tensors; move them to a CUDA device, "
                         "or run Triton's interpreter by setting TRITON_INTERPRET=1 before triton "
                         "is imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton attention kernels run on CUDA devices (or CPU under "
                         f"TRITON_INTERPRET=1), got {device}")
    return device


_PADDED_DIMS = ("batch", "heads", "length", "head_dim")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               dims: tuple[str, ...] = _PADDED_DIMS) -> tuple[int, ...]:
    """q, k, v: tensors of one shape with ``len(dims)`` dimensions and one supported dtype, the
    head dim (last) in 1..128; the padded layout's length (dim 2) within ``ATTENTION_MAX_LEN``."""
    layout = f"({', '.join(dims)})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != len(dims):
            raise ValueError(f"{name} must have shape {layout}, got {t.dim()} dimensions "
                             f"{tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the attention kernels take float32, "
                             "float16 or bfloat16")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}; "
                             f"self-attention needs q, k and v of one shape {layout}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    _check_head_dim(q.shape[-1])
    if dims == _PADDED_DIMS:
        _check_length(q.shape[2], "sequence length")
    return tuple(q.shape)


def _check_saved(q: torch.Tensor, do: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 lse_shape: tuple[int, ...]) -> None:
    """The backward's dO and O (like q) and the forward's LSE (contiguous fp32 ``lse_shape``)."""
    for name, t in (("do", do), ("o", o)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{name} has shape {tuple(t.shape)} and dtype {t.dtype}; expected "
                             f"{tuple(q.shape)} and {q.dtype} like q")
    if lse.shape != lse_shape or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous fp32 tensor of shape {lse_shape}, the "
                         "forward's log-sum-exp")


def _check_head_dim(D: int) -> None:
    if not 1 <= D <= ATTENTION_MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} is not supported by the attention kernels: it must lie in "
                         f"1..{ATTENTION_MAX_HEAD_DIM} (above {ATTENTION_MAX_HEAD_DIM} the tiles "
                         "no longer fit in registers)")


def _check_length(L: int, what: str) -> None:
    if L > ATTENTION_MAX_LEN:
        raise ValueError(f"{what} {L} is above the maximum of {ATTENTION_MAX_LEN} "
                         "(the dropout offsets hold a position in 16 bits)")


def _check_mask(mask: torch.Tensor | None, B: int, L: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"key_padding_mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask has dtype {mask.dtype}; it must be torch.bool "
                         "(True = a real token, False = padding)")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"key_padding_mask has shape {tuple(mask.shape)}, expected ({B}, {L}): "
                         "(batch, length) of q")


def _check_dropout(dropout_p: float) -> float:
    try:
        dropout_p = float(dropout_p)
    except (TypeError, ValueError):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}") from None
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return dropout_p


def _drop_threshold(dropout_p: float) -> int:
    """The kernels' 8-bit drop threshold: an element is dropped when its random byte is below it."""
    return min(255, round(dropout_p * 256))


def attention_dropout_p(dropout_p: float) -> float:
    """The dropout probability the Triton attention kernels apply for ``dropout_p``: the nearest
    multiple of 1/256 (8-bit thresholds, ``_dropout_keep``), at most 255/256; 0.1 -> 0.1015625.
    The kept probabilities are scaled by 1 / (1 - this), so the output stays unbiased."""
    return _drop_threshold(_check_dropout(dropout_p)) / 256


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(drop_threshold, dropout_scale) kernel arguments for ``dropout_p``."""
    t = _drop_threshold(dropout_p)
    return t, 256.0 / (256 - t)


def _op_seed(seed: int | torch.Tensor | None, dropout_p: float, device: torch.device):
    """The dropout seed of one call: None without dropout (nothing drawn, so no draw advances the
    generator), else ``dropout_seed``'s (1,) int64 device tensor: the caller's int or tensor, or
    for None a draw from torch's generator for ``device``; no host read either way. A caller's
    tensor is copied (on the device): the backward must see the forward's key even if the caller
    advances its tensor in place in between."""
    if dropout_p > 0.0:
        key = dropout_seed(seed, device)
        return key.clone() if isinstance(seed, torch.Tensor) else key
    if seed is not None:
        check_seed(seed, device)
    return None


def _kernel_seed(seed: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The SEED pointer argument: ``seed``, or without dropout (None) an unfilled placeholder
    the kernels never read."""
    return torch.empty(1, dtype=torch.int64, device=device) if seed is None else seed


def _seed_arg(seed: int | torch.Tensor | None, dropout_p: float, device: torch.device) -> torch.Tensor:
    """The (1,) int64 dropout seed the kernels load from their SEED pointer (``_op_seed``, or a
    placeholder without dropout)."""
    return _kernel_seed(_op_seed(seed, dropout_p, device), device)


def _check_seed_tensor(seed: torch.Tensor, device: torch.device) -> None:
    """The backward's seed: the (1,) int64 tensor the forward returned."""
    if not isinstance(seed, torch.Tensor):
        raise ValueError(f"seed must be the (1,) int64 tensor the forward returned, got "
                         f"{type(seed).__name__}")
    check_seed(seed, device)


def _check_scale(softmax_scale: float | None, D: int) -> float:
    if softmax_scale is None:
        return D ** -0.5
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError):
        raise ValueError(f"softmax_scale must be a number, got {softmax_scale!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {scale}")
    return scale


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous and in-head offsets fit in int32, else a copy."""
    L, D = t.shape[-2], t.shape[-1]
    ok = (t.stride(-1) == 1 or D == 1) and all(s >= 0 for s in t.stride()) \
        and (L - 1) * t.stride(-2) + D < 2**31
    return t if ok else t.contiguous()


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _mask_arg(mask: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, L) bool -> (uint8 view with unit column stride, batch stride); a uint8 view of
    ``dummy`` (never read) when None."""
    if mask is None:
        return dummy.view(torch.uint8), 0
    if mask.stride(1) != 1 and mask.shape[1] > 1:
        mask = mask.contiguous()
    return mask.view(torch.uint8), mask.stride(0)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """An output in t's layout (minBERT: (B, L, H, D) memory seen as (B, H, L, D)) if it is
    dense with a contiguous last dim, else contiguous."""
    out = torch.empty_like(t)
    return out if out.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


# ----------------------------------------------------------------------------- launchers
# ``_launch_fwd`` / ``_launch_bwd`` serve both layouts: ``strides(t)`` gives a tensor's (batch,
# head, row) strides as the kernels read them (``_strides3`` for (B, H, L, D); the packed layout
# passes (0, head stride, token stride)), ``stat_strides`` the (batch, head) strides of LSE and
# delta, ``cu_seqlens`` is read only when ``varlen``.
def _launch_fwd(q, k, v, o, lse, mask, cu_seqlens, seed, strides, stat_strides, B, H, L, D,
                scale, dropout_p, varlen):
    cfg = _config(D, q.dtype).fwd
    has_mask = mask is not None
    mask, stride_mb = _mask_arg(mask, lse)
    threshold, dropout_scale = _dropout_args(dropout_p)
    _attention_fwd_kernel[(triton.cdiv(L, cfg.block_m) * B * H,)](
        q, k, v, mask, cu_seqlens, seed, o, lse,
        *strides(q), *strides(k), *strides(v), *strides(o), stride_mb, *stat_strides,
        H, L, scale * _LOG2E, threshold, dropout_scale,
        HEAD_DIM=D, D_CHUNK=cfg.chunk(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_MASK=has_mask, HAS_DROPOUT=threshold > 0, INPUT_PRECISION=_input_precision(q.dtype),
        VARLEN=varlen, num_warps=cfg.num_warps, num_stages=cfg.stages(threshold > 0))


def _launch_bwd(do, q, k, v, o, lse, mask, cu_seqlens, seed, dq, dk, dv, strides, stat_strides,
                B, H, L, D, scale, dropout_p, varlen, rows, needs=(True, True, True)):
    """``rows`` = (batches, rows per batch) of the delta preprocess: (B, L) padded, (1, T) packed.
    ``needs`` = which of (dq, dk, dv) to compute: the dQ launch runs only for dq, the dK/dV
    launch only for dk or dv, and for one of them alone as its single-accumulator variant."""
    cfg = _config(D, q.dtype)
    delta = torch.empty_like(lse)
    pre_b, pre_l = rows
    _attention_bwd_preprocess_kernel[(triton.cdiv(pre_l, _PRE_BLOCK_M) * pre_b * H,)](
        o, do, delta, *strides(o), *strides(do), H, pre_l,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=_PRE_BLOCK_M, num_warps=4)
    has_mask = mask is not None
    mask, stride_mb = _mask_arg(mask, lse)
    threshold, dropout_scale = _dropout_args(dropout_p)
    has_dropout = threshold > 0
    common = dict(HEAD_DIM=D, HAS_MASK=has_mask, HAS_DROPOUT=has_dropout,
                  INPUT_PRECISION=_input_precision(q.dtype), VARLEN=varlen)
    scalars = (H, L, scale * _LOG2E, scale, threshold, dropout_scale)
    t = cfg.dkdv
    need_q, need_k, need_v = needs
    dkdv_grads = cfg.dkdv_grads if need_k and need_v else ("dk",) if need_k else ("dv",) if need_v else ()
    for grads in dkdv_grads:
        _attention_bwd_dkdv_kernel[(triton.cdiv(L, t.block_n) * B * H,)](
            q, k, v, mask, cu_seqlens, seed, do, lse, delta, dk, dv,
            *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk), *strides(dv),
            stride_mb, *stat_strides, *scalars,
            D_CHUNK=t.chunk(D), BLOCK_M=t.block_m, BLOCK_N=t.block_n, GRADS=grads,
            num_warps=t.num_warps, num_stages=t.stages(has_dropout), **common)
    if not need_q:
        return
    t = cfg.dq
    _attention_bwd_dq_kernel[(triton.cdiv(L, t.block_m) * B * H,)](
        q, k, v, mask, cu_seqlens, seed, do, lse, delta, dq,
        *strides(q), *strides(k), *strides(v), *strides(do), *strides(dq),
        stride_mb, *stat_strides, *scalars,
        D_CHUNK=t.chunk(D), BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps,
        num_stages=t.stages(has_dropout), **common)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | torch.Tensor | None = None,
):
    """Launch ``_attention_fwd_kernel``.

    Args:
        q, k, v: (B, H, L, D), one dtype (fp32/fp16/bf16), 1 <= D <= 128; strided views are read
            in place when their last dimension is contiguous.
        key_padding_mask: (B, L) bool, True = a real token; None = no padding.
        dropout_p: in [0, 1).
        softmax_scale: defaults to D ** -0.5.
        seed: the dropout seed: an int, a (1,) int64 tensor on q's device, or None (drawn on the
            device from torch's generator when dropout_p > 0; ``kernels._utils.dropout_seed``).
    Returns:
        (o (B, H, L, D) in q's dtype and layout, lse (B, H, L) fp32 (+inf on all-padding rows),
        the (1,) int64 seed tensor used, the softmax scale used).
    """
    dropout_p, scale, device = _check_forward(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    seed = _seed_arg(seed, dropout_p, device)
    o, lse = _attention_fwd_checked(q, k, v, key_padding_mask, dropout_p, scale, seed)
    return o, lse, seed, scale


def _check_forward(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    """The forward's input checks (no host read): (dropout_p, softmax scale, device)."""
    B, H, L, D = _check_qkv(q, k, v)
    _check_mask(key_padding_mask, B, L)
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(softmax_scale, D)
    return dropout_p, scale, _check_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask)


def _attention_fwd_checked(q, k, v, key_padding_mask, dropout_p, scale, seed):
    """``attention_fwd`` past its checks: ``seed`` is the (1,) int64 device tensor the kernels read
    (any placeholder without dropout); returns (o, lse)."""
    B, H, L, D = q.shape
    device = q.device
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    o = _empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=device)
    if o.numel() == 0:
        return o, lse.fill_(float("inf"))
    _launch_fwd(q, k, v, o, lse, key_padding_mask, _no_cu_seqlens(device), seed, _strides3,
                (H * L, L), B, H, L, D, scale, dropout_p, varlen=False)
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    softmax_scale: float | None,
    seed: torch.Tensor,
    needs: tuple[bool, bool, bool] = (True, True, True),
):
    """Launch the delta preprocess, ``_attention_bwd_dkdv_kernel`` and ``_attention_bwd_dq_kernel``.

    Args:
        do: (B, H, L, D) upstream gradient (any strides; copied when its last dim is not contiguous).
        q, k, v, key_padding_mask, dropout_p, softmax_scale: the forward's.
        o, lse, seed: the forward's output, log-sum-exp and (1,) int64 seed tensor.
        needs: which of (dq, dk, dv) to compute; the others are returned as None.
    Returns:
        (dq, dk, dv), each (B, H, L, D) in its input's dtype and layout, or None when not needed.
    """
    B, H, L, D = _check_qkv(q, k, v)
    _check_mask(key_padding_mask, B, L)
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(softmax_scale, D)
    _check_saved(q, do, o, lse, (B, H, L))
    device = _check_device(do=do, q=q, k=k, v=v, o=o, lse=lse, key_padding_mask=key_padding_mask)
    _check_seed_tensor(seed, device)
    q, k, v, o, do = (_kernel_layout(t) for t in (q, k, v, o, do))
    dq, dk, dv = (_empty_like(t) if need else None for t, need in zip((q, k, v), needs))
    if q.numel() == 0 or not any(needs):
        return dq, dk, dv
    _launch_bwd(do, q, k, v, o, lse, key_padding_mask, _no_cu_seqlens(device), seed,
                *_grad_args(dq, dk, dv), _strides3, (H * L, L), B, H, L, D, scale, dropout_p,
                varlen=False, rows=(B, L), needs=needs)
    return dq, dk, dv


def _grad_args(dq, dk, dv):
    """The kernels' DQ, DK, DV arguments: a gradient not computed gets a needed one's pointer
    (its launch or its store is skipped, so it is never written)."""
    some = next(g for g in (dq, dk, dv) if g is not None)
    return tuple(some if g is None else g for g in (dq, dk, dv))


def _no_cu_seqlens(device: torch.device) -> torch.Tensor:
    """The CU_SEQLENS argument of a padded launch: an int32 placeholder, never read."""
    return torch.empty(1, dtype=torch.int32, device=device)


def _attention_dropout_mask(shape: tuple[int, int, int] | torch.Size, p: float,
                            seed: int | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Debug path: the (B, H, L, L) bool keep-mask (True = kept) the kernels draw for (B, H, L).

    It runs the kernels' ``_dropout_keep``, so ``attention_ref(..., dropout_mask=...)`` drops the
    same probabilities as ``attention(..., dropout_p=p, seed=seed)``. The mask depends on (seed,
    b, h, i, j) only, so for packed sequences (``attention_varlen``) it is the mask of shape
    (B, H, max_seqlen) restricted to each sequence's [0, length) x [0, length) block.
    """
    p = _check_dropout(p)
    device = torch.device(device)
    check_seed(seed, device)
    B, H, L = (int(s) for s in shape)
    keep = torch.empty((B, H, L, L), dtype=torch.int8, device=device)
    if keep.numel() > 0:
        _check_device(keep=keep)
        grid = (triton.cdiv(L, _MASK_BLOCK), triton.cdiv(L, _MASK_BLOCK), B * H)
        _attention_dropout_mask_kernel[grid](keep, dropout_seed(seed, device), L, _drop_threshold(p),
                                             BLOCK=_MASK_BLOCK, num_warps=4)
    return keep.view(torch.bool)


# torch.library custom ops: ``torch.compile(fullgraph=True)`` traces through them (the fakes give
# shapes, dtypes and layouts) instead of breaking the graph at a Triton launch; their autograd is
# registered on the op. The seed is drawn outside the op (``_attention_triton``), so under
# torch.compile the draw is a graph op and every run, or CUDA-graph replay, gets a fresh mask.
@torch.library.custom_op(
    "minbert::attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? seed, float dropout_p, "
           "float softmax_scale) -> (Tensor, Tensor)")
def _attention_op(q, k, v, key_padding_mask, seed, dropout_p, softmax_scale):
    # the checks ran in _attention_triton; the fake repeats the shape checks for traced calls
    return _attention_fwd_checked(q, k, v, key_padding_mask, dropout_p, softmax_scale,
                                  _kernel_seed(seed, q.device))


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, seed, dropout_p, softmax_scale):
    B, H, L, D = _check_qkv(q, k, v)
    _check_mask(key_padding_mask, B, L)
    return _empty_like(_kernel_layout(q)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op(
    "minbert::attention_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? key_padding_mask, "
           "Tensor? seed, float dropout_p, float softmax_scale, bool[] needs) -> (Tensor, Tensor, Tensor)")
def _attention_bwd_op(do, q, k, v, o, lse, key_padding_mask, seed, dropout_p, softmax_scale, needs):
    grads = attention_bwd(do, q, k, v, o, lse, key_padding_mask, dropout_p, softmax_scale,
                          _kernel_seed(seed, q.device), tuple(needs))
    return tuple(op_output(g, q) for g in grads)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, seed, dropout_p, softmax_scale, needs):
    return tuple(_empty_like(_kernel_layout(t)) if need else t.new_empty(0)
                 for t, need in zip((q, k, v), needs))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, dropout_p, softmax_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, seed)
    ctx.dropout_p, ctx.softmax_scale = dropout_p, softmax_scale


def _attention_backward(ctx, do, dlse):
    """dq, dk, dv of the ``minbert::attention`` op: only those autograd asks for are computed
    (a frozen q projection skips the dQ launch, frozen k and v the dK/dV launch)."""
    q, k, v, o, lse, mask, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = torch.ops.minbert.attention_bwd(do, q, k, v, o, lse, mask, seed, ctx.dropout_p,
                                            ctx.softmax_scale, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


torch.library.register_autograd("minbert::attention", _attention_backward,
                                setup_context=_attention_setup_context)


def _attention_triton(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None):
    """Multi-head attention on the Triton kernels (the ``minbert::attention`` op); see
    ``attention_ref``. (B, H, L, D) in and out."""
    dropout_p, scale, device = _check_forward(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    o, _ = torch.ops.minbert.attention(q, k, v, key_padding_mask, _op_seed(seed, dropout_p, device),
                                       dropout_p, scale)
    return o


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention on the backend in force; see ``attention_ref``. Returns (B, H, L, D).

    ``seed``: the dropout key, an int or a (1,) int64 tensor on q's device; None draws one on the
    device from torch's generator (no host read; ``torch.manual_seed`` reproduces it)."""
    impl = dispatch("attention", attention_ref, _attention_triton)
    return impl(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                softmax_scale=softmax_scale, seed=seed)


# ----------------------------------------------------------------------------- check, compile and IO cases
def _shape_name(B: int, H: int, L: int, D: int) -> str:
    return f"B{B} H{H} L{L} D{D}"


def _padding_mask(B: int, L: int, gen: torch.Generator, all_padding_row: bool) -> torch.Tensor:
    """(B, L) bool: batch row 0 padded at the end (BERT's layout), the others random keep-masks
    (~25% padding); the last row all padding when ``all_padding_row`` and B > 1."""
    mask = torch.rand((B, L), generator=gen) >= 0.25
    mask[0] = torch.arange(L) < max(1, L - L // 3)
    if all_padding_row and B > 1:
        mask[-1] = False
    return mask


def attention_case(B: int, H: int, L: int, D: int, padding: bool = True, dropout_p: float = 0.0,
                   all_padding_row: bool = True, layout: str = "blhd",
                   softmax_scale: float | None = None) -> OpCase:
    """An ``OpCase`` of ``attention`` on (B, H, L, D) inputs.

    Args:
        padding: a random key-padding mask (``_padding_mask``); False passes None.
        dropout_p: with dropout the reference gets the kernels' mask (``_attention_dropout_mask``)
            and both sides p as the kernels apply it (``attention_dropout_p``).
        all_padding_row: the last batch row's keys are all padding (its outputs must be zeros).
        layout: ``"blhd"``: q, k, v are (B, L, H, D) tensors seen as (B, H, L, D), minBERT's
            strided views; ``"bhld"``: contiguous.
    """
    parts = (["padded"] if padding else []) + ([f"dropout{dropout_p}"] if dropout_p else []) \
        + ([layout] if layout != "blhd" else []) + ([f"scale{softmax_scale}"] if softmax_scale else [])
    name = f"attention[{'+'.join(parts) or 'plain'}] {_shape_name(B, H, L, D)}"

    def make_inputs(device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)

        def qkv():
            t = torch.randn((B, L, H, D), generator=gen).to(device=device, dtype=dtype)
            t = t.transpose(1, 2) if layout == "blhd" else t.transpose(1, 2).contiguous()
            return t.requires_grad_()

        inputs = dict(q=qkv(), k=qkv(), v=qkv(),
                      key_padding_mask=_padding_mask(B, L, gen, all_padding_row).to(device)
                      if padding else None,
                      dropout_p=attention_dropout_p(dropout_p), softmax_scale=softmax_scale,
                      seed=None, dropout_mask=None)
        if dropout_p > 0:
            inputs["seed"] = 1000 + seed
            inputs["dropout_mask"] = _attention_dropout_mask((B, H, L), dropout_p, 1000 + seed, device)
        return inputs

    def kernel_fn(dropout_mask=None, **kw):
        return _attention_triton(**kw)

    case = OpCase(name, make_inputs, kernel_fn, attention_ref)
    case.shape = (B, H, L, D)
    return case


def check_cases() -> list[OpCase]:
    """The cases ``python -m kernels.check`` runs: every head dim, odd lengths, every switch."""
    return [
        attention_case(3, 2, 1, 32),  # one token
        attention_case(2, 2, 7, 32, dropout_p=0.1),
        attention_case(2, 3, 33, 64, dropout_p=0.2),
        attention_case(2, 2, 65, 64, padding=False, layout="bhld", softmax_scale=0.3),
        attention_case(2, 1, 130, 128, dropout_p=0.1),
    ]


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_STRIDE_ARGS = {"stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_kl",
                "stride_vb", "stride_vh", "stride_vl", "stride_ob", "stride_oh", "stride_ol",
                "stride_dob", "stride_doh", "stride_dol", "stride_dqb", "stride_dqh", "stride_dql",
                "stride_dkb", "stride_dkh", "stride_dkl", "stride_dvb", "stride_dvh", "stride_dvl"}


_CONSTEXPR_ARGS = {"HEAD_DIM", "BLOCK_D", "D_CHUNK", "GRADS", "BLOCK_M", "BLOCK_N", "BLOCK",
                   "HAS_MASK", "HAS_DROPOUT", "INPUT_PRECISION", "VARLEN"}


def _signature(fn, dt: str) -> dict[str, str]:
    """Triton types of every argument of an attention kernel with I/O dtype ``dt``."""
    types = {}
    for name in fn.arg_names:
        if name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            types[name] = f"*{dt}"
        elif name in ("LSE", "DELTA"):
            types[name] = "*fp32"
        elif name == "MASK":
            types[name] = "*u8"
        elif name == "KEEP":
            types[name] = "*i8"
        elif name == "CU_SEQLENS":
            types[name] = "*i32"
        elif name == "SEED":
            types[name] = "*i64"
        elif name in ("qk_scale", "sm_scale", "dropout_p", "dropout_scale"):
            types[name] = "fp32"
        elif name in _CONSTEXPR_ARGS:
            types[name] = "constexpr"
        else:  # strides, H, L
            types[name] = "i32"
    return types


# Head dims compiled by ``compile_specs``: one per BLOCK_D (unmasked tiles), and head dims that
# are not powers of two (the masked last chunk: BERT-family checkpoints use 80 and 96).
COMPILE_HEAD_DIMS = (16, 32, 64, 128)
COMPILE_MASKED_HEAD_DIMS = (40, 80, 96)
_VARIANTS = (("mask+dropout", True, True), ("mask", True, False), ("dropout", False, True),
             ("plain", False, False))


def kernel_compile_specs(head_dims, dtypes, variants, varlen: bool = False,
                         op: str = "") -> list[CompileSpec]:
    """``CompileSpec`` of the forward, dK/dV (its "dk" and "dv" launches where ``split_dkdv``) and
    dQ kernels with their ``_CONFIGS`` tiles (and D_CHUNK) for every head dim x dtype x variant
    (name, HAS_MASK, HAS_DROPOUT); ``varlen`` compiles the packed layout (``VARLEN``). ``attrs``
    carry the divisibility-16 specialisation the JIT gives pointers and the strides of minBERT's
    (B, L, H, D) views (multiples of D) at launch."""
    specs: list[CompileSpec] = []
    for D in head_dims:
        for dtype in dtypes:
            dt = _TRITON_DTYPE[dtype]
            cfg = _config(D, dtype)
            launches = [("_attention_fwd_kernel", _attention_fwd_kernel, cfg.fwd, {}, "fwd"),
                        *(("_attention_bwd_dkdv_kernel", _attention_bwd_dkdv_kernel, cfg.dkdv,
                           dict(GRADS=g), "bwd_dkdv" if g == "dkdv" else f"bwd_dkdv[{g}]")
                          for g in cfg.dkdv_grads),
                        ("_attention_bwd_dq_kernel", _attention_bwd_dq_kernel, cfg.dq, {}, "bwd_dq")]
            for kernel, fn, tile, extra, name in launches:
                for vname, has_mask, has_dropout in variants:
                    const = dict(HEAD_DIM=D, D_CHUNK=tile.chunk(D), BLOCK_M=tile.block_m,
                                 BLOCK_N=tile.block_n, HAS_MASK=has_mask, HAS_DROPOUT=has_dropout,
                                 INPUT_PRECISION=_input_precision(dtype), VARLEN=varlen, **extra)
                    dims = f"D={D}" + (f" BLOCK_D={block_d(D)}" if block_d(D) != D else "")
                    chunk = f" D_CHUNK={tile.chunk(D)}" if tile.chunk(D) < block_d(D) else ""
                    stages = tile.stages(has_dropout)
                    specs.append(_compile_spec(
                        kernel, fn, dt, const, tile.num_warps, stages,
                        f"{op}{name} {dims} {dt} {vname} BLOCK_M={tile.block_m} "
                        f"BLOCK_N={tile.block_n}{chunk} warps={tile.num_warps} "
                        f"stages={stages}"))
    return specs


def _compile_spec(kernel, fn, dt, const, warps, stages, label) -> CompileSpec:
    sig = _signature(fn, dt)
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items()
             if t.startswith("*") or k in _STRIDE_ARGS}
    return CompileSpec(kernel, fn, sig, const, warps, stages, label, attrs)


def compile_specs() -> list[CompileSpec]:
    """One ``CompileSpec`` per (kernel, configuration the launcher can choose).

    Every BLOCK_D (``COMPILE_HEAD_DIMS``) in fp32, fp16 and bf16, all four switch settings (mask
    and dropout on or off: the compiler schedules each differently, and a lighter variant can
    spill where the heavier one does not); the masked head dims (``COMPILE_MASKED_HEAD_DIMS``) in
    fp32 and bf16 (fp16 compiles as bf16 does), heaviest and lightest setting; the delta
    preprocess per head dim and dtype; the debug dropout-mask kernel.
    """
    all_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    specs = kernel_compile_specs(COMPILE_HEAD_DIMS, all_dtypes, _VARIANTS)
    specs += kernel_compile_specs(COMPILE_MASKED_HEAD_DIMS, (torch.float32, torch.bfloat16),
                                  (_VARIANTS[0], _VARIANTS[3]))
    for D in COMPILE_HEAD_DIMS + COMPILE_MASKED_HEAD_DIMS:
        for dtype in all_dtypes:
            dt = _TRITON_DTYPE[dtype]
            specs.append(_compile_spec(
                "_attention_bwd_preprocess_kernel", _attention_bwd_preprocess_kernel, dt,
                dict(HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=_PRE_BLOCK_M), 4, 3,
                f"bwd_preprocess D={D} {dt} BLOCK_M={_PRE_BLOCK_M} warps=4"))
    specs.append(_compile_spec("_attention_dropout_mask_kernel", _attention_dropout_mask_kernel,
                               "fp32", dict(BLOCK=_MASK_BLOCK), 4, 3,
                               f"dropout mask (debug) BLOCK={_MASK_BLOCK} warps=4"))
    return specs


def fa2_tiled_bytes(B: int, H: int, L: int, D: int, dtype: torch.dtype, has_mask: bool) -> int:
    """Global-memory bytes of forward + backward under FlashAttention-2 tiling with ``_CONFIGS``.

    Per (batch, head), with T = L * D * itemsize (one head of q, k, v, o or a gradient), S = 4 L
    (one fp32 row statistic: LSE or delta), M = L (one mask row of bool, 0 without a mask), and
    n_fwd = cdiv(L, fwd BLOCK_M), n_kv = cdiv(L, dK/dV BLOCK_N), n_dq = cdiv(L, dQ BLOCK_M) tiles:
      forward:    Q once, K + V + mask once per query tile, O and LSE once:  2T + n_fwd (2T + M) + S
      preprocess: O, dO once, delta written:                               2T + S
      dK/dV:      K, V, mask once, Q + dO + LSE + delta once per key tile, dK, dV written:
                                                                           4T + M + n_kv (2T + 2S)
      dQ:         Q, dO, LSE, delta once, K + V + mask once per query tile, dQ written:
                                                                           3T + 2S + n_dq (2T + M)
    fp32 (the note above ``_mma``) reads Q once more per key tile in dK and K once more per query
    tile in dQ: + n_kv T + n_dq T; with ``split_dkdv`` the dK launch is the dK/dV line less the dV
    write and the dV launch reads K, the mask, and Q + dO + LSE per key tile and writes dV:
    + 2T + M + n_kv (2T + S) - T. These are the formulas the 16-bit target of ``bench.io`` is
    held to. Rows past L are masked off and move nothing; a key block of padding only skips its
    loop (fewer bytes than this).
    """
    return B * H * fa2_head_bytes(L, D, dtype, has_mask)


def fa2_head_bytes(L: int, D: int, dtype: torch.dtype, has_mask: bool) -> int:
    """``fa2_tiled_bytes`` of one (sequence, head) of length L (the formula above)."""
    size = torch.empty((), dtype=dtype).element_size()
    cfg = _config(D, dtype)
    T, S, M = L * D * size, 4 * L, L if has_mask else 0
    n_fwd, n_kv, n_dq = (triton.cdiv(L, b) for b in (cfg.fwd.block_m, cfg.dkdv.block_n, cfg.dq.block_m))
    per_head = (2 * T + n_fwd * (2 * T + M) + S) + (2 * T + S) \
        + (4 * T + M + n_kv * (2 * T + 2 * S)) + (3 * T + 2 * S + n_dq * (2 * T + M))
    if dtype == torch.float32:
        per_head += n_kv * T + n_dq * T
    if cfg.split_dkdv:
        per_head += 2 * T + M + n_kv * (2 * T + S) - T
    return per_head


def attention_lower_bound_bytes(B: int, H: int, L: int, D: int, dtype: torch.dtype,
                                has_mask: bool) -> int:
    """Distinct bytes a fused forward + backward must touch: q, k, v, dO read, O, dQ, dK, dV
    written (8 heads of T = L * D * itemsize), the fp32 LSE the backward needs (4 L per head) and
    the (B, L) bool mask, each counted once. The kernels' only scratch beyond it is delta (4 L
    per head)."""
    size = torch.empty((), dtype=dtype).element_size()
    return B * H * (8 * L * D * size + 4 * L) + (B * L if has_mask else 0)


def io_cases(tokens: int, hidden: int, dtype: torch.dtype) -> list[IOCase]:
    """Forward + backward memory traffic of minBERT's attention, with a key-padding mask.

    ``tokens = B * L`` and ``hidden = H * D``: D = 64 (bert-base's head dim) when it divides the
    hidden size, else 32; one case per L in (128, 512) that divides ``tokens``, B = tokens / L.
    (B=32, H=12, L=128 / 512, D=64) are (tokens, hidden) = (4096 / 16384, 768).
    Lower bound: ``attention_lower_bound_bytes``; the kernels' total should not exceed
    ``fa2_tiled_bytes`` (both formulas above). flops: the products the kernels run, 2 L^2 D each:
    2 in the forward, 4 in dK/dV (S, dV, dP, dK) and 3 in dQ (S, dP, dQ): 18 B H L^2 D.
    """
    D = 64 if hidden % 64 == 0 else 32
    if hidden % D:
        return []
    H = hidden // D
    cases = []
    for L in (128, 512):
        if tokens % L:
            continue
        B = tokens // L
        gen = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn((B, L, H, D), generator=gen).to(dtype).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        do = torch.randn((B, H, L, D), generator=gen).to(dtype)
        mask = torch.ones((B, L), dtype=torch.bool)

        def run_kernel(q=q, k=k, v=v, do=do, mask=mask):
            return torch.autograd.grad(_attention_triton(q, k, v, mask), (q, k, v), do)

        def run_eager(q=q, k=k, v=v, do=do, mask=mask):
            return torch.autograd.grad(attention_ref(q, k, v, mask), (q, k, v), do)

        cases.append(IOCase(
            f"attention fwd+bwd {_shape_name(B, H, L, D)} mask "
            f"(FA2 tiled {fa2_tiled_bytes(B, H, L, D, dtype, True) / 1e6:.2f} MB)",
            run_kernel, run_eager, attention_lower_bound_bytes(B, H, L, D, dtype, True),
            18 * B * H * L * L * D))
    return cases
