"""The multitask training stage: ``Trainer`` runs on the stage skeleton (``train/stage.py``),
which brings process start, the DeepSpeed engine, checkpoints, stop requests, logging and the
loop; this file supplies the multitask data, step, evaluation and export.

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
import copy
import dataclasses
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import kernels

from minbert.checkpoint import atomic_write_text
from minbert.heads import HeadSpec, MultitaskBert, MultitaskSpec
from minbert.lora import apply_lora
from minbert.tokenizer import Tokenizer

from . import pcgrad, smart
from .config import ConfigError, TrainConfig
from .data import load_task
from .export import save_multitask
from .schedules import Schedule
from .stage import (Stage, TrainingError, build_encoder, build_optimizer,  # noqa: F401
                    freeze_parameters, lr_lambda, param_groups)
from .tasks import build_samplers, encode_batch, metric, overall_score, padded_tokens, predict


def build_model(cfg: TrainConfig, checkpoint: str | Path | None = None) -> MultitaskBert:
    bert = build_encoder(cfg, checkpoint)
    # every HeadSpec field has a TaskConfig field of its name
    spec = MultitaskSpec(
        tasks={t: HeadSpec(**{f.name: copy.copy(getattr(getattr(cfg.tasks, t), f.name))
                              for f in dataclasses.fields(HeadSpec)})
               for t in cfg.tasks.enabled()},
        head_dropout=cfg.model.head_dropout, shared_pair_head=cfg.tasks.shared_pair_head)
    try:
        model = MultitaskBert(bert, spec)
    except ValueError as e:  # a layer the checkpoint does not have
        raise ConfigError(f"tasks.{e}") from None
    lora = cfg.model.lora
    if lora.r > 0:  # adapters on the encoder, which is frozen; head layers and heads train
        apply_lora(model.bert, lora.r, lora.alpha, lora.dropout, lora.targets)
    freeze_parameters(model, cfg.model.freeze, cfg.model.freeze_layers())
    return model


# ----------------------------------------------------------------------------- the trainer
@dataclass
class StepResult:
    """What ``Trainer.train_step`` returns (the skeleton's ``StepResult`` with the losses left
    on the device)."""

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


class Trainer(Stage):
    """The multitask stage: ``Trainer(cfg, data, out, resume=...).fit()``."""

    timer: PhaseTimer | None = None  # set by benchmarks to split the step's time into phases

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path,
                 resume: str | Path | None = None, progress: bool = True,
                 init_checkpoint: str | Path | None = None):
        """``init_checkpoint``: start the encoder from this HF directory (the SimCSE stage's
        result) instead of ``cfg.model.checkpoint``; the tokenizer stays the config's.
        ``resume``: the run directory (or one checkpoint) to continue."""
        super().__init__(cfg, data_dir, out_dir, progress, resume)
        self.desc = f"train {cfg.name}"
        self.accum = cfg.deepspeed.grad_accum(self.world)  # checks the batch sizes first
        cfg.check_task_batches(self.world)

        self.tasks = cfg.tasks.enabled()
        self.train_data = {t: self._load(t, "train", getattr(cfg.tasks, t).max_train) for t in self.tasks}
        self.dev_data = {t: self._load(t, "dev", getattr(cfg.tasks, t).max_eval) for t in self.tasks}
        self.tokenizer = Tokenizer.from_pretrained(cfg.model.checkpoint)
        self.schedule = Schedule(cfg.schedule, {t: len(d) for t, d in self.train_data.items()},
                                 {t: cfg.task_batch(t) for t in self.tasks}, cfg.epochs, cfg.seed,
                                 cfg.steps_per_epoch)
        self.samplers = build_samplers(cfg, self.train_data, self.tokenizer)
        self.total_steps, self.steps_per_epoch = self.schedule.total_steps, self.schedule.steps_per_epoch
        self.best_score = -math.inf
        self.history: list[dict] = []  # dev scores after each epoch
        self.step_losses: list[dict[str, float]] = []  # per step of this process's run
        self._pending: list[StepResult] = []  # steps whose losses are still on the device
        # every logged window of this process's run: examples and training seconds (no evaluation)
        self.train_totals = {"examples": 0, "seconds": 0.0}
        self._new_window()

        model = build_model(cfg, init_checkpoint)
        ds_config = cfg.deepspeed_config(self.world, str(self.out_dir / "monitor"),
                                         model.bert.config.hidden_size)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "config.json")
            atomic_write_text(self.out_dir / "deepspeed_config.json", json.dumps(ds_config, indent=2))
        sc = cfg.smart  # the momentum copy starts from the initial fp32 weights (resume: its own)
        self.teacher = smart.MomentumTeacher(model, sc.momentum, self.device) \
            if sc.enabled and sc.bregman_weight > 0 else None
        self.build_engine(model, ds_config)  # loads the checkpoint when resuming
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.engine.module.parameters())
        self.trainable = {"trainable_parameters": trainable, "parameters": total}
        if cfg.model.freeze != "none":
            self.say(f"{self.desc}: model.freeze {cfg.model.freeze!r}: training {trainable:,} of "
                     f"{total:,} parameters")
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

    def _all_reduce_sum(self, values: torch.Tensor | list[float]) -> torch.Tensor:
        """Sum over the ranks, as float64 on the trainer's device (NCCL refuses CPU tensors);
        the result stays there: the caller reads it back when it needs the numbers."""
        t = torch.as_tensor(values).to(device=self.device, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _rank_slice(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.world
        return indices[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _micro_batches(self, task: str) -> list[tuple[dict, torch.Tensor, int]]:
        """This rank's micro-batches of ``task`` for the current step, tokenised and on the
        device: (model keyword arguments with the host-computed packing, labels, real tokens)."""
        mine = self._rank_slice(self.samplers[task].take(self.cfg.task_batch(task)))
        m = len(mine) // self.accum
        examples = self.train_data[task]
        tc = getattr(self.cfg.tasks, task)
        return [encode_batch(self.tokenizer, task, [examples[i] for i in mine[j * m:(j + 1) * m]],
                             tc.form, tc.max_length, self.device) for j in range(self.accum)]

    def _forward_loss(self, task: str, batch: tuple[dict, torch.Tensor, int]):
        """(the task loss, the SMART terms or None) of one micro-batch."""
        kwargs, labels, _ = batch
        module = self.engine.module
        prediction = self.engine(task, **kwargs)
        loss = module.task_loss(task, prediction, labels)
        sc = self.cfg.smart
        if not sc.enabled:
            return loss, None
        return loss, smart.regulariser(module, task, kwargs, prediction, sc, self.teacher)

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
        if self.cfg.pcgrad_layout:
            epoch = self.step // self.steps_per_epoch + 1
            start = 1 if self.cfg.pcgrad else self.cfg.pcgrad_from_epoch
            losses = self._pcgrad_step(tasks, micro, project=epoch >= start)
        else:
            weighted = self.cfg.schedule.superbatch_reduce == "weighted"
            joint = self.cfg.simcse.joint_weight
            parts = []
            for j in range(self.accum):
                with self._phase("forward"):
                    losses_j, extras = zip(*(self._forward_loss(t, micro[t][j]) for t in tasks))
                    losses_j = list(losses_j)
                    total = sum((getattr(self.cfg.tasks, t).weight if weighted else 1.0) * loss
                                for t, loss in zip(tasks, losses_j))
                    if self.cfg.smart.enabled:
                        regulariser = sum(extras)
                        total = total + regulariser
                        losses_j.append(regulariser)
                    if joint > 0:
                        contrastive = self._joint_simcse([(t, micro[t][j]) for t in tasks])
                        # DeepSpeed averages the ranks' gradients; each rank's loss covers the
                        # gathered rows but reaches only its own: x world makes it the sum
                        total = total + joint * self.world * contrastive
                        losses_j.append(contrastive)
                with self._phase("backward"):
                    self.engine.backward(total)
                with self._phase("optimizer"):
                    self.engine.step()
                parts.append(torch.stack([loss.detach() for loss in losses_j]))
            losses = torch.stack(parts).mean(0)  # (len(tasks),) mean over the micro-batches
            if self.teacher is not None:
                self.teacher.update(self.engine.module)
        self.step += 1
        logged = list(tasks)
        if not self.cfg.pcgrad_layout:
            logged += (["smart"] if self.cfg.smart.enabled else []) \
                + (["simcse"] if self.cfg.simcse.joint_weight > 0 else [])
        return StepResult(self.step, logged, losses, sum(self.cfg.task_batch(t) for t in tasks),
                          tokens, slots, time.perf_counter() - t0)

    def _joint_simcse(self, batches: list[tuple[str, tuple]]) -> torch.Tensor:
        """Unsupervised SimCSE on a micro-batch's sentences (the first sentence of pairs): two
        passes with dropout, pooled as each task pools, rows of all ranks gathered as negatives
        (``train.simcse.gather_rows``); ``kernels.simcse_loss`` of the two views."""
        from .simcse import gather_rows

        module = self.engine.module
        views = [[], []]
        for task, (kwargs, _, _) in batches:
            args = (kwargs["input_ids"], kwargs["attention_mask"], kwargs["token_type_ids"])
            for view in views:
                view.append(module.embed(task, *args, packing=kwargs.get("packing")))
        z1, z2 = (gather_rows(torch.cat(v)) for v in views)
        return kernels.simcse_loss(z1, z2, self.cfg.simcse.temperature)

    def _pcgrad_step(self, tasks: list[str], micro: dict, project: bool = True) -> torch.Tensor:
        """Per-task gradients (summed over this rank's micro-batches), averaged over ranks,
        projected (or, ``project`` False, summed as they are: ``pcgrad_from_epoch``'s epochs
        before PCGrad), and fed to DeepSpeed as one backward (its accumulation is 1 under
        PCGrad). Returns this rank's mean loss per task, on the device."""
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
                    loss = module.task_loss(t, prediction, labels)
                task_losses.append(loss.detach())
                w = (tc.weight if weighted else 1.0) / self.accum
                with self._phase("backward"):
                    gj = pcgrad.flat_grad(w * loss, [aliases[n] for n in names])
                g = gj if g is None else g + gj
            grads.append(g)
            losses.append(torch.stack(task_losses).mean())
        with self._phase("backward"):
            stacked = pcgrad.all_reduce_mean(torch.stack(grads))
            combined = pcgrad.project(stacked, order_seed=self.cfg.seed * 1_000_003 + self.step) \
                if project else stacked.sum(0)
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

    # ------------------------------------------------------------------ the skeleton's hooks
    def _new_window(self) -> None:
        # since the last log line: examples, real tokens, training seconds (evaluation excluded)
        self._window = {"examples": 0, "tokens": 0, "seconds": 0.0, "start": time.perf_counter()}

    def _read_losses(self) -> list[dict[str, float]]:
        """Reduce and check the pending steps (``_check_finite``: one collective, one host read),
        record their losses in ``step_losses`` and their examples and tokens in the log window."""
        if not self._pending:
            return self.step_losses[-1:]
        losses, tokens = self._check_finite(self._pending)
        self.step_losses.extend(losses)
        self._window["examples"] += sum(r.examples for r in self._pending)
        self._window["tokens"] += tokens
        self._pending.clear()
        return losses

    def after_step(self, result: StepResult, bar) -> None:
        """Keep the step's losses on the device; read (and check) them once per ``log_every``."""
        cfg = self.cfg
        self._pending.append(result)
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            losses = self._read_losses()[-1]
            lr = self.scheduler.get_last_lr()[0]
            w = self._window
            secs = max(w["seconds"] + time.perf_counter() - w["start"], 1e-9)
            samples_s, tokens_s = w["examples"] / secs, w["tokens"] / secs
            self.train_totals["examples"] += w["examples"]
            self.train_totals["seconds"] += secs
            bar.set_postfix(loss=f"{sum(losses.values()):.4f}", task="+".join(losses),
                            samples_s=f"{samples_s:.1f}")
            record = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch + 1,
                      "loss": losses, "lr": lr, "samples_per_s": samples_s, "tokens_per_s": tokens_s}
            self.log(record)
            monitor = getattr(self.engine, "monitor", None)
            if monitor is not None and monitor.enabled and self.is_main:
                events = [(f"Train/loss_{t}", v, self.step) for t, v in losses.items()]
                events += [("Train/lr", lr, self.step), ("Train/samples_per_s", samples_s, self.step)]
                monitor.write_events(events)
            self._new_window()

    def before_save(self) -> None:
        """No checkpoint is written from weights whose losses were not checked."""
        self._read_losses()

    def end_of_epoch(self, bar) -> None:
        epoch = self.step // self.steps_per_epoch
        self._read_losses()  # checked before the export and the checkpoint
        self._window["seconds"] += time.perf_counter() - self._window["start"]
        scores = self.evaluate()
        record = {"epoch": epoch, "step": self.step, "dev": scores}
        self.history.append(record)
        self.log(record)
        if self.is_main:
            bar.write(f"epoch {epoch}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if scores["overall"] > self.best_score:
            self.best_score = scores["overall"]
            self.export(self.out_dir / "best", scores)
        # every rank holds the same all-reduced dev scores: the same decision everywhere
        patience, stop_at = self.cfg.early_stopping_patience, self.cfg.stop_after_epoch
        more = self.step < self.total_steps
        if more and patience and self.epochs_without_gain() >= patience:
            self._finish_early(bar, epoch, {"patience": patience}, f"early stopping after epoch {epoch}: "
                               f"{patience} epoch(s) without a better dev overall than {self.best_score:.4f}")
        elif more and stop_at is not None and epoch >= stop_at:
            self._finish_early(bar, epoch, {"stop_after_epoch": stop_at}, f"stopping after epoch {epoch} "
                               f"(stop_after_epoch); best dev overall {self.best_score:.4f}")
        self._window["start"] = time.perf_counter()

    def _finish_early(self, bar, epoch: int, why: dict, message: str) -> None:
        """End the run after ``epoch``: ``fit`` saves and stops; ``summary.json`` gets the record."""
        self.finished_early = {"epoch": epoch, "step": self.step, **why, "best_dev_overall": self.best_score}
        self.log({"early_stop": self.finished_early})
        if self.is_main:
            bar.write(message)

    def epochs_without_gain(self) -> int:
        """Epochs since the best dev overall so far (0 when the last epoch was the best)."""
        scores = [r["dev"]["overall"] for r in self.history]
        return len(scores) - 1 - scores.index(max(scores)) if scores else 0

    def state_dict(self) -> dict:
        state = {"best_score": self.best_score, "history": self.history,
                 "finished_early": self.finished_early,
                 "samplers": {t: s.state_dict() for t, s in self.samplers.items()}}
        if self.teacher is not None:
            state["smart_teacher"] = self.teacher.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.best_score = float(state["best_score"])
        self.history = list(state["history"])
        self.finished_early = state.get("finished_early")
        if self.teacher is not None:
            self.teacher.load_state_dict(state["smart_teacher"])
        for t, s in self.samplers.items():
            s.load_state_dict(state["samplers"][t])

    def result(self) -> dict:
        t = self.train_totals  # the whole run's rate: a median over windows misleads when
        # tasks step with batches of different sizes (tasks.<t>.global_batch)
        rate = t["examples"] / t["seconds"] if t["seconds"] > 0 else None
        return {"best_score": self.best_score, "history": self.history,
                "finished_early": self.finished_early, **self.trainable,
                "train_examples": t["examples"],
                "train_samples_per_s": None if rate is None else round(rate, 2)}

    def export(self, directory: Path, scores: dict | None = None) -> None:
        """Gather the full model (from ZeRO shards) and write it as a loadable directory."""
        state = self.gathered_state()
        if self.is_main:
            module = self.engine.module
            save_multitask(state, module.bert.config, module.spec, self.tokenizer, directory,
                           extra={"scores": scores, "step": self.step, "train_config": self.cfg.to_dict()})
        self._barrier()
