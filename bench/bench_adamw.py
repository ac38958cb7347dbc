"""Benchmarks of one AdamW step over the parameters of BERT encoder layers.

Providers:
  - ``triton``: ``kernels.FusedAdamW`` (defaults, as training builds it: the non-finite check
    reads the gradients once more; no host sync).
  - ``eager``: ``kernels.adamw_ref`` with ``foreach=False`` (torch's per-tensor AdamW loop).
  - ``torch-fused``: ``torch.optim.AdamW(fused=True)`` where torch has a fused kernel for the
    device (CUDA; recent torch also on CPU); skipped with torch's error elsewhere.
  - ``torch-foreach``: ``torch.optim.AdamW(foreach=True)`` (multi-tensor kernels).

Shapes: ``layers`` encoder layers of width ``hidden`` (``encoder_param_shapes``), fp32 parameters
(what DeepSpeed hands the optimizer). One mode, ``step``. Memory-bound: GB/s of the minimum
traffic, per element read param, grad, exp_avg, exp_avg_sq and write param, exp_avg, exp_avg_sq
(``adamw_bytes``).
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from bench import harness

PROVIDERS = ("triton", "eager", "torch-fused", "torch-foreach")
LAYERS = {"small": (1,), "full": (12,)}
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01


def encoder_param_shapes(hidden: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of ``layers`` BERT encoder layers of width h (feed-forward 4h): per layer
    Q, K, V and output projections (h, h) + (h,), LayerNorm (h,) x 2, FFN in (4h, h) + (4h,),
    FFN out (h, 4h) + (h,), LayerNorm (h,) x 2: 12 h^2 + 13 h elements."""
    h, f = hidden, 4 * hidden
    layer = [(h, h), (h,)] * 4 + [(h,), (h,), (f, h), (f,), (h, f), (h,), (h,), (h,)]
    return layer * layers


def adamw_bytes(n_elements: int, param_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """Minimum bytes of one step: read p, g, m, v; write p, m, v (each element once):
    n * (3 * param + 4 * state)  [grad in the parameter's dtype]."""
    s = torch.empty((), dtype=param_dtype).element_size()
    q = torch.empty((), dtype=state_dtype).element_size()
    return n_elements * (3 * s + 4 * q)


def adamw_grid(size: str) -> list[harness.Case]:
    shapes = ((f"H{h}xL{n}", {"hidden": h, "layers": n}) for h in harness.HIDDEN[size] for n in LAYERS[size])
    return harness.grid(PROVIDERS, (harness.STEP_MODE,), shapes, (torch.float32,))


def adamw_problem(provider: str, hidden: int, layers: int, dtype: torch.dtype, device: torch.device,
                  seed: int = 0):
    """(step, params): a zero-argument optimizer step over fresh parameters with random grads."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in encoder_param_shapes(hidden, layers):
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    hyper = {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}
    if provider == "triton":
        return kernels.FusedAdamW(params, **hyper).step, params
    if provider == "torch-fused":
        return torch.optim.AdamW(params, fused=True, **hyper).step, params
    if provider == "torch-foreach":
        return torch.optim.AdamW(params, foreach=True, **hyper).step, params
    if provider == "eager":
        data = [p.detach() for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [torch.zeros_like(p) for p in data]
        exp_avg_sqs = [torch.zeros_like(p) for p in data]
        steps = [torch.tensor(0.0) for _ in data]

        @torch.no_grad()
        def step():
            kernels.adamw_ref(data, grads, exp_avgs, exp_avg_sqs, steps, foreach=False, **hyper)

        return step, params
    raise ValueError(f"unknown AdamW provider {provider!r}")


@harness.bench_grid(adamw_grid)
def test_adamw(benchmark, case):
    harness.require(case.provider)
    d = case.dims
    dev = harness.device()
    try:
        step, params = adamw_problem(case.provider, d["hidden"], d["layers"], case.dtype, dev)
        if case.provider == "torch-fused":
            step()  # torch raises here (or above) when it has no fused AdamW for the device
    except (RuntimeError, ValueError) as e:
        if case.provider != "torch-fused":
            raise
        pytest.skip(f"torch.optim.AdamW(fused=True) unavailable here: {e}")
    n = sum(math.prod(p.shape) for p in params)
    with harness.backend(case.provider):
        harness.run(benchmark, "adamw", case, harness.Timed(step), metric="GB/s",
                    n_bytes=adamw_bytes(n, case.dtype, case.dtype),
                    extra={"parameters": n, "tensors": len(params)})
