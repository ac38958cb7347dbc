"""minBERT unpadded (``BertConfig.unpad``) against padded: outputs and every gradient within the
kernels' error budget, on both backends; ``Packing`` and the row gather/scatter it runs on."""
from __future__ import annotations

import warnings

import pytest
import torch

import kernels
from kernels.testing import REL_FLOOR, compare_tensors
from kernels._utils import gather_rows, scatter_rows
from minbert import BertConfig, BertModel
from minbert.heads import mean_pool, pool
from minbert.packing import Packing

# B = 6 rows of L = 9: a full row, length 1, odd lengths, a row of padding only
LENGTHS = [9, 1, 5, 0, 7, 3]
L = 9


def _batch(pattern: str, vocab: int):
    g = torch.Generator().manual_seed(11)
    B = len(LENGTHS)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    types = (torch.arange(L)[None, :] >= torch.tensor(LENGTHS)[:, None] // 2).long()
    mask = (torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    if pattern == "holes":  # real tokens need not be contiguous (position 0 stays real)
        mask[0, 3] = mask[4, 1] = mask[4, 5] = 0
    return ids, types, mask


def _run(model: BertModel, ids, types, mask, weights):
    """Forward + backward of a loss that touches every real token, every layer's output, the
    pooler and the mean pooling of each non-empty row; returns the compared tensors."""
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    out = model(ids, mask, types, output_hidden_states=True)
    real = mask.bool()
    rows = real.any(1)
    w_tok, w_pool, w_mean = (w.to(dtype) for w in weights)
    loss = sum((h[real] * w_tok).sum() for h in out.hidden_states)
    loss = loss + (out.pooler_output[rows] * w_pool).sum() + (pool(out, mask, "mean")[rows] * w_mean).sum()
    loss.backward()
    got = {f"hidden_states[{i}]": h[real].detach() for i, h in enumerate(out.hidden_states)}
    got["pooler_output"] = out.pooler_output[rows].detach()
    got["mean_pool"] = pool(out, mask, "mean")[rows].detach()
    got.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    return got, out


@pytest.mark.parametrize("pattern", ["right", "holes"])
@pytest.mark.parametrize("backend, dtype", [("eager", torch.float32), ("eager", torch.bfloat16),
                                            ("triton", torch.float32)])
def test_unpadded_model_matches_padded(backend, dtype, pattern, monkeypatch):
    cfg = BertConfig.preset("debug")
    torch.manual_seed(0)
    base = BertModel(cfg).eval()
    ids, types, mask = _batch(pattern, cfg.vocab_size)
    T = int(mask.sum())
    g = torch.Generator().manual_seed(5)
    weights = (torch.randn(cfg.hidden_size, generator=g), torch.randn(cfg.hidden_size, generator=g),
               torch.randn(cfg.hidden_size, generator=g))

    def model(unpad: bool, dt: torch.dtype) -> BertModel:
        m = BertModel(cfg.replace(unpad=unpad)).eval()
        m.load_state_dict(base.state_dict())
        return m.to(dt)

    calls = []
    real_varlen = kernels.attention_varlen

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return real_varlen(*args, **kw)

    monkeypatch.setattr(kernels, "attention_varlen", counted)
    with kernels.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ops without a Triton kernel yet say so once
        unpadded, out = _run(model(True, dtype), ids, types, mask, weights)
    assert out.packed is not None and out.packed.shape == (T, cfg.hidden_size)
    assert calls == [(T, cfg.num_attention_heads, cfg.head_dim)] * cfg.num_hidden_layers
    assert (out.last_hidden_state[~mask.bool()] == 0).all()
    with kernels.use_backend("eager"):
        padded, out_p = _run(model(False, dtype), ids, types, mask, weights)
        ref, _ = _run(model(False, torch.float64 if dtype == torch.float32 else torch.float32),
                      ids, types, mask, weights)
    assert out_p.packed is None and len(calls) == cfg.num_hidden_layers  # padded: no varlen call
    assert unpadded.keys() == padded.keys() == ref.keys()
    # the key biases' exact gradient is 0 (softmax is shift invariant): both runs give rounding
    # noise there, held below the floor of the key weights' gradient scale instead
    zero = [w for w in ref if w.endswith("key.bias")]
    for what in zero:
        scale = ref[what.replace("bias", "weight")].abs().max()
        assert unpadded[what].abs().max() <= 4 * REL_FLOOR[dtype] * scale, what
    results = [compare_tensors("unpad vs padded", dtype, what, unpadded[what], padded[what], ref[what])
               for what in ref if what not in zero]
    failed = [str(c) for c in results if not c.ok]
    assert not failed, "\n".join(failed)


def test_no_padding_and_all_padding_run_padded():
    cfg = BertConfig.preset("debug")
    model = BertModel(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (2, 5))
    full = model(ids, torch.ones_like(ids))
    assert full.packed is None and full.packing is None  # nothing to remove: no mask at all
    assert (full.last_hidden_state - model(ids).last_hidden_state).abs().max() == 0
    empty = model(ids, torch.zeros_like(ids))  # no real token: the padded path, finite
    assert empty.packed is None and torch.isfinite(empty.pooler_output).all()


def test_packing_given_by_the_caller_must_match_the_batch():
    cfg = BertConfig.preset("debug")
    model = BertModel(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    packing = Packing.from_mask(mask)
    a = model(ids, mask, packing=packing)
    b = model(ids, mask)  # computed inside: the same
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() == 0
    with pytest.raises(ValueError, match=r"packing describes a \(2, 6\) batch, input_ids is \(2, 5\)"):
        model(ids, mask, packing=Packing.from_mask(torch.ones(2, 6)))


def test_packing_from_mask():
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    p = Packing.from_mask(mask)
    assert p.indices.tolist() == [0, 1, 3, 8, 12, 13, 14, 15]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 3, 4, 8]
    assert p.max_seqlen == 4 and p.total == 8 and (p.batch, p.length) == (4, 4)
    assert p.positions().tolist() == [0, 1, 3, 0, 0, 1, 2, 3]
    assert p.nonempty.tolist() == [True, False, True, True]
    x = torch.randn(4, 4, 3)
    packed = p.pack(x)
    assert torch.equal(packed, x[mask.bool()])
    back = p.unpack(packed)
    assert torch.equal(back[mask.bool()], x[mask.bool()]) and (back[~mask.bool()] == 0).all()
    first = p.first_rows(packed)
    assert torch.equal(first[[0, 2, 3]], x[[0, 2, 3], 0]) and (first[1] == 0).all()
    assert torch.allclose(p.mean_rows(packed), mean_pool(back, mask), atol=1e-6)
    assert Packing.from_mask(torch.ones(3, 2)).nonempty is None
    with pytest.raises(ValueError, match="attention_mask must be"):
        Packing.from_mask(torch.ones(3))


def test_gather_and_scatter_rows_gradients():
    g = torch.Generator().manual_seed(2)
    index = torch.tensor([4, 0, 2, 5])
    x = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.equal(gather_rows(x, index), x.index_select(0, index))
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, index), (x,))
    assert torch.autograd.gradcheck(lambda t: scatter_rows(t, index, 7), (y,))
    s = scatter_rows(y, index, 7)
    assert torch.equal(s[index], y) and (s[[1, 3, 6]] == 0).all()


def test_unpad_is_saved_in_config_json_and_defaults_to_true(tmp_path):
    cfg = BertConfig.preset("debug")
    assert cfg.unpad is True
    d = cfg.replace(unpad=False).to_hf_dict()
    assert d["unpad"] is False and BertConfig.from_hf_dict(d).unpad is False
    del d["unpad"]  # an HF config.json: unpadded
    assert BertConfig.from_hf_dict(d).unpad is True
    with pytest.raises(ValueError, match="unpad must be true or false"):
        BertConfig(unpad="yes")


def test_budget_is_not_trivial():
    """The fp32 comparison above cannot pass a model whose real tokens attend to the padding (the
    bug unpadding could bring). The bf16 one can: after two layers eager bf16's own error is ~1%
    of the values, as large as this bug's effect on the debug model, so masking bugs are held by
    the fp32 cases (eager and triton backends), not by bf16."""
    cfg = BertConfig.preset("debug")
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    ids, types, mask = _batch("right", cfg.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        ref = model.double()(ids, mask, types).last_hidden_state[real]
        m = model.float()
        eager = m(ids, mask, types).last_hidden_state[real]
        broken = m(ids, None, types).last_hidden_state[real]  # no key-padding mask
    assert not compare_tensors("broken", torch.float32, "out", broken, eager, ref).ok
    assert compare_tensors("same", torch.float32, "out", eager, eager, ref).ok
