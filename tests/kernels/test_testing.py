"""The harness itself (kernels.testing): the launch counter, the scale-aware error budget, and the
wrong-kernel self-test: every op x dtype x wrong kernel must fail.

The self-test builds its wrong kernels from the eager reference (a kernel exactly as accurate as
eager PyTorch, made wrong: zeros, outputs or gradients x 0.9, a transposed output, for the
optimizer a no-op, no weight decay, half the learning rate), so every check case of every op can
be audited in every dtype in seconds; a second test builds them from the Triton kernels on one
small case per op. ``python -m kernels.check --wrong-kernels eager`` prints the whole table.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels.testing import (REL_FLOOR, WRONG_KERNELS, Comparison, OpCase, assert_case, compare_case,
                             count_launches, kernels_device, self_test_cases, self_test_table,
                             wrong_kernel_results, zero_acceptance)

DEVICE = kernels_device()  # tests/conftest.py decides it (cpu: Triton's interpreter)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AV = importlib.import_module("kernels.attention_varlen")


# ----------------------------------------------------------------------------- the launch counter
@triton.jit
def _toy_scale_kernel(
    x_ptr,  # (n,)
    y_ptr,  # (n,)
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def _toy(x):
    y = torch.empty_like(x)
    _toy_scale_kernel[(triton.cdiv(x.numel(), 64),)](x, y, x.numel(), BLOCK=64)
    return y


def test_count_launches_by_name_nested_and_removed_after():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = (JITFunction.run, InterpretedFunction.run)
    x = torch.randn(100, device=DEVICE)
    with count_launches() as outer:
        assert torch.equal(_toy(x), 2 * x)
        with count_launches() as inner:
            _toy(x)
            _toy(x)
        assert inner == {"_toy_scale_kernel": 2}
    _toy(x)  # outside every block: not counted
    assert outer == {"_toy_scale_kernel": 3}
    assert (JITFunction.run, InterpretedFunction.run) == originals
    with pytest.raises(RuntimeError), count_launches():
        raise RuntimeError("the wrappers go even when the block raises")
    assert (JITFunction.run, InterpretedFunction.run) == originals


def _bias_gelu_case(kernel_fn, scale: float = 1.0) -> OpCase:
    def make_inputs(device, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(x=(torch.randn(4, 16, generator=g) * scale).to(device, dtype).requires_grad_(),
                    bias=(torch.randn(16, generator=g) * scale).to(device, dtype).requires_grad_(),
                    approximate="none")
    return OpCase("bias_gelu helper", make_inputs, kernel_fn, kernels.bias_gelu_ref)


def test_launches_catch_an_eager_fallback():
    """A launcher that silently runs eager PyTorch is exact, and only the launch check sees it."""
    fallback = _bias_gelu_case(lambda **kw: kernels.bias_gelu_ref(**kw))
    results = compare_case(fallback, DEVICE, torch.float32, launches=["_bias_gelu_fwd_kernel"])
    (launch,) = [c for c in results if c.what.startswith("launch")]
    assert not launch.ok and "never launched" in launch.where and "no Triton kernel at all" in launch.where
    assert all(c.ok for c in results if c is not launch)
    lg = importlib.import_module("kernels.layernorm_gelu")
    real = _bias_gelu_case(lambda **kw: lg._bias_gelu_triton(**kw))
    assert_case(real, DEVICE, torch.float32, launches=["_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"])
    with pytest.raises(AssertionError, match="launch _bias_gelu_fwd_kernel: .* never launched"):
        assert_case(fallback, "cpu", torch.float32, launches=["_bias_gelu_fwd_kernel"])


# ----------------------------------------------------------------------------- the budget
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_budget_scales_with_the_values(dtype, scale):
    """At any magnitude: the right kernel (eager in fp32 math, rounded once) passes; zeros, a 10%
    error in the output or in one gradient fail. The old fixed bf16 atol (8e-3) passed zeros at
    1e-4."""
    right = _bias_gelu_case(lambda **kw: kernels.bias_gelu_ref(**kw, upcast=True).to(kw["x"].dtype), scale)
    results = compare_case(right, "cpu", dtype)
    assert [c.what for c in results] == ["out", "grad x", "grad bias"]
    assert all(c.ok for c in results), [str(c) for c in results]
    for c in results:
        assert c.budget < 0.1 * c.scale, str(c)  # a 10% error anywhere cannot pass
        assert c.budget >= REL_FLOOR[dtype] * c.scale
    for name in ("zeros", "out x 0.9", "grad x 0.9"):
        wrong = _bias_gelu_case(WRONG_KERNELS[name](right.kernel_fn), scale)
        assert not all(c.ok for c in compare_case(wrong, "cpu", dtype)), name


def test_budget_refuses_a_case_its_dtype_cannot_resolve():
    """When eager's own error is as large as the values (here x + 1e4 - 1e4 in bf16), even an
    exact kernel fails: the comparison could not tell it from zeros."""
    def ref(x, upcast=False):
        x = x.float() if upcast else x
        return (x + 1e4) - 1e4

    def make_inputs(device, dtype, seed):
        return dict(x=torch.randn(64, generator=torch.Generator().manual_seed(seed)).to(device, dtype))

    exact = OpCase("cancellation", make_inputs, lambda x: x.clone(), ref)
    (c,) = compare_case(exact, "cpu", torch.bfloat16)
    assert c.err < 1e-3 and c.accepts_zero and not c.ok and "all-zero output would pass" in c.where
    (c32,) = compare_case(exact, "cpu", torch.float32)  # fp32 resolves it
    assert c32.ok and not c32.accepts_zero


def test_budget_catches_nan_missing_gradients_and_offsets():
    def nan_kernel(x, bias, approximate):
        y = kernels.bias_gelu_ref(x, bias, approximate)
        return torch.where(torch.arange(16) == 3, torch.nan, y)

    nan = {c.what: c for c in compare_case(_bias_gelu_case(nan_kernel), "cpu", torch.float32)}
    assert not nan["out"].ok and "NaN/inf in kernel output" in nan["out"].where
    missing = {c.what: c for c in compare_case(_bias_gelu_case(
        lambda x, bias, approximate: kernels.bias_gelu_ref(x.detach(), bias.detach(), approximate)),
        "cpu", torch.float32)}
    assert missing["out"].ok and not missing["grad x"].ok and "no tensor" in missing["grad x"].where
    for dtype, offset in ((torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 1e-1)):
        shifted = {c.what: c for c in compare_case(_bias_gelu_case(
            lambda **kw: kernels.bias_gelu_ref(**kw) + offset), "cpu", dtype)}
        assert not shifted["out"].ok and shifted["grad x"].ok, dtype  # a constant leaves grads right


def test_zero_acceptance_counts():
    def comp(scale, budget, what="out"):
        return Comparison("c", torch.float32, what, 0.0, 0.0, budget, True, "", scale)

    found = [comp(1.0, 0.5), comp(1.0, 1.5), comp(0.0, 0.0), comp(float("nan"), 0.0, "launch _k")]
    assert zero_acceptance(found) == (3, 2, 1)


# ----------------------------------------------------------------------------- wrong kernels
def _varlen_case(lengths: tuple[int, ...], H: int, D: int) -> OpCase:
    """attention_varlen on packed sequences of ``lengths`` (no Triton kernel in this tree yet: the
    self-test audits the budget on its outputs and gradients)."""
    def make_inputs(device, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        T = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(T, H, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        return dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=max(lengths))

    return OpCase(f"attention_varlen lengths {'+'.join(map(str, lengths))} H{H} D{D}", make_inputs,
                  AV.attention_varlen, AV.attention_varlen_ref)


def _cases_by_op() -> dict[str, list[OpCase]]:
    by_op: dict[str, list[OpCase]] = {}
    for op, case in self_test_cases():
        by_op.setdefault(op, []).append(case)
    by_op.setdefault("attention_varlen", [_varlen_case((5, 1, 17), 2, 32), _varlen_case((33, 7), 1, 64)])
    return by_op


CASES_BY_OP = _cases_by_op()
EXPECTED_VARIANTS = {  # the wrong kernels that must apply to each op somewhere
    "adamw": {"zeros", "out x 0.9", "grad x 0.9", "no-op", "no weight decay", "half lr"},
    "simcse_loss": {"zeros", "out x 0.9", "grad x 0.9"},  # a 0-d loss: no transpose
}


@pytest.mark.parametrize("op", list(CASES_BY_OP))
def test_every_wrong_kernel_fails(op):
    """Every check case of ``op`` in fp32, fp16 and bf16: each wrong kernel that changes anything
    fails some comparison, and no comparison of the right (eager-accurate) kernel would accept an
    all-zero output unless its reference is exactly zero."""
    results = [r for case in CASES_BY_OP[op] for dtype in DTYPES
               for r in wrong_kernel_results(op, case, "cpu" if op == "attention_varlen" else DEVICE, dtype)]
    table = self_test_table(results)
    missed = [f"{r.case} [{r.dtype}] {r.variant}" for r in results if r.caught is False]
    assert not missed, f"wrong kernels that pass:\n{table}\n" + "\n".join(missed)
    applied = {r.variant for r in results if r.caught}
    assert applied >= EXPECTED_VARIANTS.get(op, {"zeros", "out x 0.9", "grad x 0.9", "transposed output"}), table


@pytest.mark.parametrize("op, index", [("layer_norm", 1), ("bias_gelu", 0), ("gelu_layer_norm", 0),
                                       ("attention", 1), ("simcse_loss", 1), ("adamw", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_wrong_triton_kernels_fail(op, index, dtype):
    """The same wrong kernels built on the Triton kernels themselves (one small case per op)."""
    case = CASES_BY_OP[op][index]
    results = wrong_kernel_results(op, case, DEVICE, dtype, base="kernel")
    assert all(r.caught is not False for r in results), self_test_table(results)
    assert sum(r.caught is True for r in results) >= 3, self_test_table(results)


def test_the_right_kernels_pass_their_own_self_test():
    """The variants are wrong only by construction: an unchanged wrapper of the eager reference is
    n/a-free and passes (the test above would be vacuous if every run failed for another reason)."""
    case = CASES_BY_OP["layer_norm"][1]
    right = OpCase(case.name, case.make_inputs, lambda **kw: case.ref_fn(**kw, upcast=False), case.ref_fn)
    for dtype in DTYPES:
        results = compare_case(right, DEVICE, dtype)
        assert results and all(c.ok for c in results), [str(c) for c in results]
        assert not any(c.accepts_zero for c in results)
    assert math.isclose(REL_FLOOR[torch.bfloat16], 2.0**-7)
