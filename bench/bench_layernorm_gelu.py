"""Benchmarks of ``kernels/layernorm_gelu.py``: layer_norm, bias_gelu, gelu_layer_norm.

Providers: ``triton`` and ``eager`` (``kernels.use_backend``); shapes (tokens, hidden) from the
BERT grid of ``bench.harness``. bias_gelu runs where BERT runs it: on the feed-forward
intermediate, (tokens, 4 * hidden). All three are memory-bound: GB/s from
``harness.traffic_bytes`` (inputs read + outputs written, and for the backward output gradients
read + inputs read + input gradients written).
"""
from __future__ import annotations

import torch

import kernels
from bench import harness

PROVIDERS = ("triton", "eager")
FFN_MULT = 4  # BERT's intermediate size is 4 x hidden


def _row_shapes(size: str, width_mult: int = 1):
    for tokens in harness.TOKENS[size]:
        for hidden in harness.HIDDEN[size]:
            dims = {"tokens": tokens, "hidden": hidden}
            if width_mult != 1:
                dims["width"] = width_mult * hidden
            yield f"T{tokens}xH{hidden}", dims


def _grid(size: str, width_mult: int = 1) -> list[harness.Case]:
    return harness.grid(PROVIDERS, harness.MODES, _row_shapes(size, width_mult), harness.float_dtypes(size))


def layer_norm_grid(size: str) -> list[harness.Case]:
    return _grid(size)


def bias_gelu_grid(size: str) -> list[harness.Case]:
    return _grid(size, FFN_MULT)


def gelu_layer_norm_grid(size: str) -> list[harness.Case]:
    return _grid(size)


# ----------------------------------------------------------------------------- problems
# Each returns (forward, inputs): forward(*inputs) is the op on the backend in force. bench.profile
# builds its inputs from these too.
def _randn(shape, dtype, device, gen, requires_grad=True, scale=1.0, shift=0.0):
    t = torch.randn(shape, generator=gen, device="cpu", dtype=torch.float32) * scale + shift
    return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def layer_norm_problem(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = _randn((tokens, hidden), dtype, device, g)
    weight = _randn((hidden,), dtype, device, g, scale=0.1, shift=1.0)
    bias = _randn((hidden,), dtype, device, g, scale=0.1)
    return kernels.layer_norm, [x, weight, bias]


def bias_gelu_problem(tokens: int, width: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return kernels.bias_gelu, [_randn((tokens, width), dtype, device, g),
                               _randn((width,), dtype, device, g, scale=0.1)]


def gelu_layer_norm_problem(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = _randn((tokens, hidden), dtype, device, g)
    bias = _randn((hidden,), dtype, device, g, scale=0.1)
    weight = _randn((hidden,), dtype, device, g, scale=0.1, shift=1.0)
    ln_bias = _randn((hidden,), dtype, device, g, scale=0.1)
    return kernels.gelu_layer_norm, [x, bias, weight, ln_bias]


def _bench(benchmark, kernel: str, case: harness.Case, problem) -> None:
    harness.require(case.provider)
    dev = harness.device()
    with harness.backend(case.provider):
        forward, inputs = problem(dev)
        timed = harness.make_callable(case.mode, forward, inputs)
        harness.run(benchmark, kernel, case, timed,
                    n_bytes=harness.traffic_bytes(case.mode, timed.inputs, timed.outputs), metric="GB/s")


@harness.bench_grid(layer_norm_grid)
def test_layer_norm(benchmark, case):
    d = case.dims
    _bench(benchmark, "layer_norm", case,
           lambda dev: layer_norm_problem(d["tokens"], d["hidden"], case.dtype, dev))


@harness.bench_grid(bias_gelu_grid)
def test_bias_gelu(benchmark, case):
    d = case.dims
    _bench(benchmark, "bias_gelu", case,
           lambda dev: bias_gelu_problem(d["tokens"], d["width"], case.dtype, dev))


@harness.bench_grid(gelu_layer_norm_grid)
def test_gelu_layer_norm(benchmark, case):
    d = case.dims
    _bench(benchmark, "gelu_layer_norm", case,
           lambda dev: gelu_layer_norm_problem(d["tokens"], d["hidden"], case.dtype, dev))
