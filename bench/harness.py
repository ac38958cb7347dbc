"""Shared harness of the kernel benchmarks (``pytest bench/ --benchmark-only``).

One benchmark = one (kernel, provider, mode, shape, dtype) case. The harness:

  - builds the timed callable for a mode from a forward function and its inputs
    (``make_callable``): ``forward`` runs the op with autograd recording, as in training;
    ``backward`` runs only the backward of one recorded forward (``retain_graph=True``, input
    gradients reset to None between calls so nothing accumulates); ``full`` runs both. Optimizer
    steps have one mode, ``step``.
  - times it (``run``): on CUDA ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])``
    (CUDA events, L2 flushed between calls); on CPU pytest-benchmark's own timer with warm-up
    rounds and repeats sized to a time budget (``CPU_WARMUP_S``, ``CPU_MEASURE_S``), and the same
    quantiles taken over the rounds. On CUDA, pytest-benchmark also times a few host-synchronised
    rounds so its table is filled, but those include launch and sync overhead: the stored
    figures (``median_ms``, ``p20_ms``, ``p80_ms``, the derived units) are do_bench's.
  - derives the unit of the case from the median time (formulas in ``traffic_bytes``,
    ``attention_flops`` and in each bench file): GB/s for memory-bound kernels, TFLOP/s for the
    matmul-bound ones.
  - stores it in ``benchmark.extra_info`` (kernel, provider, mode, shape, dtype, device, timer,
    quantiles, bytes, FLOPs, GB/s and/or TFLOP/s) and in ``RESULTS``, which ``bench/conftest.py``
    appends to ``bench/results/kernels.jsonl`` at the end of the session.

Providers: ``triton`` (our kernels, ``kernels.use_backend("triton")``), ``eager`` (the same public
functions under ``use_backend("eager")``, i.e. the ``*_ref`` references), and per family the
PyTorch baselines (``sdpa``, ``torch-fused``, ``torch-foreach``). Triton cases skip on CPU: the
interpreter is a correctness tool, its timings mean nothing.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

MODES = ("forward", "backward", "full")
STEP_MODE = "step"  # optimizers: the step is the whole op, there is no backward
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80: do_bench's quantiles and ours on CPU
SIZES = ("small", "full")

TRITON_ON_CPU = "Triton kernels need CUDA; the interpreter is a correctness tool, not a benchmark"
TRITON_INTERPRETED = ("TRITON_INTERPRET=1 is set: Triton kernels would run in the interpreter, "
                      "a correctness tool, not a benchmark")

# CPU timer: warm up for at least CPU_WARMUP_S (and CPU_MIN_WARMUP calls), then time rounds of one
# call each until CPU_MEASURE_S have been spent, with CPU_MIN_ROUNDS..CPU_MAX_ROUNDS rounds.
CPU_WARMUP_S, CPU_MIN_WARMUP = 0.05, 1
CPU_MEASURE_S, CPU_MIN_ROUNDS, CPU_MAX_ROUNDS = 0.5, 7, 100
# CUDA: pytest-benchmark's own (host-synchronised) rounds, for its table only.
CUDA_TABLE_ROUNDS, CUDA_TABLE_WARMUP = 10, 2

# BERT grid. Hidden sizes: MiniLM (384, the embedded checkpoint), BERT-base (768), BERT-large
# (1024); tokens per micro-batch: e.g. 32 x 128 and 32 x 512. Each bench derives its shapes from
# these (the FFN width is 4 x hidden, heads are hidden / 64), so no model size is written elsewhere.
HIDDEN = {"small": (384, 768), "full": (384, 768, 1024)}
TOKENS = {"small": (4096,), "full": (4096, 16384)}
HEAD_DIM = 64
ATTENTION_BHL = {"small": ((8, 12, 128),), "full": ((32, 12, 128), (32, 12, 512))}

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Results of this session's benchmarks, one dict per benchmark (bench/conftest.py writes them).
RESULTS: list[dict] = []


# ----------------------------------------------------------------------------- device and grid
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_name(dev: torch.device | None = None) -> str:
    """``torch.cuda.get_device_name()`` on CUDA; ``cpu (<model>, <threads> threads)`` on CPU."""
    dev = device() if dev is None else dev
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"


def device_count(dev: torch.device | None = None) -> int:
    dev = device() if dev is None else dev
    return torch.cuda.device_count() if dev.type == "cuda" else 1


def default_size() -> str:
    return "full" if torch.cuda.is_available() else "small"


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


def float_dtypes(size: str, dev: torch.device | None = None, *, memory_bound: bool = True
                 ) -> tuple[torch.dtype, ...]:
    """Dtypes of a grid: bf16 on CUDA (plus fp32 for memory-bound ops in the full grid), fp32 on
    CPU (bf16 there runs emulated paths that say nothing about the kernels)."""
    dev = device() if dev is None else dev
    if dev.type != "cuda":
        return (torch.float32,)
    if memory_bound and size == "full":
        return (torch.bfloat16, torch.float32)
    return (torch.bfloat16,)


class Case(dict):
    """One benchmark of a family: provider x mode x shape x dtype.

    A dict (``{"provider", "mode", "shape": {dim: size}, "dtype": "bf16", "label"}``) so that
    pytest-benchmark writes it as plain JSON in its ``params``; attributes read it back.
    """

    def __init__(self, provider: str, mode: str, shape: dict[str, int], dtype: torch.dtype, label: str):
        super().__init__(provider=provider, mode=mode, shape=dict(shape), dtype=dtype_name(dtype), label=label)

    provider = property(lambda self: self["provider"])
    mode = property(lambda self: self["mode"])
    label = property(lambda self: self["label"])  # the shape in the test id, e.g. "T4096xH768"
    dims = property(lambda self: dict(self["shape"]))  # named dimensions, e.g. {"tokens": 4096, ...}
    dtype = property(lambda self: _DTYPES[self["dtype"]])

    @property
    def id(self) -> str:
        return f"{self.provider}-{self.mode}-{self.label}-{self['dtype']}"


def grid(providers: Sequence[str], modes: Sequence[str], shapes: Iterable[tuple[str, dict[str, int]]],
         dtypes: Sequence[torch.dtype]) -> list[Case]:
    """Every (provider, mode, shape, dtype); ``shapes`` yields (label, {dim: size})."""
    shapes = list(shapes)
    return [Case(p, m, dims, dt, label)
            for label, dims in shapes for dt in dtypes for m in modes for p in providers]


GRID_ATTR = "bench_grid"


def bench_grid(grid_fn: Callable[[str], list[Case]]):
    """Decorator: the benchmark's cases are ``grid_fn(size)`` (bench/conftest.py parametrises the
    ``case`` argument with them, for ``--bench-size``). A plain attribute, not a pytest mark, so
    the bench modules also import outside a bench session (bench.profile uses their problems)."""
    def mark(fn):
        setattr(fn, GRID_ATTR, grid_fn)
        return fn

    return mark


def params(cases: Sequence[Case]) -> list:
    """``cases`` as ``pytest.param``s with readable ids (for ``metafunc.parametrize``)."""
    return [pytest.param(c, id=c.id) for c in cases]


def require(provider: str, dev: torch.device | None = None) -> None:
    """Skip the current test when ``provider`` cannot be benchmarked here."""
    dev = device() if dev is None else dev
    if provider == "triton":
        if dev.type != "cuda":
            pytest.skip(TRITON_ON_CPU)
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip(TRITON_INTERPRETED)


@contextlib.contextmanager
def backend(provider: str):
    """The kernels backend a provider runs under: ``triton`` / ``eager``; others leave it alone."""
    import kernels

    if provider in kernels.BACKENDS:
        with kernels.use_backend(provider):
            yield
    else:
        yield


# ----------------------------------------------------------------------------- derived units
def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def traffic_bytes(mode: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> int:
    """The bytes an op must move at least, each tensor once (the GB/s numerator):

        forward  = inputs read + outputs written
        backward = output gradients read + inputs read + input gradients written
                   (a gradient for each input that requires one, in its dtype)
        full     = forward + backward

    The same formula for every provider of a family, so their GB/s compare like their times.
    Saved statistics (e.g. LayerNorm's mean and rstd) are implementation details and left out.
    """
    fwd = nbytes(*inputs) + nbytes(*outputs)
    bwd = nbytes(*outputs) + nbytes(*inputs) + nbytes(*(t for t in inputs if t.requires_grad))
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def attention_flops(mode: str, B: int, H: int, L: int, D: int) -> float:
    """Matmul FLOPs of softmax(Q K^T) V over a dense (B, H, L, L) score matrix:

        forward  = 4 * B * H * L * L * D     (Q K^T and P V, 2 FLOPs per multiply-add)
        backward = 2.5 * forward             (5 matmuls against the forward's 2: the
                                              recomputed Q K^T, dV, dP, dQ and dK; the
                                              FlashAttention papers' convention)
        full     = 3.5 * forward
    Padding is not subtracted: every provider computes the padded scores.
    """
    fwd = 4.0 * B * H * L * L * D
    return {"forward": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd}[mode]


def gb_per_s(n_bytes: float, ms: float) -> float:
    return n_bytes / (ms * 1e-3) / 1e9


def tflop_per_s(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- timed callables
@dataclass
class Timed:
    """What ``make_callable`` builds: ``fn`` is timed; ``setup`` runs untimed before each call."""

    fn: Callable[[], Any]
    setup: Callable[[], None] | None = None
    grad_to_none: list[torch.Tensor] = field(default_factory=list)  # do_bench resets these
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)  # one forward's outputs (for bytes)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    raise TypeError(f"a benchmarked forward must return tensors, got {type(out).__name__}")


def make_callable(mode: str, forward: Callable[..., Any], inputs: Sequence[torch.Tensor],
                  kwargs: dict | None = None) -> Timed:
    """The callable to time for ``mode`` from ``forward(*inputs, **kwargs)``.

    ``inputs`` that require grad get gradients in ``backward`` / ``full``; the output gradients
    are random (ones for a 0-d loss), drawn once.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kwargs = kwargs or {}
    inputs = list(inputs)
    leaves = [t for t in inputs if t.requires_grad]

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    outputs = [t for t in _tensors(forward(*inputs, **kwargs))]
    diff = [t for t in outputs if t.requires_grad]
    if mode != "forward" and not diff:
        raise ValueError(f"{mode}: the forward's outputs do not require grad (no input requires it)")
    grads = [torch.ones_like(t) if t.dim() == 0 else torch.randn_like(t) for t in diff]
    clear_grads()

    if mode == "forward":
        return Timed(lambda: forward(*inputs, **kwargs), None, [], inputs, outputs)
    if mode == "backward":
        def backward() -> None:
            torch.autograd.backward(diff, grads, retain_graph=True)

        return Timed(backward, clear_grads, leaves, inputs, outputs)

    def full() -> None:
        out = [t for t in _tensors(forward(*inputs, **kwargs)) if t.requires_grad]
        torch.autograd.backward(out, grads)

    return Timed(full, clear_grads, leaves, inputs, outputs)


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    rounds: int | None = None
    warmup_rounds: int | None = None


def _quantiles_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    data = sorted(seconds)
    if len(data) == 1:
        return (data[0] * 1e3,) * 3
    # statistics.quantiles with n=100 gives the 1st..99th percentiles ("inclusive": within data)
    pct = statistics.quantiles(data, n=100, method="inclusive")
    return tuple(pct[round(q * 100) - 1] * 1e3 for q in QUANTILES)  # type: ignore[return-value]


def _time_cpu(benchmark, timed: Timed) -> Timing:
    import time

    # One untimed call sizes the rounds (and warms the allocator).
    if timed.setup:
        timed.setup()
    t0 = time.perf_counter()
    timed.fn()
    once = max(time.perf_counter() - t0, 1e-6)
    warmup = max(CPU_MIN_WARMUP, math.ceil(CPU_WARMUP_S / once))
    rounds = min(CPU_MAX_ROUNDS, max(CPU_MIN_ROUNDS, math.ceil(CPU_MEASURE_S / once)))
    benchmark.pedantic(timed.fn, setup=timed.setup, rounds=rounds, warmup_rounds=min(warmup, rounds),
                       iterations=1)
    data = list(benchmark.stats.stats.data)  # seconds per round
    median, p20, p80 = _quantiles_ms(data)
    return Timing(median, p20, p80, "pytest-benchmark rounds (time.perf_counter), CPU",
                  rounds=len(data), warmup_rounds=min(warmup, rounds))


def _time_cuda(benchmark, timed: Timed) -> Timing:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(timed.fn, quantiles=list(QUANTILES),
                                               grad_to_none=timed.grad_to_none or None)

    def synced() -> None:
        timed.fn()
        torch.cuda.synchronize()

    # For pytest-benchmark's table only (host clock around a synchronised call).
    benchmark.pedantic(synced, setup=timed.setup, rounds=CUDA_TABLE_ROUNDS,
                       warmup_rounds=CUDA_TABLE_WARMUP, iterations=1)
    return Timing(float(median), float(p20), float(p80), "triton.testing.do_bench (CUDA events)")


def time_callable(benchmark, timed: Timed, dev: torch.device | None = None) -> Timing:
    dev = device() if dev is None else dev
    return _time_cuda(benchmark, timed) if dev.type == "cuda" else _time_cpu(benchmark, timed)


def _peak_memory_mb(timed: Timed, dev: torch.device) -> float | None:
    """Peak allocated CUDA memory of one call (inputs and graph included); None on CPU."""
    if dev.type != "cuda":
        return None
    if timed.setup:
        timed.setup()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    timed.fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / 2 ** 20


# ----------------------------------------------------------------------------- one benchmark
def run(benchmark, kernel: str, case: Case, timed: Timed, *, n_bytes: float | None = None,
        flops: float | None = None, metric: str = "GB/s", dev: torch.device | None = None,
        extra: dict | None = None) -> dict:
    """Time ``timed`` for ``case``, derive its units, fill ``benchmark.extra_info``; returns the row.

    Args:
        kernel: the op's name (``layer_norm``, ``attention``...), the key of the report's plots.
        n_bytes: bytes moved (GB/s); flops: FLOPs (TFLOP/s); ``metric`` names the headline one.
        extra: more fields for ``extra_info`` (e.g. the optimizer's parameter count).
    """
    dev = device() if dev is None else dev
    if metric not in ("GB/s", "TFLOP/s"):
        raise ValueError(f"metric must be 'GB/s' or 'TFLOP/s', got {metric!r}")
    if benchmark.disabled:  # --benchmark-disable: run once as a smoke test, record nothing
        if timed.setup:
            timed.setup()
        timed.fn()
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        timing = time_callable(benchmark, timed, dev)
        peak = _peak_memory_mb(timed, dev)
    notes = sorted({str(w.message) for w in caught if "kernels" in str(w.message)})
    info: dict[str, Any] = {
        "kernel": kernel,
        "provider": case.provider,
        "mode": case.mode,
        "shape": case.dims,
        "shape_label": case.label,
        "dtype": dtype_name(case.dtype),
        "device": device_name(dev),
        "device_count": device_count(dev),
        "timer": timing.timer,
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "bytes": n_bytes,
        "flops": flops,
        "metric": metric,
    }
    if n_bytes is not None:
        info["GB/s"] = gb_per_s(n_bytes, timing.median_ms)
    if flops is not None:
        info["TFLOP/s"] = tflop_per_s(flops, timing.median_ms)
    if metric not in info:
        raise ValueError(f"metric {metric} needs {'n_bytes' if metric == 'GB/s' else 'flops'}")
    info["value"] = info[metric]
    if timing.rounds is not None:
        info.update(rounds=timing.rounds, warmup_rounds=timing.warmup_rounds)
    if peak is not None:
        info["peak_memory_mb"] = peak
    if notes:  # e.g. a Triton op that fell back to its eager reference for this shape
        info["warnings"] = notes
    info.update(extra or {})
    benchmark.extra_info.update(info)
    row = {"name": benchmark.name, **info}
    RESULTS.append(row)
    return row
