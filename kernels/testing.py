"""The error budget every fused kernel is held to, the launch counter, and the records the kernel
reports share.

Rule (flash-attention's, made relative): a kernel's error against a higher-precision reference is
at most twice the error of eager PyTorch run in the same dtype, plus a floor proportional to the
size of the values compared::

    scale     = max |ref|
    err       = max |kernel - ref|
    eager_err = max |eager  - ref|
    ok        = kernel output finite  and  err <= 2 * eager_err + REL_FLOOR[dtype] * scale

``ref`` is the reference on fp32 copies of the inputs (``ref_fn(..., upcast=True)``) for fp16 and
bf16, on fp64 copies for fp32 (``upcast=False``; fp32 against fp32 would leave eager_err = 0).
Every term scales with the tensor compared, so no budget can exceed the values themselves: an
all-zero output has err = scale and fails unless eager's own error is about half the values
(``Comparison.accepts_zero`` says when; the wrong-kernel self-test, ``python -m kernels.testing``,
counts them), or the reference is exactly zero.

``compare_case`` applies it to a forward output and to every input gradient of one ``OpCase`` and,
given ``launches``, checks that the Triton kernels named launched (``count_launches``);
``assert_case`` raises with every failing comparison. Each op module exports ``check_cases()``
(what ``python -m kernels.check`` runs), ``compile_specs()`` (``CompileSpec``: one per kernel
configuration its launchers can choose) and ``io_cases()`` (``IOCase``: memory-traffic cases).
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    import triton

# The floor of the budget, relative to max |ref|. It covers the comparisons eager PyTorch gets
# exactly right by chance (single elements, exactly representable outputs: eager_err = 0), where the
# kernel may still round its largest value to the other neighbour: one unit in the last place of
# max |ref| in the output dtype, 2**-p for p explicit mantissa bits (the ulp of x is at most
# 2**-p * |x|). fp32 is compared with fp64, so its floor also covers two correct fp32 kernels
# summing in different orders through ill-conditioned steps: SimCSE's logits are cosines / 0.05,
# so an fp32 rounding of a cosine moves a gradient by 20x more (measured: 3.5e-6 of max |ref| at
# N = 7, d = 384, temperature 0.05, where eager happens to be 5x more accurate); 2**-17 = 64 fp32
# ulps (7.6e-6 relative).
REL_FLOOR: dict[torch.dtype, float] = {
    torch.float32: 2.0**-17,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


@dataclass
class OpCase:
    """One op on one input recipe, run by ``compare_case``.

    ``make_inputs(device, dtype, seed)`` returns the keyword arguments of both functions; tensors
    that need gradients have ``requires_grad=True``. ``kernel_fn(**inputs)`` runs the kernel;
    ``ref_fn(**inputs, upcast=bool)`` the eager reference (fp32 math when ``upcast``).
    """

    name: str
    make_inputs: Callable[[torch.device, torch.dtype, int], dict[str, Any]]
    kernel_fn: Callable[..., Tensor | tuple]
    ref_fn: Callable[..., Tensor | tuple]


@dataclass
class Comparison:
    """One checked tensor: a forward output (``"out"``, ``"out[1]"``), a gradient (``"grad x"``) or
    a launch (``"launch <kernel>"``)."""

    case: str
    dtype: torch.dtype
    what: str
    err: float  # max |kernel - ref|
    eager_err: float  # max |eager - ref|
    budget: float  # 2 * eager_err + REL_FLOOR[dtype] * scale
    ok: bool
    where: str  # index and values of the worst element, or why the comparison failed
    scale: float = float("nan")  # max |ref|: what the budget is relative to
    zero: bool = False  # declared zero in exact arithmetic (compare_case's ``zero``)

    @property
    def accepts_zero(self) -> bool:
        """Whether an all-zero kernel output would pass (its error is exactly ``scale``)."""
        return math.isfinite(self.scale) and self.scale <= self.budget

    @property
    def exact_zero(self) -> bool:
        """Zeros are the right answer: the reference is exactly zero, or the tensor is zero in
        exact arithmetic and the reference holds only rounding noise."""
        return self.scale == 0.0 or self.zero

    def __str__(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{status} {self.case} [{dtype}] {self.what}: err {self.err:.3g} "
                f"(eager {self.eager_err:.3g}, budget {self.budget:.3g}, max|ref| {self.scale:.3g}) "
                f"{self.where}")


@dataclass
class CompileSpec:
    """One kernel configuration a launcher can choose, for ``triton.compile`` without a GPU.

    ``signature`` maps every argument name to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the constexpr values. ``attrs`` (optional)
    holds the specialisation the JIT applies at launch, ``{(arg_index,): [["tt.divisibility",
    16]]}`` for 16-byte-aligned pointers and integers divisible by 16; pass it on
    (``ASTSource(fn, signature, constexprs, attrs)``) or loads compile unvectorised and register
    counts come out higher than in real launches.
    """

    kernel: str
    fn: "triton.runtime.JITFunction"
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    label: str
    attrs: dict[tuple[int, ...], list] | None = None


@dataclass
class IOCase:
    """A forward + backward whose global-memory traffic is measured against a lower bound.

    ``run_kernel`` runs the Triton forward and backward (CPU tensors under the interpreter);
    ``run_eager`` the eager reference on the same inputs. ``lower_bound_bytes``: every input read
    once and every output written once (the op module documents its formula); ``flops`` counts
    the arithmetic of forward and backward.
    """

    name: str
    run_kernel: Callable[[], Any]
    run_eager: Callable[[], Any]
    lower_bound_bytes: int
    flops: int


# ----------------------------------------------------------------------------- test device, launches
DEVICE_ENV = "MINBERT_TEST_DEVICE"


def kernels_device() -> str:
    """The device the kernel tests launch on: ``"cpu"`` (Triton's interpreter) or ``"cuda"``.

    tests/conftest.py decides it once (``--kernels-device`` / ``$MINBERT_TEST_DEVICE``) and
    exports it as ``$MINBERT_TEST_DEVICE`` before any test module is imported; outside pytest the
    same variable is read, else ``cpu`` exactly when ``TRITON_INTERPRET=1``.
    """
    device = os.environ.get(DEVICE_ENV, "").strip()
    if device:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"${DEVICE_ENV}={device!r}: choose cpu or cuda")
        return device
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


_counters: list[Counter] = []  # the open count_launches() blocks, innermost last
_saved_runs: dict[type, Callable] = {}


def _kernel_classes() -> list[type]:
    """The classes whose ``run`` launches a kernel: ``fn[grid](...)`` calls ``fn.run(grid=...)``."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction]


def _counting_run(original: Callable) -> Callable:
    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            name = getattr(getattr(self, "fn", None), "__name__", None) or repr(self)
            for counter in _counters:
                counter[name] += 1
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run.__minbert_launch_counter__ = True
    return run


@contextlib.contextmanager
def count_launches() -> Iterator[Counter]:
    """Count the Triton kernel launches inside the block, by kernel name::

        with count_launches() as n:
            attention(q, k, v).sum().backward()
        assert n["_attention_fwd_kernel"] == 1

    Wraps ``run`` of Triton's ``JITFunction`` (compiled kernels, GPU) and ``InterpretedFunction``
    (``TRITON_INTERPRET=1``), which every ``kernel[grid](...)`` launch goes through (autotuners
    and heuristics end there too); warm-up compiles are not launches. Blocks may nest; the
    wrappers are removed when the outermost block ends.
    """
    counter: Counter = Counter()
    if not _counters:
        for cls in _kernel_classes():
            _saved_runs[cls] = cls.run
            cls.run = _counting_run(cls.run)
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)
        if not _counters:
            while _saved_runs:
                cls, original = _saved_runs.popitem()
                cls.run = original


# ----------------------------------------------------------------------------- comparisons
def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _copy_inputs(inputs: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Fresh leaves: floating tensors detached and cloned (converted to ``dtype`` when given)."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            t = value.detach().clone()
            if dtype is not None:
                t = t.to(dtype)
            out[name] = t.requires_grad_(value.requires_grad)
        else:
            out[name] = value
    return out


def _run(fn: Callable, inputs: dict[str, Any], upstream: list[Tensor | None], **kw) -> tuple:
    """Forward, then backward with the given upstream gradients; returns (outputs, grads by name)."""
    outs = _as_tuple(fn(**inputs, **kw))
    pairs = [(o, g.to(device=o.device, dtype=o.dtype)) for o, g in zip(outs, upstream)
             if g is not None and isinstance(o, Tensor) and o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    grads = {name: t.grad for name, t in inputs.items() if isinstance(t, Tensor) and t.requires_grad}
    return tuple(o.detach() if isinstance(o, Tensor) else o for o in outs), grads


def _compare(case: str, dtype: torch.dtype, what: str, kernel: Tensor | None, eager: Tensor | None,
             ref: Tensor | None, zero: bool = False, case_scale: float = 0.0) -> Comparison:
    def fail(why: str) -> Comparison:
        return Comparison(case, dtype, what, float("inf"), float("nan"), float("nan"), False, why)

    if ref is None or eager is None:
        return fail("the reference produced no tensor here")
    if kernel is None:
        return fail("the kernel produced no tensor (a gradient silently None?)")
    if tuple(kernel.shape) != tuple(ref.shape):
        return fail(f"kernel shape {tuple(kernel.shape)} != reference shape {tuple(ref.shape)}")
    if kernel.dtype != eager.dtype:
        return fail(f"kernel dtype {kernel.dtype} != eager dtype {eager.dtype}")
    k, e, r = (t.detach().to("cpu", torch.float64) for t in (kernel, eager, ref))
    if not torch.isfinite(r).all():
        return fail("NaN/inf in the reference (fp32, or fp64 for fp32 cases)")
    scale = r.abs().max().item() if r.numel() else 0.0
    # zero in exact arithmetic: what remains is the rounding of terms that cancel, terms as large
    # as the case's other tensors (L = 1 attention: dS = P (dP - delta) with dP = delta = dO . v)
    zero = zero or scale == 0.0
    floor = REL_FLOOR.get(eager.dtype, REL_FLOOR[dtype]) * (case_scale if zero else scale)
    eager_err = (e - r).abs().max().item() if e.numel() else 0.0
    if math.isnan(eager_err):  # eager overflowed; the budget falls back to the floor
        eager_err = float("inf")
    budget = 2 * eager_err + floor if eager_err != float("inf") else floor
    if not torch.isfinite(k).all():
        bad = torch.nonzero(~torch.isfinite(k))[0].tolist()
        return Comparison(case, dtype, what, float("inf"), eager_err, budget, False,
                          f"NaN/inf in kernel output (first at {tuple(bad)})", scale)
    if k.numel() == 0:
        return Comparison(case, dtype, what, 0.0, eager_err, budget, True, "empty", scale)
    diff = (k - r).abs()
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    err = diff.reshape(-1)[flat].item()
    where = (f"worst at {idx}: kernel {k.reshape(-1)[flat].item():.6g}, "
             f"ref {r.reshape(-1)[flat].item():.6g}, eager {e.reshape(-1)[flat].item():.6g}")
    if 0 < scale <= budget and not zero:  # the case cannot tell this kernel from zeros
        return Comparison(case, dtype, what, err, eager_err, budget, False,
                          f"budget >= max|ref|: an all-zero output would pass (eager's error is "
                          f"{eager_err / scale:.0%} of the values); choose inputs {dtype} resolves", scale)
    return Comparison(case, dtype, what, err, eager_err, budget, err <= budget, where, scale, zero)


def compare_tensors(name: str, dtype: torch.dtype, what: str, kernel: Tensor | None,
                    eager: Tensor | None, ref: Tensor | None, zero: bool = False) -> Comparison:
    """The error budget on one tensor computed outside an ``OpCase`` (e.g. a whole model run two
    ways): ``kernel`` and ``eager`` in ``dtype``, ``ref`` the same value in higher precision.
    ``zero``: the value is zero in exact arithmetic (see ``compare_case``)."""
    return _compare(name, dtype, what, kernel, eager, ref, zero=zero)


_recorders: list[list[Comparison]] = []  # open record_comparisons() blocks


@contextlib.contextmanager
def record_comparisons() -> Iterator[list[Comparison]]:
    """Collect every ``Comparison`` that ``assert_case`` asserts inside the block (tests/conftest.py
    counts, over the whole suite, how many would accept an all-zero output)."""
    found: list[Comparison] = []
    _recorders.append(found)
    try:
        yield found
    finally:
        _recorders.remove(found)


def compare_case(case: OpCase, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                 launches: Iterable[str] | None = None, zero: Iterable[str] = ()) -> list[Comparison]:
    """Kernel vs eager vs fp32 reference on every output and every input gradient of ``case``.

    ``launches``: names of Triton kernels the kernel run (forward and backward) must launch at
    least once each; one more ``Comparison`` per name (``what = "launch <name>"``), failing when
    the kernel never launched (an eager fallback inside a launcher cannot pass).

    ``zero``: the compared tensors (``"grad weight"``, ``"out"``) that are zero in exact arithmetic
    for this case, so the reference holds rounding noise only (a one-column LayerNorm's weight
    gradient: x - mean(x) = 0). They keep the budget but are exempt from the rule that a budget
    must stay below max |ref|, and are counted as exact zeros (``Comparison.exact_zero``).

    The three runs see identical input values (the reference gets fp32 copies, or fp64 copies
    when ``dtype`` is fp32, as fresh leaves so its gradients keep that precision) and identical
    upstream gradients: one fixed random tensor per output, drawn from ``seed`` and rounded to
    ``dtype``.
    """
    return _compare_all(case, device, dtype, seed, launches, zero)


def _compare_all(case: OpCase, device: torch.device | str, dtype: torch.dtype, seed: int,
                 launches: Iterable[str] | None, zero: Iterable[str] = ()) -> list[Comparison]:
    zero = set(zero)
    device = torch.device(device)
    base = case.make_inputs(device, dtype, seed)
    if dtype == torch.float32:
        ref_dtype, ref_kw = torch.float64, dict(upcast=False)
    else:
        ref_dtype, ref_kw = torch.float32, dict(upcast=True)
    e_in, r_in, k_in = _copy_inputs(base), _copy_inputs(base, ref_dtype), _copy_inputs(base)
    # forward shapes first, then one upstream gradient per floating output
    with torch.no_grad():
        shapes = [o.shape if isinstance(o, Tensor) and o.is_floating_point() else None
                  for o in _as_tuple(case.ref_fn(**_copy_inputs(base), upcast=False))]
    gen = torch.Generator().manual_seed(seed + 12345)
    upstream = [None if s is None else torch.randn(s, generator=gen).to(dtype) for s in shapes]
    e_out, e_grads = _run(case.ref_fn, e_in, upstream, upcast=False)
    r_out, r_grads = _run(case.ref_fn, r_in, upstream, **ref_kw)
    case_scale = max((t.detach().abs().max().item() for t in (*r_out, *r_grads.values())
                      if _floating(t) and t.numel()), default=0.0)
    with count_launches() as launched:
        k_out, k_grads = _run(case.kernel_fn, k_in, upstream)

    results = [_launch_check(case.name, dtype, name, launched) for name in (launches or ())]
    if len(k_out) != len(r_out):
        results.append(Comparison(case.name, dtype, "out", float("inf"), float("nan"), float("nan"),
                                  False, f"kernel returned {len(k_out)} outputs, reference {len(r_out)}"))
        return results
    for i, (k, e, r) in enumerate(zip(k_out, e_out, r_out)):
        if not isinstance(r, Tensor) or not r.is_floating_point():
            continue
        what = "out" if len(r_out) == 1 else f"out[{i}]"
        results.append(_compare(case.name, dtype, what, k, e, r, what in zero, case_scale))
    for name in r_grads:
        results.append(_compare(case.name, dtype, f"grad {name}", k_grads.get(name),
                                e_grads.get(name), r_grads[name], f"grad {name}" in zero, case_scale))
    return results


def _launch_check(case: str, dtype: torch.dtype, kernel: str, launched: Counter) -> Comparison:
    n = launched[kernel]
    where = (f"launched {n} time(s)" if n else
             f"never launched (launched: {dict(launched) or 'no Triton kernel at all'})")
    return Comparison(case, dtype, f"launch {kernel}", 0.0 if n else float("inf"), 0.0, 0.0, n > 0, where,
                      scale=float("nan"))


def assert_case(case: OpCase, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                launches: Iterable[str] | None = None, zero: Iterable[str] = ()) -> None:
    """``compare_case``, raising AssertionError that lists every failing comparison."""
    results = compare_case(case, device, dtype, seed, launches, zero)
    for found in _recorders:
        found.extend(results)
    failed = [c for c in results if not c.ok]
    if failed:
        lines = "\n  ".join(str(c) for c in failed)
        raise AssertionError(f"{len(failed)} of {len(results)} comparisons over budget:\n  {lines}")


# ----------------------------------------------------------------------------- wrong-kernel self-test
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def _floating(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _map_outputs(fn: Callable, f: Callable[[Tensor], Tensor]) -> Callable:
    def wrong(**kw):
        out = fn(**kw)
        outs = tuple(f(o) if _floating(o) else o for o in _as_tuple(out))
        return outs if isinstance(out, (tuple, list)) else outs[0]
    return wrong


def _transpose(t: Tensor) -> Tensor:
    """The output written in the wrong memory order: (rows, last) read as (last, rows)."""
    if t.dim() == 0:
        return t
    return t.reshape(-1, t.shape[-1]).t().reshape(t.shape)


def _with_inputs(fn: Callable, change: Callable[[dict], dict]) -> Callable:
    return lambda **kw: fn(**change(kw))


def _scale_grads(kw: dict) -> dict:
    """Differentiable inputs get 0.9x their gradient; for an optimizer, its ``grad`` input 0.9x."""
    out = {n: _ScaleGrad.apply(t, 0.9) if _floating(t) and t.requires_grad else t for n, t in kw.items()}
    if _floating(kw.get("grad")):
        norm = torch.linalg.vector_norm(kw["grad"].double()).item()
        if kw.get("max_grad_norm") is not None and 0.9 * norm > kw["max_grad_norm"]:
            raise _NotApplicable("clipping rescales the gradient to max_grad_norm either way")
        out["grad"] = kw["grad"] * 0.9
    return out


def _no_op(fn: Callable) -> Callable:
    """An in-place op that writes nothing: outputs updated in place come back as they were, the
    others (an optimizer's update, new - old) are zero."""
    def wrong(**kw):
        if not any(_floating(t) and not t.requires_grad for t in kw.values()):
            raise _NotApplicable("not an in-place op")
        before = {n: t.detach().clone() for n, t in kw.items() if _floating(t)}
        outs = _as_tuple(fn(**kw))
        names = [next((n for n, t in kw.items() if t is o), None) for o in outs]
        if all(n is None for n in names):
            raise _NotApplicable("no output is updated in place")
        return tuple(before[n] if n is not None else o * 0 for n, o in zip(names, outs))
    return wrong


class _NotApplicable(Exception):
    pass


# name -> (the wrong kernel built from a right one); a variant that leaves every output and
# gradient of a case unchanged (a transposed single row, zeros where the answer is zero, no
# weight decay in a case without any) is "n/a" for that case, not a pass
WRONG_KERNELS: dict[str, Callable[[Callable], Callable]] = {
    "zeros": lambda fn: _map_outputs(fn, lambda o: o * 0),
    "out x 0.9": lambda fn: _map_outputs(fn, lambda o: o * 0.9),
    "grad x 0.9": lambda fn: _with_inputs(fn, _scale_grads),
    "transposed output": lambda fn: _map_outputs(fn, _transpose),
    "no-op": _no_op,
    "no weight decay": lambda fn: _with_inputs(fn, lambda kw: {**kw, "weight_decay": 0.0}),
    "half lr": lambda fn: _with_inputs(fn, lambda kw: {**kw, "lr": kw["lr"] * 0.5}),
}
# the inputs a variant changes: without them it is n/a, known before running anything
_VARIANT_INPUTS = {"no weight decay": "weight_decay", "half lr": "lr"}


@dataclass
class WrongResult:
    """One wrong kernel on one case in one dtype: ``caught`` when some comparison failed."""

    op: str
    case: str
    dtype: torch.dtype
    variant: str
    caught: bool | None  # None: not applicable (the variant changes nothing here)
    comparisons: list[Comparison]
    why: str = ""


def _same_run(a: tuple, b: tuple) -> bool:
    (ao, ag), (bo, bg) = a, b
    if len(ao) != len(bo) or ag.keys() != bg.keys():
        return False
    pairs = list(zip(ao, bo)) + [(ag[n], bg[n]) for n in ag]
    return all((x is None and y is None) or (_floating(x) and _floating(y) and x.shape == y.shape
                                             and torch.equal(x, y)) or not (_floating(x) or _floating(y))
               for x, y in pairs)


def wrong_kernel_results(op: str, case: OpCase, device: torch.device | str, dtype: torch.dtype,
                         base: str = "eager", variants: Iterable[str] | None = None,
                         seed: int = 0) -> list[WrongResult]:
    """Feed ``compare_case`` wrong kernels built from a right one; each should fail.

    ``base``: ``"eager"`` builds them from the eager reference in ``dtype`` (what a kernel exactly as
    accurate as eager PyTorch returns: fast, so every case and dtype can be audited) or
    ``"kernel"`` from the case's Triton kernel.
    """
    device = torch.device(device)
    right = (lambda **kw: case.ref_fn(**kw, upcast=False)) if base == "eager" else case.kernel_fn
    inputs = case.make_inputs(device, dtype, seed)

    def make_inputs(dev, dt, sd):  # the same inputs for every variant, made once
        return inputs if (dev, dt, sd) == (device, dtype, seed) else case.make_inputs(dev, dt, sd)
    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        shapes = [o.shape if _floating(o) else None for o in _as_tuple(right(**_copy_inputs(inputs)))]
    upstream = [None if s is None else torch.randn(s, generator=gen).to(dtype) for s in shapes]
    expected = _run(right, _copy_inputs(inputs), upstream)
    results = []
    for name in variants or WRONG_KERNELS:
        if _VARIANT_INPUTS.get(name, next(iter(inputs))) not in inputs:
            results.append(WrongResult(op, case.name, dtype, name, None, [],
                                       f"the case has no {_VARIANT_INPUTS[name]!r} input"))
            continue
        wrong = WRONG_KERNELS[name](right)
        try:
            changed = not _same_run(_run(wrong, _copy_inputs(inputs), upstream), expected)
        except _NotApplicable as e:
            results.append(WrongResult(op, case.name, dtype, name, None, [], str(e)))
            continue
        if not changed:
            results.append(WrongResult(op, case.name, dtype, name, None, [],
                                       "the same outputs and gradients as the right kernel"))
            continue
        comps = _compare_all(OpCase(f"{case.name} <{name}>", make_inputs, wrong, case.ref_fn),
                             device, dtype, seed, None)
        results.append(WrongResult(op, case.name, dtype, name, not all(c.ok for c in comps), comps))
    return results


def _op_of(case: OpCase) -> str:
    return case.name.split("[")[0].split(" ")[0]  # "layer_norm[residual] 7x29" -> "layer_norm"


def self_test_cases(modules: list[str] | None = None) -> list[tuple[str, OpCase]]:
    """(op, case) for every op module's ``check_cases()`` (default ``kernels.check.OP_MODULES``)."""
    from .check import load_op_modules

    return [(_op_of(c), c) for _, m in load_op_modules("check_cases", modules, log=lambda msg: None)
            for c in m.check_cases()]


def self_test(device: torch.device | str = "cpu", dtypes: Iterable[torch.dtype] = (
        torch.float32, torch.float16, torch.bfloat16), base: str = "eager",
        cases: list[tuple[str, OpCase]] | None = None) -> list[WrongResult]:
    """Every wrong kernel on every check case of every op in every dtype."""
    return [r for op, case in (cases if cases is not None else self_test_cases())
            for dtype in dtypes for r in wrong_kernel_results(op, case, device, dtype, base)]


def self_test_table(results: list[WrongResult]) -> str:
    """Markdown: op x dtype rows, one column per wrong kernel, "caught/applicable" per cell."""
    variants = list(dict.fromkeys(r.variant for r in results))
    rows: dict[tuple[str, str], dict[str, list[bool]]] = {}
    for r in results:
        cell = rows.setdefault((r.op, str(r.dtype).replace("torch.", "")), {}).setdefault(r.variant, [])
        if r.caught is not None:
            cell.append(r.caught)
    lines = ["| op | dtype | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for (op, dt), cells in rows.items():
        shown = []
        for v in variants:
            got = cells.get(v, [])
            shown.append("n/a" if not got else f"{'fails' if all(got) else 'PASSES'} {sum(got)}/{len(got)}")
        lines.append(f"| {op} | {dt} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def zero_acceptance(comparisons: Iterable[Comparison]) -> tuple[int, int, int]:
    """(tensor comparisons, how many would accept an all-zero output, how many of those have an
    exactly-zero reference, where zeros are right)."""
    comps = [c for c in comparisons if not c.what.startswith("launch ") and math.isfinite(c.budget)]
    accept = [c for c in comps if c.accepts_zero]
    return len(comps), len(accept), sum(c.exact_zero for c in accept)


# ----------------------------------------------------------------------------- host reads
_HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def forbid_host_reads():
    """Inside the block, every read of a tensor's value by the host raises ``AssertionError``:
    ``Tensor.item``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``.to("cpu")``, ``bool(t)``,
    ``int(t)``, ``float(t)`` and ``t.__index__`` (on CUDA each one waits for the device).

    Run on CPU tensors, it shows that a code path would not synchronise on a GPU: tests wrap a
    forward + backward in it (Triton's interpreter itself reads none of these).
    """
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
    original_to = torch.Tensor.to

    def forbid(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name} on a {tuple(self.shape)} tensor")
        return read

    def to(self, *args, **kwargs):
        targets = [*args, kwargs.get("device")]
        if any(str(t) == "cpu" for t in targets if isinstance(t, (str, torch.device))):
            raise AssertionError(f"host read: Tensor.to('cpu') on a {tuple(self.shape)} tensor")
        return original_to(self, *args, **kwargs)

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, forbid(name))
        torch.Tensor.to = to
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.Tensor.to = original_to
