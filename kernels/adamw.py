"""Fused AdamW: one Triton launch updates every parameter of a (device, dtype) group.

``FusedAdamW`` is a ``torch.optim.Optimizer`` with the math of ``torch.optim.AdamW`` (decoupled
weight decay, bias correction; see the comment above ``_adamw_update_kernel``), plus:

  - ``master_weights=True``: 16-bit (bf16 / fp16) parameters get an fp32 master copy and fp32
    moments in the optimizer state; the kernel reads the 16-bit gradient and the fp32 m, v and
    master, and writes m, v, the master and the parameter (the new master rounded to nearest
    even) in one pass. fp32 parameters never get a master (it would equal the parameter).
  - ``max_grad_norm``: the global L2 norm of all gradients, as ``torch.nn.utils.clip_grad_norm_``
    computes it, from a fused reduction (per-block partial sums of squares, then one program
    summing them in a fixed order: deterministic), and the clip coefficient
    ``min(1, max_norm / (norm + 1e-6))`` applied to the gradient inside the update kernel.
  - non-finite gradients (the norm is inf or NaN) skip the step: parameters and state are left
    untouched, the step counters do not advance and ``skipped_steps`` counts it. The norm is
    computed for this check even without clipping (``skip_nonfinite=False`` turns the check off
    when clipping is off: no extra pass over the gradients and no host sync).

What is fused. The tensors of a launch are reached through pointer tables, not copied into a
flat buffer: ``PTRS`` (T, 6) int64 holds the addresses of each tensor's parameter, gradient,
exp_avg, exp_avg_sq and master (0 when none) and its element count; ``HYPER`` (T, 8) fp32 its
scalars (lr, weight decay, bias corrections: param groups and step counts may differ per
tensor, so one launch serves every param group of a (device, param dtype, state dtype)); and
``BLOCKS`` (programs, 2) int32 gives each program (tensor, block within it). Program i updates
``BLOCK`` elements of one tensor, so the grid is the total element count / BLOCK plus at most one
partial block per tensor. Full blocks load and store unmasked; when every address of a launch is
16-byte aligned (torch allocations are) the launcher says so (``ALIGNED``) and the full blocks
compile to 16-byte vector accesses. The block table depends only on the tensor sizes and is
cached on the device; the pointer and scalar tables are rebuilt each step (a few bytes per
tensor, copied to the device with the launch).

Traffic per element (one step): read grad, m, v, and the master (or the parameter); write m, v,
the master and the parameter: the lower bound. The non-finite check / norm reads the gradients
once more, and reading the norm back is one host sync per step (the skip decision is made on
the host).

Dtypes: parameters (and their gradients) fp32, fp16 or bf16; state fp32 with master weights,
else in the parameter's dtype, like ``torch.optim.AdamW``; all math in fp32, with IEEE sqrt
and division (``tl.sqrt_rn`` / ``tl.div_rn``) as torch uses. Sizes: any number of tensors of
any size (offsets are int64); tensors must be dense (contiguous, or at least non-overlapping and
dense, with the gradient and state in the parameter's layout). BLOCK = 2048 elements, 8 warps,
for every dtype: 58 to 128 registers, no spills on sm_80 / sm_90 (``compile_specs``). The
master-weight variant stages its fp32 stores through 8 KiB of shared memory (Triton computes in
the 8-elements-per-thread layout of the 16-bit gradient load and stores fp32 4 per thread).

Devices: param groups may live on different devices (one launch set per device; the gradient
norm adds the per-device sums on the host); all parameters of one group share a device.
Under DeepSpeed ZeRO 1 / 2 (bf16) as the client optimizer it receives one flat fp32 partition
per group and steps it like any fp32 parameter; DeepSpeed wants
``"zero_allow_untested_optimizer": true`` for it, and clips with its own
``gradient_clipping`` (leave ``max_grad_norm`` None there, or gradients are clipped twice).

State keys follow ``torch.optim.AdamW`` ("step" a CPU float32 tensor, "exp_avg", "exp_avg_sq",
plus "master_param" with master weights), so each optimizer loads the other's ``state_dict``.

Known limits: kernels launch on CUDA tensors; under Triton's interpreter (``TRITON_INTERPRET=1``)
on CPU tensors only (the kernels follow raw addresses from the pointer tables, which the
interpreter can only do for host memory). No amsgrad, maximize, capturable (CUDA graphs) or
sparse gradients. Under the interpreter the fp32 -> bf16 rounding of the parameter is only
round-to-nearest-even with ``kernels._interpreter`` installed (Triton 3.9 truncates).
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.optim.adam import adam as _torch_adam

from .testing import CompileSpec, IOCase, OpCase

ADAMW_BLOCK = 2048  # elements per program (8 warps: 8 elements, one 16-byte vector of bf16, per thread)
ADAMW_NUM_WARPS = 8
_SUM_BLOCK = 1024  # vector width of the partial-sums reduction (one program)
_PTR_COLS = 6  # PTRS row: param, grad, exp_avg, exp_avg_sq, master, numel
_HYPER_COLS = 8  # HYPER row: see _hyper_row
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


# ----------------------------------------------------------------------------- eager reference
def adamw_ref(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = None,
    master_params: list[torch.Tensor] | None = None,
    foreach: bool | None = None,
) -> torch.Tensor | None:
    """One eager ``torch.optim.AdamW`` step, in place: what ``FusedAdamW.step`` computes.

    ``torch.nn.utils.clip_grad_norm_``'s math applied to ``grads`` in place (when
    ``max_grad_norm``), then torch's own AdamW functional (``torch.optim.adam.adam`` with
    decoupled weight decay). With ``master_params`` (fp32 copies
    of 16-bit ``params``) the update runs on the masters with fp32 copies of the gradients, the
    moments must be fp32, and each parameter is then set to its master rounded to its dtype.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of tensors of matching shapes.
        steps: CPU float32 scalar tensors, the steps taken so far (incremented here).
        foreach: torch's implementation switch (None: torch's default for the device).
    Returns:
        the total gradient norm (fp32 tensor) when clipping, else None. Unlike ``FusedAdamW``
        the eager step does not skip non-finite gradients (torch does not).
    """
    norm = None
    if max_grad_norm is not None:
        # clip_grad_norm_ on the gradients themselves: its two halves, get_total_norm and the
        # scaling of clip_grads_with_norm_ (torch's foreach paths refuse CPU tensors: None there)
        clip_foreach = foreach if all(g.is_cuda for g in grads) else None
        norm = torch.nn.utils.get_total_norm(grads, 2.0, False, clip_foreach)
        coef = torch.clamp(max_grad_norm / (norm + _CLIP_EPS), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
    targets = params if master_params is None else master_params
    if master_params is not None:
        grads = [g.to(w.dtype) for g, w in zip(grads, master_params)]  # fp32 (fp64 in a reference)
    beta1, beta2 = betas
    _torch_adam(
        targets, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach,
        decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
        weight_decay=weight_decay, eps=eps, maximize=False)
    if master_params is not None:
        for p, w in zip(params, master_params):
            p.copy_(w)
    return norm


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _load_f32(ptr, offs, n, MASKED: tl.constexpr):
    """(BLOCK,) fp32 values at ``ptr + offs``; lanes at or past ``n`` read 0 when MASKED."""
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, n, x, MASKED: tl.constexpr):
    """Store fp32 ``x`` at ``ptr + offs`` in the pointer's dtype (round to nearest even)."""
    if MASKED:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=offs < n)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty))


@triton.jit
def _adamw_block(P, G, M, V, W, offs, n, clip_coef, decay, w1, beta2, c2, neg_step_size, bc2_sqrt,
                 eps, HAS_MASTER: tl.constexpr, MASKED: tl.constexpr):
    """One block of the AdamW update (the math is above ``_adamw_update_kernel``)."""
    g = _load_f32(G, offs, n, MASKED) * clip_coef
    m = _load_f32(M, offs, n, MASKED)
    v = _load_f32(V, offs, n, MASKED)
    if HAS_MASTER:
        p = _load_f32(W, offs, n, MASKED)
    else:
        p = _load_f32(P, offs, n, MASKED)
    p = p * decay
    # torch's lerp: the form depends on the weight, for accuracy at both ends
    d = g - m
    m = tl.where(w1 < 0.5, m + w1 * d, g - d * (1.0 - w1))
    v = v * beta2 + c2 * g * g
    # IEEE sqrt and division (Triton's defaults are approximate), as torch computes them
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + neg_step_size * tl.div_rn(m, denom)
    _store(M, offs, n, m, MASKED)
    _store(V, offs, n, v, MASKED)
    if HAS_MASTER:
        _store(W, offs, n, p, MASKED)
    _store(P, offs, n, p, MASKED)


# Update math, per element, as torch.optim.AdamW (t = the step count after this update):
#   g      = c * grad                       c = min(1, max_norm / (||all grads||_2 + 1e-6)), or 1
#   p      = p * (1 - lr * wd)              decoupled weight decay, on the old p
#   m      = lerp(m, g, 1 - beta1)          = beta1 m + (1 - beta1) g
#   v      = beta2 v + (1 - beta2) g^2
#   denom  = sqrt(v) / sqrt(1 - beta2^t) + eps
#   p      = p + (-lr / (1 - beta1^t)) * (m / denom)
# The per-tensor scalars (1 - lr wd, 1 - beta1, beta2, 1 - beta2, -lr / (1 - beta1^t),
# sqrt(1 - beta2^t), eps) are computed on the host in double precision and rounded to fp32, as
# torch rounds the Python scalars it passes to its fp32 ops. With HAS_MASTER, p is the fp32 master
# W, stored back, and the 16-bit parameter P receives it rounded to nearest even.
@triton.jit
def _adamw_update_kernel(
    BLOCKS,  # (programs, 2) int32: [tensor index, block index within the tensor] per program
    PTRS,  # (T, 6) int64: addresses of param, grad, exp_avg, exp_avg_sq, master (or 0); numel
    HYPER,  # (T, 8) fp32 per-tensor scalars: 1 - lr wd, 1 - beta1, beta2, 1 - beta2,
            #   -lr / (1 - beta1^t), sqrt(1 - beta2^t), eps, (unused)
    clip_coef,  # fp32: every gradient is multiplied by it (1.0 without clipping)
    PARAM_DTYPE: tl.constexpr,  # dtype of the parameters and gradients
    STATE_DTYPE: tl.constexpr,  # dtype of exp_avg and exp_avg_sq (fp32 with master weights)
    HAS_MASTER: tl.constexpr,  # fp32 master weights at the fifth address
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned: full blocks vectorise
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(BLOCKS + 2 * pid).to(tl.int64)
    blk = tl.load(BLOCKS + 2 * pid + 1).to(tl.int64)
    row = PTRS + t * 6
    P = tl.load(row).to(tl.pointer_type(PARAM_DTYPE))
    G = tl.load(row + 1).to(tl.pointer_type(PARAM_DTYPE))
    M = tl.load(row + 2).to(tl.pointer_type(STATE_DTYPE))
    V = tl.load(row + 3).to(tl.pointer_type(STATE_DTYPE))
    W = tl.load(row + 4).to(tl.pointer_type(tl.float32))  # not dereferenced without HAS_MASTER
    n = tl.load(row + 5)
    if ALIGNED:
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        M = tl.multiple_of(M, 16)
        V = tl.multiple_of(V, 16)
        W = tl.multiple_of(W, 16)
    hp = HYPER + t * 8
    decay = tl.load(hp)
    w1 = tl.load(hp + 1)
    beta2 = tl.load(hp + 2)
    c2 = tl.load(hp + 3)
    neg_step_size = tl.load(hp + 4)
    bc2_sqrt = tl.load(hp + 5)
    eps = tl.load(hp + 6)
    start = blk * BLOCK  # int64 element offset of the block in its tensor
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _adamw_block(P, G, M, V, W, offs, n, clip_coef, decay, w1, beta2, c2, neg_step_size,
                     bc2_sqrt, eps, HAS_MASTER, False)
    else:
        _adamw_block(P, G, M, V, W, offs, n, clip_coef, decay, w1, beta2, c2, neg_step_size,
                     bc2_sqrt, eps, HAS_MASTER, True)


@triton.jit
def _adamw_grad_sumsq_kernel(
    BLOCKS,  # (programs, 2) int32: [tensor index, block index], as for _adamw_update_kernel
    PTRS,  # (T, 6) int64: the update's table; only the gradient address and numel are read
    PART,  # (programs,) fp32: this program's sum of squared gradient elements
    GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    # sum over the block of g^2 in fp32 (inf / NaN propagate: the host checks the total)
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(BLOCKS + 2 * pid).to(tl.int64)
    blk = tl.load(BLOCKS + 2 * pid + 1).to(tl.int64)
    G = tl.load(PTRS + t * 6 + 1).to(tl.pointer_type(GRAD_DTYPE))
    n = tl.load(PTRS + t * 6 + 5)
    if ALIGNED:
        G = tl.multiple_of(G, 16)
    start = blk * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        g = _load_f32(G, offs, n, False)
    else:
        g = _load_f32(G, offs, n, True)
    tl.store(PART + pid, tl.sum(g * g, axis=0))


@triton.jit
def _sum_kernel(
    PART,  # (n,) fp32 partial sums
    OUT,  # (1,) fp32: their total
    n,
    BLOCK: tl.constexpr,
):
    # one program: BLOCK running sums over strided partials, then one tree sum: a fixed order
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(PART + offs, mask=offs < n, other=0.0)
    tl.store(OUT, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------- launcher checks
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str = "") -> None:
    """ValueError for hyperparameters torch.optim.AdamW would reject (or that break the math)."""
    lr = float(lr)
    if not lr >= 0.0:  # also NaN
        raise ValueError(f"{where}lr must be >= 0, got {lr}")
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"{where}betas must be a pair of floats, got {betas!r}") from None
    for i, b in enumerate((beta1, beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}betas[{i}] must lie in [0, 1), got {b}")
    if not float(eps) > 0.0:
        raise ValueError(f"{where}eps must be > 0, got {eps}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"{where}weight_decay must be >= 0, got {weight_decay}")


def _check_max_grad_norm(max_grad_norm: float | None) -> float | None:
    if max_grad_norm is None:
        return None
    max_grad_norm = float(max_grad_norm)
    if not (max_grad_norm > 0.0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a finite number > 0 (or None), got {max_grad_norm}")
    return max_grad_norm


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if _interpreting():
            raise ValueError("FusedAdamW under TRITON_INTERPRET=1 runs on CPU tensors only: its "
                             "kernels follow raw addresses from pointer tables, which Triton's "
                             "interpreter can only read in host memory; unset TRITON_INTERPRET to "
                             "run the compiled kernels on the GPU")
        return
    if device.type == "cpu":
        if not _interpreting():
            raise ValueError("FusedAdamW got CPU tensors; its Triton kernels need CUDA tensors "
                             "(move the model to the GPU first), or Triton's interpreter "
                             "(TRITON_INTERPRET=1 set before triton is imported)")
        return
    raise ValueError(f"FusedAdamW runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def _check_tensor_set(i: int, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                      w: torch.Tensor | None) -> None:
    """Dtypes, devices, shapes and layouts of one parameter's tensors (``i`` names it)."""
    what = f"parameter {i} (shape {tuple(p.shape)})"
    if p.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{what} has dtype {p.dtype}; FusedAdamW updates float32, float16 and "
                         "bfloat16 parameters")
    if g.is_sparse or p.is_sparse:
        raise ValueError(f"{what} has a sparse gradient; FusedAdamW does not support sparse "
                         "gradients (use torch.optim.SparseAdam)")
    if not _is_dense(p):
        raise ValueError(f"{what} is not dense (strides {p.stride()}); FusedAdamW treats each "
                         "tensor as one run of memory")
    if g.dtype != p.dtype:
        raise ValueError(f"{what}: gradient dtype {g.dtype} differs from the parameter's {p.dtype}")
    state_dtype = torch.float32 if w is not None else p.dtype
    named = [("gradient", g), ("exp_avg", m), ("exp_avg_sq", v)] + ([("master", w)] if w is not None else [])
    for name, t in named:
        if t.device != p.device:
            raise ValueError(f"{what}: its {name} is on {t.device}, the parameter on {p.device}")
        if t.shape != p.shape or t.stride() != p.stride():
            raise ValueError(f"{what}: its {name} has shape {tuple(t.shape)} and strides "
                             f"{t.stride()}, the parameter {tuple(p.shape)} and {p.stride()}")
        if name != "gradient" and t.dtype != state_dtype:
            raise ValueError(f"{what}: its {name} has dtype {t.dtype}, expected {state_dtype}"
                             + (" (master weights keep fp32 state)" if w is not None else
                                " (the parameter's dtype, as torch.optim.AdamW keeps it)"))


# ----------------------------------------------------------------------------- launchers
class _Launch(NamedTuple):
    """The tensors of one kernel launch: one (device, param dtype, state dtype, master) group."""

    device: torch.device
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    has_master: bool
    index: list[int]  # positions in the caller's lists


def _group_launches(params: list[torch.Tensor], exp_avgs: list[torch.Tensor] | None,
                    masters: list[torch.Tensor | None] | None) -> list[_Launch]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        has_master = masters is not None and masters[i] is not None
        state_dtype = exp_avgs[i].dtype if exp_avgs is not None else p.dtype
        groups.setdefault((p.device, p.dtype, state_dtype, has_master), []).append(i)
    return [_Launch(*key, idx) for key, idx in groups.items()]


@functools.lru_cache(maxsize=32)
def _block_table(numels: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
    """(programs, 2) int32 [tensor, block] on ``device``: every block of every non-empty tensor."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts  # each tensor's first program
    blk = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(first, counts)
    return torch.stack([tensor, blk], 1).to(torch.int32).to(device)


def _ptr_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, _PTR_COLS).to(device)


def _aligned(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def adamw_grad_sumsq(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every element of ``grads``, as a CPU fp32 scalar (one host sync).

    Per device: one ``_adamw_grad_sumsq_kernel`` launch per gradient dtype writes a partial sum
    per block into one buffer, and ``_sum_kernel`` adds them in a fixed order; the per-device
    totals are added on the host in the order of first appearance. Deterministic for a given
    list of tensor sizes. inf / NaN gradients give an inf / NaN total.
    """
    total = torch.zeros((), dtype=torch.float32)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        if g.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"gradient {i} has dtype {g.dtype}; float32, float16 or bfloat16 expected")
        if g.is_sparse:
            raise ValueError(f"gradient {i} is sparse; FusedAdamW does not support sparse gradients")
        if not _is_dense(g):
            raise ValueError(f"gradient {i} is not dense (strides {g.stride()})")
        by_device.setdefault(g.device, []).append(i)
    for device, idx in by_device.items():
        _check_device(device)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in idx:
            if grads[i].numel():
                by_dtype.setdefault(grads[i].dtype, []).append(i)
        tables = []
        for dtype, ids in by_dtype.items():
            numels = tuple(grads[i].numel() for i in ids)
            blocks = _block_table(numels, ADAMW_BLOCK, device)
            ptrs = _ptr_table([[0, grads[i].data_ptr(), 0, 0, 0, grads[i].numel()] for i in ids], device)
            tables.append((dtype, blocks, ptrs, _aligned(*(grads[i] for i in ids))))
        n_part = sum(b.shape[0] for _, b, _, _ in tables)
        if n_part == 0:
            continue
        part = torch.empty(n_part, dtype=torch.float32, device=device)
        out = torch.empty(1, dtype=torch.float32, device=device)
        offset = 0
        for dtype, blocks, ptrs, aligned in tables:
            programs = blocks.shape[0]
            _adamw_grad_sumsq_kernel[(programs,)](
                blocks, ptrs, part[offset:offset + programs], GRAD_DTYPE=_TL_DTYPE[dtype],
                ALIGNED=aligned, BLOCK=ADAMW_BLOCK, num_warps=ADAMW_NUM_WARPS)
            offset += programs
        _sum_kernel[(1,)](part, out, n_part, BLOCK=_SUM_BLOCK, num_warps=4)
        total = total + out.cpu()[0]
    return total


def _hyper_row(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               step: float) -> list[float]:
    """The per-tensor scalars of ``HYPER`` for a tensor at ``step`` (after this update), in
    double precision as torch computes them (rounded to fp32 when stored)."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return [1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, -(lr / bias_correction1),
            bias_correction2 ** 0.5, eps, 0.0]


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    hyper: list[list[float]],
    master_params: list[torch.Tensor | None] | None = None,
    clip_coef: float = 1.0,
) -> None:
    """Launch ``_adamw_update_kernel`` once per (device, param dtype, state dtype, master) group.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: matching lists; grads in the params' dtype,
            moments fp32 where a master is given, else in the param's dtype.
        hyper: per tensor, the 8 scalars of ``_hyper_row`` (the step count after this update).
        master_params: per tensor an fp32 master copy or None (None: no masters at all).
        clip_coef: every gradient is multiplied by it.
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(hyper) == n) or \
            (master_params is not None and len(master_params) != n):
        raise ValueError("adamw_update: params, grads, exp_avgs, exp_avg_sqs, hyper (and "
                         "master_params) must have one entry per parameter")
    masters = master_params if master_params is not None else [None] * n
    for i in range(n):
        _check_tensor_set(i, params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i])
        if len(hyper[i]) != _HYPER_COLS:
            raise ValueError(f"hyper[{i}] must hold {_HYPER_COLS} scalars, got {len(hyper[i])}")
        _check_device(params[i].device)
    _launch_update(params, grads, exp_avgs, exp_avg_sqs, hyper, masters, clip_coef)


def _launch_update(params, grads, exp_avgs, exp_avg_sqs, hyper, masters, clip_coef) -> None:
    """``adamw_update`` after its checks."""
    for launch in _group_launches(params, exp_avgs, masters):
        ids = [i for i in launch.index if params[i].numel() > 0]
        if not ids:
            continue
        blocks = _block_table(tuple(params[i].numel() for i in ids), ADAMW_BLOCK, launch.device)
        rows, aligned = [], True
        for i in ids:
            w = masters[i]
            rows.append([params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                         exp_avg_sqs[i].data_ptr(), 0 if w is None else w.data_ptr(),
                         params[i].numel()])
            aligned = aligned and _aligned(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], w)
        ptrs = _ptr_table(rows, launch.device)
        hyp = torch.tensor([hyper[i] for i in ids], dtype=torch.float32).to(launch.device)
        _adamw_update_kernel[(blocks.shape[0],)](
            blocks, ptrs, hyp, float(clip_coef),
            PARAM_DTYPE=_TL_DTYPE[launch.param_dtype], STATE_DTYPE=_TL_DTYPE[launch.state_dtype],
            HAS_MASTER=launch.has_master, ALIGNED=aligned, BLOCK=ADAMW_BLOCK,
            num_warps=ADAMW_NUM_WARPS)


class _Item(NamedTuple):
    """One parameter's share of a step."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    master: torch.Tensor | None
    step: torch.Tensor  # CPU float32 scalar, the steps taken so far
    hyper: tuple  # (lr, beta1, beta2, eps, weight_decay)


def _clip_coef(norm: torch.Tensor, max_grad_norm: float) -> float:
    """``min(1, max_norm / (norm + 1e-6))`` in fp32, as ``clip_grad_norm_`` computes it."""
    coef = max_grad_norm / (norm + _CLIP_EPS)  # fp32 tensor ops, like torch's
    return float(torch.clamp(coef, max=1.0))


def _fused_step(items: list[_Item], max_grad_norm: float | None,
                skip_nonfinite: bool) -> tuple[bool, float | None]:
    """The fused step over ``items``: (stepped, global grad norm or None when not computed)."""
    if not items:
        return True, None
    norm_t = None
    coef = 1.0
    for i, it in enumerate(items):  # checked before anything is read
        _check_tensor_set(i, it.param, it.grad, it.exp_avg, it.exp_avg_sq, it.master)
        _check_device(it.param.device)
    if max_grad_norm is not None or skip_nonfinite:
        norm_t = torch.sqrt(adamw_grad_sumsq([it.grad for it in items]))
        if not bool(torch.isfinite(norm_t)):
            return False, float(norm_t)
        if max_grad_norm is not None:
            coef = _clip_coef(norm_t, max_grad_norm)
    steps = [it.step for it in items]
    torch._foreach_add_(steps, 1)
    rows: dict[tuple, list[float]] = {}
    hyper = []
    for it in items:
        key = (*it.hyper, float(it.step))
        if key not in rows:
            rows[key] = _hyper_row(*key)
        hyper.append(rows[key])
    _launch_update([it.param for it in items], [it.grad for it in items],
                   [it.exp_avg for it in items], [it.exp_avg_sq for it in items], hyper,
                   [it.master for it in items], coef)
    return True, None if norm_t is None else float(norm_t)


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = None,
    master_params: list[torch.Tensor | None] | None = None,
    skip_nonfinite: bool = True,
) -> tuple[bool, float | None]:
    """Functional fused AdamW step over one group of tensors, in place (``adamw_ref``'s twin).

    Args: as ``adamw_ref``; ``master_params`` entries may be None for fp32 parameters.
    Returns:
        (stepped, grad norm): stepped is False when non-finite gradients skipped the step
        (nothing is written, ``steps`` unchanged); the norm is None when it was not computed
        (no clipping and ``skip_nonfinite=False``).
    """
    _check_hyper(lr, betas, eps, weight_decay)
    max_grad_norm = _check_max_grad_norm(max_grad_norm)
    if len({p.device for p in params}) > 1:
        raise ValueError("adamw_step: all parameters must be on one device, got "
                         + ", ".join(sorted({str(p.device) for p in params})))
    masters = master_params if master_params is not None else [None] * len(params)
    hyper = (float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay))
    items = [_Item(*t, hyper) for t in zip(params, grads, exp_avgs, exp_avg_sqs, masters, steps)]
    return _fused_step(items, max_grad_norm, skip_nonfinite)


# ----------------------------------------------------------------------------- optimizer
class FusedAdamW(torch.optim.Optimizer):
    """AdamW with fused Triton kernels: one launch per (device, dtype) group of parameters.

    Same math and state keys as ``torch.optim.AdamW`` (decoupled weight decay, bias correction),
    plus fp32 master weights for 16-bit parameters, fused global gradient-norm clipping and a
    skip of steps with non-finite gradients. Param groups may set their own ``lr``, ``betas``,
    ``eps`` and ``weight_decay``; each step reads them (LR schedulers work).

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        master_weights: keep an fp32 master copy and fp32 moments for bf16 / fp16 parameters
            (state key "master_param"); the parameter becomes the master rounded each step.
        max_grad_norm: clip the global L2 norm of all gradients to this (None: no clipping).
        skip_nonfinite: skip steps whose gradients hold inf / NaN (needs the norm pass and one
            host sync per step; with ``max_grad_norm`` the norm is computed anyway).

    Attributes:
        skipped_steps: number of steps skipped for non-finite gradients.
        grad_norm: global gradient norm of the last ``step`` (before clipping), or None.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, master_weights: bool = False,
                 max_grad_norm: float | None = None, *, skip_nonfinite: bool = True):
        _check_hyper(lr, betas, eps, weight_decay)
        self.master_weights = bool(master_weights)
        self.max_grad_norm = _check_max_grad_norm(max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_steps = 0
        self.grad_norm: float | None = None
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check_hyper(g["lr"], g["betas"], g["eps"], g["weight_decay"],
                     f"param group {len(self.param_groups) - 1}: ")

    def _uses_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype in (torch.float16, torch.bfloat16)

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state_dtype = torch.float32 if self._uses_master(p) else p.dtype
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
        if self._uses_master(p):
            state["master_param"] = p.detach().float()  # preserve_format: the param's strides

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One fused AdamW step over every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items: list[_Item] = []
        for gi, group in enumerate(self.param_groups):
            _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                         f"param group {gi}: ")
            hyper = (float(group["lr"]), float(group["betas"][0]), float(group["betas"][1]),
                     float(group["eps"]), float(group["weight_decay"]))
            devices = set()
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"param group {gi}: a parameter of shape {tuple(p.shape)} has "
                                     "a sparse gradient; FusedAdamW does not support sparse gradients")
                devices.add(p.device)
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                grad = p.grad if p.grad.stride() == p.stride() else _relayout(p.grad, p)
                items.append(_Item(p, grad, state["exp_avg"], state["exp_avg_sq"],
                                   state.get("master_param"), state["step"], hyper))
            if len(devices) > 1:
                raise ValueError(f"param group {gi} has parameters on different devices "
                                 f"({', '.join(sorted(map(str, devices)))}); FusedAdamW updates "
                                 "each group on one device")
        stepped, self.grad_norm = _fused_step(items, self.max_grad_norm, self.skip_nonfinite)
        if not stepped:
            self.skipped_steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``FusedAdamW`` or ``torch.optim.AdamW`` state dict.

        State values keep fp32 where this optimizer keeps fp32 (master weights), whatever the
        base class would cast them to; a missing master is made from the parameter; a "step"
        is held as a CPU float32 tensor.
        """
        for i, g in enumerate(state_dict["param_groups"]):
            for flag in ("amsgrad", "maximize"):
                if g.get(flag, False):
                    raise ValueError(f"param group {i} of the loaded state has {flag}=True, which "
                                     "FusedAdamW does not implement")
            if g.get("decoupled_weight_decay", True) is False and g.get("weight_decay", 0.0):
                raise ValueError(f"param group {i} of the loaded state is Adam with L2 weight decay "
                                 "(decoupled_weight_decay=False), not AdamW")
            _check_hyper(g["lr"], g["betas"], g["eps"], g["weight_decay"], f"loaded param group {i}: ")
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            saved, state = saved_state[pid], self.state[p]
            step = saved.get("step", 0.0)
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
            dtype = torch.float32 if self._uses_master(p) else p.dtype
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:  # from the saved tensor, not the base class's cast copy
                    state[key] = _relayout(saved[key].to(device=p.device, dtype=dtype), p)
            if self._uses_master(p):
                master = saved.get("master_param")
                master = p.detach() if master is None else master
                state["master_param"] = _relayout(master.to(device=p.device, dtype=torch.float32), p)
            else:
                state.pop("master_param", None)


def _relayout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (a copy only when they differ)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


# ----------------------------------------------------------------------------- check, compile and IO cases
_CASE_HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _split(flat: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Views of consecutive ``sizes`` elements of ``flat``: several tensors, some unaligned."""
    return list(torch.split(flat, list(sizes)))


def adamw_case(sizes: tuple[int, ...], master: bool = True, max_grad_norm: float | None = None,
               prior_steps: int = 4) -> OpCase:
    """An ``OpCase`` of one step over tensors of ``sizes`` elements (views of one buffer, so all
    but the first are generally not 16-byte aligned).

    Inputs are flat buffers: param, grad, exp_avg, exp_avg_sq (and master). fp16 / bf16 with
    ``master``: fp32 master and moments; ``master=False``: state in the param's dtype. Outputs:
    the update (new - old, in fp32) of the master, or of the param without one, the new exp_avg
    and exp_avg_sq and, with a master, the new 16-bit param. The eager run in a 16-bit dtype
    without master is ``torch.optim.AdamW`` on 16-bit tensors; with master it is the fp32 update
    on the master. Nothing is differentiated, so only outputs are compared.
    """
    total = sum(sizes)
    parts = [f"{'+'.join(map(str, sizes))}", "master" if master else "no-master"]
    if max_grad_norm is not None:
        parts.append(f"clip{max_grad_norm}")
    name = f"adamw[{' '.join(parts)}] step {prior_steps + 1}"

    def make_inputs(device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        has_master = master and dtype != torch.float32
        state_dtype = torch.float32 if has_master else dtype

        def rnd(scale=1.0, shift=0.0, dt=dtype):
            return (torch.randn(total, generator=gen) * scale + shift).to(device=device, dtype=dt)

        param = rnd()
        return dict(
            param=param, grad=rnd(),
            exp_avg=rnd(0.1, dt=state_dtype), exp_avg_sq=rnd(0.01, dt=state_dtype).abs(),
            master=param.float() if has_master else None,
            sizes=sizes, steps=prior_steps, max_grad_norm=max_grad_norm, **_CASE_HYPER)

    def run(fn, param, grad, exp_avg, exp_avg_sq, master, sizes, steps, **kw):
        # the update (new - old, exact in fp32 for 16-bit values) of the tensor that holds the
        # optimizer's result, the master if any, so the budget is relative to the step rather
        # than to the weights (a no-op passes a budget relative to max |param| when the step is
        # smaller); a 16-bit parameter beside its master is compared as it is (the master rounded)
        target = master if master is not None else param
        old = target.clone()
        views = [_split(t, sizes) if t is not None else None
                 for t in (param, grad, exp_avg, exp_avg_sq, master)]
        step_ts = [torch.tensor(float(steps)) for _ in sizes]
        fn(*views[:4], step_ts, master_params=views[4], **kw)
        wide = torch.promote_types(target.dtype, torch.float32)  # fp32, fp64 in a reference
        update = target.to(wide) - old.to(wide)
        return (update, exp_avg, exp_avg_sq) + ((param,) if master is not None else ())

    def kernel_fn(**inputs):
        return run(adamw_step, **inputs)

    def ref_fn(upcast=False, **inputs):
        # upcast (the reference of a 16-bit case): fp64, so the reference is more precise than
        # the fp32 master and moments too (in fp32 it would be the eager computation itself)
        if upcast:
            inputs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return run(adamw_ref, **inputs)

    return OpCase(name, make_inputs, kernel_fn, ref_fn)


def check_cases() -> list[OpCase]:
    """The cases ``python -m kernels.check`` runs: odd sizes, several tensors, both state modes,
    clipping that bites (the grads' norm is ~sqrt(n) > 1)."""
    return [
        adamw_case((1,)),
        adamw_case((7, 1, 2053), master=True),
        adamw_case((7, 1, 2053), master=False),
        adamw_case((4096, 13, 29), master=True, max_grad_norm=1.0),
        adamw_case((2048, 384), master=False, max_grad_norm=1.0, prior_steps=0),
    ]


_COMPILE_DTYPES = (  # (param dtype, state dtype, master): every combination the launcher accepts
    ("fp32", "fp32", False), ("bf16", "bf16", False), ("fp16", "fp16", False),
    ("bf16", "fp32", True), ("fp16", "fp32", True),
)
_TL_BY_NAME = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}


def compile_specs() -> list[CompileSpec]:
    """One ``CompileSpec`` per kernel configuration the launchers can pick.

    The update kernel for each (param, state, master) combination and the grad-norm kernel for
    each gradient dtype, each ``ALIGNED`` (full blocks vectorised) and not; BLOCK and num_warps
    are fixed (``ADAMW_BLOCK``, ``ADAMW_NUM_WARPS``). The tables are torch allocations, so the
    pointer arguments are 16-byte aligned (``bench.compile``'s default); the tensors' addresses
    come from the tables and are only assumed aligned under ``ALIGNED``.
    """
    specs: list[CompileSpec] = []
    stages = 3
    upd_sig = dict(BLOCKS="*i32", PTRS="*i64", HYPER="*fp32", clip_coef="fp32",
                   PARAM_DTYPE="constexpr", STATE_DTYPE="constexpr", HAS_MASTER="constexpr",
                   ALIGNED="constexpr", BLOCK="constexpr")
    cfg = f"BLOCK={ADAMW_BLOCK} warps={ADAMW_NUM_WARPS}"
    for aligned in (True, False):
        al = "aligned" if aligned else "unaligned"
        for par, st, master in _COMPILE_DTYPES:
            dt = f"{par} params, {st} state" + (" + fp32 master" if master else "")
            specs.append(CompileSpec(
                "_adamw_update_kernel", _adamw_update_kernel, upd_sig,
                dict(PARAM_DTYPE=_TL_BY_NAME[par], STATE_DTYPE=_TL_BY_NAME[st], HAS_MASTER=master,
                     ALIGNED=aligned, BLOCK=ADAMW_BLOCK),
                ADAMW_NUM_WARPS, stages, f"adamw update {dt} {al} {cfg}"))
        for g in ("fp32", "fp16", "bf16"):
            specs.append(CompileSpec(
                "_adamw_grad_sumsq_kernel", _adamw_grad_sumsq_kernel,
                dict(BLOCKS="*i32", PTRS="*i64", PART="*fp32", GRAD_DTYPE="constexpr",
                     ALIGNED="constexpr", BLOCK="constexpr"),
                dict(GRAD_DTYPE=_TL_BY_NAME[g], ALIGNED=aligned, BLOCK=ADAMW_BLOCK),
                ADAMW_NUM_WARPS, stages, f"adamw grad sum of squares {g} grads {al} {cfg}"))
    specs.append(CompileSpec(
        "_sum_kernel", _sum_kernel, dict(PART="*fp32", OUT="*fp32", n="i32", BLOCK="constexpr"),
        dict(BLOCK=_SUM_BLOCK), 4, stages, f"adamw partial-sum reduce BLOCK={_SUM_BLOCK} warps=4"))
    return specs


def _bert_layer_shapes(hidden: int) -> list[tuple[int, ...]]:
    """The 16 parameter shapes of a BERT encoder layer of width ``hidden`` (FFN 4 x hidden)."""
    h, f = hidden, 4 * hidden
    attn = [(h, h), (h,)] * 4  # query, key, value, attention output: weight, bias
    return attn + [(h,), (h,), (f, h), (f,), (h, f), (h,), (h,), (h,)]  # LN, FFN in, FFN out, LN


def _bert_shaped(numel: int, hidden: int) -> list[tuple[int, ...]]:
    """Shapes of ``numel`` elements in all: BERT encoder-layer tensors of width ``hidden``, in
    order, while the next one fits, then the rest as a (rows, hidden) matrix and a vector."""
    shapes, used = [], 0
    layer = _bert_layer_shapes(hidden)
    while True:
        for s in layer:
            n = math.prod(s)
            if used + n > numel:
                rest = numel - used
                shapes += [s for s in ((rest // hidden, hidden), (rest % hidden,)) if math.prod(s)]
                return shapes
            shapes.append(s)
            used += n


def io_cases(tokens: int, hidden: int, dtype: torch.dtype) -> list[IOCase]:
    """One optimizer step's memory traffic on CPU tensors (the kernels under the interpreter).

    The parameter count is ``tokens * hidden`` elements (1.6M to 16.8M on bench.io's default grid),
    laid out as BERT encoder-layer tensors of width ``hidden`` (big matrices and many
    hidden-sized vectors; ``_bert_shaped``). Parameters and gradients in ``dtype``; 16-bit
    dtypes use master weights (fp32 master and moments). With s the parameter itemsize and
    q = 4 the state itemsize (s without a master), per parameter:
      - ``plain`` (no clipping, ``skip_nonfinite=False``): read grad (s), m, v (q each) and the
        master (4) or the parameter (s); write m, v, the master and the parameter.
        Lower bound: bf16 + master 2 + 4 + 4 + 4 + 4 + 4 + 4 + 2 = 28 B; fp32 28 B.
      - ``clip`` (max_grad_norm=1.0, the default non-finite check): the gradients are read once
        more to get the global norm before anything is written (a step that may be skipped, or
        whose clip coefficient depends on every gradient, must), so the bound is 28 + s.
    Above the bound the kernels add only their tables (BLOCKS 8 B per 2048 elements, 48 + 32 B
    per tensor) and the per-block partial sums (4 B per 2048 elements). In-place updates read and
    write the same addresses, so ``unique`` (distinct bytes touched) is below the bound.
    The eager run is ``adamw_ref`` with ``foreach=True`` (torch's AdamW functional, the code of
    ``torch.optim.AdamW(foreach=True).step()``), after ``clip_grad_norm_(foreach=True)`` for
    ``clip``, on fp32 masters with fp32 copies of the gradients for 16-bit dtypes.
    flops: ~15 per element for the update, 2 for the norm.
    """
    shapes = _bert_shaped(tokens * hidden, hidden)
    numel = tokens * hidden
    master = dtype != torch.float32
    s = torch.empty((), dtype=dtype).element_size()
    q = 4 if master else s
    lb_plain = numel * (2 * s + 4 * q + (8 if master else 0)) if master else numel * (3 * s + 4 * q)
    cases = []
    for name, clip in (("plain", None), ("clip", 1.0)):
        gen = torch.Generator().manual_seed(0 if clip is None else 1)
        values = [torch.randn(sh, generator=gen).to(dtype) for sh in shapes]
        grads = [torch.randn(sh, generator=gen).to(dtype) for sh in shapes]
        # kernel side: a FusedAdamW whose state exists before the measured step
        params = [torch.nn.Parameter(v.clone()) for v in values]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = FusedAdamW(params, lr=1e-3, weight_decay=0.01, master_weights=master,
                         max_grad_norm=clip, skip_nonfinite=clip is not None)
        for p in params:
            opt._init_state(p, opt.state[p])
        # eager side: the same tensors and state for torch's AdamW functional
        e_params = [v.clone() for v in values]
        e_grads = [g.clone() for g in grads]
        e_state_dtype = torch.float32 if master else dtype
        e_m = [torch.zeros(sh, dtype=e_state_dtype) for sh in shapes]
        e_v = [torch.zeros(sh, dtype=e_state_dtype) for sh in shapes]
        e_w = [v.float() for v in values] if master else None
        e_steps = [torch.tensor(0.0) for _ in shapes]

        def run_eager(e_params=e_params, e_grads=e_grads, e_m=e_m, e_v=e_v, e_w=e_w,
                      e_steps=e_steps, clip=clip):
            adamw_ref(e_params, e_grads, e_m, e_v, e_steps, lr=1e-3, weight_decay=0.01,
                      max_grad_norm=clip, master_params=e_w, foreach=True)

        lb = lb_plain + (numel * s if clip is not None else 0)
        label = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype] \
            + ("+master" if master else "")
        cases.append(IOCase(
            f"adamw {name} {label} {numel / 1e6:.1f}M params ({len(shapes)} tensors, h={hidden})",
            opt.step, run_eager, lb, numel * (15 + (2 if clip is not None else 0))))
    return cases
