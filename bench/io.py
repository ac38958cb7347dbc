"""Global-memory traffic of the Triton kernels vs eager PyTorch vs a lower bound: ``python -m bench.io``.

For each op module's ``io_cases(tokens, hidden, dtype)`` (a forward + backward), three byte counts:

  - kernel ``unique`` / ``total``: the Triton kernels run in the interpreter while every global
    access is recorded (``record_traffic``): loads, stores and atomics, byte addresses of the
    lanes whose mask is on (masked-off lanes touch no memory). ``unique`` counts distinct byte
    addresses read or written over the whole case (inputs, outputs, scratch): the traffic with a
    perfect cache. ``total`` counts every access, re-reads included: the traffic with no cache.
  - ``eager``: bytes moved by the eager reference, counted by ``EagerTraffic``, a
    ``TorchDispatchMode`` that adds, for every aten op run (forward and backward), the bytes of its
    tensor inputs (read) and outputs (written); views and pure allocations move nothing (lists
    ``VIEW_OPS`` and ``ALLOC_OPS`` below).
  - ``lower bound``: from the IOCase (each input read once, each output written once).

Ratios: unique/LB, total/LB (how far the kernels are from the bound) and eager/total (traffic
saved by fusion). Modelled H100 SXM times (a roofline, not a measurement):
``t = max(bytes / 3.35e12 B/s, flops / 989e12 FLOP/s)`` with the kernel's total bytes and the
eager bytes; 3.35 TB/s is the HBM3 bandwidth and 989 TFLOP/s the dense bf16 tensor-core peak
of the H100 SXM5 datasheet.

    python -m bench.io [--hidden 384,768,1024] [--tokens 4096,16384] [--dtype bf16] [--op NAME]
                       [--json FILE] [--jobs 2]

Runs on CPU under ``TRITON_INTERPRET=1`` (re-executing itself with it when unset); each
(op module, tokens, hidden) is one task for ``--jobs`` spawned processes. The interpreter's own
per-op cost dominates (the recording adds ~10%) and grows with rows x ops per row: the default
grid of the LayerNorm/GELU module takes 15-30 minutes on 2 cores; ``--tokens 4096`` a quarter.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 HBM3 bandwidth (NVIDIA H100 datasheet)
H100_BF16_FLOPS_PER_S = 989e12  # H100 SXM5 dense bf16 tensor-core peak (same datasheet)

_PAGE_BITS = 16  # byte sets are kept as 64 KiB pages of booleans
_PAGE = 1 << _PAGE_BITS


def modelled_time_s(nbytes: float, flops: float) -> float:
    """Roofline time on an H100 SXM: ``max(bytes / 3.35e12, flops / 989e12)`` seconds."""
    return max(nbytes / H100_HBM_BYTES_PER_S, flops / H100_BF16_FLOPS_PER_S)


# ----------------------------------------------------------------------------- kernel traffic
class ByteSet:
    """A set of byte addresses, stored as 64 KiB boolean pages (memory ~ bytes touched)."""

    def __init__(self) -> None:
        self.pages: dict[int, np.ndarray] = {}

    def _page(self, p: int) -> np.ndarray:
        page = self.pages.get(p)
        if page is None:
            page = self.pages[p] = np.zeros(_PAGE, dtype=bool)
        return page

    def add(self, addrs: np.ndarray, itemsize: int) -> None:
        """Mark ``itemsize`` bytes starting at each address in ``addrs`` (uint64)."""
        if addrs.size == 0:
            return
        if itemsize > 1:
            addrs = (addrs[:, None] + np.arange(itemsize, dtype=np.uint64)[None, :]).ravel()
        pages = addrs >> np.uint64(_PAGE_BITS)
        offs = (addrs & np.uint64(_PAGE - 1)).astype(np.intp)
        first, last = int(pages.min()), int(pages.max())
        if first == last:
            self._page(first)[offs] = True
            return
        for p in np.unique(pages):
            sel = pages == p
            self._page(int(p))[offs[sel]] = True

    def count(self) -> int:
        return int(sum(int(np.count_nonzero(p)) for p in self.pages.values()))

    def union_count(self, other: "ByteSet") -> int:
        n = 0
        for key in self.pages.keys() | other.pages.keys():
            a, b = self.pages.get(key), other.pages.get(key)
            n += int(np.count_nonzero(a if b is None else b if a is None else a | b))
        return n


@dataclass
class Launch:
    kernel: str
    grid: tuple
    read_bytes: int = 0
    write_bytes: int = 0


@dataclass
class KernelTraffic:
    """What ``record_traffic`` saw. Totals count every access; unique counts distinct bytes."""

    read: ByteSet = field(default_factory=ByteSet)
    written: ByteSet = field(default_factory=ByteSet)
    total_read: int = 0
    total_write: int = 0
    launches: list[Launch] = field(default_factory=list)
    _alive: list = field(default_factory=list, repr=False)  # launch arguments, kept from reuse

    @property
    def total(self) -> int:
        return self.total_read + self.total_write

    @property
    def unique_read(self) -> int:
        return self.read.count()

    @property
    def unique_write(self) -> int:
        return self.written.count()

    @property
    def unique(self) -> int:
        return self.read.union_count(self.written)

    def _access(self, ptrs, mask, elem_ty, write: bool) -> None:
        addrs = np.asarray(ptrs.data)
        if mask is not None:
            on = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
            addrs = addrs[on]
        addrs = addrs.reshape(-1).astype(np.uint64, copy=False)
        itemsize = 8 if elem_ty.is_ptr() else max(1, elem_ty.primitive_bitwidth // 8)
        nbytes = int(addrs.size) * itemsize
        (self.written if write else self.read).add(addrs, itemsize)
        launch = self.launches[-1] if self.launches else None
        if write:
            self.total_write += nbytes
            if launch:
                launch.write_bytes += nbytes
        else:
            self.total_read += nbytes
            if launch:
                launch.read_bytes += nbytes


_active: KernelTraffic | None = None


@contextlib.contextmanager
def record_traffic() -> Iterator[KernelTraffic]:
    """Record every global-memory access of interpreted Triton kernels run inside the block.

    Wraps the interpreter's ``InterpreterBuilder.create_masked_load`` / ``create_masked_store``
    (plain and descriptor loads/stores and atomic load/store go through them) and
    ``create_atomic_rmw`` / ``create_atomic_cas`` (a read and a write per active lane). The
    tensors passed to each launch are kept alive until the block ends, so the allocator cannot
    hand their addresses to a later tensor of the same case (which would merge distinct bytes).
    """
    global _active
    if _active is not None:
        raise RuntimeError("record_traffic() blocks cannot be nested")
    import torch
    import triton.runtime.interpreter as interp

    traffic = KernelTraffic()
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    saved = {name: getattr(builder, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    saved_call = executor.__call__

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        traffic._access(ptrs, mask, ptrs.dtype.element_ty, write=False)
        return saved["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        traffic._access(ptrs, mask, ptrs.dtype.element_ty, write=True)
        return saved["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        traffic._access(ptr, mask, ptr.dtype.element_ty, write=False)
        traffic._access(ptr, mask, ptr.dtype.element_ty, write=True)
        return saved["create_atomic_rmw"](self, rmwOp, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        traffic._access(ptr, None, ptr.dtype.element_ty, write=False)
        traffic._access(ptr, None, ptr.dtype.element_ty, write=True)
        return saved["create_atomic_cas"](self, ptr, cmp, val, sem, scope)

    def call(self, *args, **kwargs):
        grid = self.grid if not callable(self.grid) else "callable"
        traffic.launches.append(Launch(getattr(self.fn, "__name__", "?"), grid))
        traffic._alive += [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return saved_call(self, *args, **kwargs)

    for name, fn in (("create_masked_load", create_masked_load), ("create_masked_store", create_masked_store),
                     ("create_atomic_rmw", create_atomic_rmw), ("create_atomic_cas", create_atomic_cas)):
        setattr(builder, name, fn)
    executor.__call__ = call
    _active = traffic
    try:
        yield traffic
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        executor.__call__ = saved_call
        traffic._alive.clear()
        _active = None


# ----------------------------------------------------------------------------- eager traffic
# Ops that only make a new view of existing memory (besides every op whose schema says it returns
# a view, OpOverload.is_view): they move no data.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "t", "transpose", "permute",
    "expand", "expand_as", "as_strided", "detach", "alias", "lift_fresh", "squeeze", "unsqueeze",
    "slice", "select", "narrow", "split", "split_with_sizes", "unbind", "chunk", "diagonal",
    "unfold", "view_as_real", "view_as_complex", "movedim", "numpy_T", "_unsafe_split",
})
# Ops that only allocate (the memory is not initialised, or filled without reading anything;
# counted as moving nothing, as the lower bounds do not count output initialisation either).
ALLOC_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones",
    "full", "full_like", "new_full", "scalar_tensor",
})
# In-place ops that overwrite their first argument without reading it.
WRITE_ONLY_SELF_OPS = frozenset({"copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_",
                                 "random_", "exponential_"})


def tensor_bytes(t) -> int:
    """Bytes of the distinct elements a tensor addresses (broadcast dims, stride 0, count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


@dataclass
class OpTraffic:
    op: str
    read_bytes: int
    write_bytes: int


def _make_eager_mode():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class EagerTraffic(TorchDispatchMode):
        """Sums the bytes each aten op reads (tensor inputs) and writes (tensor outputs)."""

        def __init__(self) -> None:
            super().__init__()
            self.ops: list[OpTraffic] = []

        @property
        def read_bytes(self) -> int:
            return sum(o.read_bytes for o in self.ops)

        @property
        def write_bytes(self) -> int:
            return sum(o.write_bytes for o in self.ops)

        @property
        def total(self) -> int:
            return self.read_bytes + self.write_bytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if name in VIEW_OPS or name in ALLOC_OPS or func.is_view:
                self.ops.append(OpTraffic(str(func), 0, 0))
                return out
            inputs = [a for a in args]
            if name in WRITE_ONLY_SELF_OPS and inputs:
                inputs = inputs[1:]
            read_list = tree_flatten((inputs, {k: v for k, v in kwargs.items() if k != "out"}))[0]
            write_list = tree_flatten(out)[0]
            # In-place ops that return nothing (the _foreach_*_ family) write their mutated
            # arguments; count those writes too (args marked as written in the op's schema).
            returned = {id(t) for t in write_list}
            for arg_schema, value in zip(func._schema.arguments, args):
                info = arg_schema.alias_info
                if info is not None and info.is_write:
                    write_list += [t for t in tree_flatten(value)[0]
                                   if isinstance(t, torch.Tensor) and id(t) not in returned]
            read = sum(tensor_bytes(t) for t in read_list if isinstance(t, torch.Tensor))
            write = sum(tensor_bytes(t) for t in write_list if isinstance(t, torch.Tensor))
            self.ops.append(OpTraffic(str(func), read, write))
            return out

    return EagerTraffic


def eager_traffic():
    """A fresh ``EagerTraffic`` dispatch mode: ``with eager_traffic() as t: ...; t.total``."""
    return _make_eager_mode()()


# ----------------------------------------------------------------------------- measuring cases
def measure_case(case, with_eager: bool = True) -> dict:
    """Kernel unique/total bytes, eager bytes and ratios for one IOCase."""
    t0 = time.perf_counter()
    with record_traffic() as kt:
        case.run_kernel()
    kernel_s = time.perf_counter() - t0
    row: dict[str, Any] = {
        "case": case.name,
        "unique": kt.unique, "unique_read": kt.unique_read, "unique_write": kt.unique_write,
        "total": kt.total, "total_read": kt.total_read, "total_write": kt.total_write,
        "launches": [{"kernel": ln.kernel, "grid": ln.grid, "read": ln.read_bytes, "write": ln.write_bytes}
                     for ln in kt.launches],
        "lower_bound": int(case.lower_bound_bytes), "flops": int(case.flops),
    }
    eager = None
    if with_eager:
        with eager_traffic() as et:
            case.run_eager()
        eager = et.total
        row.update(eager=eager, eager_read=et.read_bytes, eager_write=et.write_bytes)
    lb = row["lower_bound"]
    row.update(
        unique_over_lb=kt.unique / lb if lb else None,
        total_over_lb=kt.total / lb if lb else None,
        eager_over_total=(eager / kt.total) if (eager is not None and kt.total) else None,
        kernel_model_us=modelled_time_s(kt.total, case.flops) * 1e6,
        eager_model_us=None if eager is None else modelled_time_s(eager, case.flops) * 1e6,
        interp_s=round(kernel_s, 2),
    )
    return row


def _fmt_us(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _columns():
    from bench._report import fmt_bytes, fmt_ratio

    return [
        ("op", "op"), ("case", "case"), ("tokens", "tokens"), ("hidden", "hidden"), ("dtype", "dtype"),
        ("unique", "unique", fmt_bytes), ("total", "total", fmt_bytes), ("eager", "eager", fmt_bytes),
        ("lower_bound", "lower bound", fmt_bytes), ("unique_over_lb", "uniq/LB", fmt_ratio),
        ("total_over_lb", "total/LB", fmt_ratio), ("eager_over_total", "eager/total", fmt_ratio),
        ("kernel_model_us", "kernel us (modelled)", _fmt_us), ("eager_model_us", "eager us (modelled)", _fmt_us),
    ]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


# A task is one (op module, tokens, hidden): its io_cases() are built and measured in one process.
def _worker_init() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from kernels import _interpreter

    _interpreter.install()


def _run_task(task: tuple) -> list[dict]:
    """Measure the selected IOCases of one (module, tokens, hidden); a row per case."""
    from bench._report import progress
    from kernels.check import import_op_module, parse_dtypes, selected, short_name

    module_name, tokens, hidden, dtype, op, with_eager = task
    short = short_name(module_name)
    rows = []
    for case in import_op_module(module_name).io_cases(tokens, hidden, parse_dtypes(dtype)[0]):
        if not selected(op, short, case.name):
            continue
        base = {"op": short, "case": case.name, "tokens": tokens, "hidden": hidden, "dtype": dtype}
        label = f"{short}/{case.name} ({dtype})"
        t0 = time.perf_counter()
        try:
            row = {**base, **measure_case(case, with_eager=with_eager)}
        except Exception as e:
            rows.append({**base, "error": f"{type(e).__name__}: {e}"[:500]})
            progress(f"{label}: ERROR {rows[-1]['error']}")
            continue
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        progress(f"{label}: total {row['total'] / 1e6:.1f} MB, unique {row['unique'] / 1e6:.1f} MB "
                 f"({row['wall_s']:.1f} s)")
    return rows


def run(tasks: list[tuple], jobs: int = 2) -> list[dict]:
    """Measure every task, in ``jobs`` spawned processes (in this one when ``jobs`` is 1)."""
    from bench._report import progress

    order = sorted(range(len(tasks)), key=lambda i: -tasks[i][1] * tasks[i][2])  # biggest first
    results: dict[int, list[dict]] = {}
    t0 = time.perf_counter()
    if jobs <= 1 or len(tasks) <= 1:
        for n, i in enumerate(order, 1):
            results[i] = _run_task(tasks[i])
            progress(f"[{n}/{len(tasks)} sizes done, {time.perf_counter() - t0:.0f} s]")
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(jobs, len(tasks)), initializer=_worker_init) as pool:
            for n, (i, rows) in enumerate(pool.imap_unordered(_indexed_task, [(i, tasks[i]) for i in order]), 1):
                results[i] = rows
                progress(f"[{n}/{len(tasks)} sizes done, {time.perf_counter() - t0:.0f} s]")
    return [row for i in range(len(tasks)) for row in results[i]]


def _indexed_task(item: tuple) -> tuple[int, list[dict]]:
    i, task = item
    return i, _run_task(task)


def main(argv: list[str] | None = None, reexec: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.io", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", default="384,768,1024", help="comma list of hidden sizes")
    p.add_argument("--tokens", default="4096,16384", help="comma list of token counts (rows)")
    p.add_argument("--dtype", default="bf16", help="fp32, fp16 or bf16")
    p.add_argument("--op", default=None, help="an op module (e.g. layernorm_gelu) or a substring of case names")
    p.add_argument("--module", action="append", default=None,
                   help="measure this module (dotted name or .py path) instead of OP_MODULES; repeatable")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2; 1 runs in this process)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager count")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
    args = p.parse_args(argv)
    for name in ("hidden", "tokens"):
        try:
            if min(_ints(getattr(args, name)), default=0) < 1:
                raise ValueError
        except ValueError:
            p.error(f"--{name} must be a comma list of positive integers, got {getattr(args, name)!r}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    from kernels._cli import check_output_file

    check_output_file(args.json, "--json")

    from kernels.check import OP_MODULES, dtype_name, load_op_modules, parse_dtypes, require_interpreter

    require_interpreter(["-m", "bench.io", *sys.argv[1:]] if reexec else None)
    (dtype,) = parse_dtypes(args.dtype)
    from bench._report import format_table, write_json

    t_start = time.perf_counter()
    names = [name for name in (OP_MODULES if args.module is None else args.module)
             if load_op_modules("io_cases", [name])]
    tasks = [(name, tokens, hidden, dtype_name(dtype), args.op, not args.no_eager)
             for name in names for tokens in _ints(args.tokens) for hidden in _ints(args.hidden)]
    rows = run(tasks, args.jobs)
    errors = [f"{r['op']}/{r['case']}: {r['error']}" for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    print(format_table(rows, _columns()))
    print(f"\nmodelled: max(bytes / {H100_HBM_BYTES_PER_S:.3g} B/s, flops / {H100_BF16_FLOPS_PER_S:.3g} FLOP/s), "
          f"H100 SXM; kernel uses total bytes. {len(rows)} cases, {time.perf_counter() - t_start:.1f} s")
    for e in errors:
        print(f"ERROR {e}")
    if args.json:
        write_json(args.json, "bench.io", rows, device="cpu (Triton interpreter)",
                   model={"hbm_bytes_per_s": H100_HBM_BYTES_PER_S, "flops_per_s": H100_BF16_FLOPS_PER_S},
                   errors=errors)
    if not rows:
        print("no IO cases found")
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    from kernels._cli import run_cli

    sys.exit(run_cli(lambda argv: main(argv, reexec=True)))
