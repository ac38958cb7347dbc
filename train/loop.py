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

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minbert.checkpoint import atomic_write_text
from minbert.heads import HeadSpec, MultitaskBert, MultitaskSpec
from minbert.tokenizer import Tokenizer

from . import pcgrad
from .config import TrainConfig
from .data import load_task
from .export import save_multitask
from .schedules import Schedule, TaskSampler
from .stage import Stage, StepResult, TrainingError, build_encoder, build_optimizer  # noqa: F401
from .tasks import encode_batch, metric, overall_score, predict


def build_model(cfg: TrainConfig, checkpoint: str | Path | None = None) -> MultitaskBert:
    bert = build_encoder(cfg, checkpoint)
    spec = MultitaskSpec(
        tasks={t: HeadSpec(form=getattr(cfg.tasks, t).form, pooling=getattr(cfg.tasks, t).pooling,
                           head=getattr(cfg.tasks, t).head) for t in cfg.tasks.enabled()},
        head_dropout=cfg.model.head_dropout)
    return MultitaskBert(bert, spec)


# ----------------------------------------------------------------------------- the trainer
class Trainer(Stage):
    """The multitask stage: ``Trainer(cfg, data, out, resume=...).fit()``."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path,
                 resume: str | Path | None = None, progress: bool = True,
                 init_checkpoint: str | Path | None = None):
        """``init_checkpoint``: start the encoder from this HF directory (the SimCSE stage's
        result) instead of ``cfg.model.checkpoint``; the tokenizer stays the config's.
        ``resume``: the run directory (or one checkpoint) to continue."""
        super().__init__(cfg, data_dir, out_dir, progress, resume)
        self.desc = f"train {cfg.name}"
        self.accum = cfg.deepspeed.grad_accum(self.world)  # checks the batch sizes first

        self.tasks = cfg.tasks.enabled()
        self.train_data = {t: self._load(t, "train", getattr(cfg.tasks, t).max_train) for t in self.tasks}
        self.dev_data = {t: self._load(t, "dev", getattr(cfg.tasks, t).max_eval) for t in self.tasks}
        self.tokenizer = Tokenizer.from_pretrained(cfg.model.checkpoint)
        self.schedule = Schedule(cfg.schedule, {t: len(d) for t, d in self.train_data.items()},
                                 cfg.deepspeed.global_batch, cfg.epochs, cfg.seed, cfg.steps_per_epoch)
        self.samplers = {t: TaskSampler(len(self.train_data[t]), cfg.seed, i)
                         for i, t in enumerate(self.tasks)}
        self.total_steps, self.steps_per_epoch = self.schedule.total_steps, self.schedule.steps_per_epoch
        self.best_score = -math.inf
        self.history: list[dict] = []  # dev scores after each epoch
        self.step_losses: list[dict[str, float]] = []  # per step of this process's run
        self._window: list[StepResult] = []  # the steps since the last log record

        model = build_model(cfg, init_checkpoint)
        ds_config = cfg.deepspeed_config(self.world, str(self.out_dir / "monitor"),
                                         model.bert.config.hidden_size)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "config.json")
            atomic_write_text(self.out_dir / "deepspeed_config.json", json.dumps(ds_config, indent=2))
        self.build_engine(model, ds_config)  # loads the checkpoint when resuming
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
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

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def _rank_slice(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.world
        return indices[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _micro_batches(self, task: str) -> list[list]:
        """This rank's micro-batches of ``task`` for the current step."""
        mine = self._rank_slice(self.samplers[task].take(self.cfg.deepspeed.global_batch))
        m = len(mine) // self.accum
        examples = self.train_data[task]
        return [[examples[i] for i in mine[j * m:(j + 1) * m]] for j in range(self.accum)]

    def _forward_loss(self, task: str, examples: list) -> tuple[torch.Tensor, int]:
        tc = getattr(self.cfg.tasks, task)
        kwargs, labels, tokens = encode_batch(self.tokenizer, task, examples, tc.form, tc.max_length,
                                              self.device)
        prediction = self.engine(task, **kwargs)
        return MultitaskBert.loss(task, prediction, labels), tokens

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> list[float]:
        """Sum the losses over ranks (for logging) and stop every rank on a non-finite one."""
        values = self._all_reduce_sum([float(v.detach()) for v in losses.values()])
        for task, v in zip(losses, values):
            if not math.isfinite(v):
                latest = self.latest_checkpoint()
                raise TrainingError(
                    f"non-finite loss ({v}) at step {self.step + 1} on task {task!r}; stopping. The last "
                    f"good checkpoint is {latest if latest else 'none (no checkpoint saved yet)'}")
        return values

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        self.engine.train()
        tasks = self.schedule.tasks_for_step(self.step)
        micro = {t: self._micro_batches(t) for t in tasks}
        loss_sums = dict.fromkeys(tasks, 0.0)
        tokens = 0
        if self.cfg.pcgrad:
            loss_sums, tokens = self._pcgrad_step(tasks, micro)
        else:
            weighted = self.cfg.schedule.superbatch_reduce == "weighted"
            for j in range(self.accum):
                losses = {}
                for t in tasks:
                    losses[t], n_tok = self._forward_loss(t, micro[t][j])
                    tokens += n_tok
                reduced = self._check_finite(losses)
                for t, v in zip(tasks, reduced):
                    loss_sums[t] += v / self.world / self.accum
                total = sum((getattr(self.cfg.tasks, t).weight if weighted else 1.0) * losses[t]
                            for t in tasks)
                self.engine.backward(total)
                self.engine.step()
        tokens = int(self._all_reduce_sum([tokens])[0])
        self.step += 1
        return StepResult(self.step, loss_sums, self.cfg.deepspeed.global_batch * len(tasks), tokens,
                          time.perf_counter() - t0)

    def _pcgrad_step(self, tasks: list[str], micro: dict) -> tuple[dict[str, float], int]:
        """Per-task gradients (summed over this rank's micro-batches), averaged over ranks,
        projected, and fed to DeepSpeed as one backward (its accumulation is 1 under PCGrad)."""
        weighted = self.cfg.schedule.superbatch_reduce == "weighted"
        module = self.engine.module
        # Per-task gradients are taken w.r.t. storage-sharing aliases of the parameters, through
        # the bare module: DeepSpeed's gradient hooks on the real parameters must fire only for
        # the one backward it is given below.
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        aliases = {n: p.detach().requires_grad_() for n, p in module.named_parameters() if p.requires_grad}
        grads, loss_sums, tokens = [], {}, 0
        for t in tasks:
            g = None
            total = 0.0
            tc = getattr(self.cfg.tasks, t)
            for j in range(self.accum):
                kwargs, labels, n_tok = encode_batch(self.tokenizer, t, micro[t][j], tc.form,
                                                     tc.max_length, self.device)
                prediction = torch.func.functional_call(module, aliases, (t,), kwargs)
                loss = MultitaskBert.loss(t, prediction, labels)
                tokens += n_tok
                value = self._check_finite({t: loss})[0]
                total += value / self.world / self.accum
                w = (tc.weight if weighted else 1.0) / self.accum
                gj = pcgrad.flat_grad(w * loss, [aliases[n] for n in names])
                g = gj if g is None else g + gj
            grads.append(g)
            loss_sums[t] = total
        stacked = pcgrad.all_reduce_mean(torch.stack(grads))
        combined = pcgrad.project(stacked, order_seed=self.cfg.seed * 1_000_003 + self.step)
        self.engine.backward(pcgrad.surrogate_loss(self.params, combined))
        self.engine.step()
        return loss_sums, tokens

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
    def after_step(self, result: StepResult, bar) -> None:
        cfg = self.cfg
        self.step_losses.append(result.losses)
        self._window.append(result)
        lr = self.scheduler.get_last_lr()[0]
        secs = sum(r.seconds for r in self._window)
        samples_s = sum(r.examples for r in self._window) / max(secs, 1e-9)
        bar.set_postfix(loss=f"{sum(result.losses.values()):.4f}", task="+".join(result.losses),
                        samples_s=f"{samples_s:.1f}")
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            record = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch + 1,
                      "loss": result.losses, "lr": lr, "samples_per_s": samples_s,
                      "tokens_per_s": sum(r.tokens for r in self._window) / max(secs, 1e-9)}
            self.log(record)
            monitor = getattr(self.engine, "monitor", None)
            if monitor is not None and monitor.enabled and self.is_main:
                events = [(f"Train/loss_{t}", v, self.step) for t, v in result.losses.items()]
                events += [("Train/lr", lr, self.step), ("Train/samples_per_s", samples_s, self.step)]
                monitor.write_events(events)
            self._window = []

    def end_of_epoch(self, bar) -> None:
        epoch = self.step // self.steps_per_epoch
        scores = self.evaluate()
        record = {"epoch": epoch, "step": self.step, "dev": scores}
        self.history.append(record)
        self.log(record)
        if self.is_main:
            bar.write(f"epoch {epoch}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if scores["overall"] > self.best_score:
            self.best_score = scores["overall"]
            self.export(self.out_dir / "best", scores)

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "history": self.history,
                "samplers": {t: s.state_dict() for t, s in self.samplers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.best_score = float(state["best_score"])
        self.history = list(state["history"])
        for t, s in self.samplers.items():
            s.load_state_dict(state["samplers"][t])

    def result(self) -> dict:
        return {"best_score": self.best_score, "history": self.history}

    def export(self, directory: Path, scores: dict | None = None) -> None:
        """Gather the full model (from ZeRO shards) and write it as a loadable directory."""
        state = self.gathered_state()
        if self.is_main:
            module = self.engine.module
            save_multitask(state, module.bert.config, module.spec, self.tokenizer, directory,
                           extra={"scores": scores, "step": self.step, "train_config": self.cfg.to_dict()})
        self._barrier()
