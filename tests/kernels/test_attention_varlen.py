"""The varlen attention kernels (packed (T, H, D) tokens, ``cu_seqlens``) against ``attention_varlen_ref``.

Every accuracy comparison goes through ``kernels.testing`` (forward output, dQ, dK and dV; fp32,
fp16 and bf16). Cases with dropout hand the reference the kernels' own keep-mask
(``attention_varlen_dropout_mask``), so forward and backward are both checked with dropout on.
Also here: the dropout mask the kernels apply (read back through the outputs) equals the padded
kernel's on real tokens, and neither attention op reads a tensor back to the host.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from kernels.testing import assert_case, forbid_host_reads, kernels_device

A = importlib.import_module("kernels.attention")
V = importlib.import_module("kernels.attention_varlen")

DEVICE = kernels_device()  # tests/conftest.py decides it (cpu: Triton's interpreter)
# every accuracy case runs forward and backward through the shared attention kernels
LAUNCHES = ("_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
            "_attention_bwd_dq_kernel")

DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in
          (torch.float32, torch.float16, torch.bfloat16)]

# B = 1 with one token; a length-1 sequence among others; lengths that are not multiples of any
# block; one sequence longer than a 64-row block among short ones; an empty sequence; an upper
# bound for max_seqlen; a strided (H, T, D) layout; every BLOCK_D and masked head dims (40, 80)
CASES = [
    V.attention_varlen_case((1,), 2, 32),
    V.attention_varlen_case((5, 1, 17), 2, 16),
    V.attention_varlen_case((3, 70, 2, 9), 2, 64),
    V.attention_varlen_case((4, 0, 33), 3, 80, layout="htd", softmax_scale=0.3),
    V.attention_varlen_case((6, 11), 2, 40, max_seqlen=20),
    V.attention_varlen_case((130, 7), 1, 128),
]
DROPOUT_CASES = [
    V.attention_varlen_case((5, 1, 17), 2, 32, dropout_p=0.1),
    V.attention_varlen_case((3, 70, 2, 9), 1, 64, dropout_p=0.2, layout="htd"),
    V.attention_varlen_case((21, 4), 2, 96, dropout_p=0.1),
]


def _grid(cases):
    return [pytest.param(c, d.values[0], id=f"{c.name}-{d.id}") for c in cases for d in DTYPES]


def _cu(lengths, device=DEVICE):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def _packed(lengths, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((sum(lengths), H, D), generator=g).to(DEVICE, dtype).requires_grad_()
            for _ in range(3)]


def _pad(t, lengths):
    """(T, H, ...) packed -> (B, H, L, ...) right-padded with zeros, L = the longest."""
    B, L = len(lengths), max(lengths)
    index, _ = V.varlen_index(_cu(lengths, t.device), t.shape[0], L)
    out = t.new_zeros((B * L,) + tuple(t.shape[1:])).index_copy(0, index, t)
    return out.view((B, L) + tuple(t.shape[1:])).transpose(1, 2)


def _unpad(t, lengths):
    """(B, H, L, ...) right-padded -> (T, H, ...) real rows."""
    B, H, L = t.shape[:3]
    index, _ = V.varlen_index(_cu(lengths, t.device), sum(lengths), L)
    return t.transpose(1, 2).reshape((B * L, H) + tuple(t.shape[3:])).index_select(0, index)


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("case, dtype", _grid(CASES))
def test_matches_reference(case, dtype):
    assert_case(case, DEVICE, dtype, launches=LAUNCHES)


@pytest.mark.parametrize("case, dtype", _grid(DROPOUT_CASES))
def test_matches_reference_with_dropout(case, dtype):
    assert_case(case, DEVICE, dtype, launches=LAUNCHES)


@pytest.mark.slow
@pytest.mark.parametrize("case, dtype", _grid([
    V.attention_varlen_case((257, 3, 64, 129), 2, 64, dropout_p=0.1),
    V.attention_varlen_case((1023, 1, 5), 1, 32, dropout_p=0.1),
    V.attention_varlen_case(V.SST_MICRO_BATCHES[0], 4, 64, dropout_p=0.1),
    V.attention_varlen_case((300, 17), 2, 128),
]))
def test_large_shapes(case, dtype):
    assert_case(case, DEVICE, dtype, launches=LAUNCHES)


def test_check_cases_cover_every_switch():
    names = " ".join(c.name for c in V.check_cases())
    for part in ("B1 lens(1)", "lens(5,1,17)", "lens(4,0,33)", "D32", "D64", "D80", "D128",
                 "dropout", "htd", "scale"):
        assert part in names, part


def test_matches_padded_kernel_on_real_tokens():
    """Unpadding on or off: for one seed, the varlen kernels and the padded kernels on the
    right-padded batch give the same outputs and gradients on real tokens, dropout included."""
    lengths, H, D = (9, 1, 30, 17), 2, 32
    q, k, v = _packed(lengths, H, D, seed=4)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    out = V._attention_varlen_triton(q, k, v, _cu(lengths), max(lengths), dropout_p=0.3, seed=77)
    grads = torch.autograd.grad(out, (q, k, v), do)
    pq, pk, pv = (_pad(t.detach(), lengths).requires_grad_() for t in (q, k, v))
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    pout = A._attention_triton(pq, pk, pv, mask.to(DEVICE), dropout_p=0.3, seed=77)
    pgrads = torch.autograd.grad(pout, (pq, pk, pv), _pad(do, lengths))
    torch.testing.assert_close(out, _unpad(pout, lengths), rtol=1e-5, atol=1e-6)
    for g, pg in zip(grads, pgrads):
        torch.testing.assert_close(g, _unpad(pg, lengths), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- dropout
def _applied_masks(fn, lengths, H, p, seed):
    """The keep-masks a kernel applies, read back through its outputs: with q = k = 0 every
    probability of a row of sequence length l is 1/l, and with v = one-hot rows (v[j] = e_j),
    O[i, c] = Z[i, c] / (l (1 - p)) (the forward's mask); with dO = one-hot rows too,
    dV[j, c] = Z[c, j] / (l (1 - p)) (the dK/dV kernel's). Returns (B, H, L, L) int masks from O
    and from dV^T, zero outside each sequence."""
    D, L = 16, max(lengths)
    assert L <= D
    pos = torch.cat([torch.arange(n) for n in lengths])
    onehot = torch.nn.functional.one_hot(pos, D).float()[:, None, :].expand(-1, H, -1)
    q = torch.zeros(sum(lengths), H, D, device=DEVICE, requires_grad=True)
    k = torch.zeros_like(q, requires_grad=True)
    v = onehot.to(DEVICE).clone().requires_grad_()
    out = fn(q, k, v, p, seed)
    (dv,) = torch.autograd.grad(out, (v,), onehot.to(DEVICE))
    scale = torch.tensor(lengths, dtype=torch.float32).repeat_interleave(torch.tensor(lengths))
    scale = (scale * (1 - p))[:, None, None].to(DEVICE)
    fwd = _pad((out * scale).round(), lengths)[..., :L].int()  # (B, H, L, L): Z[b, h, i, c]
    bwd = _pad((dv * scale).round(), lengths)[..., :L].int().transpose(-1, -2)
    return fwd, bwd


def test_dropout_mask_same_in_forward_backward_and_padded_kernel():
    lengths, H, p, seed = (5, 13, 1, 9), 2, 0.5, 31
    cu, L = _cu(lengths), max(lengths)
    fwd, bwd = _applied_masks(
        lambda q, k, v, p, s: V._attention_varlen_triton(q, k, v, cu, L, dropout_p=p, seed=s),
        lengths, H, p, seed)
    real = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)  # (B, L)
    block = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, L, L) in-sequence pairs
    debug = V.attention_varlen_dropout_mask(cu, H, L, p, seed)
    assert torch.equal(fwd.bool(), debug & block)
    assert torch.equal(bwd.bool(), debug & block)
    assert 0 < int(fwd.sum()) < int(block.sum()) * H  # some dropped, some kept

    def padded(q, k, v, p, s):
        pq, pk, pv = (_pad(t, lengths) for t in (q, k, v))
        return _unpad(A._attention_triton(pq, pk, pv, real, dropout_p=p, seed=s), lengths)

    pfwd, pbwd = _applied_masks(padded, lengths, H, p, seed)
    assert torch.equal(pfwd, fwd) and torch.equal(pbwd, bwd)


def test_dropout_kept_fraction():
    cu = _cu((256, 130, 1))
    for p in (0.1, 0.5):
        keep = V.attention_varlen_dropout_mask(cu, 2, 256, p, seed=3)
        assert keep.shape == (3, 2, 256, 256)
        kept = torch.cat([keep[0].flatten(), keep[1, :, :130, :130].flatten()])
        assert abs(kept.float().mean().item() - (1 - p)) <= 0.01


def test_seed_tensor_none_and_int():
    """A device tensor seed equals the same int; the forward's key is kept for the backward even
    if the caller's tensor changes in between; None draws from torch's generator."""
    lengths = (7, 12)
    q, k, v = _packed(lengths, 2, 32, seed=1)
    cu = _cu(lengths)

    def run(seed):
        return V._attention_varlen_triton(q, k, v, cu, 12, dropout_p=0.4, seed=seed)

    seed = torch.tensor([123], dtype=torch.int64, device=DEVICE)
    out_t, out_i = run(seed), run(123)
    assert torch.equal(out_t, out_i)
    g_i = torch.autograd.grad(out_i, (q, k, v), torch.ones_like(out_i))
    seed.add_(1)  # the caller advances its seed after the forward
    g_t = torch.autograd.grad(out_t, (q, k, v), torch.ones_like(out_t))
    for a, b in zip(g_t, g_i):
        assert torch.equal(a, b)
    assert not torch.equal(run(seed), out_i)
    torch.manual_seed(5)
    first, second = run(None), run(None)
    assert not torch.equal(first, second)
    torch.manual_seed(5)
    assert torch.equal(run(None), first)


# ----------------------------------------------------------------------------- no host reads
def test_no_host_reads_in_forward_or_backward():
    """Forward + backward with dropout, both attention ops, seeds drawn (None) and given as
    device tensors: nothing reads a tensor back to the host (``forbid_host_reads``). The varlen
    call passes check=False: the documented value check of cu_seqlens is the one read (on CPU it
    is on by default, shown last)."""
    lengths = (6, 1, 11)
    q, k, v = _packed(lengths, 2, 40, seed=2)
    cu = _cu(lengths)
    pq, pk, pv = (_pad(t.detach(), lengths).requires_grad_() for t in (q, k, v))
    mask = (torch.arange(11)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)
    seed = torch.tensor([8], dtype=torch.int64, device=DEVICE)
    with forbid_host_reads(), kernels.use_backend("triton"):
        for s in (None, seed):
            out = kernels.attention_varlen(q, k, v, cu, 11, dropout_p=0.1, seed=s, check=False)
            out.backward(torch.ones_like(out))
            pout = kernels.attention(pq, pk, pv, mask, dropout_p=0.1, seed=s)
            pout.backward(torch.ones_like(pout))
    assert q.grad is not None and pq.grad is not None
    with forbid_host_reads(), pytest.raises(AssertionError, match="host read"):
        V._attention_varlen_triton(q, k, v, cu, 11)


# ----------------------------------------------------------------------------- determinism, layouts
@pytest.mark.parametrize("lengths, D, dtype", [((37, 5, 20), 32, torch.bfloat16),
                                               ((9, 3), 128, torch.float32)],
                         ids=["D32-bf16", "D128-fp32"])
def test_backward_bitwise_deterministic(lengths, D, dtype):
    """No atomics: repeated backward runs with dropout give identical bits (fp32 at D=128 runs
    dK and dV as two launches)."""
    q, k, v = _packed(lengths, 2, D, dtype, seed=3)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    out = V._attention_varlen_triton(q, k, v, _cu(lengths), max(lengths), dropout_p=0.1, seed=21)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_strided_inputs_are_read_in_place_and_match_contiguous(monkeypatch):
    """q, k, v as views of one (T, 3, H, D) projection (token stride 3 H D) are read in place
    and give the bits of contiguous copies."""
    lengths, H, D = (8, 3, 14), 2, 32
    T = sum(lengths)
    qkv = torch.randn(T, 3, H, D, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    qkv.requires_grad_()
    q, k, v = qkv.unbind(1)
    assert q.stride(0) == 3 * H * D
    copies = []
    real = V._packed_layout
    monkeypatch.setattr(V, "_packed_layout", lambda t, L: copies.append(real(t, L) is not t) or real(t, L))
    out = V._attention_varlen_triton(q, k, v, _cu(lengths), 14)
    assert not any(copies)
    cq, ck, cv = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    ref = V._attention_varlen_triton(cq, ck, cv, _cu(lengths), 14)
    assert torch.equal(out, ref)
    do = torch.randn(T, H, D, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    (g,) = torch.autograd.grad(out, (qkv,), do)
    g_ref = torch.autograd.grad(ref, (cq, ck, cv), do)
    for i in range(3):
        assert torch.equal(g[:, i], g_ref[i])


@pytest.mark.parametrize("lengths", [(), (0, 0)], ids=["B0", "B2-empty"])
def test_empty_batches(lengths):
    q, k, v = (torch.randn(0, 2, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    out = V._attention_varlen_triton(q, k, v, _cu(lengths) if lengths else
                                     torch.zeros(1, dtype=torch.int32, device=DEVICE), 0,
                                     dropout_p=0.1)
    assert out.shape == (0, 2, 32)
    out.sum().backward()
    assert q.grad.shape == (0, 2, 32) and k.grad.shape == (0, 2, 32)


# ----------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_value_error():
    lengths = (3, 5)
    q, k, v = (t.detach() for t in _packed(lengths, 2, 32))
    cu = _cu(lengths)
    fwd = V.attention_varlen_fwd

    def raises(match, *args, **kw):
        with pytest.raises(ValueError, match=match):
            fwd(*args, **kw)

    raises("cu_seqlens must start at 0, got 1", q, k, v, torch.tensor([1, 3, 8], dtype=torch.int32), 5)
    raises("cu_seqlens must not decrease", q, k, v, torch.tensor([0, 6, 4, 8], dtype=torch.int32), 6)
    raises("cu_seqlens ends at 7 but q holds 8 tokens", q, k, v,
           torch.tensor([0, 3, 7], dtype=torch.int32), 5)
    raises("cu_seqlens must be int32, got torch.int64", q, k, v, cu.long(), 5)
    raises(r"cu_seqlens must be a 1-D int32 tensor \(B \+ 1,\)", q, k, v, cu[None], 5)
    raises("one device.*cu_seqlens on meta", q, k, v, torch.empty(3, dtype=torch.int32, device="meta"), 5)
    raises("max_seqlen is 4 but cu_seqlens holds a sequence of 5 tokens", q, k, v, cu, 4)
    raises("max_seqlen must be a Python int", q, k, v, cu, torch.tensor(5))
    raises("max_seqlen must be at least the longest sequence", q, k, v, cu, 0, check=False)
    raises("max_seqlen 70000 is above the maximum of 65536", q, k, v, cu, 70000)
    raises("cu_seqlens holds no sequence but q holds 8 tokens", q, k, v,
           torch.zeros(1, dtype=torch.int32), 5, check=False)
    raises(r"q must have shape \(tokens, heads, head_dim\)", q[None], k[None], v[None], cu, 5)
    raises(r"k has shape \(8, 2, 16\) but q has \(8, 2, 32\)", q, k[..., :16], v, cu, 5)
    raises("v has dtype torch.float16 but q has torch.float32", q, k, v.half(), cu, 5)
    raises("head_dim 129 is not supported.*1..128",
           *(torch.randn(8, 1, 129) for _ in range(3)), cu, 5)
    raises(r"dropout_p must lie in \[0, 1\)", q, k, v, cu, 5, dropout_p=1.0)
    raises(r"seed must be an integer in \[0, 2\*\*63\)", q, k, v, cu, 5, dropout_p=0.1, seed=-3)
    raises("a seed tensor must hold one int64", q, k, v, cu, 5, dropout_p=0.1,
           seed=torch.tensor([1.0]))
    # the eager reference and the public function check alike
    with pytest.raises(ValueError, match="cu_seqlens ends at 7"):
        V.attention_varlen_ref(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"), kernels.use_backend("triton"):
        kernels.attention_varlen(q, k, v, cu.long(), 5)


def test_public_function_dispatches():
    lengths = (4, 9)
    q, k, v = _packed(lengths, 2, 32, seed=6)
    with kernels.use_backend("triton"):
        out = kernels.attention_varlen(q, k, v, _cu(lengths), 9)
    assert type(out.grad_fn).__name__ == "GeneratedBackwardFor_minbert_attention_varlen_defaultBackward"
    with kernels.use_backend("eager"):
        ref = kernels.attention_varlen(q, k, v, _cu(lengths), 9)
    assert type(ref.grad_fn).__name__ != "GeneratedBackwardFor_minbert_attention_varlen_defaultBackward"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- report hooks
def test_compile_specs_cover_every_config():
    specs = V.compile_specs()
    for s in specs:
        assert list(s.signature) == s.fn.arg_names, s.label
        assert s.constexprs["VARLEN"] is True and s.constexprs["HAS_MASK"] is False, s.label
    seen = {(s.kernel, s.constexprs["HEAD_DIM"], s.signature["Q"], s.constexprs.get("GRADS"),
             s.constexprs["HAS_DROPOUT"]) for s in specs}
    for D in A.COMPILE_HEAD_DIMS + (80,):
        for dt, dtype in (("*fp32", torch.float32), ("*bf16", torch.bfloat16)):
            for dropout in (True, False):
                assert ("_attention_fwd_kernel", D, dt, None, dropout) in seen
                assert ("_attention_bwd_dq_kernel", D, dt, None, dropout) in seen
                for g in A._config(D, dtype).dkdv_grads:
                    assert ("_attention_bwd_dkdv_kernel", D, dt, g, dropout) in seen


def test_io_traffic_matches_formulas():
    """Measured bytes of a small packed case: total = ``varlen_tiled_bytes`` (the FA2 formula per
    sequence + the cu_seqlens reads of every program), unique = lower bound + delta; the padded
    case on the same micro-batch moves more."""
    from bench.io import measure_case

    (packed, padded) = V.io_cases(1024, 64, torch.bfloat16)
    lens = V.SST_MICRO_BATCHES[0]
    T, H, D = sum(lens), 1, 64
    row = measure_case(packed, with_eager=False)
    assert row["lower_bound"] == V.varlen_lower_bound_bytes(lens, H, D, torch.bfloat16)
    assert row["total"] == V.varlen_tiled_bytes(lens, H, D, torch.bfloat16)
    assert row["unique"] == row["lower_bound"] + 4 * H * T  # + delta
    assert measure_case(padded, with_eager=False)["total"] > row["total"]
