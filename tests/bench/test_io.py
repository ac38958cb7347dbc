"""bench.io: exact byte counts on toy kernels of known traffic, and the eager aten-op counter.

This file is also an op module for ``python -m bench.io --module <this file>``: ``io_cases`` below.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from bench import io as bench_io
from kernels.check import OP_MODULES, load_op_modules
from kernels.testing import IOCase

THIS_FILE = str(Path(__file__).resolve())
# the kernel traffic is recorded inside Triton's interpreter: tests/conftest.py set
# TRITON_INTERPRET=1 before this module was imported (kernels device cpu); on cuda these skip
interpreter = pytest.mark.interpreter


@triton.jit
def _copy_kernel(
    x_ptr,  # (n,)
    y_ptr,  # (n,)
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _read_twice_kernel(
    x_ptr,  # (n,)
    y_ptr,  # (n,)
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    b = tl.load(x_ptr + offs, mask=mask, other=0.0)  # the same bytes again
    tl.store(y_ptr + offs, a + b, mask=mask)


@triton.jit
def _atomic_sum_kernel(
    x_ptr,  # (n,)
    out_ptr,  # (1,) fp32
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.atomic_add(out_ptr, tl.sum(x, axis=0))


N, BLOCK = 1000, 256  # 4 programs; the last has 232 of its 256 lanes on, 24 masked off


def _copy(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _copy_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), BLOCK=BLOCK)
    return y


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_with_masked_tail_is_exact(dtype):
    x = torch.randn(N).to(dtype)
    with bench_io.record_traffic() as t:
        y = _copy(x)
    assert torch.equal(y, x)
    nbytes = N * x.element_size()  # masked-off lanes of the tail program add nothing
    assert (t.total_read, t.total_write, t.unique_read, t.unique_write) == (nbytes,) * 4
    assert t.unique == t.total == 2 * nbytes
    assert [(ln.kernel, ln.grid, ln.read_bytes, ln.write_bytes) for ln in t.launches] == [
        ("_copy_kernel", (4,), nbytes, nbytes)]


@interpreter
def test_reading_twice_doubles_total_not_unique():
    x = torch.randn(N)
    y = torch.empty_like(x)
    with bench_io.record_traffic() as t:
        _read_twice_kernel[(triton.cdiv(N, BLOCK),)](x, y, N, BLOCK=BLOCK)
    assert torch.equal(y, 2 * x)
    assert t.total_read == 2 * t.unique_read == 2 * N * 4
    assert t.total_write == t.unique_write == N * 4


@interpreter
def test_two_launches_dedupe_across_launches():
    x = torch.randn(N)
    with bench_io.record_traffic() as t:
        y = _copy(x)
        z = _copy(y)  # reads what the first launch wrote: y's bytes count once in unique
    assert torch.equal(z, x) and len(t.launches) == 2
    assert t.total == 4 * N * 4
    assert t.unique == 3 * N * 4  # x, y, z


@interpreter
def test_atomics_count_read_and_write_per_lane():
    x = torch.ones(N)
    out = torch.zeros(1)
    with bench_io.record_traffic() as t:
        _atomic_sum_kernel[(4,)](x, out, N, BLOCK=BLOCK)
    assert out.item() == N
    assert t.total_read == N * 4 + 4 * 4 and t.total_write == 4 * 4  # one scalar atomic per program
    assert t.unique == N * 4 + 4


@interpreter
def test_recording_stops_after_the_block():
    x = torch.randn(N)
    with bench_io.record_traffic() as t:
        _copy(x)
    before = t.total
    _copy(x)
    assert t.total == before
    with pytest.raises(RuntimeError, match="nested"), bench_io.record_traffic():
        with bench_io.record_traffic():
            pass


def test_eager_counter_exact_bytes():
    a, b = torch.randn(10), torch.randn(10)
    with bench_io.eager_traffic() as t:
        (a + b).sum()
    # add reads 2 x 40 B and writes 40 B; sum reads 40 B and writes one 4-byte scalar
    assert [(o.op.split(".")[1], o.read_bytes, o.write_bytes) for o in t.ops] == [("add", 80, 40), ("sum", 40, 4)]
    assert t.total == 164


def test_eager_counter_counts_in_place_foreach_writes():
    """_foreach_mul_ returns nothing: its writes come from the schema's mutated arguments."""
    xs = [torch.randn(10), torch.randn(6)]
    with bench_io.eager_traffic() as t:
        torch._foreach_mul_(xs, 2.0)
    assert [(o.read_bytes, o.write_bytes) for o in t.ops] == [(64, 64)]


def test_eager_views_and_allocations_count_zero():
    a = torch.randn(10)
    c = torch.randn(1)
    with bench_io.eager_traffic() as t:
        v = a.view(2, 5).t().transpose(0, 1).unsqueeze(0).squeeze(0).view(10).detach()
        e = c.expand(10)
        z = torch.zeros(10)
        torch.empty(10)
    assert t.total == 0 and len(t.ops) >= 9
    with bench_io.eager_traffic() as t:
        s = v + e  # e is a stride-0 view: its 4 bytes count once
        z.copy_(a)  # copy_ writes z without reading it
        z.add_(a)  # read z and a, write z
    assert [o.read_bytes for o in t.ops] == [40 + 4, 40, 80] and [o.write_bytes for o in t.ops] == [40, 40, 40]
    assert torch.equal(s, a + c) and torch.equal(z, 2 * a)


def test_eager_counter_sees_backward():
    x = torch.randn(10, requires_grad=True)
    with bench_io.eager_traffic() as t:
        (x * 3.0).sum().backward()
    names = [o.op.split(".")[1] for o in t.ops]
    assert names.count("mul") == 2, names  # forward x * 3 and its backward grad * 3
    assert x.grad is not None and t.total > 40 + 40 + 40 + 4


def io_cases(tokens: int, hidden: int, dtype: torch.dtype) -> list[IOCase]:
    """A copy of (tokens, hidden): lower bound = read once + write once; eager = clone."""
    x = torch.randn(tokens, hidden).to(dtype)
    nbytes = x.numel() * x.element_size()
    return [IOCase("toy_copy", lambda: _copy(x), lambda: x.clone(), 2 * nbytes, 0)]


@interpreter
def test_cli_on_toy_module(tmp_path, capsys):
    out = tmp_path / "io.json"
    rc = bench_io.main(["--module", THIS_FILE, "--tokens", "3,5", "--hidden", "100", "--dtype", "fp16",
                        "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["hidden"]) for r in rows] == [(3, 100), (5, 100)]
    for r in rows:
        nbytes = r["tokens"] * r["hidden"] * 2
        assert r["unique"] == r["total"] == r["eager"] == r["lower_bound"] == 2 * nbytes
        assert r["unique_over_lb"] == r["total_over_lb"] == r["eager_over_total"] == 1.0
        assert r["kernel_model_us"] == pytest.approx(2 * nbytes / 3.35e12 * 1e6)
    assert "modelled" in text and "toy_copy" in text


@interpreter
def test_real_op_modules_small(tmp_path, capsys):
    present = load_op_modules("io_cases", OP_MODULES, log=lambda msg: None)
    out = tmp_path / "io.json"
    rc = bench_io.main(["--tokens", "64", "--hidden", "96", "--jobs", "1", "--json", str(out)])
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    rows, errors = doc["rows"], doc["errors"]
    if not present:  # no op module has io_cases() yet: the tool must say so and fail
        assert rc == 1 and rows == [] and "no IO cases found" in text
        return
    assert len(rows) + len(errors) == sum(len(m.io_cases(64, 96, torch.bfloat16)) for _, m in present)
    assert rows and rc == (1 if errors else 0), text  # a case that raises is reported and fails the run
    for r in rows:
        assert 0 < r["unique"] <= r["total"] and r["eager"] > 0, r
        # the bounds count each launch's inputs and outputs once (forward and backward apart), so
        # every access counted (total) cannot be below them; unique (whole case) may be
        assert r["total"] >= r["lower_bound"], f"{r['case']}: kernels move fewer bytes than the lower bound"
