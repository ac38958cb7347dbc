"""Task heads on middle layers (``HeadSpec.layer``) and the heads' own transformer layers
(``head_layers``): hand-built references, the layers above a head not computed, exports that
reload as trained."""
from __future__ import annotations

import pytest
import torch

from minbert import BertConfig, BertModel
from minbert.heads import HeadSpec, MultitaskBert, MultitaskSpec


def _bert(unpad: bool = True) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, unpad=unpad)
    return BertModel(cfg).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask, torch.zeros_like(ids)


def _model(bert, **sst) -> MultitaskBert:
    torch.manual_seed(2)
    return MultitaskBert(bert, MultitaskSpec({"sst": HeadSpec(**sst), "sts": HeadSpec()},
                                             head_dropout=0.0)).eval()


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_head_on_a_middle_layer_matches_a_hand_built_reference(unpad):
    """layer 1 of 3: embeddings -> encoder layer 0 -> pooler on [CLS] -> the linear head; layers
    1 and 2 never run."""
    bert = _bert(unpad)
    model = _model(bert, layer=1)
    ids, mask, tt = _batch()
    ran = []
    for i, layer in enumerate(bert.encoder.layer):
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    with torch.no_grad():
        got = model("sst", ids, mask, tt)
        assert ran == [0]
        ran.clear()
        ref_bert = _bert(unpad=False)  # the same weights, padded, run by hand
        ref_bert.load_state_dict(bert.state_dict())
        h = ref_bert.embeddings(ids, tt)
        h = ref_bert.encoder.layer[0](h, mask.bool())
        want = model.heads["sst"](ref_bert.pooler(h[:, 0]))
        model("sts", ids, mask, tt)  # the default head runs every layer
        assert ran == [0, 1, 2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, _model(bert)("sst", ids, mask, tt).detach())


def test_layer_zero_is_the_embeddings_and_copied_head_layers_equal_the_encoder():
    """layer 0 pools the embeddings; layer 1 with two head layers copied from encoder layers 1
    and 2 computes exactly what the plain (last-layer) head does, and trains its own copies."""
    bert = _bert()
    ids, mask, tt = _batch()
    with torch.no_grad():
        zero = _model(bert, layer=0)("sst", ids, mask, tt)
        want = _model(bert).heads["sst"](bert.pooler(bert.embeddings(ids, tt)[:, 0]))
        torch.testing.assert_close(zero, want, rtol=1e-5, atol=1e-6)
        copied = _model(bert, layer=1, head_layers=2)
        plain = _model(bert)
        torch.testing.assert_close(copied("sst", ids, mask, tt), plain("sst", ids, mask, tt),
                                   rtol=1e-5, atol=1e-6)
    own = copied.head_layers["sst"][0].attention.self.query.weight
    assert own.data_ptr() != bert.encoder.layer[1].attention.self.query.weight.data_ptr()
    random = _model(bert, layer=1, head_layers=1, head_init="random")
    assert not torch.equal(random.head_layers["sst"][0].attention.self.query.weight,
                           bert.encoder.layer[1].attention.self.query.weight)
    names = [n for n, _ in random.named_parameters() if n.startswith("head_layers.sst.0.")]
    assert "head_layers.sst.0.attention.self.query.weight" in names


@pytest.mark.parametrize("spec, message", [
    (dict(layer=4), r"layer must be -1 \(the last\) or in \[0, 3\]"),
    (dict(layer=2, head_layers=2), "takes the 2 encoder layer"),
    (dict(head_layers=4), r"head_layers must be in \[0, 3\]"),
    (dict(head_init="zeros", head_layers=1, layer=1), "head_init"),
])
def test_bad_head_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        _model(_bert(), **spec)


def test_export_with_head_layers_reloads_as_trained(tmp_path):
    from minbert.tokenizer import Tokenizer
    from train.export import load_multitask, save_multitask

    bert = _bert()
    model = _model(bert, layer=1, head_layers=1, head_init="random")
    save_multitask(model.state_dict(), bert.config, model.spec, Tokenizer.from_pretrained(),
                   tmp_path / "export")
    loaded, _ = load_multitask(tmp_path / "export")
    ids, mask, tt = _batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()("sst", ids, mask, tt), model("sst", ids, mask, tt))
    assert loaded.spec.tasks["sst"] == HeadSpec(layer=1, head_layers=1, head_init="random")


# ----------------------------------------------------------------------------- pair heads
def _pair_model(bert, shared=False, **sts):
    torch.manual_seed(3)
    spec = MultitaskSpec({"quora": HeadSpec(form="bi"), "sts": HeadSpec(form="bi", **sts)},
                         head_dropout=0.0, shared_pair_head=shared)
    return MultitaskBert(bert, spec).eval()


def test_pair_features_and_sts_target_scaling():
    """features pick the concat head's inputs (by hand: the same linear on the same columns);
    target "0-1" maps the head's output x 5 (sigmoid first with output "sigmoid") and trains on
    the MSE / 25."""
    from minbert.heads import pair_features

    bert = _bert()
    ids, mask, tt = _batch()
    feats = ["abs_diff", "cos", "u"]
    model = _pair_model(bert, features=feats, target="0-1", output="sigmoid")
    assert model.heads["sts"].in_features == 2 * 32 + 1
    with torch.no_grad():
        got = model("sts", ids, mask, tt, ids.flip(0), mask.flip(0), tt)
        u = model.embed("sts", ids, mask, tt)
        v = model.embed("sts", ids.flip(0), mask.flip(0), tt)
        x = torch.cat([(u - v).abs(), torch.nn.functional.cosine_similarity(u, v, dim=-1)[:, None], u], -1)
        torch.testing.assert_close(pair_features(u, v, feats), x)
        want = torch.sigmoid(model.heads["sts"](x).squeeze(-1)) * 5
    torch.testing.assert_close(got, want)
    assert float(got.min()) >= 0 and float(got.max()) <= 5
    gold = torch.tensor([0.0, 2.5, 5.0])
    torch.testing.assert_close(model.task_loss("sts", got, gold),
                               torch.nn.functional.mse_loss(got, gold) / 25)
    plain = _pair_model(bert)
    assert plain.task_loss("sts", got, gold) == torch.nn.functional.mse_loss(got, gold)


def test_shared_pair_head_is_one_projection_for_quora_and_sts():
    bert = _bert()
    model = _pair_model(bert, shared=True)
    assert isinstance(model.shared_pair[0], torch.nn.Linear) and model.shared_pair[0].in_features == 4 * 32
    assert model.heads["quora"].in_features == model.heads["sts"].in_features == 32
    ids, mask, tt = _batch()
    out = model("quora", ids, mask, tt, ids, mask, tt).sum() + model("sts", ids, mask, tt, ids, mask, tt).sum()
    out.backward()
    assert model.shared_pair[0].weight.grad is not None and model.shared_pair[0].weight.grad.abs().sum() > 0
    names = {n.split(".")[0] for n in model.state_dict()}
    assert "shared_pair" in names
    with pytest.raises(ValueError, match="shared_pair_head needs quora and sts"):
        _pair_model(bert, shared=True, features=["u", "v"])  # quora keeps 4 features: widths differ


@pytest.mark.parametrize("spec, message", [
    (dict(features=["u", "w"]), "features must be distinct names"),
    (dict(output="sigmoid"), "needs target '0-1'"),
])
def test_bad_pair_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        _pair_model(_bert(), **spec)
