"""Training scenarios for tests/train/test_training.py, run in one process group.

    deepspeed --num_gpus 2 tests/train/ds_worker.py --checkpoint DIR --data DIR --out DIR --scenarios a,b
    python tests/train/ds_worker.py ...            # one process

Each scenario trains a few steps of a tiny BERT and rank 0 writes its per-step losses (and what
else the tests check) to ``OUT/results.json``, and each scenario's seconds to ``OUT/timings.json``
(on 2 CPU ranks the Triton-interpreter scenarios take about half of the launch). Starting
DeepSpeed once for several scenarios keeps the tests fast. The 2-rank scenarios that use
collectives outside the trainer (``sigterm``, ``truncated``) need a process group of 2.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.config import ConfigError, TrainConfig, from_dict  # noqa: E402
from minbert.heads import MultitaskBert  # noqa: E402
from minbert.model import BertModel  # noqa: E402
from train.checkpoints import list_checkpoints, read_latest, verify  # noqa: E402
from train.loop import Trainer, TrainingError  # noqa: E402
from train.simcse import SimCSEStage  # noqa: E402
from train.stage import STOP  # noqa: E402

NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "head_dropout": 0.0}
SMALL_TASKS = {t: {"max_train": 48, "max_eval": 8, "max_length": 32} for t in ("sst", "quora", "sts")}


def base(checkpoint: str, **changes) -> dict:
    cfg = {
        "name": "test", "seed": 3, "epochs": 1, "steps_per_epoch": 6, "eval_batch_size": 8,
        "log_every": 1,
        "model": {"checkpoint": checkpoint, "kernels": "eager", **NO_DROPOUT},
        "tasks": copy.deepcopy(SMALL_TASKS),
        "schedule": {"kind": "round_robin"},
        "optim": {"name": "adamw", "lr": 1e-3, "warmup_ratio": 0.0},
        "deepspeed": {"zero_stage": 2, "bf16": True, "global_batch": 8, "micro_batch_per_device": 4},
    }
    for key, value in changes.items():  # "a.b" -> nested
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


# options that also run under ZeRO-3 (parameters partitioned over the ranks), as "<name>-zero3"
ZERO3_OPTIONS = ("lora", "mid-layer", "pair-heads", "joint-simcse", "task-batch")


def scenarios(checkpoint: str, world: int) -> dict[str, dict]:
    micro = 8 // world  # the same global batch (8) on any world size
    table = {
        **{f"zero{s}": base(checkpoint, **{"deepspeed.zero_stage": s,
                                          "deepspeed.micro_batch_per_device": micro}) for s in (0, 1, 2)},
        # the padded encoder (BertConfig.unpad off) on the same batches as zero2 (unpadded)
        "zero2-padded": base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                            "model.unpad": False}),
        "zero2-fused": base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                           "optim.name": "fused_adamw"}),
        "pcgrad": base(checkpoint, pcgrad=True, **{"schedule.kind": "superbatch",
                                                   "deepspeed.micro_batch_per_device": micro}),
        # Dropout on and fp32: resuming must restore the RNG as well as the model and optimizer.
        "fp32": base(checkpoint, **{"deepspeed.bf16": False, "deepspeed.micro_batch_per_device": micro,
                                    "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
                                    "model.head_dropout": 0.1}),
        "learn": base(checkpoint, steps_per_epoch=24, **{"schedule.kind": "superbatch",
                                                         "deepspeed.micro_batch_per_device": micro,
                                                         "tasks.quora.enabled": False,
                                                         "model.hidden_dropout": 0.1}),
        # SimCSE stage then a multitask start from it; no dropout: deterministic, so 2 ranks and
        # 1 process (same global batch of 8 triples) can be compared step by step
        "simcse-sup": base(checkpoint, simcse=dict(SIMCSE, mode="sup"),
                           **{"deepspeed.micro_batch_per_device": micro}),
        "simcse-unsup": base(checkpoint, simcse=dict(SIMCSE, mode="unsup", max_steps=16),
                             **{"deepspeed.micro_batch_per_device": micro, "model.hidden_dropout": 0.1}),
        # the stage's first-step gradient in fp32: the reference the bf16 gradients are held to
        "simcse-sup-fp32": base(checkpoint, simcse=dict(SIMCSE, mode="sup", max_steps=1, eval_max=4),
                                **{"deepspeed.micro_batch_per_device": micro, "deepspeed.bf16": False}),
        # the Triton kernels (Triton's interpreter on CPU) against eager inside bf16 training steps:
        # head dim 32, SST only (the interpreter's cost grows with the tokens), padded batches
        # spanning several key tiles (kernels_scenario)
        # model.freeze: the whole encoder (heads only), and layer 0 of 2 under ZeRO-2 and -3
        "freeze-encoder": base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                              "model.freeze": "encoder", "optim.head_lr": 1e-2}),
        **{f"freeze-layers{suffix}": base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                                         "deepspeed.zero_stage": stage,
                                                         "model.freeze": "layers:0-0"})
           for suffix, stage in (("", 2), ("-zero3", 3))},
        "mid-layer": base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                         "tasks.sst.layer": 1, "tasks.sst.head_layers": 1,
                                         "tasks.sst.head_init": "random", "tasks.quora.layer": 1,
                                         "tasks.quora.head_layers": 1}),
        "pair-heads": base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                          "tasks.quora.form": "bi", "tasks.sts.form": "bi",
                                          "tasks.quora.features": ["u", "abs_diff", "cos"],
                                          "tasks.sts.features": ["u", "abs_diff", "cos"],
                                          "tasks.sts.target": "0-1", "tasks.sts.output": "sigmoid",
                                          "tasks.shared_pair_head": True}),
        "joint-simcse": base(checkpoint, simcse={"joint_weight": 0.5, "temperature": 0.1},
                             **{"deepspeed.micro_batch_per_device": micro, "model.hidden_dropout": 0.1}),
        **{name: base(checkpoint, epochs=2, steps_per_epoch=3, **{
            "schedule.kind": "superbatch", "deepspeed.micro_batch_per_device": micro // 2}, **extra)
           for name, extra in (("pcgrad-from-2", {"pcgrad_from_epoch": 2}), ("superbatch", {}))},
        "task-batch": base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                          "tasks.sst.global_batch": 16, "tasks.sts.global_batch": 4}),
        "smart": base(checkpoint, smart={"enabled": True, "weight": 1.0, "bregman_weight": 1.0,
                                         "momentum": 0.5, "noise_std": 1e-3, "step_size": 1e-2,
                                         "epsilon": 1e-2},
                      **{"deepspeed.micro_batch_per_device": micro}),
        "lora": base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                    "model.lora": {"r": 4, "alpha": 8.0, "dropout": 0.0,
                                                   "targets": ["query", "key", "value",
                                                               "intermediate.dense"]}}),
        "early-stop": base(checkpoint, epochs=4, steps_per_epoch=2, early_stopping_patience=1,
                           **{"deepspeed.micro_batch_per_device": micro, "optim.lr": 1e-12}),
        "stop-after": base(checkpoint, epochs=3, steps_per_epoch=2, stop_after_epoch=2,
                           **{"deepspeed.micro_batch_per_device": micro}),
        "stop-after-full": base(checkpoint, epochs=3, steps_per_epoch=2,
                                **{"deepspeed.micro_batch_per_device": micro}),
        **{f"kernels-{k}": base(checkpoint, steps_per_epoch=KERNEL_STEPS, **{
            "deepspeed.micro_batch_per_device": micro, "model.kernels": k, "tasks.quora.enabled": False,
            "tasks.sts.enabled": False, "tasks.sst.max_eval": 4, "tasks.sst.max_length": 48})
           for k in ("eager", "triton")},
    }
    for name in ZERO3_OPTIONS:
        cfg = copy.deepcopy(table[name])
        cfg["deepspeed"]["zero_stage"] = 3
        table[f"{name}-zero3"] = cfg
    for name, changes in OPTION_SETS.items():
        for k in ("eager", "triton"):
            table[f"{name}-{k}"] = base(checkpoint, **{"deepspeed.micro_batch_per_device": micro,
                                                       "model.kernels": k, **copy.deepcopy(changes)})
        for stage in (0, 1):  # eager, ZeRO-0 and -1 (the sets run ZeRO-2)
            cfg = copy.deepcopy(table[f"{name}-eager"])
            cfg["deepspeed"]["zero_stage"] = stage
            table[f"{name}-zero{stage}"] = cfg
    return table


# Every option, on each kernels backend (Triton: its interpreter on CPU), in three sets (LoRA
# freezes the encoder that set b's frozen layers and SMART's embeddings need; SMART and joint
# SimCSE are refused with PCGrad). No dropout: the two backends differ by kernel rounding only.
# Short sequences keep the interpreter fast.
_SHORT = {f"tasks.{t}.max_length": 24 for t in ("sst", "quora", "sts")}
OPTION_SETS = {
    "options-a": {  # round robin, 6 steps: each task twice
        **_SHORT, "model.lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["query", "value"]},
        "tasks.sst.layer": 1, "tasks.sst.head_layers": 1, "tasks.sst.head_init": "random",
        "tasks.quora.form": "bi", "tasks.sts.form": "bi", "tasks.quora.features": ["u", "abs_diff", "cos"],
        "tasks.sts.features": ["u", "abs_diff", "cos"], "tasks.sts.target": "0-1",
        "tasks.sts.output": "sigmoid", "tasks.shared_pair_head": True, "tasks.sts.global_batch": 4,
        "simcse": {"joint_weight": 0.5, "temperature": 0.1}},
    "options-b": {  # round robin, 6 steps
        **_SHORT, "model.freeze": "layers:0-0", "tasks.quora.layer": 1, "tasks.quora.head_layers": 1,
        "smart": {"enabled": True, "weight": 1.0, "bregman_weight": 1.0, "momentum": 0.5,
                  "noise_std": 1e-3, "step_size": 1e-2, "epsilon": 1e-2}},
    "options-c": {  # superbatch, 2 epochs of 2 steps, PCGrad in the second
        **_SHORT, "model.freeze": "embeddings", "tasks.sts.layer": 1, "schedule.kind": "superbatch",
        "pcgrad_from_epoch": 2, "epochs": 2, "steps_per_epoch": 2},
}


KERNEL_STEPS = 4
KERNEL_TILE = 16  # attention tiles of 16 x 16 in the Triton run: SST batches of 4 span 2-3 key tiles


SIMCSE = {"enabled": True, "global_batch": 8, "max_examples": 256, "max_steps": 6, "eval_max": 24,
          "max_length": 24, "lr": 1e-3, "temperature": 0.1}


def _save_first_step_grads(stage, path: Path) -> None:
    """Record the full (all ranks') fp32 gradient of every parameter at the stage's first step,
    after the backward and before the optimizer step; rank 0 saves it to ``path``."""
    import torch
    from deepspeed.utils import safe_get_full_grad

    real_step = stage.engine.step

    def step(*args, **kwargs):
        if not path.exists() and stage.step == 0:
            grads = {n: safe_get_full_grad(p).detach().float().cpu().clone()  # a collective
                     for n, p in stage.engine.module.named_parameters()}
            if stage.rank == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(grads, path)
        return real_step(*args, **kwargs)

    stage.engine.step = step


def simcse_fp32_grads(table, data, out) -> dict:
    """One fp32 step of the supervised stage; only its first-step gradient is kept."""
    stage = SimCSEStage(from_dict(TrainConfig, table["simcse-sup-fp32"]), data, out, progress=False)
    _save_first_step_grads(stage, out / "grads_step1.pt")
    stage.run()
    stage.close()
    return {"grads_step1": str(out / "grads_step1.pt")}


def simcse_scenario(cfg: TrainConfig, data: str, out: Path) -> dict:
    """Run the stage, then build the multitask trainer from its result (no multitask steps)."""
    stage = SimCSEStage(cfg, data, out, progress=False)
    _save_first_step_grads(stage, out / "grads_step1.pt")
    report = stage.run()
    stage.close()
    trainer = Trainer(cfg, data, out, progress=False, init_checkpoint=out / "simcse")
    exported = BertModel.from_pretrained(out / "simcse").state_dict()
    start = trainer.engine.module.bert.state_dict()
    # the multitask engine holds bf16 copies of the exported fp32 weights
    mismatch = max(float((start[k].float() - v.to(start[k].dtype).float()).abs().max())
                   for k, v in exported.items())
    return {"losses": stage.losses, "report": report, "start_mismatch": mismatch,
            "gather_check": gather_check(), "grads_step1": str(out / "grads_step1.pt")}


def gather_check() -> dict:
    """``gather_rows`` + the world-size loss scale + DeepSpeed-style gradient averaging give the
    gradient of the whole batch's loss (computed here on one process for comparison)."""
    import torch
    import torch.distributed as dist

    import kernels
    from train.simcse import gather_rows

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same data and weights on every rank
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x, y, h = (torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(3))
    n = 8 // world
    mine = slice(rank * n, (rank + 1) * n)
    w_dist = w.clone().requires_grad_()
    z1, z2, hn = (gather_rows(t[mine] @ w_dist.T) for t in (x, y, h))
    loss = kernels.simcse_loss_ref(z1, z2, 0.5, hn)
    (loss * world).backward()
    grad = w_dist.grad.clone()
    dist.all_reduce(grad)
    grad /= world
    w_full = w.clone().requires_grad_()
    full = kernels.simcse_loss_ref(x @ w_full.T, y @ w_full.T, 0.5, h @ w_full.T)
    full.backward()
    return {"loss_diff": abs(float(loss) - float(full)),
            "grad_diff": float((grad - w_full.grad).abs().max()), "grad_scale": float(w_full.grad.abs().max())}


def kernels_scenario(table, data, out, backend: str) -> dict:
    """A few bf16 steps with ``model.kernels`` = ``backend``. The Triton run uses attention tiles of
    ``KERNEL_TILE`` (a launcher configuration the kernels take at any size) so that the short SST
    sentences span several key tiles, and records what the kernels saw: launches by kernel, the
    longest padded length and whether any key was padding."""
    import importlib

    from kernels.testing import count_launches

    if backend == "eager":
        trainer = _trainer(table["kernels-eager"], data, out)
        trainer.fit()
        return {"losses": trainer.step_losses}
    A = importlib.import_module("kernels.attention")
    tile = A._Tile(KERNEL_TILE, KERNEL_TILE, 4, 2)
    A._CONFIGS[(32, "16")] = A._AttentionConfig(tile, tile, tile)
    seen = {"max_len": 0, "padded": False}
    real_fwd = A._attention_fwd_checked  # what the minbert::attention op runs

    def attention_fwd(q, k, v, key_padding_mask, *args, **kwargs):
        seen["max_len"] = max(seen["max_len"], q.shape[2])
        seen["padded"] |= key_padding_mask is not None and not bool(key_padding_mask.all())
        return real_fwd(q, k, v, key_padding_mask, *args, **kwargs)

    V = importlib.import_module("kernels.attention_varlen")  # the unpadded model's path
    real_varlen_fwd = V._varlen_fwd_checked  # what the minbert::attention_varlen op runs

    def attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs):
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()
        seen["max_len"] = max(seen["max_len"], int(lens.max()) if len(lens) else 0)
        seen["padded"] |= bool((lens != lens.max()).any())  # sequences of unequal lengths
        return real_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs)

    A._attention_fwd_checked, V._varlen_fwd_checked = attention_fwd, attention_varlen_fwd
    try:
        with count_launches() as launched:
            trainer = _trainer(table["kernels-triton"], data, out)
            trainer.fit()
    finally:
        A._attention_fwd_checked, V._varlen_fwd_checked = real_fwd, real_varlen_fwd
    return {"losses": trainer.step_losses, "launches": dict(launched), **seen, "tile": KERNEL_TILE}


# ----------------------------------------------------------------------------- run, stop, resume
def _trainer(cfg: dict, data: str, out: Path, **kwargs) -> Trainer:
    return Trainer(from_dict(TrainConfig, cfg), data, out, progress=False, **kwargs)


def _rank0_stderr(fn):
    """``fn()``, and what rank 0 wrote to stderr meanwhile."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        value = fn()
    return value, buf.getvalue()


def _all_ranks(value):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _log_records(run_dir: Path) -> list[dict]:
    """Every record of a run's ``log.jsonl``, in order."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def fp32_resume(table, data, out):
    """Stop after 2 steps (checkpoint); 2 more steps are logged but never saved (a crash); a new
    trainer resumes from step 2 and must not log those steps twice."""
    first = _trainer(table["fp32"], data, out)
    first.fit(stop_after=2)
    for _ in range(2):
        first.after_step(first.train_step(), _NoBar())
    second = _trainer(table["fp32"], data, out, resume=out)
    second.fit()
    log = _log_records(out)
    return {"first": first.step_losses[:2], "second": second.step_losses,
            "logged_steps": [r["step"] for r in log if "loss" in r]}


class _NoBar:
    def set_postfix(self, **kwargs):
        pass


def sigterm(table, data, out):
    """SIGTERM to rank 0 after step 3 of 6: every rank saves at the next check (step 4, with
    stop_check_every 2) and returns; a new trainer resumes and finishes the run."""
    cfg = dict(table["fp32"], stop_check_every=2)
    trainer = _trainer(cfg, data, out)
    real_after_step = trainer.after_step

    def after_step(result, bar):
        real_after_step(result, bar)
        if trainer.step == 3 and trainer.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.after_step = after_step
    trainer.fit()
    stopped = _all_ranks(trainer.stopped)
    STOP.clear()
    resumed = _trainer(cfg, data, out, resume=out)
    resumed.fit()
    ckpt = Path(stopped[0]["checkpoint"])
    return {"stopped": stopped, "first": trainer.step_losses, "second": resumed.step_losses,
            "history": resumed.history, "checkpoint_problem": verify(ckpt),
            "best_step": json.loads((out / "best" / "multitask.json").read_text())["step"]}


def truncated(table, data, out):
    """Checkpoints at steps 2 and 4; a file of step 4 is cut short: resuming falls back to step 2
    with a warning naming the file, and the run then ends as an uninterrupted one does. A config
    with another subset size is refused, naming the key."""
    cfg = dict(table["zero2"], save_every_steps=2, keep_checkpoints=3)
    first = _trainer(cfg, data, out)
    first.fit(stop_after=4)
    damaged = out / "checkpoints" / "step0000004" / "mp_rank_00_model_states.pt"
    dist.barrier()
    if first.rank == 0:
        with open(damaged, "r+b") as f:
            f.truncate(damaged.stat().st_size // 2)
    dist.barrier()
    resumed, warning = _rank0_stderr(lambda: _trainer(cfg, data, out, resume=out))
    resumed_step = resumed.step
    resumed.fit()
    changed = copy.deepcopy(cfg)
    changed["tasks"]["sst"]["max_train"] = 40
    try:
        _trainer(changed, data, out, resume=out)
        refused = None
    except ConfigError as e:
        refused = str(e)
    root = out / "checkpoints"
    return {"damaged": str(damaged), "warning": warning, "resumed_step": resumed_step,
            "losses": first.step_losses[:2] + resumed.step_losses, "refused": refused,
            "left": [p.name for _, p in list_checkpoints(root)], "latest": read_latest(root).name,
            "problems": [verify(p) for _, p in list_checkpoints(root)]}


def simcse_resume(table, data, out):
    """The SimCSE stage on the skeleton: stopped after 3 of 6 steps, resumed to the end."""
    cfg = from_dict(TrainConfig, table["simcse-sup"])
    stage = SimCSEStage(cfg, data, out, progress=False)
    stage.before = stage.evaluate()
    stage.fit(stop_after=3)
    stage.close()
    again = SimCSEStage(cfg, data, out, progress=False, resume=out)
    resumed_step = again.step
    report = again.run()
    again.close()
    return {"resumed_step": resumed_step, "losses": again.losses, "report": report,
            "checkpoints_left": (out / "simcse-checkpoints").exists()}


def offload(table, data, out):
    """ZeRO-Offload from the user's own DeepSpeed JSON, batch sizes and precision "auto"."""
    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "cpu"},
                                  "reduce_bucket_size": "auto", "overlap_comm": False}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ds_user.json").write_text(json.dumps(user))
    cfg = copy.deepcopy(table["zero2"])
    cfg["deepspeed"]["config_file"] = str(out / "ds_user.json")
    cfg["optim"]["name"] = "auto"  # on an offloaded optimizer: DeepSpeed's CPU Adam
    trainer = _trainer(cfg, data, out)
    trainer.fit()
    return {"losses": trainer.step_losses, "ds_config": trainer.ds_config,
            "optimizer": type(trainer.engine.optimizer.optimizer).__name__}


def freeze_scenario(table, data, out, which):
    """Train with ``model.freeze``; compare the full (gathered) weights before and after: which
    tensors moved, whether any moved that should not, and what the optimizer holds."""
    trainer = _trainer(table[which], data, out)
    before = {k: v.float().clone() for k, v in trainer.gathered_state().items()}
    trainer.fit()
    after = trainer.gathered_state()
    changed = sorted(k for k, v in after.items() if not torch_equal(v.float(), before[k]))
    unchanged = sorted(k for k in after if k not in changed)
    frozen = sorted(n for n, p in trainer.engine.module.named_parameters() if not p.requires_grad)
    # the parameters the optimizer was handed (DeepSpeed flattens them: count elements)
    in_optimizer = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    return {"changed": changed, "unchanged": unchanged, "frozen": frozen,
            "optimizer_elements": in_optimizer, **trainer.trainable,
            "losses": trainer.step_losses}


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def early_stop_scenario(table, data, out):
    """Four epochs of 2 steps at a learning rate too small to change a bf16 weight: dev overall
    never improves after epoch 1, so patience 1 ends the run after epoch 2; the best export stays
    epoch 1's; resuming the run's last checkpoint trains nothing more."""
    cfg = table["early-stop"]
    trainer = _trainer(cfg, data, out)
    result = trainer.fit()
    best = json.loads((out / "best" / "multitask.json").read_text())
    resumed = _trainer(cfg, data, out, resume=out)
    again = resumed.fit()
    log = _log_records(out)
    return {"steps": trainer.step, "history": trainer.history, "finished_early": result["finished_early"],
            "best_step": best["step"], "resumed_step": resumed.step, "resumed_result": again["finished_early"],
            "early_stop_logged": [r["early_stop"] for r in log if "early_stop" in r]}


def stop_after_scenario(table, data, out):
    """``stop_after_epoch: 2`` of 3 epochs beside the full 3 epochs: the steps (losses, learning
    rates) each logs, where the cut run ended, and what its resume trains."""
    def steps(run_dir):
        return [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in _log_records(run_dir) if "loss" in r]

    full = _trainer(table["stop-after-full"], data, out / "full")
    full.fit()
    cut = _trainer(table["stop-after"], data, out / "cut")
    result = cut.fit()
    resumed = _trainer(table["stop-after"], data, out / "cut", resume=out / "cut")
    again = resumed.fit()
    best = json.loads((out / "cut" / "best" / "multitask.json").read_text())
    return {"full": steps(out / "full"), "cut": steps(out / "cut"), "cut_step": cut.step,
            "total_steps": cut.total_steps, "finished_early": result["finished_early"],
            "epochs": [h["epoch"] for h in cut.history], "best_step": best["step"],
            "resumed_step": resumed.step, "resumed_result": again["finished_early"]}


def export_scenario(table, data, out, name):
    """Train; the export must reload with the same heads and weights. ``mid-layer``: heads on
    layer 1 of 2 with their own layers (SST: one random, Quora: one copied from encoder layer 2
    of 2), STS on the last layer. ``pair-heads``: bi-encoder Quora and STS with chosen features,
    one shared projection, STS trained on a sigmoid 0-1 scale."""
    import torch

    from train.export import load_multitask

    trainer = _trainer(table[name], data, out)
    trainer.fit()
    state = trainer.gathered_state()
    model, _ = load_multitask(out / "best")
    loaded = model.state_dict()
    head_layer_keys = sorted(k for k in state if k.startswith("head_layers."))
    return {"losses": trainer.step_losses, "history": trainer.history,
            "spec": model.spec.to_dict(), "head_layer_keys": head_layer_keys,
            "own_keys": sorted(k for k in state if not k.startswith("bert.")),
            "export_matches": all(torch.equal(loaded[k].float(), state[k].float()) for k in state)}


def lora_scenario(table, data, out):
    """LoRA r=4 on query/key/value and the feed-forward input: the base encoder tensors stay bit
    for bit, the adapters and heads move, and the export is the merged plain BERT (W + s B A of
    the trained state) that transformers loads."""
    import torch
    import transformers

    from minbert.lora import merge_lora

    trainer = _trainer(table["lora"], data, out)
    before = {k: v.clone() for k, v in trainer.gathered_state().items()}
    trainer.fit()
    after = trainer.gathered_state()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    merged = merge_lora(after)
    hf = transformers.BertModel.from_pretrained(out / "best", attn_implementation="eager")
    hf_state = hf.state_dict()
    export_diff = max(float((hf_state[k[len("bert."):]].float() - v).abs().max())
                      for k, v in merged.items() if k.startswith("bert.") and k[len("bert."):] in hf_state)
    return {"changed": changed, "trainable_parameters": trainer.trainable["trainable_parameters"],
            "parameters": trainer.trainable["parameters"], "export_diff": export_diff,
            "merged_moved": sorted(k for k in merged if k.startswith("bert.")
                                   and not torch.equal(merged[k], before[k])),
            "losses": trainer.step_losses}


@contextlib.contextmanager
def _recorded(owner, name: str, record):
    """Inside the block, every call of ``owner.name`` first hands its arguments to ``record``."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        record(*args, **kwargs)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, real)


def joint_simcse_scenario(table, data, out):
    """simcse.joint_weight 0.5 with dropout on, and the same run at weight 0: the rows each
    contrastive loss saw (every rank's micro-batch gathered), its logged values, and both runs'
    task losses (equal at step 1, apart after the joint gradient's first update)."""
    import train.loop as loop

    rows = []
    with _recorded(loop.kernels, "simcse_loss", lambda z1, *rest, **kw: rows.append(int(z1.shape[0]))):
        on = _trainer(table["joint-simcse"], data, out / "on")
        on.fit()
    off_cfg = copy.deepcopy(table["joint-simcse"])
    off_cfg["simcse"]["joint_weight"] = 0.0
    off = _trainer(off_cfg, data, out / "off")
    off.fit()
    return {"rows": rows, "on": on.step_losses, "off": off.step_losses}


def smart_scenario(table, data, out):
    """SMART on (weight 1, Bregman 1, momentum 0.5): stop after 3 of 6 steps and resume. The
    logged "smart" term, the momentum copy's distance from its start and from the model, and
    whether the resumed trainer got the copy back as saved."""
    import torch

    cfg = table["smart"]
    first = _trainer(cfg, data, out)
    start = {k: v.clone() for k, v in first.teacher.model.state_dict().items()}
    first.fit(stop_after=3)
    saved = {k: v.clone() for k, v in first.teacher.model.state_dict().items()}
    resumed = _trainer(cfg, data, out, resume=out)
    restored = all(torch.equal(resumed.teacher.model.state_dict()[k], v) for k, v in saved.items())
    resumed.fit()
    model = resumed.gathered_state()
    teacher = resumed.teacher.model.state_dict()
    moved = max(float((teacher[k] - start[k]).abs().max()) for k in start)
    from_model = max(float((teacher[k].float() - model[k]).abs().max()) for k in start if k in model)
    return {"first": first.step_losses, "second": resumed.step_losses, "restored": restored,
            "teacher_moved": moved, "teacher_from_model": from_model}


def pcgrad_from_scenario(table, data, out):
    """pcgrad_from_epoch 2 of 2 (3 steps each) against plain superbatch steps: the projection
    runs only in epoch 2, and epoch 1 (the tasks' gradients summed through the per-task path)
    trains like the plain run."""
    import train.loop as loop

    calls = []
    with _recorded(loop.pcgrad, "project", lambda grads, order_seed: calls.append(order_seed)):
        late = _trainer(table["pcgrad-from-2"], data, out / "late")
        late.fit()
    plain = _trainer(table["superbatch"], data, out / "plain")
    plain.fit()
    return {"project_calls": len(calls), "late": late.step_losses, "plain": plain.step_losses,
            "ds_accum": late.ds_config["gradient_accumulation_steps"]}


def task_batch_scenario(table, data, out):
    """tasks.sst.global_batch 16 and tasks.sts.global_batch 4 beside the default 8 (quora): the
    examples each step's micro-batches hold on this rank, and the schedule's steps per epoch."""
    trainer = _trainer(table["task-batch"], data, out)
    real = trainer._micro_batches
    seen = []

    def recording(task):
        batches = real(task)
        seen.append((task, [int(labels.shape[0]) for _, labels, _ in batches]))
        return batches

    trainer._micro_batches = recording
    trainer.fit()
    return {"seen": seen, "world": trainer.world, "accum": trainer.accum,
            "steps_per_epoch": trainer.steps_per_epoch, "losses": trainer.step_losses}


def options_scenario(table, data, out, name):
    """One option set (``OPTION_SETS``) on one backend: the losses, the Triton launches by kernel,
    the trainable parameters and the PCGrad projections."""
    import train.loop as loop
    from kernels.testing import count_launches

    projections = []
    with count_launches() as launched, \
            _recorded(loop.pcgrad, "project", lambda grads, order_seed: projections.append(order_seed)):
        trainer = _trainer(table[name], data, out)
        trainer.fit()
    return {"losses": trainer.step_losses, "launches": dict(launched), "projections": len(projections),
            **trainer.trainable}


# options whose runs stop at a step (a checkpoint), resume in a new trainer and must log the
# uninterrupted run's losses (the scenario of that name in this launch); pcgrad-from-2 stops at
# step 4 of 6, in its PCGrad epoch
RESUME_OPTIONS = {"lora": 3, "freeze-layers": 3, "mid-layer": 3, "pair-heads": 3, "joint-simcse": 3,
                  "task-batch": 3, "pcgrad-from-2": 4}


def options_resume(table, data, out):
    """Each of ``RESUME_OPTIONS``: stop, resume, the losses of both parts in order."""
    runs = {}
    for name, stop in RESUME_OPTIONS.items():
        first = _trainer(table[name], data, out / name)
        first.fit(stop_after=stop)
        second = _trainer(table[name], data, out / name, resume=out / name)
        second.fit()
        runs[name] = {"first": first.step_losses[:stop], "second": second.step_losses}
    return runs


SCENARIO_RUNNERS = {"fp32-resume": fp32_resume, "sigterm": sigterm, "truncated": truncated,
                    "simcse-resume": simcse_resume, "offload": offload, "simcse-sup-fp32": simcse_fp32_grads,
                    "kernels-eager": lambda *a: kernels_scenario(*a, "eager"),
                    "kernels-triton": lambda *a: kernels_scenario(*a, "triton"),
                    "early-stop": early_stop_scenario, "stop-after": stop_after_scenario,
                    **{n: (lambda *a, n=n: export_scenario(*a, n)) for n in ("mid-layer", "pair-heads")},
                    "lora": lora_scenario, "joint-simcse": joint_simcse_scenario, "smart": smart_scenario,
                    "pcgrad-from-2": pcgrad_from_scenario, "task-batch": task_batch_scenario,
                    **{name: (lambda *a, n=name: freeze_scenario(*a, n))
                       for name in ("freeze-encoder", "freeze-layers", "freeze-layers-zero3")},
                    "options-resume": options_resume,
                    **{f"{n}-{k}": (lambda *a, n=f"{n}-{k}": options_scenario(*a, n))
                       for n in OPTION_SETS for k in ("eager", "triton", "zero0", "zero1")}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", required=True, help="comma-separated; 'fp32-resume' = stop + resume")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    results = {}

    world = int(os.environ.get("WORLD_SIZE", 1))
    table = scenarios(args.checkpoint, world)
    starts = []  # (scenario, its start): timings.json gives each one's seconds, to see where the launch goes
    for name in args.scenarios.split(","):
        starts.append((name, time.perf_counter()))
        if name in SCENARIO_RUNNERS:
            results[name] = SCENARIO_RUNNERS[name](table, args.data, out / name)
            continue
        if name == "nan":  # a loss that turns NaN after a checkpoint: a clear stop, checkpoint kept
            # losses read every 4 steps: the NaN of step 2 is seen at step 4, named as step 2's
            cfg = from_dict(TrainConfig, dict(table["zero2"], log_every=4))
            trainer = Trainer(cfg, args.data, out / name, progress=False)
            trainer.fit(stop_after=1)
            real_loss = MultitaskBert.loss
            MultitaskBert.loss = staticmethod(lambda task, p, y: real_loss(task, p, y) * float("nan"))
            try:
                trainer.fit()
                results[name] = {"error": None}
            except TrainingError as e:
                results[name] = {"error": str(e), "latest": str(read_latest(out / name / "checkpoints"))}
            finally:
                MultitaskBert.loss = staticmethod(real_loss)
            continue
        if name == "interrupted-save":  # a save that dies half-way leaves the previous one usable
            cfg = from_dict(TrainConfig, table["zero2"])
            trainer = Trainer(cfg, args.data, out / name, progress=False)
            trainer.fit(stop_after=1)

            def dying_save(save_dir, tag, **kwargs):
                (Path(save_dir) / tag / "partial.pt").write_bytes(b"half")
                raise KeyboardInterrupt("killed during save")

            trainer.engine.save_checkpoint = dying_save
            trainer.train_step()
            try:
                trainer.save_checkpoint()
            except KeyboardInterrupt:
                pass
            resumed = Trainer(cfg, args.data, out / name, resume=out / name, progress=False)
            results[name] = {"latest": str(read_latest(out / name / "checkpoints")), "resumed_step": resumed.step}
            continue
        if name.startswith("simcse"):
            results[name] = simcse_scenario(from_dict(TrainConfig, table[name]), args.data, out / name)
            continue
        trainer = Trainer(from_dict(TrainConfig, table[name]), args.data, out / name, progress=False)
        trainer.fit()
        results[name] = {"losses": trainer.step_losses, "history": trainer.history,
                         "unpad": trainer.engine.module.bert.config.unpad}
    if int(os.environ.get("RANK", 0)) == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        ends = [t for _, t in starts[1:]] + [time.perf_counter()]
        (out / "timings.json").write_text(json.dumps(
            {name: round(end - start, 2) for (name, start), end in zip(starts, ends)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
