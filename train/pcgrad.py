"""PCGrad: gradient surgery across tasks (Yu et al., 2020).

Each task's gradient g_i is projected, in a random task order, onto the normal plane of every other
task's gradient it conflicts with (g_i . g_j < 0); the projected gradients are summed.

Under data parallelism the per-task gradients are averaged over the ranks *before* the projection,
so every rank projects the same vectors in the same order and obtains the same result, which also
equals the single-process PCGrad on the same global batch. The result is handed to DeepSpeed as
one ordinary backward (see ``surrogate_loss``), so DeepSpeed's ZeRO 0/1/2 reduction, clipping and
accumulation boundary see exactly one gradient per step.

References:
    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, https://arxiv.org/abs/2001.06782
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """d loss / d params as one fp32 vector (zeros for parameters the loss does not reach)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()).reshape(-1)
                      for p, g in zip(params, grads)])


def all_reduce_mean(vectors: torch.Tensor) -> torch.Tensor:
    """Average (T, P) per-task gradients over the data-parallel ranks (no-op on one rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vectors, op=dist.ReduceOp.SUM)
        vectors /= dist.get_world_size()
    return vectors


def project(grads: torch.Tensor, order_seed: int) -> torch.Tensor:
    """PCGrad of (T, P) task gradients -> (P,) combined gradient.

    The task order of each projection sequence comes from ``order_seed`` (the same on every rank).
    """
    T = grads.shape[0]
    rng = np.random.default_rng(order_seed)
    out = torch.zeros_like(grads[0])
    norms_sq = (grads * grads).sum(dim=1)  # (T,)
    safe = torch.where(norms_sq > 0, norms_sq, torch.ones_like(norms_sq))
    for i in range(T):
        g = grads[i].clone()
        for j in rng.permutation(T).tolist():
            if j == i:
                continue
            # the conflict test as a device-side factor (no host read: a sync per pair on a GPU);
            # a zero gradient never conflicts (dot = 0)
            dot = torch.dot(g, grads[j])
            g -= torch.where(dot < 0, dot / safe[j], torch.zeros_like(dot)) * grads[j]
        out += g
    return out


def surrogate_loss(params: list[torch.nn.Parameter], flat: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ``params`` is ``flat`` (split to their shapes)."""
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    offset = 0
    for p in params:
        n = p.numel()
        total = total + (p.float() * flat[offset:offset + n].view_as(p).to(p.device)).sum()
        offset += n
    return total
