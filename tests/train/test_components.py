"""Config checking, schedules, PCGrad math, heads and prediction-file format (no DeepSpeed)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from minbert import BertConfig, BertModel
from minbert.heads import HeadSpec, MultitaskBert, MultitaskSpec
from train import pcgrad
from train.config import ConfigError, ScheduleConfig, TrainConfig, from_dict, load_config
from train.schedules import Schedule, TaskSampler
from train.tasks import metric, overall_score, write_predictions


# ----------------------------------------------------------------------------- config
def test_shipped_configs_load_and_derive_deepspeed(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "train" / "configs").glob("*.json"))
    assert {p.stem for p in configs} >= {"zero2_bf16", "cpu_smoke", "zero0_bf16", "zero1_bf16", "zero3_bf16"}
    for path in configs:
        cfg = load_config(path)
        ds = cfg.deepspeed_config(world_size=2)
        assert ds["train_batch_size"] == (ds["train_micro_batch_size_per_gpu"]
                                          * ds["gradient_accumulation_steps"] * 2)
        assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
        assert ds["bf16"]["enabled"] == cfg.deepspeed.bf16
        assert ds["gradient_clipping"] == cfg.optim.grad_clip


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) optim\.learning_rate"):
        from_dict(TrainConfig, {"optim": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) epoch\b"):
        from_dict(TrainConfig, {"epoch": 3})
    with pytest.raises(ConfigError, match=r"schedule\.kind must be one of"):
        from_dict(TrainConfig, {"schedule": {"kind": "uniform"}})
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage must be one of"):
        from_dict(TrainConfig, {"deepspeed": {"zero_stage": 4}})
    with pytest.raises(ConfigError, match=r"epochs must be an integer"):
        from_dict(TrainConfig, {"epochs": "3"})
    with pytest.raises(ConfigError, match="pcgrad needs every task's gradient"):
        from_dict(TrainConfig, {"pcgrad": True})
    with pytest.raises(ConfigError, match="at least one of sst, quora, sts"):
        from_dict(TrainConfig, {"tasks": {t: {"enabled": False} for t in ("sst", "quora", "sts")}})
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        load_config(tmp_path / "missing.json")


def test_overrides_and_world_size_divisibility(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"deepspeed": {"global_batch": 64, "micro_batch_per_device": 16}}))
    cfg = load_config(path, [("optim.lr", "3e-5"), ("schedule.kind", "superbatch"), ("pcgrad", "true")])
    assert cfg.name == "c" and cfg.optim.lr == 3e-5 and cfg.pcgrad is True
    assert cfg.deepspeed.grad_accum(2) == 2 and cfg.deepspeed.grad_accum(4) == 1
    with pytest.raises(ConfigError, match=r"global_batch \(64\) is not a multiple of .* world size \(3\)"):
        cfg.deepspeed.grad_accum(3)
    # Under PCGrad DeepSpeed gets one backward per step: no accumulation on its side.
    ds = cfg.deepspeed_config(2)
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_micro_batch_size_per_gpu"] == 32


def test_saved_config_round_trips(tmp_path):
    cfg = from_dict(TrainConfig, {"optim": {"betas": [0.8, 0.9]}, "tasks": {"sts": {"form": "bi"}}})
    cfg.save(tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again == cfg


# ----------------------------------------------------------------------------- schedules
SIZES = {"sst": 300, "quora": 1200, "sts": 100}


def test_sampler_passes_cover_every_example_and_resume():
    s = TaskSampler(10, seed=1, task_index=0)
    first = s.take(10)
    assert sorted(first) == list(range(10))
    s.take(3)
    state = s.state_dict()
    rest = s.take(12)
    t = TaskSampler(10, seed=1, task_index=0)
    t.load_state_dict(state)
    assert t.take(12) == rest


@pytest.mark.parametrize("kind", ["sequential", "round_robin", "random", "proportional", "annealed",
                                  "superbatch"])
def test_schedules_are_deterministic(kind):
    a = Schedule(ScheduleConfig(kind=kind), SIZES, 10, epochs=2, seed=5)
    b = Schedule(ScheduleConfig(kind=kind), SIZES, 10, epochs=2, seed=5)
    seq = [a.tasks_for_step(i) for i in range(a.total_steps)]
    assert seq == [b.tasks_for_step(i) for i in range(b.total_steps)]
    if kind == "superbatch":
        assert all(s == ["sst", "quora", "sts"] for s in seq)
        assert a.steps_per_epoch == 54  # ceil(1600 / (10 * 3))
    else:
        assert a.steps_per_epoch == 30 + 120 + 10


def test_sequential_and_round_robin_order():
    seq = Schedule(ScheduleConfig(kind="sequential"), SIZES, 10, epochs=1, seed=0)
    tasks = [seq.tasks_for_step(i)[0] for i in range(seq.total_steps)]
    assert tasks == ["sst"] * 30 + ["quora"] * 120 + ["sts"] * 10
    rr = Schedule(ScheduleConfig(kind="round_robin"), SIZES, 10, epochs=1, seed=0)
    assert [rr.tasks_for_step(i)[0] for i in range(6)] == ["sst", "quora", "sts"] * 2


def test_proportional_and_annealed_probabilities():
    prop = Schedule(ScheduleConfig(kind="proportional", alpha=1.0), SIZES, 10, epochs=1, seed=0)
    counts = Counter(prop.tasks_for_step(i)[0] for i in range(prop.total_steps))
    expected = {t: n / 1600 * prop.total_steps for t, n in SIZES.items()}
    for t in SIZES:
        assert abs(counts[t] - expected[t]) < 4 * np.sqrt(expected[t]) + 1
    ann = Schedule(ScheduleConfig(kind="annealed", alpha_start=1.0, alpha_end=0.0), SIZES, 10, 3, 0)
    assert np.allclose(ann.probabilities(0), [n / 1600 for n in SIZES.values()])
    assert np.allclose(ann.probabilities(ann.total_steps - 1), [1 / 3] * 3)


# ----------------------------------------------------------------------------- PCGrad
def test_pcgrad_projects_conflicting_gradients():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    out = pcgrad.project(g.clone(), order_seed=0)
    # g0 . g1 = -1 < 0: g0 -> g0 - (-1/2) g1 = (0.5, 0.5); g1 -> g1 - (-1/1) g0 = (0, 1)
    assert torch.allclose(out, torch.tensor([0.5, 1.5]))
    aligned = torch.tensor([[1.0, 2.0], [3.0, 1.0]])  # no conflict: the plain sum
    assert torch.allclose(pcgrad.project(aligned, 0), aligned.sum(0))


def test_pcgrad_result_does_not_conflict_for_two_tasks():
    gen = torch.Generator().manual_seed(0)
    conflicts = 0
    for _ in range(20):
        g = torch.randn(2, 50, generator=gen, dtype=torch.float64)
        if torch.dot(g[0], g[1]) >= 0:
            continue
        conflicts += 1
        p0 = g[0] - torch.dot(g[0], g[1]) / g[1].square().sum() * g[1]
        assert torch.dot(p0, g[1]).abs() < 1e-10
        assert torch.allclose(pcgrad.project(g, 3), p0 + g[1] - torch.dot(g[1], g[0]) / g[0].square().sum() * g[0])
    assert conflicts >= 5


def test_surrogate_loss_gradient_is_the_given_vector():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    flat = torch.arange(10, dtype=torch.float32)
    pcgrad.surrogate_loss(params, flat).backward()
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), flat)


# ----------------------------------------------------------------------------- heads
@pytest.mark.parametrize("form, pooling, head", [("cross", "cls", "concat"), ("bi", "mean", "concat"),
                                                 ("bi", "cls", "cosine")])
def test_heads_shapes_and_losses(form, pooling, head):
    torch.manual_seed(0)
    bert = BertModel(BertConfig.preset("debug"))
    spec = MultitaskSpec(tasks={"sst": HeadSpec(), "quora": HeadSpec(form, pooling, head),
                                "sts": HeadSpec(form, pooling, head)})
    model = MultitaskBert(bert, spec).eval()
    ids = torch.randint(1, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    pair = {"input_ids_b": ids.flip(1), "attention_mask_b": mask, "token_type_ids_b": torch.zeros_like(ids)}
    args = (ids, mask, torch.zeros_like(ids))
    assert model("sst", *args).shape == (3, 5)
    extra = pair if form == "bi" else {}
    quora, sts = model("quora", *args, **extra), model("sts", *args, **extra)
    assert quora.shape == sts.shape == (3,)
    if head == "cosine":
        assert ((sts >= 0) & (sts <= 5)).all()
    loss = (MultitaskBert.loss("sst", model("sst", *args), torch.tensor([0, 4, 2]))
            + MultitaskBert.loss("quora", quora, torch.tensor([0, 1, 1]))
            + MultitaskBert.loss("sts", sts, torch.tensor([0.0, 2.5, 5.0])))
    loss.backward()
    assert all(p.grad is not None for p in model.bert.parameters() if p.requires_grad)
    if form == "bi":
        with pytest.raises(ValueError, match="bi-encoder: it needs the second sentence"):
            model("quora", *args)


# ----------------------------------------------------------------------------- metrics and files
def test_metrics_and_overall_score():
    assert metric("sst", torch.tensor([1.0, 2.0, 3.0]), [1, 2, 0]) == pytest.approx(2 / 3)
    r = metric("sts", torch.tensor([1.0, 2.0, 4.0]), [1.5, 2.5, 3.0])
    assert r == pytest.approx(float(np.corrcoef([1, 2, 4], [1.5, 2.5, 3.0])[0, 1]))
    assert overall_score({"sst": 0.5, "quora": 0.8, "sts": 0.6}) == pytest.approx((0.5 + 0.8 + 0.8) / 3)


def test_prediction_file_format(tmp_path):
    write_predictions(tmp_path / "sts.csv", "sts", ["a", "b"], torch.tensor([1.23456, 5.0]))
    write_predictions(tmp_path / "para.csv", "quora", ["x"], torch.tensor([1.0]))
    assert (tmp_path / "sts.csv").read_text() == "id \t Predicted_Similiarity \na , 1.2346 \nb , 5.0000 \n"
    assert (tmp_path / "para.csv").read_text() == "id \t Predicted_Is_Paraphrase \nx , 1 \n"
