"""Config checking, schedules, PCGrad math, heads and prediction-file format (no DeepSpeed)."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

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


def _grouped(size=1000, batch=8, window=5, seed=3):
    lengths = np.random.default_rng(9).integers(3, 64, size)
    return TaskSampler(size, seed, 1, lengths, batch, window), TaskSampler(size, seed, 1), lengths


def test_length_grouped_sampler_reorders_within_windows_only():
    grouped, plain, lengths = _grouped()
    batch, span = 8, 40  # window of 5 batches
    g, p = grouped.take(1000), plain.take(1000)
    assert sorted(g) == list(range(1000))  # every example once per pass
    for start in range(0, 1000, span):  # each window: the plain permutation's examples, regrouped
        assert sorted(g[start:start + span]) == sorted(p[start:start + span])
        batches = [g[b:b + batch] for b in range(start, min(start + span, 1000), batch)]
        bounds = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
        # the window is sorted: the batches' length ranges do not interleave
        assert all(hi_a <= lo_b for (_, hi_a), (lo_b, _) in zip(bounds, bounds[1:]))
    # batches hold similar lengths: much less padding than random batches
    waste = lambda order: sum(lengths[order[b:b + batch]].max() * batch - lengths[order[b:b + batch]].sum()
                              for b in range(0, 1000, batch))
    assert waste(g) < 0.3 * waste(p)
    # the batch order within a window is shuffled, not always longest first
    firsts = [lengths[g[s:s + batch]].max() for s in range(0, 1000, span)]
    maxes = [lengths[g[s:s + span]].max() for s in range(0, 1000, span)]
    assert any(f < m for f, m in zip(firsts, maxes))


def test_length_grouped_sampler_is_seeded_and_resumes():
    a, _, _ = _grouped()
    b, _, _ = _grouped()
    assert a.take(1500) == b.take(1500)  # crosses into the second pass
    c, _, _ = _grouped(seed=4)
    assert a.take(100) != c.take(100)
    a.take(37)
    state = a.state_dict()
    rest = a.take(900)
    d, _, _ = _grouped()
    d.load_state_dict(state)
    assert d.take(900) == rest
    with pytest.raises(ValueError, match="lengths has 3 entries for 10 examples"):
        TaskSampler(10, 0, 0, np.ones(3))


def test_build_samplers_groups_by_token_length(data_dir):
    from minbert import Tokenizer
    from train.data import load_task
    from train.tasks import build_samplers

    cfg = from_dict(TrainConfig, {"data": {"group_by_length": True, "group_window": 4},
                                  "deepspeed": {"global_batch": 16, "micro_batch_per_device": 8}})
    data = {t: load_task(t, "dev", data_dir, warn=False).examples[:200] for t in ("sst", "quora")}
    samplers = build_samplers(cfg, data, Tokenizer.from_pretrained())
    s = samplers["quora"]
    assert s.lengths is not None and s.window == 2 and s.batch == 16  # 4 micro-batches of 8
    tok = Tokenizer.from_pretrained()
    e = data["quora"][0]
    assert s.lengths[0] == int(tok([e.sentence1], [e.sentence2], max_length=128).attention_mask.sum())
    assert build_samplers(from_dict(TrainConfig, {}), data, tok)["sst"].lengths is None
    with pytest.raises(ConfigError, match="data.group_window must be >= 1"):
        from_dict(TrainConfig, {"data": {"group_window": 0}})


# ----------------------------------------------------------------------------- the train step's reads
def _bare_trainer(tmp_path, device="cpu", world=1):
    """A Trainer without DeepSpeed: only what the reductions use."""
    from train.loop import Trainer

    t = Trainer.__new__(Trainer)
    t.device, t.world, t.rank, t.out_dir, t.step = torch.device(device), world, 0, tmp_path, 0
    return t


def test_collectives_run_on_the_trainers_device(tmp_path, monkeypatch):
    """NCCL takes device tensors only: every collective of the trainer gets its tensor on the
    trainer's device ('meta' here, so a CPU tensor cannot pass by accident)."""
    import torch.distributed as dist

    from train import tasks

    seen = []

    class Stop(Exception):
        pass

    def fake_all_reduce(t, op=None):
        seen.append(("all_reduce", t.device))

    def fake_all_gather(parts, t):
        seen.append(("all_gather", t.device))
        raise Stop  # 'meta' tensors cannot be read back; the device is what is checked

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    trainer = _bare_trainer(tmp_path, "meta", world=2)
    trainer._all_reduce_sum([1.0, 2.0])
    trainer._all_reduce_sum(torch.ones(3))  # a CPU tensor is moved first
    trainer._all_reduce_sum(torch.ones(3, device="meta"))
    monkeypatch.setattr(tasks, "_world", lambda: (0, 2))
    with pytest.raises(Stop):
        tasks.sharded_map(lambda batch: torch.zeros(len(batch), device="meta"), list(range(5)), 2,
                          lambda i: i, device=torch.device("meta"))
    assert seen == [("all_reduce", torch.device("meta"))] * 3 + [("all_gather", torch.device("meta"))]


def test_release_shared_buffers_removes_one_ranks_or_one_ports_buffers(tmp_path, monkeypatch):
    from train import stage

    monkeypatch.setattr(stage, "SHM_DIR", tmp_path)
    uid = os.getuid()
    names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{port}_{rank}" for port in (4107, 41070) for rank in (0, 1)]
    names.append(f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_4107_0")  # another user's
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    left = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    assert stage.release_shared_buffers(4107, rank=1, addr="127.0.0.1") == 1
    assert left() == sorted(set(names) - {names[1]})
    assert stage.release_shared_buffers("4107") == 1  # rank 0 of that port; not 41070, not the other uid
    assert left() == sorted(names[2:])
    assert stage.release_shared_buffers(4107) == 0


def test_a_process_group_leaves_no_shared_buffer_behind(tmp_path):
    """DeepSpeed's CPU accelerator creates the buffer under the name ``shared_buffers`` looks for
    (seen while the group is up), and the exit hook removes it."""
    import subprocess
    import sys

    from train.stage import SHM_DIR, shared_buffers

    if not SHM_DIR.is_dir():
        pytest.fail(f"{SHM_DIR} is missing: the CPU all-reduce buffers live there on Linux")
    code = ("import os, json; from train.stage import init_distributed, shared_buffers; init_distributed(); "
            "port = os.environ['MASTER_PORT']; print(json.dumps([port, [str(p) for p in shared_buffers(port, 0)]]))")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env["LOCAL_SIZE"] = "1"  # what the deepspeed launcher sets: all ranks on this node, so the buffer is used
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr[-2000:]
    port, during = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(during) == 1, f"no buffer named like DeepSpeed's while the group was up: {during}"
    assert shared_buffers(port) == [], "the exit hook left the buffer in /dev/shm"


def test_a_window_of_losses_is_reduced_and_a_late_nan_names_its_step(tmp_path):
    from train.loop import StepResult, TrainingError

    trainer = _bare_trainer(tmp_path)
    steps = [StepResult(3, ["sst"], torch.tensor([0.5]), 32, 100, 160, 0.1),
             StepResult(4, ["quora", "sts"], torch.tensor([0.25, 2.0]), 64, 300, 400, 0.1)]
    trainer.step = 4
    losses, tokens = trainer._check_finite(steps)
    assert losses == [{"sst": 0.5}, {"quora": 0.25, "sts": 2.0}] and tokens == 400
    steps.append(StepResult(5, ["sts"], torch.tensor([1.0]), 32, 10, 20, 0.1))
    steps[1].losses[1] = float("nan")  # step 4's sts loss; the window is read at step 6
    trainer.step = 6
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 4 on task 'sts' "
                                            r"\(seen at step 6\); stopping\. The last good checkpoint "
                                            r"is none"):
        trainer._check_finite(steps)


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


def test_pcgrad_projection_reads_nothing_back(monkeypatch):
    """The conflict tests stay on the device: Tensor.__bool__ / .item() patched to raise."""
    g = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    want = pcgrad.project(g.clone(), order_seed=4)

    def forbidden(*args, **kwargs):
        raise AssertionError("a host read in pcgrad.project")

    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    got = pcgrad.project(g.clone(), order_seed=4)
    monkeypatch.undo()
    assert torch.equal(got, want)
    # task 0 and 1 conflict (dot -1): each loses its component along the other
    assert float(torch.dot(got, g[0])) >= 0 and float(torch.dot(got, g[1])) >= 0


def test_samplers_take_each_tasks_batch_in_windows_of_the_same_micro_batches():
    """A task's own global batch changes its step's examples, not the length-grouping window:
    group_window micro-batches of every task are the same number of steps."""
    from train.config import TrainConfig, from_dict
    from train.tasks import build_samplers

    cfg = from_dict(TrainConfig, {"tasks": {"sts": {"global_batch": 4}}, "data": {"group_window": 20},
                                  "deepspeed": {"global_batch": 8, "micro_batch_per_device": 2}})
    samplers = build_samplers(cfg, {"sst": list(range(50)), "sts": list(range(50))}, tokenizer=None)
    assert (samplers["sst"].batch, samplers["sts"].batch) == (8, 4)
    assert samplers["sst"].window == samplers["sts"].window == 5  # 20 x 2 / 8 steps


# ----------------------------------------------------------------------------- layer-wise lr decay
def _group_lrs(model, **optim) -> dict[str, float]:
    from train.stage import param_groups

    cfg = from_dict(TrainConfig, {"optim": {"lr": 1e-4, "head_lr": 1e-3, **optim}})
    groups = param_groups(cfg, model)
    ids = {id(p): name for name, p in model.named_parameters()}
    lrs = {ids[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert len(lrs) == sum(p.requires_grad for p in model.parameters())  # each parameter once
    return lrs


def test_layer_decay_scales_each_encoder_layer_and_leaves_the_top_alone():
    """optim.layer_decay 0.5 over 3 encoder layers: the embeddings at lr x 0.5^4, layer i at
    lr x 0.5^(3 - i); the pooler and a head's own (copied) layer at lr; heads at head_lr; weight
    decay still off on biases and LayerNorm weights; 1.0 gives every encoder tensor lr."""
    bert = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32))
    model = MultitaskBert(bert, MultitaskSpec({"sst": HeadSpec(layer=2, head_layers=1), "sts": HeadSpec()}))
    lrs = _group_lrs(model, layer_decay=0.5)
    expected = {"bert.embeddings.word_embeddings.weight": 1e-4 / 16,
                "bert.embeddings.LayerNorm.bias": 1e-4 / 16,
                "bert.encoder.layer.0.attention.self.query.weight": 1e-4 / 8,
                "bert.encoder.layer.1.output.dense.bias": 1e-4 / 4,
                "bert.encoder.layer.2.intermediate.dense.weight": 1e-4 / 2,
                "bert.pooler.dense.weight": 1e-4}
    for name, lr in expected.items():
        assert lrs[name] == pytest.approx(lr, rel=1e-12), name
    own = [n for n in lrs if n.startswith("head_layers.")]
    heads = [n for n in lrs if n.startswith("heads.")]
    assert own and heads
    assert all(lrs[n] == pytest.approx(1e-4) for n in own) and all(lrs[n] == pytest.approx(1e-3) for n in heads)
    assert set(_group_lrs(model).values()) == {1e-4, 1e-3}  # off by default
    from train.stage import param_groups

    cfg = from_dict(TrainConfig, {"optim": {"layer_decay": 0.5, "weight_decay": 0.01}})
    for g in param_groups(cfg, model):
        names = {n for n, p in model.named_parameters() if any(p is q for q in g["params"])}
        no_decay = {n.endswith("bias") or "LayerNorm" in n for n in names}
        assert no_decay == {g["weight_decay"] == 0.0}, names
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        from_dict(TrainConfig, {"optim": {"layer_decay": 0.0}})
