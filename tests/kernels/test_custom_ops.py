"""The fused ops as torch.library custom ops: schemas, fakes and autograd pass ``opcheck``, and
``torch.compile(fullgraph=True)`` traces modules built on them (on the triton backend) in one
graph, with the eager run's outputs and gradients.

The compiled tests use ``backend="aot_eager"``: dynamo and AOT autograd trace the whole graph
through the fake implementations (what fullgraph needs), and the ops then run as compiled.
Inductor works too on this CPU machine but takes ~30 s per graph to build its C++ (``slow``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import kernels
from kernels.testing import count_launches, kernels_device

DEVICE = kernels_device()


def _rand(*shape, seed=0, grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_(grad)


# ----------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    x, r = _rand(3, 5, 24, seed=1), _rand(3, 5, 24, seed=2)
    w, b = _rand(24, seed=3), _rand(24, seed=4)
    seed = torch.tensor([7], device=DEVICE)
    z = [_rand(6, 16, seed=10 + i) for i in range(3)]
    ops = torch.ops.minbert
    return {
        "layer_norm residual+dropout+prenorm": (ops.layer_norm.default, (x, w, b, r, seed, 1e-5, 0.1, True, None)),
        "layer_norm plain, frozen weight": (ops.layer_norm.default, (x, w.detach(), b, None, None, 1e-5, 0.0, False, None)),
        "layer_norm bf16 x + fp32 residual": (
            ops.layer_norm.default, (x.detach().bfloat16().requires_grad_(), w, b, r, None, 1e-5, 0.0, False, None)),
        "bias_gelu": (ops.bias_gelu.default, (x, b, "tanh")),
        "gelu_layer_norm": (ops.gelu_layer_norm.default, (x, b, w, b, 1e-5, "none")),
        "simcse_loss": (ops.simcse_loss.default, (z[0], z[1], z[2], 0.05)),
        "simcse_loss frozen z2": (ops.simcse_loss.default, (z[0], z[1].detach(), None, 0.1)),
        # (B, L, H, D) memory seen as (B, H, L, D), as minBERT calls it, with padding and dropout
        "attention padded+dropout, strided": (
            ops.attention.default, (*_heads(2, 19, 2, 16, seed=30), _pad_mask(2, 19), seed, 0.1, 0.25)),
        "attention plain, frozen q": (
            ops.attention.default, (_heads(1, 9, 2, 24, seed=31)[0].detach(), *_heads(1, 9, 2, 24, seed=32)[1:],
                                    None, None, 0.0, 24 ** -0.5)),
        "attention_varlen dropout": (
            ops.attention_varlen.default, (*[_rand(13, 2, 16, seed=40 + i) for i in range(3)],
                                           _cu(5, 1, 7), 7, seed, 0.2, 0.25, None)),
        "attention_varlen frozen k, v": (
            ops.attention_varlen.default, (_rand(13, 2, 16, seed=43), *[_rand(13, 2, 16, seed=44 + i, grad=False)
                                                                       for i in range(2)],
                                           _cu(6, 7), 9, None, 0.0, 0.25, False)),
    }


def _heads(B, L, H, D, seed):
    """q, k, v: (B, L, H, D) memory seen as (B, H, L, D), requiring grad."""
    return [_rand(B, L, H, D, seed=seed + i).detach().transpose(1, 2).requires_grad_() for i in range(3)]


def _pad_mask(B, L):
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[-1, L // 2:] = False
    return mask


def _cu(*lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    """Schema, fake tensor, autograd registration and AOT dispatch of each op (torch's checks)."""
    op, args = _opcheck_cases()[name]
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


# ----------------------------------------------------------------------------- torch.compile(fullgraph=True)
class _Block(nn.Module):
    """The LayerNorm family as minBERT uses it: LN(dropout(dense(x)) + x), the feed-forward's
    GELU(x W^T + b) and LN(GELU(x W^T + b)) (the prediction head)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.ffn = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(2 * hidden, hidden, bias=False)
        self.ln = kernels.LayerNorm(hidden)
        self.head = nn.Linear(hidden, hidden, bias=False)
        self.head_bias = nn.Parameter(torch.randn(hidden) * 0.1)
        self.head_ln = kernels.LayerNorm(hidden)

    def forward(self, x):
        h = self.ln(self.dense(x), residual=x, dropout_p=0.1)
        h = self.out(kernels.bias_gelu(F.linear(h, self.ffn.weight), self.ffn.bias))
        y, prenorm = kernels.layer_norm(h, self.ln.weight, self.ln.bias, residual=x, dropout_p=0.1,
                                        return_prenorm=True)
        z = kernels.gelu_layer_norm(self.head(y), self.head_bias, self.head_ln.weight, self.head_ln.bias)
        return z + prenorm


def _run(module, fn, inputs, seed):
    """Forward from a fixed RNG state (the dropout seeds are drawn from it), backward; returns the
    output and every gradient."""
    module.zero_grad(set_to_none=True)
    for t in inputs:
        t.grad = None
    torch.manual_seed(seed)
    out = fn(*inputs)
    out.square().mean().backward()
    return [out.detach()] + [t.grad for t in inputs] + [p.grad for p in module.parameters()]


def _assert_compiles_like_eager(module, inputs, seed=0):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    with kernels.use_backend("triton"):
        got = _run(module, compiled, inputs, seed)
        want = _run(module, module, inputs, seed)
    assert counter.frame_count == 1  # one graph: fullgraph=True would have raised on a break
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return counter


def test_layer_norm_family_compiles_in_one_graph():
    module = _Block(32).to(DEVICE).train()
    x = _rand(2, 7, 32, seed=5)
    counter = _assert_compiles_like_eager(module, [x])
    assert counter.op_count > 0


def test_simcse_loss_compiles_in_one_graph():
    class Contrastive(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, a, b, hn):
            return kernels.simcse_loss(self.proj(a), self.proj(b), 0.05, hard_negatives=self.proj(hn))

    inputs = [_rand(9, 16, seed=20 + i) for i in range(3)]
    _assert_compiles_like_eager(Contrastive().to(DEVICE), inputs)


@pytest.mark.slow
def test_layer_norm_family_compiles_with_inductor():
    """The same module through inductor (random numbers from torch's eager generator, so the
    dropout seeds match the eager run)."""
    import torch._inductor.config as inductor_config

    module = _Block(32).to(DEVICE).train()
    x = _rand(2, 7, 32, seed=5)
    with inductor_config.patch(fallback_random=True), kernels.use_backend("triton"):
        compiled = torch.compile(module, fullgraph=True)
        got = _run(module, compiled, [x], 0)
        want = _run(module, module, [x], 0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _tiny_bert_layer():
    from minbert.config import BertConfig
    from minbert.model import BertLayer

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertLayer(config).to(DEVICE).train()  # dropout on: attention probabilities and LNs


def test_minbert_layer_compiles_in_one_graph_padded():
    """A whole minBERT encoder layer on the triton backend (attention with a key-padding mask and
    dropout, LayerNorm + residual + dropout twice, bias + GELU) traces into one graph, with
    the eager run's output and every gradient (the dropout seeds are drawn in the graph, from
    the same generator state)."""
    layer = _tiny_bert_layer()
    x = _rand(2, 11, 32, seed=50)
    mask = _pad_mask(2, 11)

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, mask)

    with count_launches() as launched:
        _assert_compiles_like_eager(Padded(), [x])
    assert {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
            "_layer_norm_fwd_kernel", "_bias_gelu_fwd_kernel"} <= set(launched), launched


def test_minbert_layer_compiles_in_one_graph_unpadded():
    """The same layer on packed tokens (``attention_varlen``: cu_seqlens and max_seqlen from the
    Packing): one graph, eager's outputs and gradients."""
    from minbert.packing import Packing

    layer = _tiny_bert_layer()
    mask = _pad_mask(3, 9)
    mask[0, 4:] = False
    packing = Packing.from_mask(mask).to(DEVICE)
    x = _rand(packing.total, 32, seed=51)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, None, packing)

    with count_launches() as launched:
        _assert_compiles_like_eager(Packed(), [x])
    assert {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"} \
        <= set(launched), launched


def test_attention_backward_skips_gradients_nobody_needs():
    """Frozen q: no dQ launch; frozen k and v: no dK/dV launch; frozen k alone: the dV-only
    variant. The gradients computed equal the full backward's."""
    from kernels.attention import _attention_triton

    q, k, v = _heads(1, 17, 2, 16, seed=60)
    full = torch.autograd.grad(_attention_triton(q, k, v, dropout_p=0.1, seed=3).sum(), (q, k, v))
    cases = {"q": ({"_attention_bwd_dkdv_kernel"}, (False, True, True)),
             "kv": ({"_attention_bwd_dq_kernel"}, (True, False, False)),
             "k": ({"_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"}, (True, False, True))}
    for frozen, (kernels_run, needs) in cases.items():
        ins = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), needs)]
        out = _attention_triton(*ins, dropout_p=0.1, seed=3)
        with count_launches() as launched:
            out.sum().backward()
        assert set(launched) - {"_attention_bwd_preprocess_kernel"} == kernels_run, (frozen, launched)
        for t, g, need in zip(ins, full, needs):
            assert (t.grad is not None) == need
            if need:
                assert torch.equal(t.grad, g)
