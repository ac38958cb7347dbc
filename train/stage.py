"""The skeleton every training loop of the project runs on: the multitask ``Trainer``
(``train/loop.py``), the SimCSE stage (``train/simcse.py``) and, through the Trainer,
``bench.throughput``. A stage supplies its step and its evaluation; this file does the rest once:

- process start: the process group (or a group of one), this rank's device, the kernels backend,
  the seeds;
- the DeepSpeed engine from a model, the optimizer (``build_optimizer``) and the LR schedule
  (``lr_lambda``); with ZeRO-Offload in the DeepSpeed JSON the optimizer is DeepSpeed's CPU Adam;
- the loop (``Stage.fit``): progress bar, ``log.jsonl``, epoch ends, checkpoints at epoch ends,
  every ``save_every_steps`` steps and every ``save_every_minutes`` minutes;
- checkpoints (``train/checkpoints.py`` for the files): model, optimizer, LR schedule, the stage's
  own state, the RNG of every rank, the config, and a manifest of sizes and SHA-256 written before
  ``latest`` moves. Resuming picks the newest complete checkpoint (rank 0 verifies, every rank
  loads the same one), refuses a config that differs on any key that shapes the run, and cuts
  ``log.jsonl`` back to the checkpoint's step;
- stop requests: SIGTERM or SIGUSR1 to any rank (or to the whole process group), or the exit of
  the deepspeed launcher above a rank, make every rank save at the next step boundary and return
  with ``self.stopped`` set. The ranks agree on it every ``stop_check_every`` steps and after
  every save: one all-reduce (MAX) of two integers held on the training device, read once on the
  host, so a step pays no host synchronisation of its own for it;
- export: the full weights gathered from ZeRO shards (``gathered_state``).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import kernels
from kernels._cli import UserError
from minbert.checkpoint import atomic_write_text
from minbert.model import BertModel

from .checkpoints import (CONFIG, LATEST, LOG, CheckpointError, check_world_size, choose_checkpoint,
                          cut_log, prune, read_latest, step_of, tag_for, write_manifest)
from .config import ConfigError, TrainConfig, check_resume, load_config, offloads_optimizer

CHECKPOINTS = "checkpoints"


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why (one line
    in the command-line tools, no traceback)."""


# ----------------------------------------------------------------------------- distributed set-up
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DeepSpeed's CPU accelerator gives every rank of a one-node group a 66 MiB shared-memory
# all-reduce buffer, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>,
# and never unlinks it: each run would leave its buffers in tmpfs (RAM) until the machine
# restarts. Every rank removes its own at exit (the name only: ranks still running keep their
# mapping), and train.recipe removes a killed member's by its port.
SHM_DIR = Path("/dev/shm")


def shared_buffers(port: int | str, rank: int | None = None, addr: str = "*") -> list[Path]:
    """The DeepSpeed CPU all-reduce buffers of the group on ``port`` (of one rank, or of all)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{'*' if rank is None else rank}"
    return sorted(SHM_DIR.glob(name))


def release_shared_buffers(port: int | str, rank: int | None = None, addr: str = "*") -> int:
    """Unlink those buffers; returns how many were removed."""
    removed = 0
    for path in shared_buffers(port, rank, addr):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:  # another rank or process got there first
            pass
    return removed


def init_distributed() -> tuple[int, int, int]:
    """Join (or, as one plain process, create) the process group; returns (rank, world, local_rank)."""
    import deepspeed

    if "RANK" not in os.environ:  # `python train/run.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=True)
        atexit.register(release_shared_buffers, os.environ["MASTER_PORT"], dist.get_rank(),
                        os.environ["MASTER_ADDR"])
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
    """Join the process group, pick this rank's device, choose the kernels backend, listen for
    stop requests; returns (rank, world size, device)."""
    rank, world, local_rank = init_distributed()
    device = _device(local_rank)
    if cfg.model.kernels != "auto":
        kernels.set_backend(cfg.model.kernels)
    STOP.install()
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


# ----------------------------------------------------------------------------- stop requests
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# a launcher's command line: a program of one of these names, or python -m one of these modules
LAUNCHER_PROGRAMS = ("deepspeed", "torchrun")
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run")


class StopRequests:
    """Why this process was asked to stop; None while it was not.

    Set by SIGTERM or SIGUSR1 (so a signal to one rank, to every rank, or to the whole process
    group all end the same way), and by the exit of the launcher processes above this rank (the
    ``deepspeed`` runner exits at once on SIGTERM on a single node; without this its ranks would
    go on, orphaned). Reading ``reason`` is free; ``Stage.fit`` has the ranks agree on it.
    """

    def __init__(self):
        self.reason: str | None = None
        self._watcher: threading.Thread | None = None

    def install(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_signal)
        if self._watcher is None:
            launchers = _launcher_processes()
            if launchers:
                self._watcher = threading.Thread(target=self._watch, args=(launchers,), daemon=True,
                                                 name="minbert-launcher-watch")
                self._watcher.start()
        return self

    def _on_signal(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def clear(self) -> None:
        self.reason = None

    def _watch(self, launchers: list, interval: float = 1.0) -> None:
        import psutil

        while True:
            for p in launchers:
                try:
                    gone = not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
                except psutil.Error:
                    gone = True
                if gone:
                    self.request(f"the launcher (pid {p.pid}) exited")
                    return
            time.sleep(interval)


def _launcher_processes() -> list:
    """The launcher processes directly above this one (deepspeed's per-node ``launch.py`` and the
    ``deepspeed`` runner above it), outermost last; [] for a plain process."""
    try:
        import psutil
    except ImportError:  # DeepSpeed depends on psutil; without it nothing is watched
        return []
    found = []
    try:
        p = psutil.Process().parent()
        while p is not None and len(found) < 2:
            args = p.cmdline()
            if not any(os.path.basename(a) in LAUNCHER_PROGRAMS or a in LAUNCHER_MODULES for a in args[:4]):
                break
            found.append(p)
            p = p.parent()
    except psutil.Error:
        pass
    return found


STOP = StopRequests()  # one per process: signal handlers are process-wide


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


def freeze_parameters(model: torch.nn.Module, freeze: str, layers: tuple[int, int] | None) -> int:
    """Stop training what ``model.freeze`` names (``requires_grad`` off: no gradient is computed
    and ``param_groups`` leaves them out, so they get no optimizer state); returns how many
    parameter tensors were frozen. ``model`` is a ``MultitaskBert``."""
    if freeze == "none":
        return 0
    bert = model.bert
    if freeze == "encoder":
        chosen = list(bert.parameters())
    elif freeze == "embeddings":
        chosen = list(bert.embeddings.parameters())
    else:
        first, last = layers
        n = len(bert.encoder.layer)
        if last >= n:
            raise ConfigError(f"model.freeze {freeze!r} names layer {last}, but the encoder has "
                              f"{n} layers (0-{n - 1})")
        chosen = [p for i in range(first, last + 1) for p in bert.encoder.layer[i].parameters()]
    for p in chosen:
        p.requires_grad_(False)
    return len(chosen)


_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)embeddings\.")


def lr_depth(name: str, n_layers: int) -> int:
    """How far below the top a parameter sits for ``optim.layer_decay``: encoder layer i of n is
    n - i, the embeddings n + 1, everything else (pooler, the heads' own layers, heads) 0."""
    if _EMBEDDINGS.search(name):
        return n_layers + 1
    match = _LAYER.search(name)  # the heads' own layers are "head_layers.<task>.<i>.": no match
    return n_layers - int(match[1]) if match else 0


def param_groups(cfg: TrainConfig, model: torch.nn.Module, lr: float | None = None) -> list[dict]:
    """The optimizer's parameter groups: no weight decay on biases and LayerNorm weights; the
    heads (and the shared pair projection) at ``optim.head_lr``; the encoder and the heads' own
    transformer layers at ``lr`` (default ``optim.lr``), each encoder layer scaled by
    ``optim.layer_decay`` to the power of its ``lr_depth``. Frozen parameters (``requires_grad``
    off) are left out."""
    o = cfg.optim
    lr = o.lr if lr is None else lr
    n_layers = 0  # the encoder's (frozen ones included); 0: no layer-wise decay
    if o.layer_decay != 1.0:
        n_layers = 1 + max((int(m[1]) for name, _ in model.named_parameters() if (m := _LAYER.search(name))),
                           default=-1)
    groups: dict[tuple[bool, bool, int], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name.endswith("bias") or "LayerNorm" in name
        is_head = name.startswith(("heads.", "shared_pair."))
        depth = 0 if is_head or not n_layers else lr_depth(name, n_layers)
        groups.setdefault((is_head, no_decay, depth), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else o.weight_decay,
             "lr": (o.head_lr or lr) if is_head else lr * o.layer_decay ** depth}
            for (is_head, no_decay, depth), ps in sorted(groups.items())]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float | None = None,
                    offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. ``lr``: the encoder's learning rate instead of
    ``cfg.optim.lr`` (the SimCSE stage's). ``offload``: the optimizer runs on the CPU
    (ZeRO-Offload): DeepSpeed's vectorised CPU Adam for ``optim.name`` "auto", torch's AdamW for
    "adamw"."""
    o = cfg.optim
    if lr is not None:
        o = dataclasses.replace(o, lr=lr)
    groups = param_groups(cfg, model, lr)
    name = o.name
    if offload:
        if name == "fused_adamw":
            raise ConfigError("optim.name 'fused_adamw' runs on the GPU, but the DeepSpeed config "
                              "offloads the optimizer to the CPU: use 'auto' or 'adamw'")
        if name == "auto":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
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


def deepspeed_config_error(error: Exception, source: str | None) -> ConfigError | None:
    """DeepSpeed's (pydantic) validation error about a user's DeepSpeed JSON as one ConfigError
    naming each bad key; None for any other exception (or when there is no user file)."""
    if source is None or type(error).__name__ != "ValidationError" or not hasattr(error, "errors"):
        return None
    parts = [f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
             for err in error.errors()]
    return ConfigError(f"DeepSpeed rejects {source} ({error.title}): {'; '.join(parts)}")


def check_deepspeed_config(ds_config: dict, source: str | None) -> None:
    """Check the ZeRO section of a merged DeepSpeed JSON as DeepSpeed will (no process group
    needed), so a typo in a user's file stops the run before anything starts."""
    if source is None:
        return
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    except Exception as e:
        error = deepspeed_config_error(e, source)
        if error is None:
            raise
        raise error from None


# ----------------------------------------------------------------------------- the skeleton
@dataclass
class StepResult:
    step: int
    losses: dict[str, float]  # mean loss per task over the global batch
    examples: int  # examples in the step, all ranks
    tokens: int  # non-padding tokens in the step, all ranks
    seconds: float


class Stage:
    """One training stage: ``Stage(cfg, data, out, resume=...)``, then ``fit()``.

    A subclass sets ``total_steps`` and ``steps_per_epoch``, calls ``build_engine`` at the end of
    its ``__init__`` (which loads the checkpoint when resuming), and supplies ``train_step()``
    (-> StepResult), ``evaluate()``, ``after_step(result, bar)`` (logging), ``end_of_epoch(bar)``,
    ``state_dict()`` / ``load_state_dict()`` (what its checkpoints hold beyond the engine and the
    RNG) and ``result()`` (what ``fit`` returns).
    """

    checkpoint_dir = CHECKPOINTS  # under out_dir
    log_stage: str | None = None  # the "stage" field of this stage's log records (None: none)
    desc = "train"  # progress bar label
    save_final = True  # save a checkpoint after the last step too (False: the stage exports instead)
    finished_early: dict | None = None  # set by end_of_epoch to end the run there (early stopping)

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path,
                 progress: bool = True, resume: str | Path | None = None):
        """``resume``: a run directory (its newest complete checkpoint of this stage) or one
        checkpoint directory. The checkpoint is chosen and its config checked here, before any
        data is read."""
        self.cfg = cfg
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.rank, self.world, self.device = start_process(cfg)
        self.is_main = self.rank == 0
        self.show_progress = progress and self.is_main
        self.step = 0
        self.total_steps = self.steps_per_epoch = 0
        self.stopped: dict | None = None  # set when fit() ended early on a stop request
        self._saved_step: int | None = None
        self._last_save = time.monotonic()
        seed_everything(cfg.seed)
        self.resume_from = self._choose_checkpoint(Path(resume)) if resume is not None else None

    # ------------------------------------------------------------------ helpers
    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / self.checkpoint_dir

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def log(self, record: dict) -> None:
        if self.is_main:
            if self.log_stage is not None:
                record = {"stage": self.log_stage, **record}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        """A line on rank 0's stdout."""
        if self.is_main:
            print(text, flush=True)

    def latest_checkpoint(self) -> Path | None:
        return read_latest(self.checkpoint_root)

    # ------------------------------------------------------------------ engine
    def build_engine(self, model: torch.nn.Module, ds_config: dict, lr: float | None = None,
                     warmup_ratio: float | None = None) -> None:
        """The DeepSpeed engine over ``model`` with the optimizer and LR schedule of the config
        (``lr`` / ``warmup_ratio``: the stage's own), for ``self.total_steps`` steps; then the
        checkpoint chosen at construction, if resuming."""
        import deepspeed

        offload = offloads_optimizer(ds_config)
        optimizer = build_optimizer(self.cfg, model, lr, offload=offload)
        if offload and type(optimizer).__name__ != "DeepSpeedCPUAdam":  # optim.name "adamw" asked for
            ds_config = {**ds_config, "zero_force_ds_cpu_optimizer": False}  # torch's AdamW on the CPU
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.cfg, self.total_steps, warmup_ratio))
        self.ds_config = ds_config
        try:
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        except Exception as e:
            error = deepspeed_config_error(e, self.cfg.deepspeed.config_file)
            if error is None:
                raise
            raise error from None
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

    def gathered_state(self) -> dict[str, torch.Tensor]:
        """The model's full state dict, fp32 on the CPU, gathered from ZeRO-3 shards (every rank
        must call it)."""
        from deepspeed import zero

        module = self.engine.module
        with zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                     enabled=self.cfg.deepspeed.zero_stage == 3):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    def close(self) -> None:
        """Drop the engine (its optimizer state), e.g. before the next stage builds its own."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        del self.engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ checkpoints
    def _warn(self, text: str) -> None:
        import sys

        print(text, file=sys.stderr, flush=True)

    def _choose_checkpoint(self, resume: Path) -> Path:
        """Rank 0 picks the newest complete checkpoint (falling back past damaged ones, with a
        warning naming the bad file); every rank gets its choice; its config must match."""
        explicit = resume if step_of(resume) is not None else None
        root = resume.parent if explicit is not None else resume / self.checkpoint_dir
        chosen = error = None
        if self.is_main:
            try:
                path = choose_checkpoint(root, explicit, warn=self._warn)
                check_world_size(path, self.world)
                chosen = str(path)
            except CheckpointError as e:
                error = str(e)
        chosen, error = self._broadcast((chosen, error))
        if error is not None:
            raise CheckpointError(error)
        path = Path(chosen)
        check_resume(load_config(path / CONFIG, complete=True), self.cfg, path)
        return path

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint of this step: every rank writes its files, rank 0 writes the
        config and the manifest, then moves ``latest`` and prunes. Saving the step already saved
        (or resumed from) does nothing."""
        root = self.checkpoint_root
        path = root / tag_for(self.step)
        if self._saved_step == self.step:
            return path
        self.before_save()
        if self.is_main:
            if path.exists():  # left by an interrupted save, or by a timeline resumed earlier
                shutil.rmtree(path)
            path.mkdir(parents=True)
        self._barrier()
        torch.save(_rng_state(), path / f"rng_rank{self.rank}.pt")
        client_state = {"step": self.step, "stage": self.state_dict(), "config": self.cfg.to_dict()}
        self.engine.save_checkpoint(str(root), tag=path.name, client_state=client_state,
                                    save_latest=False)
        self._barrier()
        if self.is_main:
            self.cfg.save(path / CONFIG)
            write_manifest(path, self.step, self.world)
            atomic_write_text(root / LATEST, path.name + "\n")
            prune(root, self.cfg.keep_checkpoints, path)
        self._barrier()
        self._saved_step, self._last_save = self.step, time.monotonic()
        return path

    def _load_checkpoint(self, path: Path) -> None:
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        rng_file = path / f"rng_rank{self.rank}.pt"
        if not rng_file.is_file():
            raise CheckpointError(f"{path} holds no RNG state for rank {self.rank}")
        self.step = int(client["step"])
        self.load_state_dict(client["stage"])
        _set_rng_state(torch.load(rng_file, weights_only=False))
        self._saved_step = self.step
        if self.is_main:
            dropped = cut_log(self.out_dir / LOG, self.step, self.log_stage)
            note = f"; {dropped} log record(s) after it dropped from {LOG}" if dropped else ""
            print(f"resumed from {path} at step {self.step}{note}", flush=True)

    # ------------------------------------------------------------------ stop requests
    def _agree(self) -> tuple[bool, bool]:
        """(stop requested on any rank, a timed save due on any rank): the same on every rank.
        One all-reduce on the training device and one host read."""
        minutes = self.cfg.save_every_minutes
        flags = [STOP.reason is not None,
                 minutes is not None and time.monotonic() - self._last_save >= 60 * minutes]
        if self.world > 1:
            t = torch.tensor(flags, dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [bool(v) for v in t.tolist()]
        return flags[0], flags[1]

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_after: int | None = None):
        """Train to the end of the schedule, or until a stop request (then ``self.stopped`` says
        where the checkpoint is), or until step ``stop_after`` (save and return: how tests split
        a run in two)."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc,
                   disable=not self.show_progress, dynamic_ncols=True)
        if self.finished_early is not None:  # resumed from the checkpoint that ended the run
            bar.close()
            return self.result()
        if self.step < self.total_steps and self._agree()[0]:  # asked to stop while starting up
            return self._stop(bar)
        while self.step < self.total_steps:
            if stop_after is not None and self.step >= stop_after:
                self.save_checkpoint()
                break
            result = self.train_step()
            bar.update(1)
            self.after_step(result, bar)
            saved = False
            if self.step % self.steps_per_epoch == 0:
                self.end_of_epoch(bar)
                if self.finished_early is not None:  # early stopping: this epoch ends the run
                    if self.save_final:
                        self.save_checkpoint()
                    break
                if self.save_final or self.step < self.total_steps:
                    self.save_checkpoint()
                    saved = True
            elif cfg.save_every_steps is not None and self.step % cfg.save_every_steps == 0:
                self.save_checkpoint()
                saved = True
            if saved or self.step % cfg.stop_check_every == 0:
                stop, timed = self._agree()
                if timed:
                    self.save_checkpoint()
                if stop and self.step < self.total_steps:
                    return self._stop(bar)
        bar.close()
        return self.result()

    def _stop(self, bar):
        """Save this step (every rank) and end ``fit`` with ``self.stopped`` saying where."""
        path = self.save_checkpoint()
        self.stopped = {"reason": STOP.reason or "a stop request on another rank", "step": self.step,
                        "total_steps": self.total_steps, "checkpoint": str(path)}
        bar.close()
        self.say(f"{self.desc}: stopped at step {self.step} of {self.total_steps} "
                 f"({self.stopped['reason']}); checkpoint {path}")
        return self.result()

    # ------------------------------------------------------------------ what a stage supplies
    def train_step(self) -> StepResult:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def after_step(self, result: StepResult, bar) -> None:
        """Log the step (and show it on the bar)."""

    def before_save(self) -> None:
        """Called before every checkpoint is written (e.g. to check values kept on the device)."""

    def end_of_epoch(self, bar) -> None:
        """Evaluate, export; the skeleton saves a checkpoint after it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def result(self):
        return None
