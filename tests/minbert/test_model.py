"""minBERT against transformers.BertModel on the embedded checkpoint, and checkpoint I/O errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import kernels
from minbert import BertConfig, BertModel, Tokenizer
from train.data import load_task

transformers = pytest.importorskip("transformers")


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: relative to the tensor's scale, so near-zero entries don't blow it up."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def hf_model(embedded_dir):
    torch.manual_seed(0)
    return transformers.BertModel.from_pretrained(str(embedded_dir), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ours():
    return BertModel.from_pretrained().eval()


@pytest.fixture(scope="module")
def ours_padded():
    return BertModel.from_pretrained(config_changes={"unpad": False}).eval()


@pytest.fixture(scope="module")
def real_batches(data_dir):
    """Padded batches of real sentences: SST singles and Quora pairs (token types 0/1)."""
    tok = Tokenizer.from_pretrained()
    sst = [e.sentence for e in load_task("sst", "dev", data_dir).examples[:13]]
    quora = load_task("quora", "dev", data_dir).examples[:11]
    return [tok(sst), tok([e.sentence1 for e in quora], [e.sentence2 for e in quora])]


@pytest.mark.parametrize("which", [0, 1], ids=["sst-single", "quora-pairs"])
@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_forward_parity_with_transformers(ours, ours_padded, hf_model, real_batches, which, unpad):
    batch = real_batches[which]
    model = ours if unpad else ours_padded
    assert model.config.unpad is unpad
    assert (batch.attention_mask == 0).any(), "the batch must contain padding"
    with kernels.use_backend("eager"), torch.no_grad():
        a = model(batch.input_ids, batch.attention_mask, batch.token_type_ids, output_hidden_states=True)
        b = hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     token_type_ids=batch.token_type_ids, output_hidden_states=True)
    assert (a.packed is not None) is unpad  # padding present: unpadded exactly when asked
    real = batch.attention_mask.bool()
    if unpad:  # the padding rows are zeros, the real tokens equal transformers'
        assert a.packed.shape == (int(real.sum()), model.config.hidden_size)
        assert (a.last_hidden_state[~real] == 0).all()
        assert (a.last_hidden_state - b.last_hidden_state)[real].abs().max().item() <= 1e-5
    else:  # padded: every position equals transformers', padding included
        assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max().item() <= 1e-5
    assert len(a.hidden_states) == model.config.num_hidden_layers + 1
    for ha, hb in zip(a.hidden_states, b.hidden_states):  # every layer, at the real tokens
        assert (ha - hb)[real].abs().max().item() <= 1e-5


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_gradient_parity_with_transformers(embedded_dir, real_batches, unpad):
    batch = real_batches[1]
    ours = BertModel.from_pretrained(config_changes={"unpad": unpad}).eval()
    hf = transformers.BertModel.from_pretrained(str(embedded_dir), attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    w_tok = torch.randn(ours.config.hidden_size, generator=g)
    w_pool = torch.randn(ours.config.hidden_size, generator=g)
    mask = batch.attention_mask.unsqueeze(-1).float()

    def loss_of(out):  # touches every token (padding excluded) and the pooler
        return ((out.last_hidden_state * mask) @ w_tok).square().mean() + (out.pooler_output @ w_pool).mean()

    with kernels.use_backend("eager"):
        loss_of(ours(batch.input_ids, batch.attention_mask, batch.token_type_ids)).backward()
    loss_of(hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
               token_type_ids=batch.token_type_ids)).backward()
    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert ours_params.keys() == hf_params.keys()
    scale = max(p.grad.abs().max().item() for p in hf_params.values())
    for name, p in ours_params.items():
        assert p.grad is not None, f"no gradient for {name}"
        if name.endswith("attention.self.key.bias"):
            # Its exact gradient is zero (it adds q.b_k to a whole softmax row, which softmax
            # ignores); both models leave only rounding noise, so a relative error means nothing.
            assert p.grad.abs().max().item() <= 1e-6 * scale
            assert hf_params[name].grad.abs().max().item() <= 1e-6 * scale
            continue
        err = max_rel_err(p.grad, hf_params[name].grad)
        assert err <= 1e-4, f"{name}: gradient max relative error {err:.2e}"


def test_save_pretrained_roundtrip_through_transformers(ours, tmp_path):
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.BertModel.from_pretrained(str(tmp_path / "ours"))
    hf_state = hf.state_dict()
    our_state = ours.state_dict()
    assert set(our_state) <= set(hf_state)
    for k, v in our_state.items():
        assert hf_state[k].shape == v.shape and torch.equal(hf_state[k], v), k
    hf.save_pretrained(str(tmp_path / "hf"))
    back = BertModel.from_pretrained(tmp_path / "hf")
    assert back.config == ours.config
    for k, v in back.state_dict().items():
        assert torch.equal(v, our_state[k]), k


def test_loads_prefixed_and_legacy_names_and_pytorch_bin(ours, tmp_path):
    """A BertForPreTraining-style .bin: 'bert.' prefix, LayerNorm gamma/beta, a cls.* head."""
    state = {}
    for k, v in ours.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state["bert." + k] = v.clone()
    state["cls.predictions.bias"] = torch.zeros(3)
    state["bert.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(ours.config.to_hf_dict()))
    loaded = BertModel.from_pretrained(tmp_path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_hidden_states_and_padding_rows():
    torch.manual_seed(0)
    cfg = BertConfig.preset("debug")
    model = BertModel(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, :] = 0  # a row of padding only: finite outputs, not NaN
    out = model(ids, mask, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 7, cfg.hidden_size)
    assert out.pooler_output.shape == (3, cfg.hidden_size)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert torch.isfinite(out.last_hidden_state).all()
    # Padding does not leak into real tokens: the same sentence unpadded gives the same vectors.
    short = model(ids[1:2, :4], mask[1:2, :4]).last_hidden_state
    assert (short - out.last_hidden_state[1:2, :4]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- bad input
def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_files(tmp_path, embedded_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        BertModel.from_pretrained(tmp_path / "nope")
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="config file not found"):
        BertModel.from_pretrained(d)
    shutil.copy(embedded_dir / "config.json", d / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors or pytorch_model\.bin"):
        BertModel.from_pretrained(d)


def test_config_without_required_field(tmp_path, embedded_dir):
    d = _copy_checkpoint(embedded_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing required field.*num_hidden_layers"):
        BertModel.from_pretrained(d)


def test_shape_mismatch_names_parameter_and_shapes(tmp_path, embedded_dir):
    d = _copy_checkpoint(embedded_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 1000
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its config.json") as e:
        BertModel.from_pretrained(d)
    for layer in range(6):  # every mismatched parameter is named, with both shapes
        assert (f"'encoder.layer.{layer}.intermediate.dense.weight' has shape (1536, 384), "
                "the model expects (1000, 384)") in str(e.value)
        assert f"'encoder.layer.{layer}.output.dense.weight' has shape (384, 1536)" in str(e.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path, ours):
    state = ours.state_dict()
    del state["pooler.dense.weight"]
    state["encoder.layer.0.extra.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ours.config.to_hf_dict()))
    with pytest.raises(KeyError) as e:
        BertModel.from_pretrained(tmp_path)
    assert "missing keys: pooler.dense.weight" in str(e.value)
    assert "unexpected keys: encoder.layer.0.extra.weight" in str(e.value)


def test_bad_forward_inputs():
    model = BertModel(BertConfig.preset("debug"))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4))


def test_config_checks_and_presets():
    assert BertConfig.preset("minilm-l6").hidden_size == 384
    assert BertConfig.preset("bert-base").num_hidden_layers == 12
    with pytest.raises(ValueError, match="unknown BertConfig preset"):
        BertConfig.preset("huge")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        BertConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="only 'bert' checkpoints"):
        BertConfig.from_hf_dict({"model_type": "roberta"})
