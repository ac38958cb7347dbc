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
    untouched, the step counters do not advance and ``skipped_steps`` counts it. The decision
    is a predicate on the device (as torch's ``_fused_adamw`` with ``found_inf``): no host read.
    The norm is computed for this check even without clipping (``skip_nonfinite=False`` turns
    the check off when clipping is off: no extra pass over the gradients).
  - ``capturable=True``: ``step()`` may be captured in a CUDA graph (see ``FusedAdamW``).

What is fused. The tensors of a launch are reached through pointer tables, not copied into a
flat buffer: ``PTRS`` (T, 7) int64 holds the addresses of each tensor's parameter, gradient,
exp_avg, exp_avg_sq, master (0 when none), its element count and the address of its step count;
``BLOCKS`` (programs, 2) int32 gives each program (tensor, block within it); ``GROUP`` (T,) each
tensor's param group. Program i updates ``BLOCK`` elements of one tensor, so the grid is the
total element count / BLOCK plus at most one partial block per tensor. Full blocks load and
store unmasked; when every address of a launch is 16-byte aligned (torch allocations are) the
launcher says so (``ALIGNED``) and the full blocks compile to 16-byte vector accesses. These
tables are built once per parameter set (``_Plan``) and reused while every address and size
is unchanged (a gradient freed by ``zero_grad(set_to_none=True)`` usually comes back at its
address; when it does not, the tables are rebuilt). ``HYPER`` (G, 5) fp64 holds each param
group's lr, betas, eps and weight decay, rebuilt when a float value changes (a scheduler's lr:
a few bytes, copied asynchronously from pinned memory) or refreshed on the device from a tensor
lr. Each step then runs, per launch: ``_adamw_hyper_kernel`` (step counts += 1 unless skipped;
the per-tensor scalars with the bias corrections, in fp64, into ``TAB``) and
``_adamw_update_kernel``; before them, with a norm, ``_adamw_grad_sumsq_kernel`` and
``_sum_kernel`` (norm, clip coefficient and skip flag into a 4-float ``STATUS``).

Traffic per element (one step): read grad, m, v, and the master (or the parameter); write m, v,
the master and the parameter: the lower bound. The non-finite check / norm reads the gradients
once more. Nothing is read back to the host: ``grad_norm`` is a device tensor.

Dtypes: parameters (and their gradients) fp32, fp16 or bf16; state fp32 with master weights,
else in the parameter's dtype, like ``torch.optim.AdamW``; all math in fp32, with IEEE sqrt
and division (``tl.sqrt_rn`` / ``tl.div_rn``) as torch uses. Sizes: any number of tensors of
any size (offsets are int64); tensors must be dense (contiguous, or at least non-overlapping and
dense, with the gradient and state in the parameter's layout). BLOCK = 2048 elements, 8 warps,
for every dtype: 58 to 128 registers, no spills on sm_80 / sm_90 (``compile_specs``). The
master-weight variant stages its fp32 stores through 8 KiB of shared memory (Triton computes in
the 8-elements-per-thread layout of the 16-bit gradient load and stores fp32 4 per thread).

Devices: param groups may live on different devices (one launch set per device; the gradient
norm adds the per-device sums on the first device, with device-to-device copies); all
parameters of one group share a device.
Under DeepSpeed ZeRO 1 / 2 (bf16) as the client optimizer it receives one flat fp32 partition
per group and steps it like any fp32 parameter; DeepSpeed wants
``"zero_allow_untested_optimizer": true`` for it, and clips with its own
``gradient_clipping`` (leave ``max_grad_norm`` None there, or gradients are clipped twice).

State keys follow ``torch.optim.AdamW`` ("step" a float32 tensor, on the parameter's device as
torch keeps it with ``capturable=True`` or ``fused=True``; "exp_avg", "exp_avg_sq", plus
"master_param" with master weights), so each optimizer loads the other's ``state_dict``.

Known limits: kernels launch on CUDA tensors; under Triton's interpreter (``TRITON_INTERPRET=1``)
on CPU tensors only (the kernels follow raw addresses from the pointer tables, which the
interpreter can only do for host memory). No amsgrad, maximize or sparse gradients. Step counts
are exact up to 2**24 (fp32, as torch's). Under the interpreter the fp32 -> bf16 rounding of the
parameter is only round-to-nearest-even with ``kernels._interpreter`` installed (Triton 3.9 truncates).
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
_PTR_COLS = 7  # PTRS row: param, grad, exp_avg, exp_avg_sq, master, numel, step
_HYPER_BLOCK_T = 128  # tensors per program of _adamw_hyper_kernel
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
# sqrt(1 - beta2^t), eps) come from TAB, which _adamw_hyper_kernel writes on the device each step
# in double precision, rounded to fp32, as torch rounds the Python scalars it passes to its fp32
# ops. c and the skip flag come from STATUS (written by _sum_kernel): a skipped step (non-finite
# gradients) writes nothing, a predicate on the device, as torch's _fused_adamw with found_inf.
# With HAS_MASTER, p is the fp32 master W, stored back, and the 16-bit parameter P receives it
# rounded to nearest even.
@triton.jit
def _adamw_update_kernel(
    BLOCKS,  # (programs, 2) int32: [tensor index, block index within the tensor] per program
    PTRS,  # (T, 7) int64: addresses of param, grad, exp_avg, exp_avg_sq, master (or 0); numel;
           #   step (read by _adamw_hyper_kernel only)
    TAB,  # (T, 8) fp32 per-tensor scalars of this step: 1 - lr wd, 1 - beta1, beta2, 1 - beta2,
          #   -lr / (1 - beta1^t), sqrt(1 - beta2^t), eps, (unused)
    STATUS,  # (4,) fp32: sum of squared grads, norm, clip coefficient, skip (read when HAS_STATUS)
    PARAM_DTYPE: tl.constexpr,  # dtype of the parameters and gradients
    STATE_DTYPE: tl.constexpr,  # dtype of exp_avg and exp_avg_sq (fp32 with master weights)
    HAS_MASTER: tl.constexpr,  # fp32 master weights at the fifth address
    HAS_STATUS: tl.constexpr,  # a gradient norm was computed: clip coefficient and skip flag
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned: full blocks vectorise
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(BLOCKS + 2 * pid).to(tl.int64)
    blk = tl.load(BLOCKS + 2 * pid + 1).to(tl.int64)
    if HAS_STATUS:
        clip_coef = tl.load(STATUS + 2)
        skip = tl.load(STATUS + 3)
    else:
        clip_coef = 1.0
        skip = 0.0
    if skip == 0.0:
        row = PTRS + t * 7
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
        hp = TAB + t * 8
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
def _pow_f64(base, e):
    """base ** e for fp64 ``base`` and int32 ``e`` in [0, 2**31) by binary powering (multiplies
    only: the same on GPUs and in the interpreter, ~1e-15 relative error)."""
    out = tl.full(base.shape, 1.0, tl.float64)
    for _ in tl.static_range(31):
        out = tl.where((e & 1) == 1, out * base, out)
        base = base * base
        e = e >> 1
    return out


# Per tensor, before the update (t = its step count): t += 1 unless the step is skipped, then
#   TAB = [1 - lr wd, 1 - beta1, beta2, 1 - beta2, -lr / (1 - beta1^t), sqrt(1 - beta2^t), eps, 0]
# in fp64 from the group's HYPER row (lr, beta1, beta2, eps, wd as doubles), rounded to fp32.
@triton.jit
def _adamw_hyper_kernel(
    PTRS,  # (T, 7) int64: the update's table; the step address (column 6) is read
    GROUP,  # (T,) int32: each tensor's row of HYPER
    HYPER,  # (G, 5) fp64: lr, beta1, beta2, eps, weight decay of each param group
    TAB,  # (T, 8) fp32: written
    STATUS,  # (4,) fp32: the skip flag at [3] (read when HAS_STATUS)
    T,
    HAS_STATUS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    t64 = t.to(tl.int64)
    hp = HYPER + tl.load(GROUP + t, mask=ok, other=0).to(tl.int64) * 5
    lr = tl.load(hp, mask=ok, other=0.0)
    beta1 = tl.load(hp + 1, mask=ok, other=0.0)
    beta2 = tl.load(hp + 2, mask=ok, other=0.0)
    eps = tl.load(hp + 3, mask=ok, other=1.0)
    wd = tl.load(hp + 4, mask=ok, other=0.0)
    step_ptr = tl.load(PTRS + t64 * 7 + 6, mask=ok, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr, mask=ok, other=0.0)
    if HAS_STATUS:
        step += 1.0 - tl.load(STATUS + 3)
    else:
        step += 1.0
    tl.store(step_ptr, step, mask=ok)
    e = tl.maximum(step.to(tl.int32), 1)  # (a skipped first step leaves 0: TAB is then unused)
    bc1 = 1.0 - _pow_f64(beta1, e)
    bc2 = 1.0 - _pow_f64(beta2, e)
    tab = TAB + t64 * 8
    tl.store(tab, (1.0 - lr * wd).to(tl.float32), mask=ok)
    tl.store(tab + 1, (1.0 - beta1).to(tl.float32), mask=ok)
    tl.store(tab + 2, beta2.to(tl.float32), mask=ok)
    tl.store(tab + 3, (1.0 - beta2).to(tl.float32), mask=ok)
    tl.store(tab + 4, (-(lr / bc1)).to(tl.float32), mask=ok)
    tl.store(tab + 5, tl.sqrt(bc2).to(tl.float32), mask=ok)
    tl.store(tab + 6, eps.to(tl.float32), mask=ok)
    tl.store(tab + 7, tl.zeros_like(lr).to(tl.float32), mask=ok)


@triton.jit
def _adamw_grad_sumsq_kernel(
    BLOCKS,  # (programs, 2) int32: [tensor index, block index], as for _adamw_update_kernel
    PTRS,  # (T, 7) int64: the update's table; only the gradient address and numel are read
    PART,  # (programs,) fp32: this program's sum of squared gradient elements
    GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    # sum over the block of g^2 in fp32 (inf / NaN propagate into the total)
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(BLOCKS + 2 * pid).to(tl.int64)
    blk = tl.load(BLOCKS + 2 * pid + 1).to(tl.int64)
    G = tl.load(PTRS + t * 7 + 1).to(tl.pointer_type(GRAD_DTYPE))
    n = tl.load(PTRS + t * 7 + 5)
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
    PART,  # (n,) fp32 partial sums of squared gradients
    STATUS,  # (4,) fp32, written: total, norm = sqrt(total), clip coefficient, skip (1.0 / 0.0)
    SKIPPED,  # (1,) fp32 count of skipped steps, incremented when this one is skipped
    n, max_grad_norm,
    HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program: BLOCK running sums over strided partials, then one tree sum: a fixed order
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(PART + offs, mask=offs < n, other=0.0)
    total = tl.sum(acc, axis=0)
    norm = tl.sqrt_rn(total)
    skip = tl.where(total <= 3.4028234663852886e38, 0.0, 1.0)  # 1.0 when inf or NaN
    coef = 1.0
    if HAS_CLIP:  # clip_grad_norm_'s fp32 math: min(1, max_norm / (norm + 1e-6))
        coef = tl.minimum(tl.div_rn(max_grad_norm + tl.zeros_like(norm), norm + 1e-6), 1.0)
    tl.store(STATUS, total)
    tl.store(STATUS + 1, norm)
    tl.store(STATUS + 2, coef)
    tl.store(STATUS + 3, skip)
    tl.store(SKIPPED, tl.load(SKIPPED) + skip)


# ----------------------------------------------------------------------------- launcher checks
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str = "") -> None:
    """ValueError for hyperparameters torch.optim.AdamW would reject (or that break the math).
    A tensor lr is checked for its shape only (its value would be a host read)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{where}lr as a tensor must hold one floating-point value, got "
                             f"{lr.dtype} of shape {tuple(lr.shape)}")
    elif not float(lr) >= 0.0:  # also NaN
        raise ValueError(f"{where}lr must be >= 0, got {float(lr)}")
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
class _Item(NamedTuple):
    """One parameter's share of a step."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    master: torch.Tensor | None
    step: torch.Tensor  # 0-d fp32 on the parameter's device: the steps taken so far
    group: int  # its param group: a row of the HYPER table


@functools.lru_cache(maxsize=32)
def _block_table(numels: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
    """(programs, 2) int32 [tensor, block] on ``device``: every block of every non-empty tensor."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts  # each tensor's first program
    blk = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(first, counts)
    return _to_device(torch.stack([tensor, blk], 1).to(torch.int32), device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to ``device`` without a host sync: on CUDA from pinned memory,
    asynchronously (torch's caching host allocator keeps the staging buffer until the copy ran)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _aligned(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_CAPTURE_HINT = ("run one step eagerly before capturing, keep the parameter set and gradient "
                 "buffers fixed, and give a learning rate that changes between replays as a "
                 "tensor (param_group['lr'] = torch.tensor(lr, device=...), updated in place)")


class _Plan:
    """The device tables of one update launch: the tensors of one (device, param dtype, state
    dtype, master) group. Built once per parameter set and reused while ``key`` (every address,
    size and param group) is unchanged, so a step copies nothing from the host."""

    def __init__(self, items: list[_Item], device: torch.device):
        self.key = _plan_key(items)
        self.device = device
        self.param_dtype, self.has_master = items[0].param.dtype, items[0].master is not None
        self.state_dtype = items[0].exp_avg.dtype
        self.blocks = _block_table(tuple(it.param.numel() for it in items), ADAMW_BLOCK, device)
        rows = [[it.param.data_ptr(), it.grad.data_ptr(), it.exp_avg.data_ptr(),
                 it.exp_avg_sq.data_ptr(), 0 if it.master is None else it.master.data_ptr(),
                 it.param.numel(), it.step.data_ptr()] for it in items]
        self.ptrs = _to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1, _PTR_COLS), device)
        self.group = _to_device(torch.tensor([it.group for it in items], dtype=torch.int32), device)
        self.tab = torch.empty((len(items), 8), dtype=torch.float32, device=device)
        self.aligned = all(_aligned(it.param, it.grad, it.exp_avg, it.exp_avg_sq, it.master)
                           for it in items)


def _plan_key(items: list[_Item]) -> tuple:
    return tuple((it.param.data_ptr(), it.grad.data_ptr(), it.exp_avg.data_ptr(),
                  it.exp_avg_sq.data_ptr(), 0 if it.master is None else it.master.data_ptr(),
                  it.step.data_ptr(), it.param.numel(), it.group) for it in items)


def _launch_key(it: _Item) -> tuple:
    return (it.param.device, it.param.dtype, it.exp_avg.dtype, it.master is not None)


class _Stepper:
    """Fused AdamW steps with their device tables cached: pointer tables per update launch
    (``_Plan``) and a (G, 5) fp64 HYPER table of the param groups' lr, betas, eps and weight
    decay per device, rebuilt only when the parameters or a float hyper-parameter change (a
    tensor lr is copied on the device each step). A step then reads nothing from the host and
    nothing back to it: the gradient norm, the clip coefficient, the skip decision and the step
    counts stay on the device."""

    def __init__(self):
        self.plans: dict[tuple, _Plan] = {}
        self.hyper: dict[torch.device, tuple[tuple, torch.Tensor]] = {}
        self.skipped: torch.Tensor | None = None  # (1,) fp32 skipped-step count, first device

    def _plan(self, key: tuple, items: list[_Item]) -> _Plan:
        plan = self.plans.get(key)
        if plan is None or plan.key != _plan_key(items):
            if _capturing(key[0]):
                raise RuntimeError("FusedAdamW.step() under CUDA-graph capture would rebuild its "
                                   "pointer tables (the parameters or their gradient buffers "
                                   f"changed): {_CAPTURE_HINT}")
            plan = self.plans[key] = _Plan(items, key[0])
        return plan

    def _hyper(self, device: torch.device, groups: list[tuple]) -> torch.Tensor:
        """The (G, 5) fp64 HYPER table on ``device``; a tensor lr is copied into it each step."""
        floats = tuple((None if isinstance(h[0], torch.Tensor) else h[0], *h[1:]) for h in groups)
        cached = self.hyper.get(device)
        if cached is None or cached[0] != floats:
            if _capturing(device):
                raise RuntimeError("FusedAdamW.step() under CUDA-graph capture found a changed "
                                   f"float hyper-parameter: {_CAPTURE_HINT}")
            rows = [[0.0 if lr is None else lr, *rest] for lr, *rest in floats]
            cached = self.hyper[device] = (floats, _to_device(
                torch.tensor(rows, dtype=torch.float64).reshape(-1, 5), device))
        table = cached[1]
        for g, h in enumerate(groups):
            if isinstance(h[0], torch.Tensor):
                table[g, 0].copy_(h[0].reshape(()), non_blocking=True)
        return table

    def _counter(self, device: torch.device) -> torch.Tensor:
        if self.skipped is None:
            self.skipped = torch.zeros(1, dtype=torch.float32, device=device)
        return self.skipped

    def step(self, items: list[_Item], groups: list[tuple], max_grad_norm: float | None,
             norm: bool) -> torch.Tensor | None:
        """One step over ``items`` (checked by the caller); ``groups``: per param group
        (lr, beta1, beta2, eps, weight decay). ``norm``: compute the gradient norm (and skip
        the step on inf / NaN), as clipping needs anyway. Returns the (4,) fp32 STATUS of the
        first device (sum of squares, norm, clip coefficient, skip) or None."""
        by_launch: dict[tuple, list[_Item]] = {}
        for it in items:
            by_launch.setdefault(_launch_key(it), []).append(it)
        plans = [self._plan(key, its) for key, its in by_launch.items()]
        self.plans = {key: self.plans[key] for key in by_launch}  # forget launches gone
        devices = list(dict.fromkeys(p.device for p in plans))
        status = _grad_norm_status([p for p in plans], devices, max_grad_norm,
                                   self._counter(devices[0])) if norm else {}
        for plan in plans:
            st = status.get(plan.device)
            T = plan.ptrs.shape[0]
            _adamw_hyper_kernel[(triton.cdiv(T, _HYPER_BLOCK_T),)](
                plan.ptrs, plan.group, self._hyper(plan.device, groups), plan.tab,
                plan.tab if st is None else st, T,
                HAS_STATUS=st is not None, BLOCK_T=_HYPER_BLOCK_T, num_warps=4)
            programs = plan.blocks.shape[0]
            if programs:
                _adamw_update_kernel[(programs,)](
                    plan.blocks, plan.ptrs, plan.tab, plan.tab if st is None else st,
                    PARAM_DTYPE=_TL_DTYPE[plan.param_dtype], STATE_DTYPE=_TL_DTYPE[plan.state_dtype],
                    HAS_MASTER=plan.has_master, HAS_STATUS=st is not None, ALIGNED=plan.aligned,
                    BLOCK=ADAMW_BLOCK, num_warps=ADAMW_NUM_WARPS)
        return status.get(devices[0]) if status else None


def _grad_norm_status(plans: list[_Plan], devices: list[torch.device],
                      max_grad_norm: float | None, skipped: torch.Tensor) -> dict:
    """Per device a (4,) fp32 STATUS: sum of squared gradients over every device, norm, clip
    coefficient, skip (1.0 when the norm is inf / NaN); ``skipped`` counts skipped steps.

    Per device one ``_adamw_grad_sumsq_kernel`` launch per plan writes a partial sum per block
    and ``_sum_kernel`` adds them in a fixed order (deterministic for given tensor sizes). With
    several devices the totals meet on the first one (device-to-device copies) and the STATUS
    found there is copied back: no host read anywhere.
    """
    status = {}
    for device in devices:
        mine = [p for p in plans if p.device == device and p.blocks.shape[0]]
        n_part = sum(p.blocks.shape[0] for p in mine)
        part = torch.empty(max(n_part, 1), dtype=torch.float32, device=device)
        offset = 0
        for p in mine:
            programs = p.blocks.shape[0]
            _adamw_grad_sumsq_kernel[(programs,)](
                p.blocks, p.ptrs, part[offset:offset + programs], GRAD_DTYPE=_TL_DTYPE[p.param_dtype],
                ALIGNED=p.aligned, BLOCK=ADAMW_BLOCK, num_warps=ADAMW_NUM_WARPS)
            offset += programs
        st = status[device] = torch.empty(4, dtype=torch.float32, device=device)
        counter = skipped if len(devices) == 1 else torch.zeros(1, dtype=torch.float32, device=device)
        _sum_kernel[(1,)](part, st, counter, n_part, float(max_grad_norm or 0.0),
                          HAS_CLIP=max_grad_norm is not None, BLOCK=_SUM_BLOCK, num_warps=4)
    if len(devices) > 1:  # the global norm on the first device, then everywhere
        first = devices[0]
        total = sum(status[d][0].to(first) for d in devices)
        norm = total.sqrt()
        coef = (max_grad_norm / (norm + _CLIP_EPS)).clamp(max=1.0) if max_grad_norm is not None \
            else torch.ones_like(norm)
        skip = (~torch.isfinite(total)).float()
        merged = torch.stack([total, norm, coef, skip])
        skipped += skip
        for d in devices:
            status[d].copy_(merged)
    return status


def adamw_grad_sumsq(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every element of ``grads``: a 0-d fp32 tensor on the first gradient's
    device (CPU for an empty list), computed without a host read (see ``_grad_norm_status``).
    inf / NaN gradients give an inf / NaN total."""
    items = []
    for i, g in enumerate(grads):
        if g.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"gradient {i} has dtype {g.dtype}; float32, float16 or bfloat16 expected")
        if g.is_sparse:
            raise ValueError(f"gradient {i} is sparse; FusedAdamW does not support sparse gradients")
        if not _is_dense(g):
            raise ValueError(f"gradient {i} is not dense (strides {g.stride()})")
        _check_device(g.device)
        # only the gradient's address and size are read: the other columns point at it too
        items.append(_Item(g, g, g, g, None, g, 0))
    if not items:
        return torch.zeros((), dtype=torch.float32)
    by_launch: dict[tuple, list[_Item]] = {}
    for it in items:
        by_launch.setdefault((it.param.device, it.param.dtype), []).append(it)
    plans = [_Plan(its, key[0]) for key, its in by_launch.items()]
    devices = list(dict.fromkeys(p.device for p in plans))
    counter = torch.zeros(1, dtype=torch.float32, device=devices[0])
    return _grad_norm_status(plans, devices, None, counter)[devices[0]][0]


def _hyper_row(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               step: float) -> list[float]:
    """The per-tensor scalars ``_adamw_hyper_kernel`` writes to TAB for a tensor at ``step``
    (after this update), in double precision as torch computes them: the host's formula, kept
    for tests and for ``adamw_update``."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return [1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, -(lr / bias_correction1),
            bias_correction2 ** 0.5, eps, 0.0]


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = None,
    master_params: list[torch.Tensor | None] | None = None,
    skip_nonfinite: bool = True,
) -> torch.Tensor | None:
    """Functional fused AdamW step over one group of tensors, in place (``adamw_ref``'s twin).

    Args: as ``adamw_ref``; ``steps`` are 0-d fp32 tensors on the parameters' device (as torch's
        capturable AdamW keeps them; incremented on the device unless the step is skipped);
        ``master_params`` entries may be None for fp32 parameters.
    Returns:
        the (4,) fp32 device STATUS (sum of squared gradients, norm, clip coefficient, skip flag:
        1.0 when non-finite gradients skipped the step and nothing was written), or None when
        no norm was computed (no clipping and ``skip_nonfinite=False``). Nothing is read back.
    """
    _check_hyper(lr, betas, eps, weight_decay)
    max_grad_norm = _check_max_grad_norm(max_grad_norm)
    if len({p.device for p in params}) > 1:
        raise ValueError("adamw_step: all parameters must be on one device, got "
                         + ", ".join(sorted({str(p.device) for p in params})))
    masters = master_params if master_params is not None else [None] * len(params)
    items = [_Item(*t, 0) for t in zip(params, grads, exp_avgs, exp_avg_sqs, masters, steps)]
    _check_items(items)
    if not items:
        return None
    group = (lr, float(betas[0]), float(betas[1]), float(eps), float(weight_decay))
    return _Stepper().step(items, [group], max_grad_norm, max_grad_norm is not None or skip_nonfinite)


def _check_items(items: list[_Item]) -> None:
    for i, it in enumerate(items):  # checked before anything is read
        _check_tensor_set(i, it.param, it.grad, it.exp_avg, it.exp_avg_sq, it.master)
        _check_device(it.param.device)
        if it.step.device != it.param.device or it.step.dtype != torch.float32 or it.step.numel() != 1:
            raise ValueError(f"parameter {i}: its step must be a one-element float32 tensor on "
                             f"{it.param.device} (as torch's capturable AdamW keeps it), got "
                             f"{it.step.dtype} {tuple(it.step.shape)} on {it.step.device}")


# ----------------------------------------------------------------------------- optimizer
class FusedAdamW(torch.optim.Optimizer):
    """AdamW with fused Triton kernels: one launch per (device, dtype) group of parameters.

    Same math and state keys as ``torch.optim.AdamW`` (decoupled weight decay, bias correction),
    plus fp32 master weights for 16-bit parameters, fused global gradient-norm clipping and a
    skip of steps with non-finite gradients. Param groups may set their own ``lr``, ``betas``,
    ``eps`` and ``weight_decay``; each step reads them (LR schedulers work). ``step()`` reads
    nothing back to the host: the norm, the clip coefficient, the skip decision and the step
    counts ("step", on the parameter's device as with torch's ``capturable=True``) stay on the
    device, and the pointer and hyper-parameter tables are rebuilt only when the parameters
    (or their gradient buffers) or a float hyper-parameter change.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; ``lr`` may be a one-element
            tensor (updated in place by a scheduler: read on the device every step).
        master_weights: keep an fp32 master copy and fp32 moments for bf16 / fp16 parameters
            (state key "master_param"); the parameter becomes the master rounded each step.
        max_grad_norm: clip the global L2 norm of all gradients to this (None: no clipping).
        skip_nonfinite: skip steps whose gradients hold inf / NaN (a norm pass over the
            gradients; with ``max_grad_norm`` the norm is computed anyway).
        capturable: as ``torch.optim.AdamW``'s: ``step()`` may be captured in a CUDA graph
            (after one eager step; a changing lr given as a tensor). Without it a step under
            capture raises.

    Attributes:
        skipped_steps: number of steps skipped for non-finite gradients (reading it syncs).
        grad_norm: global gradient norm of the last ``step`` (before clipping) as a 0-d device
            tensor, or None when none was computed.
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, master_weights: bool = False,
                 max_grad_norm: float | None = None, *, skip_nonfinite: bool = True,
                 capturable: bool = False):
        _check_hyper(lr, betas, eps, weight_decay)
        self.master_weights = bool(master_weights)
        self.max_grad_norm = _check_max_grad_norm(max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.capturable = bool(capturable)
        self.grad_norm: torch.Tensor | None = None
        self._stepper = _Stepper()
        self._skipped_before = 0  # skipped steps of a loaded state dict
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @property
    def skipped_steps(self) -> int:
        counter = self._stepper.skipped
        return self._skipped_before + (0 if counter is None else int(counter.sum().item()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check_hyper(g["lr"], g["betas"], g["eps"], g["weight_decay"],
                     f"param group {len(self.param_groups) - 1}: ")

    def _uses_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype in (torch.float16, torch.bfloat16)

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        if _capturing(p.device):
            raise RuntimeError(f"FusedAdamW.step() under CUDA-graph capture would create state: "
                               f"{_CAPTURE_HINT}")
        state_dtype = torch.float32 if self._uses_master(p) else p.dtype
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
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
        hyper: list[tuple] = []
        for gi, group in enumerate(self.param_groups):
            _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                         f"param group {gi}: ")
            lr = group["lr"] if isinstance(group["lr"], torch.Tensor) else float(group["lr"])
            hyper.append((lr, float(group["betas"][0]), float(group["betas"][1]),
                          float(group["eps"]), float(group["weight_decay"])))
            devices = set()
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"param group {gi}: a parameter of shape {tuple(p.shape)} has "
                                     "a sparse gradient; FusedAdamW does not support sparse gradients")
                devices.add(p.device)
                if not self.capturable and _capturing(p.device):
                    raise RuntimeError("FusedAdamW.step() is being captured in a CUDA graph but "
                                       "the optimizer was made with capturable=False")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                grad = p.grad if p.grad.stride() == p.stride() else _relayout(p.grad, p)
                items.append(_Item(p, grad, state["exp_avg"], state["exp_avg_sq"],
                                   state.get("master_param"), state["step"], gi))
            if len(devices) > 1:
                raise ValueError(f"param group {gi} has parameters on different devices "
                                 f"({', '.join(sorted(map(str, devices)))}); FusedAdamW updates "
                                 "each group on one device")
        _check_items(items)
        status = self._stepper.step(items, hyper, self.max_grad_norm,
                                    self.max_grad_norm is not None or self.skip_nonfinite) \
            if items else None
        self.grad_norm = None if status is None else status[1]
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``FusedAdamW`` or ``torch.optim.AdamW`` state dict.

        State values keep fp32 where this optimizer keeps fp32 (master weights), whatever the
        base class would cast them to; a missing master is made from the parameter; a "step"
        becomes a 0-d float32 tensor on the parameter's device.
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
        self._stepper = _Stepper()  # new state tensors: new tables
        self._skipped_before = int(state_dict.get("skipped_steps", 0))
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            saved, state = saved_state[pid], self.state[p]
            step = saved.get("step", 0.0)
            state["step"] = torch.as_tensor(step).to(device=p.device, dtype=torch.float32).reshape(())
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
    upd_sig = dict(BLOCKS="*i32", PTRS="*i64", TAB="*fp32", STATUS="*fp32",
                   PARAM_DTYPE="constexpr", STATE_DTYPE="constexpr", HAS_MASTER="constexpr",
                   HAS_STATUS="constexpr", ALIGNED="constexpr", BLOCK="constexpr")
    cfg = f"BLOCK={ADAMW_BLOCK} warps={ADAMW_NUM_WARPS}"
    for aligned in (True, False):
        al = "aligned" if aligned else "unaligned"
        for par, st, master in _COMPILE_DTYPES:
            dt = f"{par} params, {st} state" + (" + fp32 master" if master else "")
            for has_status in (True, False):
                norm = "norm" if has_status else "no norm"
                specs.append(CompileSpec(
                    "_adamw_update_kernel", _adamw_update_kernel, upd_sig,
                    dict(PARAM_DTYPE=_TL_BY_NAME[par], STATE_DTYPE=_TL_BY_NAME[st], HAS_MASTER=master,
                         HAS_STATUS=has_status, ALIGNED=aligned, BLOCK=ADAMW_BLOCK),
                    ADAMW_NUM_WARPS, stages, f"adamw update {dt} {al} {norm} {cfg}"))
        for g in ("fp32", "fp16", "bf16"):
            specs.append(CompileSpec(
                "_adamw_grad_sumsq_kernel", _adamw_grad_sumsq_kernel,
                dict(BLOCKS="*i32", PTRS="*i64", PART="*fp32", GRAD_DTYPE="constexpr",
                     ALIGNED="constexpr", BLOCK="constexpr"),
                dict(GRAD_DTYPE=_TL_BY_NAME[g], ALIGNED=aligned, BLOCK=ADAMW_BLOCK),
                ADAMW_NUM_WARPS, stages, f"adamw grad sum of squares {g} grads {al} {cfg}"))
    for clip in (True, False):
        specs.append(CompileSpec(
            "_sum_kernel", _sum_kernel,
            dict(PART="*fp32", STATUS="*fp32", SKIPPED="*fp32", n="i32", max_grad_norm="fp32",
                 HAS_CLIP="constexpr", BLOCK="constexpr"),
            dict(HAS_CLIP=clip, BLOCK=_SUM_BLOCK), 4, stages,
            f"adamw partial-sum reduce + {'clip coefficient' if clip else 'skip flag'} "
            f"BLOCK={_SUM_BLOCK} warps=4"))
    for has_status in (True, False):
        specs.append(CompileSpec(
            "_adamw_hyper_kernel", _adamw_hyper_kernel,
            dict(PTRS="*i64", GROUP="*i32", HYPER="*fp64", TAB="*fp32", STATUS="*fp32", T="i32",
                 HAS_STATUS="constexpr", BLOCK_T="constexpr"),
            dict(HAS_STATUS=has_status, BLOCK_T=_HYPER_BLOCK_T), 4, stages,
            f"adamw step scalars {'norm' if has_status else 'no norm'} BLOCK_T={_HYPER_BLOCK_T} warps=4"))
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
