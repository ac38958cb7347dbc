"""Benchmarks of ``kernels.attention`` (bidirectional self-attention with a key padding mask).

Providers: ``triton`` and ``eager`` (``kernels.use_backend``), and PyTorch's
``torch.nn.functional.scaled_dot_product_attention`` (``sdpa``: flash / memory-efficient / math,
whichever it picks for the inputs; a padding mask rules flash out). Shapes (B, H, L, D) from
``harness.ATTENTION_BHL`` with D = ``harness.HEAD_DIM``; the full grid adds padded batches
(key lengths drawn in [L/4, L]). TFLOP/s from ``harness.attention_flops`` (dense scores: padding is
computed by every provider, so it is counted).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from bench import harness

PROVIDERS = ("triton", "eager", "sdpa")


def attention_grid(size: str) -> list[harness.Case]:
    def shapes():
        for B, H, L in harness.ATTENTION_BHL[size]:
            for padded in ((0,) if size == "small" else (0, 1)):
                dims = {"B": B, "H": H, "L": L, "D": harness.HEAD_DIM, "padded": padded}
                yield f"B{B}xH{H}xL{L}xD{harness.HEAD_DIM}{'-pad' if padded else ''}", dims

    return harness.grid(PROVIDERS, harness.MODES, shapes(), harness.float_dtypes(size, memory_bound=False))


def padding_mask(B: int, L: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """(B, L) bool, True = a real token; lengths uniform in [L/4, L], first row full length."""
    lengths = torch.randint(max(1, L // 4), L + 1, (B,), generator=gen)
    lengths[0] = L
    return (torch.arange(L)[None, :] < lengths[:, None]).to(device)


def sdpa(q, k, v, key_padding_mask=None):
    """PyTorch's fused attention with the same mask convention (True = attend to this key)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_problem(B: int, H: int, L: int, D: int, dtype: torch.dtype, device: torch.device,
                      padded: bool = False, provider: str = "triton", seed: int = 0):
    """(forward, inputs, kwargs): q, k, v (B, H, L, D) requiring grad, and the padding mask."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn((B, H, L, D), generator=g).to(device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    kwargs = {"key_padding_mask": padding_mask(B, L, device, g) if padded else None}
    forward = sdpa if provider == "sdpa" else kernels.attention
    return forward, [q, k, v], kwargs


@harness.bench_grid(attention_grid)
def test_attention(benchmark, case):
    harness.require(case.provider)
    d = case.dims
    dev = harness.device()
    with harness.backend(case.provider):
        forward, inputs, kwargs = attention_problem(d["B"], d["H"], d["L"], d["D"], case.dtype, dev,
                                                    bool(d["padded"]), case.provider)
        timed = harness.make_callable(case.mode, forward, inputs, kwargs)
        harness.run(benchmark, "attention", case, timed, metric="TFLOP/s",
                    flops=harness.attention_flops(case.mode, d["B"], d["H"], d["L"], d["D"]),
                    n_bytes=harness.traffic_bytes(case.mode, timed.inputs, timed.outputs))
