"""Which task(s) each optimizer step trains, and which examples it sees.

Everything here is a pure function of the seed and the step (plus per-task cursors that are saved
in checkpoints), so every rank makes the same choice without talking to the others, and a resumed
run continues exactly where it stopped.

Schedules (``ScheduleConfig.kind``):
  - ``sequential``:   all of task 1's steps of an epoch, then task 2's, ...
  - ``round_robin``:  task ``step % T``.
  - ``random``:       a task drawn uniformly at each step.
  - ``proportional``: P(task i) ~ n_i ** alpha.
  - ``annealed``:     the same with alpha moving linearly from ``alpha_start`` to ``alpha_end`` over
                      training (Stickland & Murray, 2019: start near proportional, end near uniform).
  - ``superbatch``:   one batch of every task in each step; their losses summed or weighted.

References:
    Stickland & Murray, "BERT and PALs", ICML 2019, https://arxiv.org/abs/1902.02671
"""
from __future__ import annotations

import math

import numpy as np

from .config import ScheduleConfig


def group_by_length(perm: np.ndarray, lengths: np.ndarray, batch: int, window: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``perm`` cut into windows of ``window`` batches of ``batch`` indices; each window sorted by
    length (longest first), cut into batches, and its full batches served in a random order
    (a last partial batch stays last, so later batches keep their boundaries)."""
    out = []
    span = window * batch
    for start in range(0, len(perm), span):
        chunk = perm[start:start + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        full = len(chunk) // batch
        order = rng.permutation(full)
        out.extend(chunk[k * batch:(k + 1) * batch] for k in order)
        out.append(chunk[full * batch:])
    return np.concatenate(out) if out else perm


class TaskSampler:
    """Endless stream of example indices of one task: a fresh permutation each pass over the data.

    The permutation of pass ``e`` depends only on (seed, task_index, e), so the state is just
    ``(pass, cursor)``. With ``lengths`` (one per example) each pass is length-grouped
    (``group_by_length``: windows of ``window`` batches of ``batch``), a function of the same
    permutation, so the state stays ``(pass, cursor)``.
    """

    def __init__(self, size: int, seed: int, task_index: int, lengths: np.ndarray | None = None,
                 batch: int = 1, window: int = 50):
        if size < 1:
            raise ValueError("a task needs at least one training example")
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"lengths has {len(lengths)} entries for {size} examples")
        if batch < 1 or window < 1:
            raise ValueError(f"batch ({batch}) and window ({window}) must be >= 1")
        self.size, self.seed, self.task_index = size, seed, task_index
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.batch, self.window = batch, window
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.task_index, epoch]).permutation(self.size)
        if self.lengths is None:
            return perm
        rng = np.random.default_rng([self.seed, self.task_index, epoch, 1])
        return group_by_length(perm, self.lengths, self.batch, self.window, rng)

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            n = min(k - len(out), self.size - self.cursor)
            out.extend(self._perm[self.cursor:self.cursor + n].tolist())
            self.cursor += n
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)


class Schedule:
    """The task(s) of every step, for ``epochs`` epochs of ``steps_per_epoch`` steps."""

    def __init__(self, cfg: ScheduleConfig, sizes: dict[str, int], global_batch: int | dict[str, int],
                 epochs: int, seed: int, steps_per_epoch: int | None = None):
        """``global_batch``: examples per step, one number or one per task."""
        if not sizes:
            raise ValueError("the schedule needs at least one task")
        self.cfg, self.tasks, self.seed = cfg, list(sizes), seed
        self.sizes = np.array([sizes[t] for t in self.tasks], dtype=np.float64)
        per_task = [global_batch[t] if isinstance(global_batch, dict) else global_batch for t in self.tasks]
        batches = [math.ceil(n / b) for n, b in zip(self.sizes, per_task)]
        if steps_per_epoch is None:
            if cfg.kind == "superbatch":  # each step sees every task: same examples per epoch
                steps_per_epoch = math.ceil(sum(self.sizes) / sum(per_task))
            else:
                steps_per_epoch = sum(batches)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.epochs = epochs
        self.total_steps = self.steps_per_epoch * epochs
        # sequential: the step (within an epoch) where each task's block ends
        cum = np.cumsum(batches) / sum(batches)
        self._seq_bounds = [round(self.steps_per_epoch * c) for c in cum]

    def alpha(self, step: int) -> float:
        if self.cfg.kind == "proportional":
            return self.cfg.alpha
        progress = step / max(self.total_steps - 1, 1)
        return self.cfg.alpha_start + (self.cfg.alpha_end - self.cfg.alpha_start) * progress

    def probabilities(self, step: int) -> np.ndarray:
        if self.cfg.kind == "random":
            return np.full(len(self.tasks), 1.0 / len(self.tasks))
        weights = self.sizes ** self.alpha(step)
        return weights / weights.sum()

    def tasks_for_step(self, step: int) -> list[str]:
        kind = self.cfg.kind
        if kind == "superbatch":
            return list(self.tasks)
        if kind == "round_robin":
            return [self.tasks[step % len(self.tasks)]]
        if kind == "sequential":
            within = step % self.steps_per_epoch
            return [next(t for t, end in zip(self.tasks, self._seq_bounds) if within < end)]
        rng = np.random.default_rng([self.seed, 7919, step])
        return [self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities(step)))]]
