"""LoRA adapters (minbert.lora): the adapted model starts as the pretrained one, trains only the
adapters, and merges into a plain BERT that minBERT and transformers load with the same outputs."""
from __future__ import annotations

import pytest
import torch

from minbert import BertConfig, BertModel
from minbert.lora import LORA_TARGETS, LoRALinear, apply_lora, merge_lora


def _bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


def _perturb(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


ALL = sorted(LORA_TARGETS)


@pytest.mark.parametrize("targets", [["query", "key", "value"], ALL], ids=["qkv", "all"])
def test_starts_as_the_base_model_and_trains_only_the_adapters(targets):
    base, model = _bert(), _bert()
    n = apply_lora(model, r=4, alpha=8, dropout=0.0, targets=targets)
    assert n == 2 * len(targets)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).last_hidden_state, base(ids, mask).last_hidden_state)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for name in trainable)
    assert len(trainable) == 2 * n
    _perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids, mask).last_hidden_state, base(ids, mask).last_hidden_state,
                                  atol=1e-4)
    model(ids, mask).last_hidden_state.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[name] is not None and grads[name].abs().sum() > 0 for name in trainable)
    assert all(g is None for name, g in grads.items() if name not in trainable)


@pytest.mark.parametrize("targets", [["query", "key", "value"], ALL], ids=["qkv", "all"])
def test_merged_weights_are_base_plus_scaled_BA_and_compute_the_same(targets, tmp_path):
    model = _bert()
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets=targets)
    _perturb(model)
    state = model.state_dict()
    merged = merge_lora(state)
    assert not any("lora_" in k for k in merged) and set(merged) == set(_bert().state_dict())
    layer = model.encoder.layer[1].attention.self.query
    want = layer.weight + 2.0 * layer.lora_B @ layer.lora_A  # alpha / r = 8 / 4
    torch.testing.assert_close(merged["encoder.layer.1.attention.self.query.weight"], want)
    plain = _bert()
    plain.load_state_dict(merged)
    plain.save_pretrained(tmp_path / "merged")
    ids, mask = _batch()
    with torch.no_grad():
        ours = model.eval()(ids, mask).last_hidden_state
        torch.testing.assert_close(plain(ids, mask).last_hidden_state, ours, rtol=1e-5, atol=1e-5)
        import transformers

        hf = transformers.BertModel.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
        out = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out * mask[..., None], ours * mask[..., None], rtol=1e-4, atol=1e-4)


def test_bad_targets_and_rank():
    with pytest.raises(ValueError, match="LoRA targets"):
        apply_lora(_bert(), 4, 8, 0.0, ["qurey"])
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        LoRALinear(torch.nn.Linear(3, 3), 0, 8)
    from train.config import ConfigError, LoRAConfig

    with pytest.raises(ConfigError, match="model.lora.targets"):
        LoRAConfig(r=4, targets=["dense"])
    with pytest.raises(ConfigError, match="model.lora.r"):
        LoRAConfig(r=-1)
