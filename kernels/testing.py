"""The error budget every fused kernel is held to, and the records the kernel reports share.

Rule (flash-attention's): a kernel's error against an fp32 upcast reference is at most twice the
error of eager PyTorch run in the same dtype, plus a small absolute tolerance per dtype::

    err       = max |kernel - ref32|
    eager_err = max |eager  - ref32|
    ok        = kernel output finite  and  err <= 2 * eager_err + ATOL[dtype]

``ref32`` is the reference on fp32 copies of the inputs (``ref_fn(..., upcast=True)``) for fp16
and bf16. For fp32 itself that would be eager PyTorch again (eager_err = 0, leaving only ATOL,
which no fixed number gets right for both a 1-element output and a sum over thousands of rows),
so fp32 cases are measured against the reference run on fp64 copies (``upcast=False``): the
kernel is then held to twice eager fp32's own rounding error, as the 16-bit dtypes are.

``compare_case`` applies it to a forward output and to every input gradient of one ``OpCase``;
``assert_case`` raises with every failing comparison. Each op module exports ``check_cases()``
(what ``python -m kernels.check`` runs), ``compile_specs()`` (``CompileSpec``: one per kernel
configuration its launchers can choose) and ``io_cases()`` (``IOCase``: memory-traffic cases).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    import triton

# Absolute slack per dtype, added to 2x the eager error. It covers the cases where eager PyTorch is
# exact by chance (single elements, outputs that are exactly representable), so its error alone
# would allow nothing.
ATOL: dict[torch.dtype, float] = {
    # fp32 is measured against fp64 (see above), so 2 * eager_err already scales with the values;
    # 1e-5 covers outputs eager fp32 gets exactly right by chance while the kernel sums in
    # another order (~1e-7 relative on values up to ~10s).
    torch.float32: 1e-5,
    # one fp16 ulp at 1.0 (2**-10 = 9.8e-4): a kernel that rounds a value the other way.
    torch.float16: 1e-3,
    # one bf16 ulp at 1.0 (2**-7 = 7.8e-3), for the same reason.
    torch.bfloat16: 8e-3,
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
    """One checked tensor: a forward output (``"out"``, ``"out[1]"``) or a gradient (``"grad x"``)."""

    case: str
    dtype: torch.dtype
    what: str
    err: float  # max |kernel - ref32|
    eager_err: float  # max |eager - ref32|
    budget: float  # 2 * eager_err + ATOL[dtype]
    ok: bool
    where: str  # index and values of the worst element, or why the comparison failed

    def __str__(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{status} {self.case} [{dtype}] {self.what}: err {self.err:.3g} "
                f"(eager {self.eager_err:.3g}, budget {self.budget:.3g}) {self.where}")


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
             ref: Tensor | None) -> Comparison:
    atol = ATOL[dtype]

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
    eager_err = (e - r).abs().max().item() if e.numel() else 0.0
    if math.isnan(eager_err):  # eager overflowed; the budget falls back to ATOL
        eager_err = float("inf")
    budget = 2 * eager_err + atol if eager_err != float("inf") else atol
    if not torch.isfinite(k).all():
        bad = torch.nonzero(~torch.isfinite(k))[0].tolist()
        return Comparison(case, dtype, what, float("inf"), eager_err, budget, False,
                          f"NaN/inf in kernel output (first at {tuple(bad)})")
    if k.numel() == 0:
        return Comparison(case, dtype, what, 0.0, eager_err, budget, True, "empty")
    diff = (k - r).abs()
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    err = diff.reshape(-1)[flat].item()
    where = (f"worst at {idx}: kernel {k.reshape(-1)[flat].item():.6g}, "
             f"ref32 {r.reshape(-1)[flat].item():.6g}, eager {e.reshape(-1)[flat].item():.6g}")
    return Comparison(case, dtype, what, err, eager_err, budget, err <= budget, where)


def compare_tensors(name: str, dtype: torch.dtype, what: str, kernel: Tensor | None,
                    eager: Tensor | None, ref: Tensor | None) -> Comparison:
    """The error budget on one tensor computed outside an ``OpCase`` (e.g. a whole model run two
    ways): ``kernel`` and ``eager`` in ``dtype``, ``ref`` the same value in higher precision."""
    return _compare(name, dtype, what, kernel, eager, ref)


def compare_case(case: OpCase, device: torch.device | str, dtype: torch.dtype,
                 seed: int = 0) -> list[Comparison]:
    """Kernel vs eager vs fp32 reference on every output and every input gradient of ``case``.

    The three runs see identical input values (the reference gets fp32 copies, or fp64 copies
    when ``dtype`` is fp32, as fresh leaves so its gradients keep that precision) and identical
    upstream gradients: one fixed random tensor per output, drawn from ``seed`` and rounded to
    ``dtype``.
    """
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
    k_out, k_grads = _run(case.kernel_fn, k_in, upstream)

    results = []
    if len(k_out) != len(r_out):
        results.append(Comparison(case.name, dtype, "out", float("inf"), float("nan"), float("nan"),
                                  False, f"kernel returned {len(k_out)} outputs, reference {len(r_out)}"))
        return results
    for i, (k, e, r) in enumerate(zip(k_out, e_out, r_out)):
        if not isinstance(r, Tensor) or not r.is_floating_point():
            continue
        what = "out" if len(r_out) == 1 else f"out[{i}]"
        results.append(_compare(case.name, dtype, what, k, e, r))
    for name in r_grads:
        results.append(_compare(case.name, dtype, f"grad {name}", k_grads.get(name),
                                e_grads.get(name), r_grads[name]))
    return results


def assert_case(case: OpCase, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> None:
    """``compare_case``, raising AssertionError that lists every failing comparison."""
    results = compare_case(case, device, dtype, seed)
    failed = [c for c in results if not c.ok]
    if failed:
        lines = "\n  ".join(str(c) for c in failed)
        raise AssertionError(f"{len(failed)} of {len(results)} comparisons over budget:\n  {lines}")
