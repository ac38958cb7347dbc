"""Training scenarios for tests/train/test_training.py, run in one process group.

    deepspeed --num_gpus 2 tests/train/ds_worker.py --checkpoint DIR --data DIR --out DIR --scenarios a,b
    python tests/train/ds_worker.py ...            # one process

Each scenario trains a few steps of a tiny BERT and rank 0 writes its per-step losses to
``OUT/results.json``. Starting DeepSpeed once for several scenarios keeps the tests fast.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.config import TrainConfig, from_dict  # noqa: E402
from minbert.heads import MultitaskBert  # noqa: E402
from minbert.model import BertModel  # noqa: E402
from train.loop import Trainer, TrainingError, latest_checkpoint  # noqa: E402
from train.simcse import SimCSEStage  # noqa: E402

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


def scenarios(checkpoint: str, world: int) -> dict[str, dict]:
    micro = 8 // world  # the same global batch (8) on any world size
    return {
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
    }


SIMCSE = {"enabled": True, "global_batch": 8, "max_examples": 256, "max_steps": 6, "eval_max": 24,
          "max_length": 24, "lr": 1e-3, "temperature": 0.1}


def simcse_scenario(cfg: TrainConfig, data: str, out: Path) -> dict:
    """Run the stage, then build the multitask trainer from its result (no multitask steps)."""
    stage = SimCSEStage(cfg, data, out, progress=False)
    report = stage.run()
    stage.close()
    trainer = Trainer(cfg, data, out, progress=False, init_checkpoint=out / "simcse")
    exported = BertModel.from_pretrained(out / "simcse").state_dict()
    start = trainer.engine.module.bert.state_dict()
    # the multitask engine holds bf16 copies of the exported fp32 weights
    mismatch = max(float((start[k].float() - v.to(start[k].dtype).float()).abs().max())
                   for k, v in exported.items())
    return {"losses": stage.losses, "report": report, "start_mismatch": mismatch,
            "gather_check": gather_check()}


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
    import os

    world = int(os.environ.get("WORLD_SIZE", 1))
    table = scenarios(args.checkpoint, world)
    for name in args.scenarios.split(","):
        if name == "fp32-resume":  # stop after 2 steps (checkpoint), then a new trainer resumes
            cfg = from_dict(TrainConfig, table["fp32"])
            first = Trainer(cfg, args.data, out / name, progress=False)
            first.fit(stop_after=2)
            second = Trainer(cfg, args.data, out / name, resume=out / name, progress=False)
            second.fit()
            results[name] = {"first": first.step_losses, "second": second.step_losses}
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
                results[name] = {"error": str(e), "latest": str(latest_checkpoint(out / name))}
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
            results[name] = {"latest": str(latest_checkpoint(out / name)), "resumed_step": resumed.step}
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
