"""SMART (train.smart): the divergence, the adversarial perturbation and the momentum copy."""
from __future__ import annotations

import torch

from minbert import BertConfig, BertModel
from minbert.heads import HeadSpec, MultitaskBert, MultitaskSpec
from train import smart


def _model() -> MultitaskBert:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    spec = MultitaskSpec({"sst": HeadSpec(), "quora": HeadSpec(form="bi"), "sts": HeadSpec()}, head_dropout=0.0)
    return MultitaskBert(BertModel(cfg), spec)


def _kwargs(pair: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    if pair:
        kw.update(input_ids_b=ids.flip(0), attention_mask_b=mask.flip(0), token_type_ids_b=torch.zeros_like(ids))
    return kw


def test_divergence_is_zero_only_for_equal_predictions_and_reaches_both():
    g = torch.Generator().manual_seed(2)
    for task, shape in (("sst", (4, 5)), ("quora", (4,)), ("sts", (4,))):
        p = torch.randn(shape, generator=g, requires_grad=True)
        q = torch.randn(shape, generator=g, requires_grad=True)
        assert float(smart.divergence(task, p, p.detach().clone()).detach()) < 1e-6
        d = smart.divergence(task, p, q)
        assert float(d.detach()) > 1e-3
        d.backward()
        assert p.grad.abs().sum() > 0 and q.grad.abs().sum() > 0, task
    # sst: the symmetric KL by hand
    p, q = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    want = ((lq.exp() * (lq - lp)).sum(-1) + (lp.exp() * (lp - lq)).sum(-1)).mean()
    torch.testing.assert_close(smart.divergence("sst", p, q), want)


def test_perturbation_ascends_within_the_box_one_delta_per_encoder_call():
    model = _model()
    pert = smart.Perturbation(1e-5)
    clean = model("quora", **_kwargs(pair=True))
    adv = model("quora", **_kwargs(pair=True), perturb=pert)
    assert len(pert.deltas) == 2  # a bi-encoder encodes both sentences
    grads = torch.autograd.grad(smart.divergence("quora", adv, clean.detach()), pert.deltas)
    pert.ascend(grads, step_size=1e-3, epsilon=1e-4)
    assert all(float(d.detach().abs().max()) <= 1e-4 + 1e-12 for d in pert.deltas)
    assert all(abs(float(d.detach().abs().max()) - 1e-4) < 1e-9 for d in pert.deltas)  # step 1e-3 > box: at the edge


def test_smoothness_term_is_positive_and_its_gradient_reaches_the_embeddings():
    model = _model()
    kw = _kwargs()
    clean = model("sst", **kw)
    term = smart.smoothness(model, "sst", kw, clean, noise_std=1e-3, step_size=1e-2, epsilon=1e-2, steps=2)
    assert float(term.detach()) > 0
    model.zero_grad()
    term.backward()
    emb = model.bert.embeddings.word_embeddings.weight.grad
    assert emb is not None and float(emb.abs().sum()) > 0
    assert float(model.heads["sst"].weight.grad.abs().sum()) > 0


def test_momentum_teacher_is_a_moving_average_and_round_trips():
    model = _model()
    teacher = smart.MomentumTeacher(model, momentum=0.9)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    teacher.update(model)
    for (name, t), p in zip(teacher.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(t, 0.9 * before[name] + 0.1 * p)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    again = smart.MomentumTeacher(_model(), momentum=0.9)
    again.load_state_dict(teacher.state_dict())
    kw = _kwargs()
    torch.testing.assert_close(again.predict("sst", kw), teacher.predict("sst", kw))


def test_regulariser_sums_the_weighted_terms_and_weight_zero_runs_no_adversarial_pass(monkeypatch):
    from train.config import SmartConfig

    model = _model()
    kw = _kwargs(pair=True)
    teacher = smart.MomentumTeacher(_model(), momentum=0.9)
    with torch.no_grad():  # a teacher that differs, so the Bregman term is not 0
        for p in teacher.model.parameters():
            p.mul_(1.5)
    clean = model("quora", **kw)
    bregman = smart.divergence("quora", clean, teacher.predict("quora", kw))
    assert float(bregman.detach()) > 1e-4
    calls = []
    real = smart.smoothness

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(smart, "smoothness", counted)
    torch.manual_seed(0)  # the perturbation's noise: the same draw for the hand-made sum
    both = smart.regulariser(model, "quora", kw, clean, SmartConfig(weight=2.0, bregman_weight=3.0), teacher)
    assert len(calls) == 1
    torch.manual_seed(0)
    smooth = real(model, "quora", kw, clean, 1e-5, 1e-3, 1e-5, 1)
    torch.testing.assert_close(both, 2.0 * smooth + 3.0 * bregman)
    calls.clear()
    alone = smart.regulariser(model, "quora", kw, clean, SmartConfig(weight=0.0, bregman_weight=3.0), teacher)
    assert not calls  # weight 0: no adversarial forward or backward
    torch.testing.assert_close(alone, 3.0 * bregman)
    alone.backward()  # and its gradient reaches the trained model
    assert float(model.heads["quora"].weight.grad.abs().sum()) > 0
    no_copy = smart.regulariser(model, "quora", kw, clean.detach(), SmartConfig(weight=2.0), None)
    assert len(calls) == 1 and float(no_copy.detach()) >= 0
    import pytest
    with pytest.raises(ValueError, match="adds nothing"):
        smart.regulariser(model, "quora", kw, clean, SmartConfig(weight=0.0), None)


def test_config_checks():
    import pytest

    from train.config import ConfigError, SmartConfig, TrainConfig

    with pytest.raises(ConfigError, match="smart.steps"):
        SmartConfig(steps=0)
    with pytest.raises(ConfigError, match="smart.momentum"):
        SmartConfig(momentum=1.0)
    with pytest.raises(ConfigError, match="both 0"):
        SmartConfig(enabled=True, weight=0.0, bregman_weight=0.0)
    SmartConfig(enabled=False, weight=0.0, bregman_weight=0.0)  # off: nothing to refuse
    with pytest.raises(ConfigError, match="ZeRO stages 0-2"):
        from train.config import DeepSpeedConfig

        TrainConfig(smart=SmartConfig(enabled=True), deepspeed=DeepSpeedConfig(zero_stage=3))
