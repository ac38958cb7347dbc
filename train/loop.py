"""The multitask training loop around a DeepSpeed engine.

One code path for ``deepspeed [--num_gpus N] train/run.py`` and ``python train/run.py`` (one
process, still through ``deepspeed.initialize``). The model (``minbert``) knows nothing of
DeepSpeed; this file wraps it.

Data layout per step: the schedule picks the task(s); each task's sampler yields the step's
``global_batch`` example indices (the same on every rank); rank r takes its contiguous slice and
splits it into micro-batches. So the examples of a step do not depend on the world size, and
runs with different world sizes but the same global batch see the same data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import kernels
from minbert.checkpoint import atomic_write_text
from minbert.heads import HeadSpec, MultitaskBert, MultitaskSpec
from minbert.model import BertModel
from minbert.tokenizer import Tokenizer

from . import pcgrad
from .config import TrainConfig
from .data import load_task
from .schedules import Schedule
from .tasks import build_samplers, encode_batch, metric, overall_score, padded_tokens, predict

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


# ----------------------------------------------------------------------------- distributed set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Join (or, as one plain process, create) the process group; returns (rank, world, local_rank)."""
    import deepspeed

    if "RANK" not in os.environ:  # `python train/run.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=True)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _device(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        # Share the cores between the ranks of this node instead of oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
        return torch.device("cpu")
    get_accelerator().set_device(local_rank)
    return torch.device(name, local_rank)


def start_process(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """Join the process group, pick this rank's device, choose the kernels backend; returns
    (rank, world size, device)."""
    rank, world, local_rank = init_distributed()
    device = _device(local_rank)
    if cfg.model.kernels != "auto":
        kernels.set_backend(cfg.model.kernels)
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- model and optimizer
def build_encoder(cfg: TrainConfig, checkpoint: str | Path | None = None) -> BertModel:
    """The BERT encoder from ``checkpoint`` (default: the config's), with the config's dropout."""
    changes = {}
    if cfg.model.hidden_dropout is not None:
        changes["hidden_dropout_prob"] = cfg.model.hidden_dropout
    if cfg.model.attention_dropout is not None:
        changes["attention_probs_dropout_prob"] = cfg.model.attention_dropout
    if cfg.model.unpad is not None:
        changes["unpad"] = cfg.model.unpad
    return BertModel.from_pretrained(checkpoint if checkpoint is not None else cfg.model.checkpoint,
                                     config_changes=changes)


def build_model(cfg: TrainConfig, checkpoint: str | Path | None = None) -> MultitaskBert:
    bert = build_encoder(cfg, checkpoint)
    spec = MultitaskSpec(
        tasks={t: HeadSpec(form=getattr(cfg.tasks, t).form, pooling=getattr(cfg.tasks, t).pooling,
                           head=getattr(cfg.tasks, t).head) for t in cfg.tasks.enabled()},
        head_dropout=cfg.model.head_dropout)
    return MultitaskBert(bert, spec)


def param_groups(cfg: TrainConfig, model: torch.nn.Module, lr: float | None = None) -> list[dict]:
    """The optimizer's parameter groups: no weight decay on biases and LayerNorm weights; the
    heads at ``optim.head_lr``; the encoder at ``lr`` (default ``optim.lr``)."""
    o = cfg.optim
    lr = o.lr if lr is None else lr
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        no_decay = name.endswith("bias") or "LayerNorm" in name
        groups.setdefault((name.startswith("heads."), no_decay), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else o.weight_decay,
             "lr": (o.head_lr or lr) if is_head else lr}
            for (is_head, no_decay), ps in sorted(groups.items())]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. ``lr``: the encoder's learning rate instead of
    ``cfg.optim.lr`` (the SimCSE stage's)."""
    o = cfg.optim
    if lr is not None:
        o = dataclasses.replace(o, lr=lr)
    groups = param_groups(cfg, model, lr)
    name = o.name
    if name == "auto":
        name = "fused_adamw" if torch.cuda.is_available() else "adamw"
    if name == "fused_adamw":
        # Clipping and the bf16 master weights are DeepSpeed's (it hands the optimizer fp32
        # partitions and clips by deepspeed.gradient_clipping), so they stay off here.
        return kernels.FusedAdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    # torch's fused AdamW: the same update as its default per-tensor loop in one pass over each
    # tensor (on CPU several times faster over the flat ZeRO partitions DeepSpeed hands it)
    from deepspeed.accelerator import get_accelerator

    fused = get_accelerator().device_name() in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused)


def lr_lambda(cfg: TrainConfig, total_steps: int, warmup_ratio: float | None = None):
    """Linear warm-up over ``warmup_ratio`` (default ``cfg.optim.warmup_ratio``) of the steps,
    then ``cfg.optim.lr_schedule``'s decay."""
    warmup = int((cfg.optim.warmup_ratio if warmup_ratio is None else warmup_ratio) * total_steps)
    kind = cfg.optim.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# ----------------------------------------------------------------------------- the trainer
@dataclass
class StepResult:
    step: int
    tasks: list[str]
    # (len(tasks),) this rank's mean loss per task, left on the device: ``Trainer._check_finite``
    # reduces a window of steps over the ranks and reads it back once per logging interval
    losses: torch.Tensor
    examples: int  # examples in the step, all ranks
    tokens: int  # real (non-padding) tokens in the step, this rank (a host count)
    padded_tokens: int  # token slots in the step, padding included, this rank
    seconds: float  # host time of the call (on a GPU the device may still be running it)


class PhaseTimer:
    """Wall time per phase of ``Trainer.train_step`` (data, forward, backward, optimizer), the
    device synchronised at each boundary so the split is exact. A benchmark tool: training runs
    without it (``Trainer.timer = None``), since the synchronisations cost time."""

    PHASES = ("data", "forward", "backward", "optimizer")

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - t0


class Trainer:
    timer: PhaseTimer | None = None  # set by benchmarks to split the step's time into phases

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path,
                 resume: str | Path | None = None, progress: bool = True,
                 init_checkpoint: str | Path | None = None):
        """``init_checkpoint``: start the encoder from this HF directory (the SimCSE stage's
        result) instead of ``cfg.model.checkpoint``; the tokenizer stays the config's."""
        import deepspeed

        self.cfg = cfg
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.rank, self.world, self.device = start_process(cfg)
        self.is_main = self.rank == 0
        self.show_progress = progress and self.is_main
        self.accum = cfg.deepspeed.grad_accum(self.world)  # checks the batch sizes first
        seed_everything(cfg.seed)

        self.tasks = cfg.tasks.enabled()
        self.train_data = {t: self._load(t, "train", getattr(cfg.tasks, t).max_train) for t in self.tasks}
        self.dev_data = {t: self._load(t, "dev", getattr(cfg.tasks, t).max_eval) for t in self.tasks}
        self.tokenizer = Tokenizer.from_pretrained(cfg.model.checkpoint)
        self.schedule = Schedule(cfg.schedule, {t: len(d) for t, d in self.train_data.items()},
                                 cfg.deepspeed.global_batch, cfg.epochs, cfg.seed, cfg.steps_per_epoch)
        self.samplers = build_samplers(cfg, self.train_data, self.tokenizer)

        model = build_model(cfg, init_checkpoint)
        optimizer = build_optimizer(cfg, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.schedule.total_steps))
        monitor_dir = str(self.out_dir / "monitor")
        self.ds_config = cfg.deepspeed_config(self.world, monitor_dir)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]

        self.step = 0
        self.best_score = -math.inf
        self.history: list[dict] = []  # dev scores after each epoch
        self.step_losses: list[dict[str, float]] = []  # per step of this process's run
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "config.json")
            atomic_write_text(self.out_dir / "deepspeed_config.json", json.dumps(self.ds_config, indent=2))
        if resume is not None:
            self.resume(resume)
        self._barrier()

    # ------------------------------------------------------------------ helpers
    def _load(self, task: str, split: str, limit: int | None):
        loaded = load_task(task, split, self.data_dir, warn=self.is_main)
        examples = loaded.examples
        if limit and limit < len(examples):  # a seeded random subset: the files are not shuffled
            keep = sorted(random.Random(f"{self.cfg.seed}/{task}/{split}").sample(range(len(examples)), limit))
            examples = [examples[i] for i in keep]
        if not examples:
            raise TrainingError(f"{task} {split}: no usable examples in {loaded.path}")
        return examples

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _all_reduce_sum(self, values: torch.Tensor | list[float]) -> torch.Tensor:
        """Sum over the ranks, as float64 on the trainer's device (NCCL refuses CPU tensors);
        the result stays there: the caller reads it back when it needs the numbers."""
        t = torch.as_tensor(values).to(device=self.device, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _rank_slice(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.world
        return indices[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _micro_batches(self, task: str) -> list[tuple[dict, torch.Tensor, int]]:
        """This rank's micro-batches of ``task`` for the current step, tokenised and on the
        device: (model keyword arguments with the host-computed packing, labels, real tokens)."""
        mine = self._rank_slice(self.samplers[task].take(self.cfg.deepspeed.global_batch))
        m = len(mine) // self.accum
        examples = self.train_data[task]
        tc = getattr(self.cfg.tasks, task)
        return [encode_batch(self.tokenizer, task, [examples[i] for i in mine[j * m:(j + 1) * m]],
                             tc.form, tc.max_length, self.device) for j in range(self.accum)]

    def _forward_loss(self, task: str, batch: tuple[dict, torch.Tensor, int]) -> torch.Tensor:
        kwargs, labels, _ = batch
        return MultitaskBert.loss(task, self.engine(task, **kwargs), labels)

    def _phase(self, name: str):
        return contextlib.nullcontext() if self.timer is None else self.timer(name)

    def _check_finite(self, results: list[StepResult]) -> tuple[list[dict[str, float]], int]:
        """Reduce a window of steps over the ranks (one collective, one read back to the host):
        each step's mean loss per task, and the real tokens of the window. Stops every rank,
        naming the first step and task whose loss is NaN/inf.

        The losses are checked here, at the logging interval (and before every checkpoint), not
        after each micro-batch: the step never waits on the host. The price: a non-finite loss
        is detected up to ``log_every - 1`` steps after the step that produced it, and those
        steps' updates have been applied; the error names the step where it happened, and no
        checkpoint is written from weights that were not checked.
        """
        if not results:
            return [], 0
        local = torch.cat([r.losses.detach().to(torch.float64) for r in results]
                          + [torch.tensor([float(sum(r.tokens for r in results))], dtype=torch.float64)
                             .to(self.device, non_blocking=True)])
        values = self._all_reduce_sum(local).tolist()  # the one host read
        losses, i = [], 0
        for r in results:
            step = {}
            for t in r.tasks:
                v = values[i] / self.world
                i += 1
                if not math.isfinite(v):
                    latest = self.latest_checkpoint()
                    seen = f" (seen at step {self.step})" if r.step != self.step else ""
                    raise TrainingError(
                        f"non-finite loss ({v}) at step {r.step} on task {t!r}{seen}; stopping. "
                        f"The last good checkpoint is "
                        f"{latest if latest else 'none (no checkpoint saved yet)'}")
                step[t] = v
            losses.append(step)
        return losses, int(round(values[-1]))

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        """One optimizer step. Nothing in it reads a value back from the device: the losses
        stay there (``StepResult.losses``) until ``_check_finite`` reads a window of them."""
        t0 = time.perf_counter()
        self.engine.train()
        tasks = self.schedule.tasks_for_step(self.step)
        with self._phase("data"):
            micro = {t: self._micro_batches(t) for t in tasks}
        tokens = sum(b[2] for t in tasks for b in micro[t])
        slots = sum(padded_tokens(b[0]) for t in tasks for b in micro[t])
        if self.cfg.pcgrad:
            losses = self._pcgrad_step(tasks, micro)
        else:
            weighted = self.cfg.schedule.superbatch_reduce == "weighted"
            parts = []
            for j in range(self.accum):
                with self._phase("forward"):
                    losses_j = [self._forward_loss(t, micro[t][j]) for t in tasks]
                    total = sum((getattr(self.cfg.tasks, t).weight if weighted else 1.0) * loss
                                for t, loss in zip(tasks, losses_j))
                with self._phase("backward"):
                    self.engine.backward(total)
                with self._phase("optimizer"):
                    self.engine.step()
                parts.append(torch.stack([loss.detach() for loss in losses_j]))
            losses = torch.stack(parts).mean(0)  # (len(tasks),) mean over the micro-batches
        self.step += 1
        return StepResult(self.step, list(tasks), losses, self.cfg.deepspeed.global_batch * len(tasks),
                          tokens, slots, time.perf_counter() - t0)

    def _pcgrad_step(self, tasks: list[str], micro: dict) -> torch.Tensor:
        """Per-task gradients (summed over this rank's micro-batches), averaged over ranks,
        projected, and fed to DeepSpeed as one backward (its accumulation is 1 under PCGrad).
        Returns this rank's mean loss per task, on the device."""
        weighted = self.cfg.schedule.superbatch_reduce == "weighted"
        module = self.engine.module
        # Per-task gradients are taken w.r.t. storage-sharing aliases of the parameters, through
        # the bare module: DeepSpeed's gradient hooks on the real parameters must fire only for
        # the one backward it is given below.
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        aliases = {n: p.detach().requires_grad_() for n, p in module.named_parameters() if p.requires_grad}
        grads, losses = [], []
        for t in tasks:
            g = None
            tc = getattr(self.cfg.tasks, t)
            task_losses = []
            for j in range(self.accum):
                kwargs, labels, _ = micro[t][j]
                with self._phase("forward"):
                    prediction = torch.func.functional_call(module, aliases, (t,), kwargs)
                    loss = MultitaskBert.loss(t, prediction, labels)
                task_losses.append(loss.detach())
                w = (tc.weight if weighted else 1.0) / self.accum
                with self._phase("backward"):
                    gj = pcgrad.flat_grad(w * loss, [aliases[n] for n in names])
                g = gj if g is None else g + gj
            grads.append(g)
            losses.append(torch.stack(task_losses).mean())
        with self._phase("backward"):
            stacked = pcgrad.all_reduce_mean(torch.stack(grads))
            combined = pcgrad.project(stacked, order_seed=self.cfg.seed * 1_000_003 + self.step)
            self.engine.backward(pcgrad.surrogate_loss(self.params, combined))
        with self._phase("optimizer"):
            self.engine.step()
        return torch.stack(losses)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        scores = {}
        for t in self.tasks:
            tc = getattr(self.cfg.tasks, t)
            preds = predict(self.engine.module, self.tokenizer, t, self.dev_data[t], tc.form,
                            tc.max_length, self.cfg.eval_batch_size, self.device)
            scores[t] = metric(t, preds, [e.label for e in self.dev_data[t]])
        scores["overall"] = overall_score(scores)
        return scores

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def save_checkpoint(self) -> Path:
        """A resumable DeepSpeed checkpoint; ``latest`` moves to it only once it is complete."""
        root = self.out_dir / CHECKPOINTS
        tag = f"step{self.step:07d}"
        (root / tag).mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), root / tag / f"rng_rank{self.rank}.pt")
        client_state = {"step": self.step, "best_score": self.best_score, "history": self.history,
                        "samplers": {t: s.state_dict() for t, s in self.samplers.items()},
                        "config": self.cfg.to_dict()}
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        self._barrier()
        if self.is_main:
            self.cfg.save(root / tag / "config.json")
            atomic_write_text(root / LATEST, tag + "\n")
            tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
            for old in tags[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(root / old, ignore_errors=True)
        self._barrier()
        return root / tag

    def resume(self, path: str | Path) -> None:
        ckpt = find_checkpoint(path)
        _, client = self.engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
        if client is None:
            raise TrainingError(f"could not load the DeepSpeed checkpoint {ckpt}")
        self.step = int(client["step"])
        self.best_score = float(client["best_score"])
        self.history = list(client["history"])
        for t, s in self.samplers.items():
            s.load_state_dict(client["samplers"][t])
        rng_file = ckpt / f"rng_rank{self.rank}.pt"
        if not rng_file.is_file():
            raise TrainingError(f"{ckpt} holds no RNG state for rank {self.rank} (saved with another "
                                "world size?)")
        _set_rng_state(torch.load(rng_file, weights_only=False))
        if self.is_main:
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    def export(self, directory: Path, scores: dict | None = None) -> None:
        """Gather the full model (from ZeRO shards) and write it as a loadable directory."""
        from deepspeed import zero

        module = self.engine.module
        with zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                     enabled=self.cfg.deepspeed.zero_stage == 3):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        if self.is_main:
            save_multitask(state, module.bert.config, module.spec, self.tokenizer, directory,
                           extra={"scores": scores, "step": self.step, "train_config": self.cfg.to_dict()})
        self._barrier()

    # ------------------------------------------------------------------ the run
    def fit(self, stop_after: int | None = None) -> dict:
        """Train to the end of the schedule (or until step ``stop_after``, then save and return:
        how a run is split in two to test resuming)."""
        from tqdm import tqdm

        cfg, sched = self.cfg, self.schedule
        bar = tqdm(total=sched.total_steps, initial=self.step, desc=f"train {cfg.name}",
                   disable=not self.show_progress, dynamic_ncols=True)
        pending: list[StepResult] = []  # steps whose losses are still on the device
        # since the last log line: examples, real tokens, training seconds (evaluation excluded)
        window = {"examples": 0, "tokens": 0, "seconds": 0.0, "start": time.perf_counter()}
        while self.step < sched.total_steps:
            if stop_after is not None and self.step >= stop_after:
                self._read_losses(pending, window)
                self.save_checkpoint()
                break
            pending.append(self.train_step())
            bar.update(1)
            end_of_epoch = self.step % sched.steps_per_epoch == 0
            if self.step % cfg.log_every == 0 or self.step == sched.total_steps:
                losses = self._read_losses(pending, window)[-1]
                lr = self.scheduler.get_last_lr()[0]
                secs = max(window["seconds"] + time.perf_counter() - window["start"], 1e-9)
                samples_s, tokens_s = window["examples"] / secs, window["tokens"] / secs
                bar.set_postfix(loss=f"{sum(losses.values()):.4f}", task="+".join(losses),
                                samples_s=f"{samples_s:.1f}")
                record = {"step": self.step, "epoch": (self.step - 1) // sched.steps_per_epoch + 1,
                          "loss": losses, "lr": lr, "samples_per_s": samples_s, "tokens_per_s": tokens_s}
                self.log(record)
                monitor = getattr(self.engine, "monitor", None)
                if monitor is not None and monitor.enabled and self.is_main:
                    events = [(f"Train/loss_{t}", v, self.step) for t, v in losses.items()]
                    events += [("Train/lr", lr, self.step), ("Train/samples_per_s", samples_s, self.step)]
                    monitor.write_events(events)
                window = {"examples": 0, "tokens": 0, "seconds": 0.0, "start": time.perf_counter()}
            if end_of_epoch:
                self._read_losses(pending, window)  # checked before the checkpoint is written
                window["seconds"] += time.perf_counter() - window["start"]
                self._end_of_epoch(bar)
                window["start"] = time.perf_counter()
        bar.close()
        return {"best_score": self.best_score, "history": self.history}

    def _read_losses(self, pending: list[StepResult], window: dict) -> list[dict[str, float]]:
        """Reduce and check the pending steps (``_check_finite``), record their losses in
        ``step_losses`` and their examples and tokens in ``window``; empties ``pending``."""
        if not pending:
            return self.step_losses[-1:]
        losses, tokens = self._check_finite(pending)
        self.step_losses.extend(losses)
        window["examples"] += sum(r.examples for r in pending)
        window["tokens"] += tokens
        pending.clear()
        return losses

    def _end_of_epoch(self, bar) -> None:
        epoch = self.step // self.schedule.steps_per_epoch
        scores = self.evaluate()
        record = {"epoch": epoch, "step": self.step, "dev": scores}
        self.history.append(record)
        self.log(record)
        if self.is_main:
            bar.write(f"epoch {epoch}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if scores["overall"] > self.best_score:
            self.best_score = scores["overall"]
            self.export(self.out_dir / "best", scores)
        self.save_checkpoint()


# ----------------------------------------------------------------------------- files
def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return Path(out_dir) / CHECKPOINTS / tag if tag else None


def find_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints directory, or one checkpoint -> that checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume from: {path} does not exist")
    if (path / LATEST).is_file():  # the checkpoints directory
        path = path.parent
    found = latest_checkpoint(path)
    if found is not None:
        return found
    if path.name.startswith("step") and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"no checkpoint under {path}: expected {path / CHECKPOINTS / LATEST}")


def save_multitask(state: dict, bert_config, spec: MultitaskSpec, tokenizer: Tokenizer,
                   directory: Path, extra: dict | None = None) -> None:
    """Write an exported model: the encoder as an HF BERT directory (``minbert`` and
    ``transformers`` load it), the heads beside it, and ``multitask.json``. The directory is
    built under a temporary name and swapped in, so a crash never leaves a half-written one."""
    from safetensors.torch import save_file

    tmp = fresh_temp_dir(directory)
    bert = BertModel(bert_config)
    bert.load_state_dict({k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")})
    bert.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("heads.")},
              str(tmp / "heads.safetensors"))
    meta = {"spec": spec.to_dict(), **(extra or {})}
    (tmp / "multitask.json").write_text(json.dumps(meta, indent=2) + "\n")
    swap_in(tmp, directory)


def fresh_temp_dir(directory: str | Path) -> Path:
    """An empty ``<directory>.tmp`` to build ``directory`` in (see ``swap_in``)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, directory: str | Path) -> None:
    """Replace ``directory`` by the complete ``tmp`` (renames only: a crash leaves the old one or
    the new one, never a half-written one)."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_multitask(directory: str | Path, device: str | torch.device = "cpu") -> tuple[MultitaskBert, dict]:
    """Load an exported model (see ``save_multitask``) for prediction."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_file = directory / "multitask.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{directory} is not an exported multitask model: {meta_file} is missing")
    meta = json.loads(meta_file.read_text())
    bert = BertModel.from_pretrained(directory)
    model = MultitaskBert(bert, MultitaskSpec.from_dict(meta["spec"]))
    heads = load_file(str(directory / "heads.safetensors"))
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if k.startswith("heads.")]
    if missing or unexpected:
        raise KeyError(f"{directory}/heads.safetensors: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), meta
