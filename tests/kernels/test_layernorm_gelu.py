"""The LayerNorm / bias + GELU / GELU + LayerNorm Triton kernels against their fp32 references.

On CPU the kernels run in Triton's interpreter (tests/conftest.py chooses the device before triton
is imported). Every comparison goes through ``kernels.testing`` (error budget: 2x eager's error
against the fp32 reference + ``REL_FLOOR[dtype]`` x max |ref|), on the forward outputs and every gradient.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import kernels
from kernels import layernorm_gelu as lg
from kernels.testing import OpCase, assert_case, count_launches, kernels_device

DEVICE = kernels_device()  # tests/conftest.py decides it (cpu: Triton's interpreter)
# the kernels each op's forward + backward must launch (weight grads: the partials' reduction)
LAUNCHES = {op: (f"_{op}_fwd_kernel", f"_{op}_bwd_kernel", "_weight_grad_reduce_kernel")
            for op in ("layer_norm", "bias_gelu", "gelu_layer_norm")}

# dtype and tolerance travel together: each comparison reads kernels.testing.REL_FLOOR[dtype]
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in
          (torch.float32, torch.float16, torch.bfloat16)]
# odd shapes: one element, primes, non-powers of two (heavy padding), exact powers of two
SHAPES = [(1, 1), (7, 29), (3, 5, 384), (2, 13, 768), (1, 1023), (5, 1024)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LN_VARIANTS = {
    "plain": dict(),
    "residual": dict(residual=True),
    "residual+dropout": dict(residual=True, dropout_p=0.1),
    "residual+dropout+prenorm": dict(residual=True, dropout_p=0.1, return_prenorm=True),
}


def _launches(case: OpCase) -> tuple[str, ...]:
    return LAUNCHES[case.name.split("[")[0]]  # "layer_norm[residual] 7x29" -> layer_norm


def _zero(op: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Gradients that are zero in exact arithmetic: over one column the normalised values are
    x - mean(x) = 0, so the output is the bias alone and nothing before the normalisation, nor its
    weight, gets a gradient (the references hold rounding noise amplified by rstd = 1/sqrt(eps))."""
    if shape[-1] != 1:
        return ()
    return {"layer_norm": ("grad x", "grad residual", "grad weight"),
            "gelu_layer_norm": ("grad x", "grad bias", "grad weight")}.get(op, ())


@pytest.fixture
def small_row_groups(monkeypatch):
    """Four rows per program, so small shapes run several programs (and a ragged last group)."""
    monkeypatch.setattr(lg, "_MIN_ROWS_PER_PROGRAM", 4)


# ----------------------------------------------------------------------------- accuracy grids
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("variant", list(LN_VARIANTS))
def test_layer_norm_matches_reference(variant, shape, dtype, small_row_groups):
    assert_case(lg.layer_norm_case(shape, **LN_VARIANTS[variant]), DEVICE, dtype,
                launches=LAUNCHES["layer_norm"], zero=_zero("layer_norm", shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_dropout_prenorm_without_residual(dtype, small_row_groups):
    assert_case(lg.layer_norm_case((3, 7, 29), dropout_p=0.2, return_prenorm=True), DEVICE, dtype,
                launches=LAUNCHES["layer_norm"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_matches_reference(approximate, shape, dtype, small_row_groups):
    assert_case(lg.bias_gelu_case(shape, approximate), DEVICE, dtype, launches=LAUNCHES["bias_gelu"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 29), (3, 5, 384), (1, 1023)],
                         ids=["1x1", "7x29", "3x5x384", "1x1023"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_layer_norm_matches_reference(approximate, shape, dtype, small_row_groups):
    assert_case(lg.gelu_layer_norm_case(shape, approximate), DEVICE, dtype,
                launches=LAUNCHES["gelu_layer_norm"], zero=_zero("gelu_layer_norm", shape))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    lg.layer_norm_case((3, 97, 4096), residual=True, dropout_p=0.1, return_prenorm=True),
    lg.layer_norm_case((2, 8192), residual=True, dropout_p=0.1),
    lg.bias_gelu_case((64, 3072), "none"),
    lg.gelu_layer_norm_case((33, 4096), "tanh"),
], ids=lambda c: c.name)
def test_large_shapes(case, dtype):
    assert_case(case, DEVICE, dtype, launches=_launches(case))


def test_check_cases_pass_in_fp32():
    for case in lg.check_cases():
        assert_case(case, DEVICE, torch.float32, launches=_launches(case))


# ----------------------------------------------------------------------------- dropout
def test_dropout_kept_fraction_and_forward_mask():
    p = 0.1
    keep = lg._layer_norm_dropout_mask((64, 1024), p, seed=3, device=DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (64, 1024)
    assert abs(keep.float().mean().item() - (1 - p)) <= 0.01
    # the forward drops exactly those elements: h = dropout(1) = keep / (1 - p)
    x = torch.ones(64, 1024, device=DEVICE)
    w, b = torch.ones(1024, device=DEVICE), torch.zeros(1024, device=DEVICE)
    _, h = lg._layer_norm_triton(x, w, b, dropout_p=p, seed=3, return_prenorm=True)
    assert torch.equal(h == 0, ~keep)
    assert torch.allclose(h[keep], torch.full_like(h[keep], 1 / (1 - p)))


def test_dropout_mask_depends_on_row_and_column_only():
    wide = lg._layer_norm_dropout_mask((5, 300), 0.5, seed=11, device=DEVICE)
    narrow = lg._layer_norm_dropout_mask((5, 29), 0.5, seed=11, device=DEVICE)  # other width, other BLOCK_N
    assert torch.equal(narrow, wide[:, :29])
    assert not torch.equal(wide[0], wide[1])  # rows get their own streams
    assert not torch.equal(wide, lg._layer_norm_dropout_mask((5, 300), 0.5, seed=12, device=DEVICE))


def test_dropout_seed_reproducible_and_drawn_when_none():
    g = torch.Generator().manual_seed(0)
    x, r, w, b = (torch.randn(shape, generator=g).to(DEVICE) for shape in ((6, 40), (6, 40), 40, 40))

    def run(seed):
        return lg._layer_norm_triton(x, w, b, residual=r, dropout_p=0.3, seed=seed)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    torch.manual_seed(123)
    first, second = run(None), run(None)
    assert not torch.equal(first, second)  # fresh masks each call
    torch.manual_seed(123)
    assert torch.equal(run(None), first)  # drawn from torch's RNG


def test_backward_regenerates_forward_mask():
    g = torch.Generator().manual_seed(1)
    x, r, w, b, dy = (torch.randn(shape, generator=g).to(DEVICE) for shape in ((9, 50), (9, 50), 50, 50, (9, 50)))
    x.requires_grad_(), r.requires_grad_()
    y = lg._layer_norm_triton(x, w, b, residual=r, dropout_p=0.25, seed=77)
    y.backward(dy)
    keep = lg._layer_norm_dropout_mask((9, 50), 0.25, seed=77, device=DEVICE)
    assert torch.all(x.grad[~keep] == 0)
    torch.testing.assert_close(x.grad[keep], r.grad[keep] / 0.75, rtol=1e-6, atol=1e-6)


def test_dropout_threshold_rounds_p_to_16_bits():
    assert lg._drop_threshold(0.1) == 6554 and lg._drop_threshold(0.5) == 32768
    assert abs(lg._drop_threshold(0.1) / 65536 - 0.1) <= 2**-17
    # eight 16-bit decisions per Philox call: with p = 0.5 each half is a fair coin, and the eight
    # columns of a group are not copies of one another
    keep = lg._layer_norm_dropout_mask((256, 64), 0.5, seed=5, device=DEVICE).view(256, 8, 8).float()
    assert abs(keep.mean().item() - 0.5) <= 0.01
    assert (keep[..., 0] != keep[..., 1]).float().mean().item() > 0.4


def test_dropout_masks_uncorrelated_between_layers_and_steps():
    """Two LayerNorm layers, two steps, seeds drawn from torch's generator: four masks, each
    keeping 1 - p of the elements, pairwise uncorrelated; reseeding reproduces them."""
    p, shape = 0.1, (64, 512)
    x = torch.ones(shape, device=DEVICE)
    layers = [kernels.LayerNorm(shape[-1]).to(DEVICE).train() for _ in range(2)]

    def step():  # h = dropout(1): the kept elements are the nonzero ones
        return [(ln(x, dropout_p=p, return_prenorm=True)[1] != 0).flatten().float() for ln in layers]

    with kernels.use_backend("triton"), torch.no_grad():
        torch.manual_seed(0)
        masks = step() + step()
        torch.manual_seed(0)
        again = step()
    assert all(torch.equal(a, b) for a, b in zip(masks[:2], again))
    for m in masks:
        assert abs(m.mean().item() - (1 - p)) <= 0.01
    corr = torch.corrcoef(torch.stack(masks))
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    # 32,768 elements: the correlation of independent masks has a standard deviation of ~0.0055
    assert off_diagonal.abs().max().item() < 0.03, corr


def test_layer_norm_dropout_reads_nothing_back(no_host_reads):
    """Forward and backward with a seed drawn on the device: no item/cpu/tolist/bool on a tensor."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 40, generator=g).to(DEVICE).requires_grad_()
    r = torch.randn(6, 40, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(40, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(40, generator=g).to(DEVICE).requires_grad_()
    with kernels.use_backend("triton"):
        y, h = kernels.layer_norm(x, w, b, residual=r, dropout_p=0.1, return_prenorm=True)
        (y + h).backward(torch.ones_like(y))
    assert x.grad is not None and w.grad is not None
    with pytest.raises(AssertionError, match="a host read"):  # the guard itself works
        y.sum().item()


def test_dropout_seed_may_be_a_device_tensor():
    g = torch.Generator().manual_seed(8)
    x, w, b = (torch.randn(shape, generator=g).to(DEVICE) for shape in ((5, 24), 24, 24))
    as_int = lg._layer_norm_triton(x, w, b, dropout_p=0.2, seed=1234)
    as_tensor = lg._layer_norm_triton(x, w, b, dropout_p=0.2, seed=torch.tensor([1234], device=DEVICE))
    assert torch.equal(as_int, as_tensor)
    with pytest.raises(ValueError, match="a seed tensor must hold one int64"):
        lg._layer_norm_triton(x, w, b, dropout_p=0.2, seed=torch.tensor([1.0], device=DEVICE))


# ----------------------------------------------------------------------------- autocast, launches, frozen params
def test_layer_norm_under_autocast_promotes_as_eager():
    """bf16 x (a linear's output under autocast) with an fp32 residual stream: h and y in fp32,
    dx in bf16 and dresidual in fp32, as eager gives them; values within the bf16 budget."""
    def make_inputs(device, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(x=(torch.randn(3, 7, 48, generator=g) * 2).to(device, torch.bfloat16).requires_grad_(),
                    weight=torch.randn(48, generator=g).to(device).requires_grad_(),
                    bias=torch.randn(48, generator=g).to(device).requires_grad_(),
                    residual=torch.randn(3, 7, 48, generator=g).to(device).requires_grad_(),
                    return_prenorm=True)

    def autocast(fn):
        def run(**kw):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return fn(**kw)
        return run

    case = OpCase("layer_norm autocast", make_inputs, autocast(lg._layer_norm_triton),
                  autocast(kernels.layer_norm_ref))
    assert_case(case, DEVICE, torch.bfloat16)
    inputs = make_inputs(DEVICE, None, 0)
    y, h = autocast(lg._layer_norm_triton)(**inputs)
    y_ref, h_ref = autocast(kernels.layer_norm_ref)(**inputs)
    assert (y.dtype, h.dtype) == (y_ref.dtype, h_ref.dtype) == (torch.float32, torch.float32)


@pytest.mark.parametrize("N", [384, 768])
def test_forward_grids_fill_the_gpu(N, record_launches):
    """At M = 4096 rows every LayerNorm-family forward starts >= 2 programs per SM (264 on an
    H100, the SM count the interpreter assumes), each one tile of rows (no loop), covering every
    row."""
    M, sms = 4096, lg._num_sms(torch.device(DEVICE))
    assert DEVICE != "cpu" or sms == 132
    x, v = torch.empty(M, N, device=DEVICE), torch.empty(N, device=DEVICE)
    launches = {name: record_launches(lg, name) for name in
                ("_layer_norm_fwd_kernel", "_gelu_layer_norm_fwd_kernel", "_bias_gelu_fwd_kernel")}
    lg.layer_norm_fwd(x, v, v, residual=x, dropout_p=0.1, seed=0, return_prenorm=True)
    lg.gelu_layer_norm_fwd(x, v, v, v)
    lg.bias_gelu_fwd(x, v)
    lg.bias_gelu_fwd(torch.empty(M, 4 * N, device=DEVICE), torch.empty(4 * N, device=DEVICE))
    for name, rec in launches.items():
        for grid, _, kw in rec.calls:
            assert grid[0] * grid[1] >= 2 * sms, (name, grid)
            assert grid[0] * kw["BLOCK_M"] >= M and (grid[0] - 1) * kw["BLOCK_M"] < M, (name, grid)
            assert grid[1] * kw["BLOCK_N"] >= x.shape[1], (name, grid)


def _grads_with_frozen(fn, tensors, frozen):
    """Run fn(*tensors) with the tensors named in ``frozen`` not requiring grad; return the grads."""
    leaves = {k: t.detach().clone().requires_grad_(k not in frozen) for k, t in tensors.items()}
    out = fn(**leaves)
    out.backward(torch.ones_like(out))
    return {k: t.grad for k, t in leaves.items()}


@pytest.mark.parametrize("frozen", [("weight", "bias"), ("weight",), ("x",), ("x", "weight", "bias")])
def test_layer_norm_backward_skips_gradients_nobody_asked_for(frozen, record_launches):
    g = torch.Generator().manual_seed(9)
    tensors = {k: torch.randn(shape, generator=g).to(DEVICE) for k, shape in
               (("x", (6, 40)), ("residual", (6, 40)), ("weight", 40), ("bias", 40))}
    full = _grads_with_frozen(lg._layer_norm_triton, tensors, ())
    bwd = record_launches(lg, "_layer_norm_bwd_kernel", run=True)
    reduce = record_launches(lg, "_weight_grad_reduce_kernel", run=True)
    part = _grads_with_frozen(lg._layer_norm_triton, tensors, frozen)
    (_, _, kw), = bwd.calls
    assert kw["WEIGHT_GRADS"] == (not {"weight", "bias"} <= set(frozen))
    assert kw["STORE_DX"] == ("x" not in frozen)
    assert len(reduce.calls) == 2 - len({"weight", "bias"} & set(frozen))
    for name, grad in part.items():
        if name in frozen:
            assert grad is None, name
        else:
            assert torch.equal(grad, full[name]), name


def test_gelu_ops_skip_gradients_nobody_asked_for(record_launches):
    g = torch.Generator().manual_seed(10)
    x, b = torch.randn(6, 40, generator=g).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)
    bwd = record_launches(lg, "_bias_gelu_bwd_kernel", run=True)
    reduce = record_launches(lg, "_weight_grad_reduce_kernel", run=True)
    grads = _grads_with_frozen(lg._bias_gelu_triton, dict(x=x, bias=b), ("bias",))
    (_, _, kw), = bwd.calls
    assert not kw["WEIGHT_GRADS"] and kw["STORE_DX"] and reduce.calls == []
    assert grads["bias"] is None and torch.equal(
        grads["x"], _grads_with_frozen(lg._bias_gelu_triton, dict(x=x, bias=b), ())["x"])

    tensors = dict(x=x, bias=b, weight=torch.randn(40, generator=g).to(DEVICE),
                   ln_bias=torch.randn(40, generator=g).to(DEVICE))
    full = _grads_with_frozen(lg._gelu_layer_norm_triton, tensors, ())
    bwd = record_launches(lg, "_gelu_layer_norm_bwd_kernel", run=True)
    reduce.calls.clear()
    part = _grads_with_frozen(lg._gelu_layer_norm_triton, tensors, ("x", "weight", "ln_bias"))
    (_, _, kw), = bwd.calls
    assert kw["WEIGHT_GRADS"] and not kw["STORE_DX"] and len(reduce.calls) == 1  # dbias only
    assert part["x"] is None and part["weight"] is None and part["ln_bias"] is None
    assert torch.equal(part["bias"], full["bias"])


# ----------------------------------------------------------------------------- determinism, layouts
@pytest.mark.parametrize("op", ["layer_norm", "bias_gelu", "gelu_layer_norm"])
def test_weight_grads_bitwise_deterministic(op, small_row_groups):
    g = torch.Generator().manual_seed(2)
    M, N = 38, 96  # ten programs of 4 rows, the last ragged
    x = torch.randn(M, N, generator=g).to(DEVICE)
    dy = torch.randn(M, N, generator=g).to(DEVICE)
    params = [torch.randn(N, generator=g).to(DEVICE) for _ in range(4)]

    def grads():
        ps = [p.clone().requires_grad_() for p in params]
        if op == "layer_norm":
            out, used = lg._layer_norm_triton(x, ps[0], ps[1], residual=x, dropout_p=0.1, seed=3), ps[:2]
        elif op == "bias_gelu":
            out, used = lg._bias_gelu_triton(x, ps[0]), ps[:1]
        else:
            out, used = lg._gelu_layer_norm_triton(x, ps[0], ps[1], ps[2]), ps[:3]
        return torch.autograd.grad(out, used, dy)

    first, second = grads(), grads()
    assert lg._row_groups(M, torch.device(DEVICE))[1] > 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_broadcast_residual(dtype):
    """A residual that broadcasts to x (minBERT's position embeddings: (L, H) for x (B, L, H))."""
    def make_inputs(device, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(x=(torch.randn(3, 7, 29, generator=g) * 2).to(device, dtype).requires_grad_(),
                    weight=torch.randn(29, generator=g).to(device, dtype).requires_grad_(),
                    bias=torch.randn(29, generator=g).to(device, dtype).requires_grad_(),
                    residual=torch.randn(7, 29, generator=g).to(device, dtype).requires_grad_())

    assert_case(OpCase("layer_norm broadcast residual", make_inputs, lg._layer_norm_triton,
                       kernels.layer_norm_ref), DEVICE, dtype, launches=LAUNCHES["layer_norm"])


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(29, 7, generator=g).to(DEVICE).t()  # (7, 29) transposed view
    r = torch.randn(29, 7, generator=g).to(DEVICE).t()
    w, b = torch.randn(29, generator=g).to(DEVICE), torch.randn(29, generator=g).to(DEVICE)
    assert not x.is_contiguous()
    for fn in (lambda x, r: lg._layer_norm_triton(x, w, b, residual=r, dropout_p=0.1, seed=4),
               lambda x, r: lg._bias_gelu_triton(x, b) + r,
               lambda x, r: lg._gelu_layer_norm_triton(x, b, w, b) + r):
        xs = [t.detach().clone().requires_grad_() for t in (x, r)]
        cs = [t.detach().contiguous().requires_grad_() for t in (x, r)]
        out, ref = fn(*xs), fn(*cs)
        assert torch.equal(out, ref)
        dy = torch.randn(7, 29, generator=g).to(DEVICE)
        out.backward(dy)
        ref.backward(dy)
        assert torch.equal(xs[0].grad, cs[0].grad) and torch.equal(xs[1].grad, cs[1].grad)


def test_empty_inputs():
    w, b = torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    for shape in [(0, 16), (2, 0, 16)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        y, h = lg._layer_norm_triton(x, wg, bg, residual=x, dropout_p=0.1, return_prenorm=True)
        assert y.shape == shape and h.shape == shape
        (y.sum() + h.sum()).backward()
        assert x.grad.shape == shape and torch.equal(wg.grad, torch.zeros(16, device=DEVICE))
        assert lg._bias_gelu_triton(x, b).shape == shape
        assert lg._gelu_layer_norm_triton(x, b, w, b).shape == shape


def test_weight_dtype_may_differ_from_activations():
    """bf16 activations with fp32 parameters: outputs in x's dtype, grads in the params' dtypes."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 64, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    w = torch.randn(64, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(64, generator=g).to(DEVICE).requires_grad_()
    y = lg._layer_norm_triton(x, w, b)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    ref = kernels.layer_norm_ref(x.detach().float(), w.detach(), b.detach(), upcast=True)
    assert (y.float() - ref).abs().max().item() <= 2 * 2**-7 * ref.abs().max().item()


# ----------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_value_error(monkeypatch):
    x, w, b = (torch.randn(shape, device=DEVICE) for shape in ((3, 8), 8, 8))
    with pytest.raises(ValueError, match=r"x has dtype torch.int32; the Triton kernels take"):
        lg.layer_norm_fwd(x.to(torch.int32), w, b)
    with pytest.raises(ValueError, match=r"weight has shape \(9,\), expected \(8,\)"):
        lg.layer_norm_fwd(x, torch.randn(9, device=DEVICE), b)
    with pytest.raises(ValueError, match=r"residual has shape \(3, 7\), expected \(3, 8\)"):
        lg.layer_norm_fwd(x, w, b, residual=torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out_dtype torch.int8 is not float32, float16 or bfloat16"):
        lg.layer_norm_fwd(x, w, b, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="hidden size 8193 is above the maximum of 8192"):
        lg.layer_norm_fwd(*(torch.randn(shape, device=DEVICE) for shape in ((1, 8193), 8193, 8193)))
    with pytest.raises(ValueError, match="hidden size 4097 is above the maximum of 4096"):
        lg.gelu_layer_norm_fwd(*(torch.randn(shape, device=DEVICE) for shape in ((1, 4097), 4097, 4097, 4097)))
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\)"):
            lg.layer_norm_fwd(x, w, b, dropout_p=p)
    with pytest.raises(ValueError, match="seed must be an integer"):
        lg.layer_norm_fwd(x, w, b, dropout_p=0.1, seed=-1)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        lg.bias_gelu_fwd(x, b, approximate="fast")
    with pytest.raises(ValueError, match="bias has shape"):
        lg.bias_gelu_fwd(x, torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        lg._check_device(x, torch.empty(8, device="meta"))
    # through the public functions too
    with pytest.raises(ValueError, match="weight has shape"), kernels.use_backend("triton"):
        kernels.layer_norm(x, torch.randn(9, device=DEVICE), b)
    # CPU tensors need the interpreter: the env var must stay set in this process, so the check
    # itself is called with it removed
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="got CPU tensors.*TRITON_INTERPRET=1"):
        lg._check_device(x.cpu(), w.cpu())


# ----------------------------------------------------------------------------- dispatch and minBERT
def test_public_functions_dispatch_to_triton():
    g = torch.Generator().manual_seed(5)
    x, r, w, b = (torch.randn(shape, generator=g).to(DEVICE) for shape in ((4, 33), (4, 33), 33, 33))
    with kernels.use_backend("triton"):
        assert torch.equal(kernels.layer_norm(x, w, b, residual=r),
                           lg._layer_norm_triton(x, w, b, residual=r))
        assert torch.equal(kernels.bias_gelu(x, b, "tanh"), lg._bias_gelu_triton(x, b, "tanh"))
        assert torch.equal(lg.gelu_layer_norm(x, b, w, b), lg._gelu_layer_norm_triton(x, b, w, b))
        out = kernels.layer_norm(x.clone().requires_grad_(), w, b)
        assert type(out.grad_fn).__name__ == "GeneratedBackwardFor_minbert_layer_norm_defaultBackward"

    def run():
        with count_launches() as launched:
            kernels.layer_norm(x, w, b)
            kernels.bias_gelu(x, b)
            lg.gelu_layer_norm(x, b, w, b)
        return launched

    with kernels.use_backend("eager"):
        assert not run()
    with kernels.use_backend("triton"):
        assert run() == {"_layer_norm_fwd_kernel": 1, "_bias_gelu_fwd_kernel": 1, "_gelu_layer_norm_fwd_kernel": 1}


def test_minbert_triton_matches_eager():
    """The debug preset's forward + backward, triton vs eager backends, both against the model run
    in fp64: the same model-level budget as the attention test (2x eager fp32's error + 1e-5 x
    max(1, the tensor's largest value))."""
    import minbert

    torch.manual_seed(0)
    model = minbert.BertModel(minbert.BertConfig.preset("debug")).eval().to(DEVICE)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 211, (2, 9), generator=g).to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, 6:] = 0

    def run(backend):
        model.zero_grad(set_to_none=True)
        with kernels.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ops without a kernel yet say so once
            out = model(ids, mask)
        (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
        return [out.last_hidden_state.detach().double(), out.pooler_output.detach().double()], grads

    with count_launches() as launched:
        eager = run("eager")
    assert not launched
    with count_launches() as launched:
        triton_ = run("triton")
    layers = model.config.num_hidden_layers
    # LayerNorm: embeddings + 2 per layer; bias + GELU: 1 per layer; forward and backward each
    assert launched["_layer_norm_fwd_kernel"] == launched["_layer_norm_bwd_kernel"] == 1 + 2 * layers
    assert launched["_bias_gelu_fwd_kernel"] == launched["_bias_gelu_bwd_kernel"] == layers
    model.double()
    ref = run("eager")

    def check(what, t, e, r):
        err, eager_err = (t - r).abs().max().item(), (e - r).abs().max().item()
        budget = 2 * eager_err + 1e-5 * max(1.0, r.abs().max().item())
        assert err <= budget, f"{what}: triton err {err:.3g} > budget {budget:.3g} (eager {eager_err:.3g})"

    for what, t, e, r in zip(("last_hidden_state", "pooler_output"), triton_[0], eager[0], ref[0]):
        check(what, t, e, r)
    assert triton_[1].keys() == eager[1].keys() == ref[1].keys()
    for name in ref[1]:
        check(f"grad {name}", triton_[1][name], eager[1][name], ref[1][name])


# ----------------------------------------------------------------------------- report hooks
def test_compile_specs_are_complete():
    specs = lg.compile_specs()
    assert {s.kernel for s in specs} >= {
        "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_bias_gelu_fwd_kernel",
        "_bias_gelu_bwd_kernel", "_gelu_layer_norm_fwd_kernel", "_gelu_layer_norm_bwd_kernel",
        "_weight_grad_reduce_kernel", "_dropout_mask_kernel"}
    for s in specs:
        assert list(s.signature) == s.fn.arg_names, s.label
        constexpr = {k for k, t in s.signature.items() if t == "constexpr"}
        assert constexpr == set(s.constexprs), s.label
    labels = " ".join(s.label for s in specs)
    for n in (384, 768, 1024, 4096):  # every hidden size the compile report checks has its config
        assert f"BLOCK_N={lg._row_config(n)[0]} warps={lg._row_config(n)[1]}" in labels


# per IO case, counted from the op's definition (not from io_cases' formulas): distinct activation
# tensors (T bytes each), distinct parameter vectors and their gradients (p), fp32 statistics (s),
# weight gradients reduced through fp32 partials (k), parameter vectors each forward / backward
# program loads
_IO_CENSUS = {
    "layer_norm residual+dropout0.1": dict(acts=6, params=4, stats=2, k=2, fwd_loads=2, bwd_loads=1),  # x r dy y dx dr
    "layer_norm": dict(acts=4, params=4, stats=2, k=2, fwd_loads=2, bwd_loads=1),  # x dy y dx; w b dw db
    "bias_gelu erf": dict(acts=4, params=2, stats=0, k=1, fwd_loads=1, bwd_loads=1),  # b db
    "gelu_layer_norm erf": dict(acts=4, params=6, stats=2, k=3, fwd_loads=3, bwd_loads=2),  # b1 w b + grads
}


@pytest.mark.interpreter
def test_io_cases_bound_the_measured_traffic():
    """The lower bounds against the bytes the kernels move (bench.io.record_traffic) at 64 rows in
    several row tiles: distinct bytes touched = the op's distinct tensors + the fp32 weight-grad
    partials, exactly; every access = the bound + each extra program's parameter loads + the
    partials written and read once, exactly. A bound that counts a tensor too many or too few, or
    a kernel that re-reads anything else, fails."""
    from bench.io import measure_case

    tokens, hidden = 64, 96
    cases = lg.io_cases(tokens, hidden, torch.bfloat16)
    assert sorted(c.name.rsplit(" ", 1)[0] for c in cases) == sorted(_IO_CENSUS)
    for case in cases:
        census = _IO_CENSUS[case.name.rsplit(" ", 1)[0]]
        width = 4 * hidden if case.name.startswith("bias_gelu") else hidden
        T, p, s = tokens * width * 2, width * 2, tokens * 4
        row = measure_case(case, with_eager=False)
        fwd_programs = row["launches"][0]["grid"][0]  # row tiles of the forward
        programs = row["launches"][1]["grid"][0]  # row groups of the backward (one partial each)
        assert fwd_programs > 1 and programs > 1, row["launches"]
        partials = programs * census["k"] * width * 4
        seed = 8 if "dropout" in case.name else 0  # the (1,) int64 Philox seed the kernels load
        assert row["unique"] == (census["acts"] * T + census["params"] * p + census["stats"] * s + partials
                                 + seed), case.name
        extra_loads = ((fwd_programs - 1) * census["fwd_loads"] + (programs - 1) * census["bwd_loads"]) * p
        # every program of the forward and of the backward loads the seed once
        assert row["total"] == (row["lower_bound"] + extra_loads + 2 * partials
                                + seed * (fwd_programs + programs)), case.name
