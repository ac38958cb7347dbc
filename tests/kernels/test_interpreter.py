"""The interpreter fixes (kernels._interpreter): each bug is real without them, and they cure it.

bf16 ``tl.dot`` on raw bits, fp32 -> bf16 conversion by truncation, and the helper-call speed-up.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as interp

from kernels import _interpreter

# tests/conftest.py set TRITON_INTERPRET=1 before this module was imported (kernels device cpu),
# so the @triton.jit functions below are interpreted; on cuda every test here is skipped
pytestmark = pytest.mark.interpreter


@triton.jit
def _masked_dot_kernel(
    a_ptr,  # (M, K)
    b_ptr,  # (K, N)
    c_ptr,  # (BLOCK_M, BLOCK_N) fp32; only the (M, N) corner is written
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.5, tl.float32)
    acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


M, K, N = 13, 29, 11  # odd sizes inside 16 x 32 @ 32 x 16 blocks: every edge is masked
SENTINEL = -7.0


def _run_dot(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(K, N, generator=g).to(dtype)
    c = torch.full((16, 16), SENTINEL)
    _masked_dot_kernel[(1,)](a, b, c, M, N, K, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    ref = a.double() @ b.double() + 0.5  # exact products of the (already rounded) inputs
    return c, ref


@pytest.fixture
def fix_state():
    """Leave the process with the fix installed, whatever a test did."""
    yield
    _interpreter.install()


def test_bf16_dot_is_wrong_without_fix(fix_state):
    _interpreter.uninstall()
    assert not _interpreter.is_installed()
    c, ref = _run_dot(torch.bfloat16)
    err = (c[:M, :N].double() - ref).abs().max().item()
    assert err > 1e6, f"the interpreter's bf16 dot bug seems gone (max error {err}); drop the fix?"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dot_correct_with_fix(fix_state, dtype):
    _interpreter.install()
    c, ref = _run_dot(dtype)
    # fp32 accumulation of K=29 exact products: a few fp32 ulps of the largest partial sum
    torch.testing.assert_close(c[:M, :N].double(), ref, rtol=0, atol=1e-5)
    assert (c[M:, :] == SENTINEL).all() and (c[:, N:] == SENTINEL).all(), "masked lanes were written"


PATCHED = [(interp.InterpreterBuilder, "create_dot"), (interp.InterpreterBuilder, "cast_impl"),
           (interp.InterpreterBuilder, "create_fp_to_fp"), (interp.InterpretedFunction, "__call__")]


def test_install_is_idempotent_and_uninstall_restores(fix_state):
    _interpreter.uninstall()
    original = [getattr(owner, name) for owner, name in PATCHED]
    assert not any(getattr(f, "__minbert_interpreter_fix__", False) for f in original)
    _interpreter.install()
    patched = [getattr(owner, name) for owner, name in PATCHED]
    _interpreter.install()
    assert [getattr(owner, name) for owner, name in PATCHED] == patched, "a second install() wrapped twice"
    assert all(p is not o for p, o in zip(patched, original)) and _interpreter.is_installed()
    _interpreter.uninstall()
    assert [getattr(owner, name) for owner, name in PATCHED] == original
    assert not _interpreter.is_installed()


@triton.jit
def _to_bf16_kernel(
    x_ptr,  # (n,) fp32
    rne_ptr,  # (n,) bf16: x.to(bf16), default rounding
    store_ptr,  # (n,) bf16: fp32 x stored to a bf16 pointer
    rtz_ptr,  # (n,) bf16: x.to(bf16, "rtz")
    back_ptr,  # (n,) fp32: the bf16 value read back as fp32
    int_ptr,  # (n,) int32: the bf16 value converted to int32
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = x.to(tl.bfloat16)
    tl.store(rne_ptr + offs, y, mask=mask)
    tl.store(store_ptr + offs, x, mask=mask)
    tl.store(rtz_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"), mask=mask)
    tl.store(back_ptr + offs, y.to(tl.float32), mask=mask)
    tl.store(int_ptr + offs, y.to(tl.int32), mask=mask)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).int() & 0xFFFF


# inf and NaN converted to int32 (lanes the comparisons leave out) make numpy warn
_CAST_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")


def _run_to_bf16():
    special = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x00000001, 0x80000000,
                            0x7F800000, 0xFF800000, 0x3F7FFFFF, 0x477FE000], dtype=torch.int64)
    special = special.to(torch.int32).view(torch.float32)  # ties both ways, carries, max, tiny, -0, inf
    g = torch.Generator().manual_seed(1)
    x = torch.cat([special, torch.randn(2000, generator=g) * 100, torch.tensor([float("nan")])])
    n = x.numel()
    outs = [torch.empty(n, dtype=torch.bfloat16) for _ in range(3)]
    back, as_int = torch.empty(n), torch.empty(n, dtype=torch.int32)
    _to_bf16_kernel[(1,)](x, *outs, back, as_int, n, BLOCK=triton.next_power_of_2(n))
    return x, outs, back, as_int


@_CAST_WARNING
def test_fp32_to_bf16_truncates_without_fix(fix_state):
    _interpreter.uninstall()
    x, (rne, store, _), _, _ = _run_to_bf16()
    finite = torch.isfinite(x)
    for out in (rne, store):  # explicit .to(tl.bfloat16) and the cast of a store alike
        wrong = (_bits(out) != _bits(x.to(torch.bfloat16)))[finite].sum().item()
        assert wrong > 500, f"only {wrong} of {finite.sum().item()} conversions differ from round-to-nearest-even"


@_CAST_WARNING
def test_bf16_conversions_with_fix(fix_state):
    _interpreter.install()
    x, (rne, store, rtz), back, as_int = _run_to_bf16()
    ref = x.to(torch.bfloat16)  # torch rounds to nearest even, as the GPU's cvt.rn.bf16.f32
    nan = torch.isnan(x)
    assert torch.equal(_bits(rne)[~nan], _bits(ref)[~nan]) and torch.isnan(rne[nan]).all()
    assert torch.equal(_bits(store)[~nan], _bits(ref)[~nan]) and torch.isnan(store[nan]).all()
    trunc = (x.view(torch.int32) >> 16) & 0xFFFF  # round toward zero: drop the low 16 bits
    assert torch.equal(_bits(rtz)[~nan], trunc[~nan]) and torch.isnan(rtz[nan]).all()
    assert torch.equal(back[~nan], ref.float()[~nan])
    finite = torch.isfinite(x) & (x.abs() < 2**31)
    assert torch.equal(as_int[finite], ref.float()[finite].to(torch.int32))


@triton.jit
def _scale(x, k):
    return x * k


@triton.jit
def _helper_loop_kernel(
    x_ptr,  # (ROWS, 16) fp32
    y_ptr,  # (ROWS, 16) fp32
    ROWS: tl.constexpr,
):
    cols = tl.arange(0, 16)
    for r in range(ROWS):
        x = tl.load(x_ptr + r * 16 + cols)
        tl.store(y_ptr + r * 16 + cols, _scale(_scale(x, 2.0), 0.5) + tl.sum(x, axis=0))


def test_helper_calls_skip_repatching_and_match(fix_state, monkeypatch):
    calls = []
    real_patch_lang = interp._patch_lang
    monkeypatch.setattr(interp, "_patch_lang", lambda fn: calls.append(fn) or real_patch_lang(fn))
    x = torch.randn(5, 16)
    results = {}
    for fixed in (False, True):
        _interpreter.install() if fixed else _interpreter.uninstall()
        calls.clear()
        y = torch.empty_like(x)
        _helper_loop_kernel[(2,)](x, y, ROWS=5)
        results[fixed] = (y, len(calls))
    # one launch; per row two _scale calls and tl.sum (itself a @triton.jit function) for 2 programs
    assert results[False][1] == 1 + 2 * 5 * 3, "the original re-patches on each helper call"
    assert results[True][1] == 1, "with the fix only the launch patches triton.language"
    assert torch.equal(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][0], x + x.sum(1, keepdim=True))


def test_bit_helpers_match_torch():
    x = torch.tensor([1.0, -2.5, 3.140625, 0.0, -0.0, float("inf"), 1e-40], dtype=torch.bfloat16)
    got = _interpreter.bf16_bits_to_float32(x.view(torch.uint16).numpy())
    np.testing.assert_array_equal(got, x.float().numpy())
    y = torch.randn(10000, generator=torch.Generator().manual_seed(2)) * 1e3
    np.testing.assert_array_equal(_interpreter.float32_to_bf16_bits(y.numpy()),
                                  y.to(torch.bfloat16).view(torch.uint16).numpy())
