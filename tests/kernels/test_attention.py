"""The fused attention kernels (forward, dK/dV, dQ) against the eager reference ``attention_ref``.

On CPU the kernels run in Triton's interpreter (tests/conftest.py chooses the device before triton
is imported). Every accuracy comparison goes through ``kernels.testing`` (error budget: 2x eager's
error against the fp32 reference + ``REL_FLOOR[dtype]`` x max |ref|), on the output and on dQ,
dK and dV, and asserts that the Triton kernels launched. Cases with dropout hand the reference the kernels' own keep-mask
(``_attention_dropout_mask``), so forward and backward are both checked with dropout on.
"""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import kernels
from kernels.testing import assert_case, count_launches, kernels_device

# ``kernels.attention`` is the public function (kernels/__init__.py re-exports it), so the module
# is taken from sys.modules
A = importlib.import_module("kernels.attention")

DEVICE = kernels_device()  # tests/conftest.py decides it (cpu: Triton's interpreter)
# every accuracy case runs forward and backward: each of these must launch
LAUNCHES = ("_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
            "_attention_bwd_dq_kernel")

# dtype and tolerance travel together: each comparison reads kernels.testing.REL_FLOOR[dtype]
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in
          (torch.float32, torch.float16, torch.bfloat16)]

# odd lengths (1, 7, 33, 65, 130), every head dim, random padding with one all-padding batch row,
# minBERT's strided (B, L, H, D) views and contiguous inputs, a custom softmax scale
CASES = [
    A.attention_case(3, 2, 1, 32),
    A.attention_case(2, 2, 7, 32),
    A.attention_case(2, 3, 33, 64),
    A.attention_case(2, 2, 65, 64, padding=False, layout="bhld", softmax_scale=0.3),
    A.attention_case(2, 1, 130, 128),
]
# head dims that are not 32, 64 or 128: BLOCK_D 16, and masked head-dim chunks (40 -> 64, 80 and
# 96 -> 128 columns), with and without dropout
HEAD_DIM_CASES = [
    A.attention_case(2, 2, 9, 16),
    A.attention_case(1, 2, 21, 40, dropout_p=0.1),
    A.attention_case(2, 2, 33, 80),
    A.attention_case(2, 1, 17, 96, dropout_p=0.2, layout="bhld"),
]
DROPOUT_CASES = [
    A.attention_case(2, 2, 33, 32, dropout_p=0.2),
    A.attention_case(2, 1, 70, 64, dropout_p=0.1, layout="bhld"),
    A.attention_case(2, 1, 130, 128, dropout_p=0.1),
]


def _qkv(B, H, L, D, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((B, L, H, D), generator=g).to(DEVICE, dtype).transpose(1, 2)
            .requires_grad_(requires_grad) for _ in range(3)]


def _grid(cases):
    """Every (case, dtype) pair: each head dim has a Triton kernel in every dtype."""
    return [pytest.param(c, d.values[0], id=f"{c.name}-{d.id}") for c in cases for d in DTYPES]


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("case, dtype", _grid(CASES))
def test_matches_reference(case, dtype):
    assert_case(case, DEVICE, dtype, launches=LAUNCHES)


@pytest.mark.parametrize("case, dtype", _grid(DROPOUT_CASES))
def test_matches_reference_with_dropout(case, dtype):
    assert_case(case, DEVICE, dtype, launches=LAUNCHES)


@pytest.mark.parametrize("case, dtype", _grid(HEAD_DIM_CASES))
def test_any_head_dim_matches_reference(case, dtype):
    assert_case(case, DEVICE, dtype, launches=LAUNCHES)


def test_masked_head_dim_leaves_no_trace_in_padding_columns():
    """D = 80 runs 128-column tiles: the outputs and gradients hold exactly D columns, equal to
    the same inputs zero-padded to 128 columns (the extra columns change no score)."""
    q, k, v = _qkv(2, 2, 19, 80, seed=9)
    do = torch.randn(2, 2, 19, 80, generator=torch.Generator().manual_seed(1))
    out = A._attention_triton(q, k, v, softmax_scale=80 ** -0.5)
    grads = torch.autograd.grad(out, (q, k, v), do)
    wide = [torch.nn.functional.pad(t.detach(), (0, 48)).requires_grad_() for t in (q, k, v)]
    out_w = A._attention_triton(*wide, softmax_scale=80 ** -0.5)
    grads_w = torch.autograd.grad(out_w, wide, torch.nn.functional.pad(do, (0, 48)))
    assert out.shape == (2, 2, 19, 80)
    torch.testing.assert_close(out, out_w[..., :80], rtol=1e-5, atol=1e-6)
    for g, gw in zip(grads, grads_w):
        torch.testing.assert_close(g, gw[..., :80], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case, dtype", _grid([
    A.attention_case(2, 2, 257, 64, dropout_p=0.1),
    A.attention_case(2, 1, 513, 128),
    A.attention_case(1, 1, 1023, 32, dropout_p=0.1),
    A.attention_case(1, 1, 2048, 64, dropout_p=0.1, all_padding_row=False),
]))
def test_large_shapes(case, dtype):
    assert_case(case, DEVICE, dtype, launches=LAUNCHES)


def test_check_cases_cover_every_switch():
    """``python -m kernels.check`` runs these in every dtype. Read from the inputs the cases make
    (not their names): every head dim, dropout on and off, padding on and off with an
    all-padding batch row, strided and contiguous q, length 1, a custom softmax scale."""
    seen = set()
    for case in A.check_cases():
        inp = case.make_inputs(torch.device("cpu"), torch.float32, 0)
        q, mask = inp["q"], inp["key_padding_mask"]
        seen.add(f"D{q.shape[-1]}")
        seen.add("dropout" if inp["dropout_p"] > 0 else "no dropout")
        seen.add("strided" if not q.is_contiguous() else "contiguous")
        seen |= {"no mask"} if mask is None else {"mask"} | ({"empty row"} if (~mask).all(1).any() else set())
        seen |= {"L1"} if q.shape[2] == 1 else set()
        seen |= {"scale"} if inp["softmax_scale"] is not None else set()
    assert seen == {"D32", "D64", "D128", "dropout", "no dropout", "strided", "contiguous", "mask",
                    "no mask", "empty row", "L1", "scale"}


# ----------------------------------------------------------------------------- padding
def test_all_padding_rows_give_zeros_and_zero_grads():
    q, k, v = _qkv(2, 2, 19, 32, seed=1)
    mask = torch.ones(2, 19, dtype=torch.bool, device=DEVICE)
    mask[1] = False  # every key of batch row 1 is padding
    mask[0, 11:] = False
    out = A._attention_triton(q, k, v, mask, dropout_p=0.3, seed=4)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    # padded keys of batch 0 get no gradient either
    assert torch.equal(k.grad[0, :, 11:], torch.zeros_like(k.grad[0, :, 11:]))
    assert torch.equal(v.grad[0, :, 11:], torch.zeros_like(v.grad[0, :, 11:]))


# ----------------------------------------------------------------------------- dropout
def test_dropout_kept_fraction():
    for p in (0.1, 0.5):
        keep = A._attention_dropout_mask((2, 4, 384), p, seed=3, device=DEVICE)
        assert keep.dtype == torch.bool and keep.shape == (2, 4, 384, 384)
        assert abs(keep.float().mean().item() - (1 - p)) <= 0.01


def test_dropout_p_in_steps_of_1_256():
    """8-bit thresholds: p is applied as the nearest multiple of 1/256 (at most 255/256), the
    kept fraction and the scale follow that p, and a p between two steps runs bit-identically to
    the step it rounds to."""
    eff = A.attention_dropout_p
    assert eff(0.0) == 0.0 and eff(0.1) == 26 / 256 and eff(0.5) == 0.5 and eff(0.999) == 255 / 256
    assert eff(1 / 1024) == 0.0 and eff(eff(0.1)) == eff(0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        eff(1.0)
    keep = A._attention_dropout_mask((2, 4, 256), 0.3, seed=5, device=DEVICE)  # 0.30078125
    assert abs(keep.float().mean().item() - (1 - eff(0.3))) <= 0.003  # 524,288 draws: sd 6e-4
    q, k, v = _qkv(1, 2, 40, 32, requires_grad=False, seed=6)
    ones = torch.ones(1, 2, 40, 40, dtype=torch.bool, device=DEVICE)
    for p in (0.1, 0.3):
        out = A._attention_triton(q, k, v, dropout_p=p, seed=8)
        assert torch.equal(out, A._attention_triton(q, k, v, dropout_p=eff(p), seed=8))
        keep = A._attention_dropout_mask((1, 2, 40), p, seed=8, device=DEVICE)
        ref = A.attention_ref(q, k, v, dropout_p=eff(p), dropout_mask=keep)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        # the nominal p's scale is another output: the kernels do apply the rounded p
        nominal = A.attention_ref(q, k, v, dropout_p=p, dropout_mask=keep)
        assert not torch.allclose(out, nominal, rtol=1e-4, atol=1e-5)
    assert not torch.equal(A.attention_ref(q, k, v, dropout_p=0.1, dropout_mask=ones),
                           A.attention_ref(q, k, v))


def test_dropout_bytes_of_one_philox_call_are_independent():
    """One Philox call decides 16 neighbouring keys: every byte position keeps 1 - p of its
    elements, and neighbouring keys (1, 4, 8 and 16 apart: the same word, the same call, the next
    call), queries, heads, batch rows and seeds drawn one after another (layers, steps) are
    uncorrelated. A mapping that reused a byte or a word would correlate neighbours fully."""
    p = 0.5
    keep = A._attention_dropout_mask((2, 4, 256), p, seed=13, device=DEVICE).float().cpu()
    by_byte = keep.reshape(2, 4, 256, 16, 16).mean(dim=(0, 1, 2, 3))
    assert (by_byte - (1 - p)).abs().max() <= 0.01, by_byte  # 32,768 draws each: sd 0.003

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].abs().item()

    for step in (1, 4, 8, 16):  # ~500,000 pairs: sd 0.0014
        assert corr(keep[..., :-step], keep[..., step:]) < 0.01, step
    assert corr(keep[:, :, :-1], keep[:, :, 1:]) < 0.01
    assert corr(keep[:, 0], keep[:, 1]) < 0.01 and corr(keep[0], keep[1]) < 0.01
    torch.manual_seed(0)
    from kernels._utils import dropout_seed
    first, second = dropout_seed(None, DEVICE), dropout_seed(None, DEVICE)  # two layers' draws
    a = A._attention_dropout_mask((1, 2, 256), p, first, DEVICE).float()
    b = A._attention_dropout_mask((1, 2, 256), p, second, DEVICE).float()
    assert corr(a, b) < 0.01


def test_dropout_mask_depends_on_position_only(monkeypatch):
    big = A._attention_dropout_mask((2, 3, 80), 0.5, seed=11, device=DEVICE)
    small = A._attention_dropout_mask((2, 3, 21), 0.5, seed=11, device=DEVICE)  # other L
    assert torch.equal(small, big[:, :, :21, :21])
    monkeypatch.setattr(A, "_MASK_BLOCK", 16)  # other tile
    assert torch.equal(A._attention_dropout_mask((2, 3, 80), 0.5, seed=11, device=DEVICE), big)
    assert not torch.equal(big[0, 0], big[0, 1]) and not torch.equal(big[0, 0], big[1, 0])
    assert not torch.equal(big, A._attention_dropout_mask((2, 3, 80), 0.5, seed=12, device=DEVICE))


def test_dropout_independent_of_kernel_tiles(monkeypatch):
    """Other block sizes drop the same elements: outputs and grads agree to rounding."""
    q, k, v = _qkv(2, 2, 45, 32, seed=2)
    mask = (torch.rand(2, 45, generator=torch.Generator().manual_seed(0)) > 0.2).to(DEVICE)
    do = torch.randn(2, 2, 45, 32).to(DEVICE)

    def run():
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = A._attention_triton(*ins, mask, dropout_p=0.3, seed=9)
        out.backward(do)
        return [out.detach()] + [t.grad for t in ins]

    first = run()
    tiles = A._AttentionConfig(A._Tile(16, 32, 4, 2), A._Tile(32, 16, 4, 2), A._Tile(16, 16, 4, 2))
    monkeypatch.setitem(A._CONFIGS, (32, "32"), tiles)
    second = run()
    # head-dim chunks and dK / dV in two launches (fp32 D=128's scheme) drop the same elements too
    chunked = A._AttentionConfig(A._Tile(16, 32, 4, 2, d_chunk=16), A._Tile(32, 16, 4, 2, d_chunk=16),
                                 A._Tile(16, 16, 4, 2, d_chunk=16), split_dkdv=True)
    monkeypatch.setitem(A._CONFIGS, (32, "32"), chunked)
    third = run()
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_dropout_seed_reproducible_and_drawn_when_none():
    q, k, v = _qkv(1, 2, 17, 32, requires_grad=False)

    def run(seed):
        return A._attention_triton(q, k, v, dropout_p=0.3, seed=seed)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    torch.manual_seed(123)
    first, second = run(None), run(None)
    assert not torch.equal(first, second)  # a fresh mask each call
    torch.manual_seed(123)
    assert torch.equal(run(None), first)  # drawn from torch's RNG


# ----------------------------------------------------------------------------- determinism, layouts
@pytest.mark.parametrize("D, dtype", [(32, torch.bfloat16), (128, torch.float32)])
def test_backward_bitwise_deterministic(D, dtype):
    """No atomics: 20 backward runs give identical bits (fp32 at D=128 runs dK and dV as two
    launches)."""
    q, k, v = _qkv(2, 2, 37, D, dtype=dtype, seed=3)
    mask = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    mask[1, 30:] = False
    do = torch.randn(2, 2, 37, D, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    out = A._attention_triton(q, k, v, mask, dropout_p=0.1, seed=21)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    for _ in range(19):  # 20 backward runs in all
        again = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_strided_inputs_are_read_in_place_and_match_contiguous():
    q, k, v = _qkv(2, 3, 21, 64, seed=5)
    assert not q.is_contiguous()
    mask = torch.ones(2, 21, dtype=torch.bool, device=DEVICE)
    mask[0, 15:] = False
    cq, ck, cv = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out, ref = A._attention_triton(q, k, v, mask), A._attention_triton(cq, ck, cv, mask)
    assert torch.equal(out, ref)
    # the output takes q's (B, L, H, D) memory order: minBERT's transpose + reshape is a view
    assert out.transpose(1, 2).is_contiguous()
    dy = torch.randn(2, 21, 3, 64).to(DEVICE).transpose(1, 2)  # a strided upstream gradient
    out.backward(dy)
    ref.backward(dy.contiguous())
    for a, b in zip((q, k, v), (cq, ck, cv)):
        assert torch.equal(a.grad, b.grad)
        assert a.grad.stride() == a.stride()
    # an expanded upstream gradient (stride 0), as out.sum() gives
    g = torch.autograd.grad(A._attention_triton(cq, ck, cv, mask).sum(), (cq, ck, cv))
    g_ref = torch.autograd.grad(A._attention_triton(cq, ck, cv, mask), (cq, ck, cv),
                                torch.ones(2, 3, 21, 64, device=DEVICE))
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)


def test_empty_inputs():
    for shape in [(0, 2, 5, 32), (2, 2, 0, 32)]:
        q, k, v = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(3))
        out = A._attention_triton(q, k, v)
        assert out.shape == shape
        out.sum().backward()
        assert q.grad.shape == shape


# ----------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_value_error(monkeypatch):
    q, k, v = _qkv(2, 2, 5, 32, requires_grad=False)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    fwd = A.attention_fwd
    with pytest.raises(ValueError, match="head_dim 160 is not supported.*1..128"):
        fwd(*(torch.randn(2, 2, 5, 160, device=DEVICE) for _ in range(3)))
    with pytest.raises(ValueError, match=r"k has shape \(2, 2, 6, 32\) but q has \(2, 2, 5, 32\)"):
        fwd(q, torch.randn(2, 2, 6, 32, device=DEVICE), v)
    with pytest.raises(ValueError, match=r"v has dtype torch.float16 but q has torch.float32"):
        fwd(q, k, v.half())
    with pytest.raises(ValueError, match="q has dtype torch.int32"):
        fwd(*(torch.zeros(2, 2, 5, 32, dtype=torch.int32, device=DEVICE) for _ in range(3)))
    with pytest.raises(ValueError, match=r"q must have shape \(batch, heads, length, head_dim\)"):
        fwd(*(torch.randn(2, 5, 32, device=DEVICE) for _ in range(3)))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 6\), expected \(2, 5\)"):
        fwd(q, k, v, torch.ones(2, 6, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"key_padding_mask has dtype torch.int64; it must be torch.bool"):
        fwd(q, k, v, torch.ones(2, 5, dtype=torch.long, device=DEVICE))
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\)"):
            fwd(q, k, v, mask, dropout_p=p)
    with pytest.raises(ValueError, match="seed must be an integer"):
        fwd(q, k, v, dropout_p=0.1, seed=-1)
    with pytest.raises(ValueError, match="attention inputs must be on one device.*k on meta"):
        fwd(q, torch.empty(2, 2, 5, 32, device="meta"), v)
    with pytest.raises(ValueError, match="key_padding_mask on meta"):
        fwd(q, k, v, torch.ones(2, 5, dtype=torch.bool, device="meta"))
    # through the public function too
    with pytest.raises(ValueError, match="head_dim 129 is not supported"), kernels.use_backend("triton"):
        kernels.attention(*(torch.randn(1, 1, 3, 129, device=DEVICE) for _ in range(3)))
    with pytest.raises(ValueError, match="a seed tensor must hold one int64"):
        fwd(q, k, v, dropout_p=0.1, seed=torch.tensor([3], dtype=torch.int32, device=DEVICE))
    # CPU tensors need the interpreter: the check is called with the variable removed
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="got CPU tensors.*TRITON_INTERPRET=1"):
        A._check_device(q=q.cpu())


def test_fp32_head_dim_128_runs_the_kernels():
    """fp32 x D=128 has a Triton configuration (dK and dV in two launches): no eager fallback."""
    q, k, v = _qkv(1, 2, 9, 128, seed=8)
    assert A._config(128, torch.float32).dkdv_grads == ("dk", "dv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = A._attention_triton(q, k, v)
    assert type(out.grad_fn).__name__ == "GeneratedBackwardFor_minbert_attention_defaultBackward"
    o, lse, _, _ = A.attention_fwd(q, k, v)
    assert torch.equal(out, o) and lse.shape == (1, 2, 9)


# ----------------------------------------------------------------------------- dispatch and minBERT
def test_public_function_dispatches_to_triton():
    q, k, v = _qkv(1, 2, 9, 32, seed=6)
    with kernels.use_backend("triton"), count_launches() as launched:
        out = kernels.attention(q, k, v)
    assert type(out.grad_fn).__name__ == "GeneratedBackwardFor_minbert_attention_defaultBackward"
    assert launched == {"_attention_fwd_kernel": 1}
    with kernels.use_backend("eager"), count_launches() as launched:
        eager = kernels.attention(q, k, v)
    assert type(eager.grad_fn).__name__ != "GeneratedBackwardFor_minbert_attention_defaultBackward" and not launched


def test_minbert_embedded_checkpoint_triton_matches_eager():
    """minBERT (all-MiniLM-L6-v2, head_dim 32) forward + backward, triton vs eager backends.

    Tolerance: the kernels' error budget at model level. Both backends are compared with the
    eager model run in fp64; the triton run's error on the last hidden state and on every
    parameter gradient must be at most 2x eager fp32's own error plus 1e-5 x max(1, the tensor's
    largest value). The relative floor (~80 fp32 ulps) covers fp32 rounding noise amplified
    through six layers' backward, which differs between two correct fp32 implementations that
    sum in another order (measured: up to 4e-6 relative for both backends, and key-bias
    gradients, exactly 0 in exact arithmetic, are pure noise for both); a wrong mask, scale or
    probability gives errors of 1e-3 relative and more.
    """
    import minbert

    # padded: this test is about the padded kernel (the unpadded model runs attention_varlen)
    model = minbert.BertModel.from_pretrained(config_changes={"unpad": False}).eval().to(DEVICE)
    tok = minbert.Tokenizer.from_pretrained()
    enc = tok(["the quick brown fox jumps over the lazy dog near the river bank",
               "a short padded one"])
    ids, mask = enc.input_ids.to(DEVICE), enc.attention_mask.to(DEVICE)
    assert ids.shape[1] >= 12 and int(mask[1].sum()) < ids.shape[1]
    g = torch.Generator().manual_seed(7)

    def run(m, backend, dtype):
        m.zero_grad(set_to_none=True)
        with kernels.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ops without a kernel yet say so once
            out = m(ids, mask)
        h = out.last_hidden_state
        (h * weights.to(dtype)).sum().backward()
        return h.detach().double(), {n: p.grad.double() for n, p in m.named_parameters()
                                     if p.grad is not None}

    weights = torch.randn(ids.shape + (model.config.hidden_size,), generator=g).to(DEVICE)
    with count_launches() as launched:
        tri = run(model, "triton", torch.float32)
    layers = model.config.num_hidden_layers
    assert {k: launched[k] for k in LAUNCHES} == dict.fromkeys(LAUNCHES, layers), launched  # every layer
    eager = run(model, "eager", torch.float32)
    ref = run(model.double(), "eager", torch.float64)

    def check(what, t, e, r):
        err, eager_err = (t - r).abs().max().item(), (e - r).abs().max().item()
        budget = 2 * eager_err + 1e-5 * max(1.0, r.abs().max().item())
        assert err <= budget, f"{what}: triton err {err:.3g} > budget {budget:.3g} (eager {eager_err:.3g})"

    check("last_hidden_state", tri[0], eager[0], ref[0])
    assert tri[1].keys() == eager[1].keys() == ref[1].keys()
    for name in ref[1]:
        check(f"grad {name}", tri[1][name], eager[1][name], ref[1][name])


# ----------------------------------------------------------------------------- report hooks
def test_compile_specs_cover_every_config():
    specs = A.compile_specs()
    kernels_ = {s.kernel for s in specs}
    assert kernels_ == {"_attention_fwd_kernel", "_attention_bwd_preprocess_kernel",
                        "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
                        "_attention_dropout_mask_kernel"}
    for s in specs:
        assert list(s.signature) == s.fn.arg_names, s.label
        assert {k for k, t in s.signature.items() if t == "constexpr"} == set(s.constexprs), s.label
    seen = {(s.kernel, s.constexprs.get("HEAD_DIM"), s.signature.get("Q"), s.constexprs.get("BLOCK_M"),
             s.constexprs.get("BLOCK_N"), s.num_warps, s.num_stages) for s in specs}
    for (D, kind), cfg in A._CONFIGS.items():
        for dt in (("*fp32",) if kind == "32" else ("*fp16", "*bf16")):
            for kernel, t in (("_attention_fwd_kernel", cfg.fwd), ("_attention_bwd_dkdv_kernel", cfg.dkdv),
                              ("_attention_bwd_dq_kernel", cfg.dq)):
                assert (kernel, D, dt, t.block_m, t.block_n, t.num_warps, t.num_stages) in seen


@pytest.mark.interpreter
@pytest.mark.parametrize("D, dtype", [(64, torch.bfloat16), (64, torch.float32), (128, torch.float32)],
                         ids=["D64-bf16", "D64-fp32", "D128-fp32"])
def test_io_traffic_matches_formulas(D, dtype):
    """Measured bytes of a small case: total = the FA2 tiled formula (with fp32's second loads and
    split dK/dV launches), unique = lower bound + delta."""
    from bench.io import measure_case
    from kernels.testing import IOCase

    B, H, L = 1, 1, 128
    if D == 64 and dtype == torch.bfloat16:  # the case bench.io measures, B1 H1 L128 D64
        (case,) = [c for c in A.io_cases(128, 64, dtype) if "L128" in c.name]
    else:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn((B, L, H, D), generator=g).to(dtype).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        do = torch.randn((B, H, L, D), generator=g).to(dtype)
        mask = torch.ones((B, L), dtype=torch.bool)
        case = IOCase(f"attention D{D} {dtype}",
                      lambda: torch.autograd.grad(A._attention_triton(q, k, v, mask), (q, k, v), do),
                      lambda: torch.autograd.grad(A.attention_ref(q, k, v, mask), (q, k, v), do),
                      A.attention_lower_bound_bytes(B, H, L, D, dtype, True), 18 * B * H * L * L * D)
    row = measure_case(case, with_eager=True)
    assert row["lower_bound"] == A.attention_lower_bound_bytes(B, H, L, D, dtype, True)
    assert row["unique"] == row["lower_bound"] + 4 * B * H * L  # + delta, nothing L x L
    assert row["total"] == A.fa2_tiled_bytes(B, H, L, D, dtype, True)
    assert row["eager"] > row["total"]
