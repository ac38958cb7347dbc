"""Typed training configuration: JSON in, checked on load, DeepSpeed config derived from it.

A config file is a JSON object whose keys mirror the dataclasses below; an unknown key anywhere is
an error that names it. ``--key.sub value`` command-line overrides go through the same checks. The
DeepSpeed JSON is *produced* from this config (``deepspeed_config``), so the batch sizes, ZeRO
stage, precision and clipping that DeepSpeed uses can never disagree with the training loop's.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kernels._cli import UserError

TASK_NAMES = ("sst", "quora", "sts")
SCHEDULES = ("sequential", "round_robin", "random", "proportional", "annealed", "superbatch")


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid; the message names it."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (``minbert.lora``): r = 0 is off; r > 0 freezes the whole encoder and
    trains adapters on ``targets`` of every layer, plus the task heads. Exports merge them."""

    r: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value"])

    def __post_init__(self):
        from minbert.lora import LORA_TARGETS

        if self.r < 0:
            raise ConfigError(f"model.lora.r must be >= 0 (0 = off), got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must lie in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"model.lora.targets must be a non-empty list from "
                              f"{sorted(LORA_TARGETS)}, got {self.targets!r}")


@dataclass
class ModelConfig:
    checkpoint: str | None = None  # HF-format BERT directory; None = embedded all-MiniLM-L6-v2
    kernels: Literal["auto", "eager", "triton"] = "auto"  # kernels backend; auto = triton on CUDA
    hidden_dropout: float | None = None  # override the checkpoint's dropout (None = keep)
    attention_dropout: float | None = None
    head_dropout: float = 0.1  # dropout before each task head
    # run the encoder on the real tokens only (BertConfig.unpad); None = the checkpoint's (true
    # unless its config.json says otherwise)
    unpad: bool | None = None
    # parameters the multitask stage does not train (no gradient, no optimizer state): "none",
    # "encoder" (the whole BERT: only the task heads learn, the "last linear layer" baseline),
    # "embeddings", or "layers:A-B" (encoder layers A..B, inclusive, 0-based)
    freeze: str = "none"
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        for name in ("hidden_dropout", "attention_dropout", "head_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must lie in [0, 1), got {value!r}")
        self.freeze_layers()  # checks the form

    def freeze_layers(self) -> tuple[int, int] | None:
        """(A, B) of ``freeze = "layers:A-B"``, None for the other forms; raises on a bad form."""
        if self.freeze in ("none", "encoder", "embeddings"):
            return None
        match = re.fullmatch(r"layers:(\d+)-(\d+)", str(self.freeze))
        if match is None or int(match[1]) > int(match[2]):
            raise ConfigError(f"model.freeze must be 'none', 'encoder', 'embeddings' or "
                              f"'layers:A-B' with A <= B (e.g. 'layers:0-3'), got {self.freeze!r}")
        return int(match[1]), int(match[2])


@dataclass
class TaskConfig:
    enabled: bool = True
    form: Literal["cross", "bi"] = "cross"  # pair tasks: one [CLS] a [SEP] b [SEP] pass, or two towers
    pooling: Literal["cls", "mean"] = "cls"  # [CLS] vector (BERT pooler) or mean over real tokens
    head: Literal["concat", "cosine"] = "concat"  # bi-encoder: [u, v, |u-v|, u*v] -> linear, or cosine
    weight: float = 1.0  # loss weight (superbatch "weighted" reduction)
    max_train: int | None = None  # train on a seeded random N of the examples (None = all)
    max_eval: int | None = None  # evaluate on a seeded random N of the dev examples (None = all)
    max_length: int = 128  # tokens per sequence (pairs: both sentences together)
    # examples of this task per optimizer step over all ranks (null: deepspeed.global_batch);
    # the accumulation steps stay DeepSpeed's, so the task's micro-batches are
    # global_batch / (accumulation x world size) examples
    global_batch: int | None = None
    # the encoder layer whose hidden states feed the head (0 = the embeddings, -1 = the last);
    # the layers above it are not computed for this task
    layer: int = -1
    head_layers: int = 0  # transformer layers of the head's own after ``layer`` (0-3)
    head_init: Literal["copy", "random"] = "copy"  # copy: of the encoder layers after ``layer``
    # bi-encoder concat heads (form "bi", head "concat"): what the head sees of the two sentence
    # vectors, any of u, v, abs_diff, prod, cos
    features: list[str] = field(default_factory=lambda: ["u", "v", "abs_diff", "prod"])
    # sts only: the head's scale, "0-5" (similarity units) or "0-1" (trained against gold / 5),
    # and "sigmoid" to squash a "0-1" head's output into [0, 1]
    target: Literal["0-5", "0-1"] = "0-5"
    output: Literal["linear", "sigmoid"] = "linear"

    def check(self, task: str) -> None:
        if self.weight < 0:
            raise ConfigError(f"tasks.{task}.weight must be >= 0, got {self.weight}")
        for name in ("max_train", "max_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"tasks.{task}.{name} must be >= 1 or null, got {value}")
        if self.max_length < 8:
            raise ConfigError(f"tasks.{task}.max_length must be >= 8, got {self.max_length}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ConfigError(f"tasks.{task}.global_batch must be >= 1 or null, got {self.global_batch}")
        if self.layer < -1:
            raise ConfigError(f"tasks.{task}.layer must be -1 (the last) or >= 0, got {self.layer}")
        if not 0 <= self.head_layers <= 3:
            raise ConfigError(f"tasks.{task}.head_layers must be in [0, 3], got {self.head_layers}")
        from minbert.heads import output_problem

        problem = output_problem(task, self.features, self.target, self.output)
        if problem:
            raise ConfigError(f"tasks.{task}.{problem}")
        if task == "sst" and (self.form != "cross" or self.head != "concat"):
            raise ConfigError("tasks.sst is a single-sentence task: form and head do not apply")


@dataclass
class TasksConfig:
    sst: TaskConfig = field(default_factory=TaskConfig)
    quora: TaskConfig = field(default_factory=TaskConfig)
    sts: TaskConfig = field(default_factory=TaskConfig)
    # quora and sts share one projection (hidden units, tanh) before their own output layers;
    # both must be enabled with heads of one input width
    shared_pair_head: bool = False

    def __post_init__(self):
        for name in TASK_NAMES:
            getattr(self, name).check(name)
        if not self.enabled():
            raise ConfigError("tasks: at least one of sst, quora, sts must be enabled")
        if self.shared_pair_head and not (self.quora.enabled and self.sts.enabled):
            raise ConfigError("tasks.shared_pair_head needs quora and sts both enabled")

    def enabled(self) -> list[str]:
        return [name for name in TASK_NAMES if getattr(self, name).enabled]


@dataclass
class DataConfig:
    # Length-grouped sampling (the HF Trainer's group_by_length): each pass over a task is
    # shuffled, then sorted by token count within windows of ``group_window`` micro-batches, and
    # the window's batches are served in a shuffled order. Helps the padded path (unpad off); the
    # unpadded model wastes nothing on padding anyway. Resume and seeds work as without it.
    group_by_length: bool = False
    group_window: int = 50  # micro-batches per sorted window

    def __post_init__(self):
        if self.group_window < 1:
            raise ConfigError(f"data.group_window must be >= 1, got {self.group_window}")


@dataclass
class ScheduleConfig:
    kind: Literal["sequential", "round_robin", "random", "proportional", "annealed", "superbatch"] = "annealed"
    alpha: float = 0.5  # proportional: P(task i) ~ n_i ** alpha
    alpha_start: float = 1.0  # annealed: alpha goes linearly from alpha_start ...
    alpha_end: float = 0.2  # ... to alpha_end over the training run
    superbatch_reduce: Literal["sum", "weighted"] = "sum"  # superbatch: sum or task-weighted sum

    def __post_init__(self):
        for name in ("alpha", "alpha_start", "alpha_end"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    # kernels.FusedAdamW ("fused_adamw") or torch.optim.AdamW ("adamw", torch's fused
    # implementation on CPU and CUDA); "auto": kernels.FusedAdamW on CUDA, torch's on CPU (the
    # Triton optimizer only runs in the interpreter there, a correctness tool)
    name: Literal["auto", "adamw", "fused_adamw"] = "auto"
    lr: float = 5e-5
    head_lr: float | None = None  # learning rate of the task heads (None = lr)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warm-up
    warmup_ratio: float = 0.1  # fraction of all steps spent warming up linearly from 0
    grad_clip: float = 1.0  # global gradient-norm clipping (0 = off)
    # layer-wise learning-rate decay: encoder layer i of n trains at lr x layer_decay^(n - i), the
    # embeddings at lr x layer_decay^(n + 1); the pooler and the heads' own layers at lr, the
    # heads at head_lr (1.0 = off)
    layer_decay: float = 1.0

    def __post_init__(self):
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ConfigError("optim.lr and optim.head_lr must be > 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must lie in (0, 1] (1 = off), got {self.layer_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        self.betas = tuple(self.betas)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = True  # bf16 weights/activations with fp32 master weights in the optimizer
    global_batch: int = 32  # examples per optimizer step, over all ranks and accumulation steps
    micro_batch_per_device: int = 32  # examples per forward/backward on one rank
    monitor_csv: bool = False  # DeepSpeed's CSV monitor (out/monitor/)
    monitor_tensorboard: bool = False  # DeepSpeed's TensorBoard monitor (needs tensorboard)
    # a DeepSpeed JSON of the user's merged over the derived one (offload, overlap_comm, bucket
    # sizes, ...); "auto" values are filled from this config, disagreeing values are errors
    config_file: str | None = None

    def __post_init__(self):
        for name in ("global_batch", "micro_batch_per_device"):
            if getattr(self, name) < 1:
                raise ConfigError(f"deepspeed.{name} must be >= 1, got {getattr(self, name)}")

    def grad_accum(self, world_size: int) -> int:
        """Accumulation steps so that micro x accumulation x world = global; an error if none."""
        per_step = self.micro_batch_per_device * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"deepspeed.global_batch ({self.global_batch}) is not a multiple of "
                f"micro_batch_per_device ({self.micro_batch_per_device}) x world size ({world_size}) "
                f"= {per_step}; choose sizes whose product divides the global batch")
        return self.global_batch // per_step


@dataclass
class SimCSEConfig:
    """The optional contrastive stage run before the multitask stage (``train.simcse``)."""

    enabled: bool = False
    # unsup: each sentence of every task's training file twice through the model, dropout the
    # only noise; sup: (anchor, positive, hard negative) triples from Quora and STS
    mode: Literal["unsup", "sup"] = "unsup"
    epochs: int = 1  # passes over the stage's data
    max_steps: int | None = None  # stop after this many steps (None = all epochs)
    max_examples: int | None = None  # a seeded random N sentences (unsup) or triples (sup)
    # sentences (unsup) or triples (sup) per step over all ranks; each rank encodes its share in
    # one forward and the embeddings are gathered, so every row sees the whole batch as negatives
    global_batch: int = 64
    lr: float = 3e-5
    warmup_ratio: float = 0.0
    temperature: float = 0.05
    max_length: int = 32  # tokens per sentence
    # mean of the real tokens (how the embedded all-MiniLM-L6-v2 was trained) or the BERT pooler
    # on [CLS] (the SimCSE paper's MLP over [CLS])
    pooling: Literal["cls", "mean"] = "mean"
    sts_threshold: float = 4.0  # sup: STS pairs scored at least this are positives
    eval_max: int | None = None  # zero-shot STS on a seeded random N of the dev pairs (None = all)
    # joint SimCSE: add joint_weight x the unsupervised contrastive loss of each multitask
    # micro-batch's sentences (two dropout views, pooled as each task pools, negatives gathered
    # over the ranks) to every multitask step; 0 = off. Independent of ``enabled`` (the stage).
    joint_weight: float = 0.0

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"simcse.epochs must be >= 1, got {self.epochs}")
        if self.joint_weight < 0:
            raise ConfigError(f"simcse.joint_weight must be >= 0 (0 = off), got {self.joint_weight}")
        for name in ("max_steps", "max_examples", "eval_max"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"simcse.{name} must be >= 1 or null, got {value}")
        if self.global_batch < 2:
            raise ConfigError(f"simcse.global_batch must be >= 2 (in-batch negatives), got "
                              f"{self.global_batch}")
        if self.lr <= 0:
            raise ConfigError(f"simcse.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"simcse.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if not self.temperature > 0:
            raise ConfigError(f"simcse.temperature must be > 0, got {self.temperature}")
        if self.max_length < 8:
            raise ConfigError(f"simcse.max_length must be >= 8, got {self.max_length}")
        if not 0.0 <= self.sts_threshold <= 5.0:
            raise ConfigError(f"simcse.sts_threshold must lie in [0, 5], got {self.sts_threshold}")

    def per_rank_batch(self, world_size: int) -> int:
        if self.global_batch % world_size:
            raise ConfigError(f"simcse.global_batch ({self.global_batch}) is not a multiple of the "
                              f"world size ({world_size})")
        return self.global_batch // world_size


@dataclass
class SmartConfig:
    """SMART regularisation of the multitask stage (``train.smart``)."""

    enabled: bool = False
    weight: float = 1.0  # of the adversarial smoothness term
    epsilon: float = 1e-5  # the perturbation's box (max-norm) on the input embeddings
    step_size: float = 1e-3  # of each normalised ascent step
    noise_std: float = 1e-5  # of the initial perturbation
    steps: int = 1  # ascent steps
    bregman_weight: float = 1.0  # of the proximal term against the momentum copy (0 = off)
    momentum: float = 0.99  # of the copy's moving average

    def __post_init__(self):
        for name in ("weight", "epsilon", "step_size", "noise_std", "bregman_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"smart.{name} must be >= 0, got {getattr(self, name)}")
        if self.steps < 1:
            raise ConfigError(f"smart.steps must be >= 1, got {self.steps}")
        if self.enabled and self.weight == 0 and self.bregman_weight == 0:
            raise ConfigError("smart.weight and smart.bregman_weight are both 0: SMART would add "
                              "nothing; set one of them above 0 or smart.enabled false")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"smart.momentum must lie in [0, 1), got {self.momentum}")


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = 0
    epochs: int = 3
    steps_per_epoch: int | None = None  # None: as many as the data gives (see train.schedules)
    pcgrad: bool = False  # project conflicting task gradients (needs schedule.kind = superbatch)
    # PCGrad from this epoch on (1-based) within one run; before it the tasks' gradients are
    # summed unprojected through the same per-task path (null: as ``pcgrad`` says)
    pcgrad_from_epoch: int | None = None
    eval_batch_size: int = 64
    log_every: int = 10  # steps between log lines
    keep_checkpoints: int = 2  # resumable DeepSpeed checkpoints kept (the newest ones)
    save_every_steps: int | None = None  # also save a checkpoint every N steps (None: epoch ends only)
    save_every_minutes: float | None = None  # also save when this long has passed since the last save
    # steps between the ranks' agreement on a stop request (SIGTERM / SIGUSR1) or a timed save:
    # one all-reduce of two integers on the device and one host read per check
    stop_check_every: int = 10
    # end the run after this many epochs in a row without a better dev overall (0 = off); the
    # best export (out/best) stays the best epoch's
    early_stopping_patience: int = 0
    # end the run after this epoch (null: run every epoch); the schedules (learning rate, task
    # sampling) still span all `epochs`, so the epochs trained are those of the longer run, cut
    stop_after_epoch: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    simcse: SimCSEConfig = field(default_factory=SimCSEConfig)
    smart: SmartConfig = field(default_factory=SmartConfig)

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1 or null, got {self.steps_per_epoch}")
        if self.pcgrad and self.pcgrad_from_epoch is not None:
            raise ConfigError("set pcgrad (PCGrad from the first step) or pcgrad_from_epoch, not both")
        if self.pcgrad_from_epoch is not None and not 1 <= self.pcgrad_from_epoch <= self.epochs:
            raise ConfigError(f"pcgrad_from_epoch must be in [1, epochs = {self.epochs}] or null, got "
                              f"{self.pcgrad_from_epoch}")
        if self.pcgrad_layout and self.schedule.kind != "superbatch":
            raise ConfigError("pcgrad needs every task's gradient in each step: set "
                              "schedule.kind to 'superbatch'")
        if self.pcgrad_layout and self.deepspeed.zero_stage == 3:
            raise ConfigError("pcgrad works under ZeRO stages 0, 1 and 2 (stage 3 shards the "
                              "parameters it projects)")
        if self.pcgrad_layout and len(self.tasks.enabled()) < 2:
            raise ConfigError("pcgrad needs at least two enabled tasks")
        if self.smart.enabled and self.pcgrad_layout:
            raise ConfigError("smart works without pcgrad (its terms are not tasks)")
        if self.smart.enabled and self.smart.bregman_weight > 0 and self.deepspeed.zero_stage == 3:
            raise ConfigError("smart.bregman_weight needs ZeRO stages 0-2 (its momentum copy is built "
                              "from full weights on every rank); set it to 0 under stage 3")
        if self.pcgrad_layout and self.simcse.joint_weight > 0:
            raise ConfigError("simcse.joint_weight works without pcgrad (PCGrad projects the "
                              "tasks' gradients; the joint loss is not a task)")
        if self.eval_batch_size < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("eval_batch_size, log_every and keep_checkpoints must be >= 1")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise ConfigError(f"save_every_steps must be >= 1 or null, got {self.save_every_steps}")
        if self.save_every_minutes is not None and not self.save_every_minutes > 0:
            raise ConfigError(f"save_every_minutes must be > 0 or null, got {self.save_every_minutes}")
        if self.stop_check_every < 1:
            raise ConfigError(f"stop_check_every must be >= 1, got {self.stop_check_every}")
        if self.stop_after_epoch is not None and not 1 <= self.stop_after_epoch <= self.epochs:
            raise ConfigError(f"stop_after_epoch must be in [1, epochs = {self.epochs}] or null, got "
                              f"{self.stop_after_epoch}")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"early_stopping_patience must be >= 0 (0 = off), got "
                              f"{self.early_stopping_patience}")

    def task_batch(self, task: str) -> int:
        """Examples of ``task`` per optimizer step, over all ranks."""
        return getattr(self.tasks, task).global_batch or self.deepspeed.global_batch

    def check_task_batches(self, world_size: int) -> None:
        """Every task's batch splits into the same accumulation steps as DeepSpeed's."""
        per_micro = self.deepspeed.grad_accum(world_size) * world_size
        for t in self.tasks.enabled():
            if self.task_batch(t) % per_micro:
                raise ConfigError(f"tasks.{t}.global_batch ({self.task_batch(t)}) is not a multiple of "
                                  f"the accumulation steps x world size ({per_micro}): each rank "
                                  f"takes the same number of micro-batches of every task")

    @property
    def pcgrad_layout(self) -> bool:
        """Whether steps go through the per-task gradient path (PCGrad now or from an epoch on):
        DeepSpeed then sees one backward per step."""
        return self.pcgrad or self.pcgrad_from_epoch is not None

    # ------------------------------------------------------------------ DeepSpeed
    def deepspeed_config(self, world_size: int, monitor_dir: str | None = None,
                         hidden_size: int | None = None) -> dict:
        """The DeepSpeed JSON for ``world_size`` ranks: derived from this config, with the user's
        ``deepspeed.config_file`` merged over it (``merge_deepspeed``; ``hidden_size`` fills the
        bucket sizes a user left "auto").

        With PCGrad the loop feeds DeepSpeed one backward per step (the projected gradient), so
        DeepSpeed accumulates nothing and sees the whole per-rank batch as its micro-batch.
        """
        ds = self.deepspeed
        accum = ds.grad_accum(world_size)
        micro = ds.micro_batch_per_device
        if self.pcgrad_layout:
            micro, accum = micro * accum, 1
        out: dict[str, Any] = {
            "train_batch_size": ds.global_batch,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            "gradient_clipping": self.optim.grad_clip,
            "bf16": {"enabled": ds.bf16},
            "zero_optimization": {"stage": ds.zero_stage},
            "steps_per_print": 10 ** 9,  # our own logger reports progress
            "wall_clock_breakdown": False,
            "zero_allow_untested_optimizer": True,
        }
        if ds.zero_stage == 3:
            out["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.monitor_csv or ds.monitor_tensorboard:
            if monitor_dir is None:
                raise ConfigError("a DeepSpeed monitor needs an output directory")
            if ds.monitor_csv:
                out["csv_monitor"] = {"enabled": True, "output_path": monitor_dir, "job_name": self.name}
            if ds.monitor_tensorboard:
                out["tensorboard"] = {"enabled": True, "output_path": monitor_dir, "job_name": self.name}
        if ds.config_file is not None:
            out = merge_deepspeed(out, read_deepspeed_json(ds.config_file), ds.config_file, hidden_size)
        return out

    def simcse_deepspeed_config(self, world_size: int, hidden_size: int | None = None) -> dict:
        """The DeepSpeed JSON of the SimCSE stage: the multitask stage's ZeRO stage, precision,
        clipping and user settings; the stage's own batch, one forward per rank per step (no
        accumulation: the in-batch negatives must all be in one loss). The batch sizes of a user's
        file are the multitask stage's and do not apply here."""
        out = dataclasses.replace(self, deepspeed=dataclasses.replace(self.deepspeed, config_file=None))
        out = out.deepspeed_config(world_size, monitor_dir="")  # the monitors are the multitask stage's
        out.pop("csv_monitor", None)
        out.pop("tensorboard", None)
        out.update(train_batch_size=self.simcse.global_batch,
                   train_micro_batch_size_per_gpu=self.simcse.per_rank_batch(world_size),
                   gradient_accumulation_steps=1)
        if self.deepspeed.config_file is not None:
            user = read_deepspeed_json(self.deepspeed.config_file)
            for key in BATCH_KEYS:
                user.pop(key, None)
            out = merge_deepspeed(out, user, self.deepspeed.config_file, hidden_size)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from minbert.checkpoint import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------- a user's DeepSpeed JSON
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed settings the run config decides: a user's file must agree with them or say "auto"
DECIDED_BY = {
    "train_batch_size": "deepspeed.global_batch",
    "train_micro_batch_size_per_gpu": "deepspeed.micro_batch_per_device",
    "gradient_accumulation_steps": "deepspeed.global_batch / (micro_batch_per_device x world size)",
    "gradient_clipping": "optim.grad_clip",
    "bf16.enabled": "deepspeed.bf16",
    "zero_optimization.stage": "deepspeed.zero_stage",
}
# Sections the training loop owns (it hands DeepSpeed its own optimizer and LR schedule).
OWNED_SECTIONS = {"optimizer": "optim.name, optim.lr, optim.betas, optim.eps, optim.weight_decay",
                  "scheduler": "optim.lr_schedule, optim.warmup_ratio"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _auto_fills(hidden_size: int | None) -> dict[str, Any]:
    """"auto" values the model decides (the HF Trainer's choices); None until the model is known."""
    h = hidden_size
    return {"fp16.enabled": False,
            "zero_optimization.reduce_bucket_size": h * h if h else None,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h) if h else None,
            "zero_optimization.stage3_param_persistence_threshold": 10 * h if h else None}


def _read_json_object(path: Path, what: str) -> dict:
    """The JSON object in the existing file ``path``; a ConfigError starting with ``what``."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: the file must hold a JSON object")
    return data


def read_deepspeed_json(path: str | Path) -> dict:
    """A user's DeepSpeed JSON file; a ConfigError naming the file if it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file {path}: no such file")
    return _read_json_object(path, f"deepspeed.config_file {path}")


def merge_deepspeed(derived: dict, user: dict, source: str | Path,
                    hidden_size: int | None = None) -> dict:
    """``user`` (a DeepSpeed JSON) merged over ``derived`` (the one this config gives).

    - ``"auto"`` takes the derived value, or the model's (bucket sizes from ``hidden_size``, as the
      HF Trainer does); an "auto" nothing fills is an error.
    - The batch sizes, clipping, bf16 and the ZeRO stage (``DECIDED_BY``) must equal the derived
      values: a difference is an error naming both and the run-config key that decides it.
    - ``optimizer`` / ``scheduler`` sections are errors (the loop brings its own); fp16 too.
    - Everything else (offload, overlap_comm, bucket sizes, activation checkpointing, ...) is the
      user's.
    """
    for section, keys in OWNED_SECTIONS.items():
        if section in user:
            raise ConfigError(f"{source}: remove the {section!r} section: the {section} comes from "
                              f"the run config ({keys})")
    have = _flatten(derived)
    fills = _auto_fills(hidden_size)
    merged = json.loads(json.dumps(derived))
    for key, value in _flatten(user).items():
        if value == {}:
            continue
        if value == "auto":
            if key in have:
                value = have[key]
            elif key in fills:
                if fills[key] is None:
                    continue  # known once the model is built
                value = fills[key]
            else:
                raise ConfigError(f"{source}: {key} is \"auto\" but the run config has nothing to "
                                  "fill it with; give a value")
        elif key in DECIDED_BY and value != have[key]:
            raise ConfigError(f"{source}: {key} is {value!r} but the run config gives {have[key]!r} "
                              f"({DECIDED_BY[key]}); make them agree or write \"auto\"")
        elif key == "fp16.enabled" and value:
            raise ConfigError(f"{source}: fp16 is not supported; train in bf16 (deepspeed.bf16) or fp32")
        node = merged
        *parents, last = key.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {'.'.join(parents[:i + 1])} must be an object")
        if isinstance(node.get(last), dict):
            raise ConfigError(f"{source}: {key} must be an object, got {value!r}")
        node[last] = value
    return merged


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether ``ds_config`` puts the optimizer on the CPU (ZeRO-Offload) or NVMe."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


# ----------------------------------------------------------------------------- loading
def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``hint`` (and build nested dataclasses)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {value!r}")
        return from_dict(hint, value, where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or type(value) is not type(next(c for c in choices if c == value)):
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {hint}")
    if origin is list:
        (arg,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {where}")  # a bug in this file


def from_dict(cls, data: dict, where: str = "config"):
    """Build the dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = "" if where == "config" else f"{where}."
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys{' of ' + where if where != 'config' else ''}: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        sub = name if where == "config" else f"{where}.{name}"
        kwargs[name] = _coerce(value, hints[name], sub)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _parse_override_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as --schedule.kind superbatch


def apply_overrides(data: dict, overrides: list[tuple[str, str]]) -> dict:
    """Set ``key.sub`` paths in the raw config dict from command-line ``(key, value)`` pairs."""
    data = json.loads(json.dumps(data))  # deep copy
    for key, text in overrides:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part!r} is not a section")
        node[parts[-1]] = _parse_override_value(text)
    return data


def missing_keys(cls, data: dict, where: str = "") -> list[str]:
    """The fields of the dataclass ``cls`` (recursively) that ``data`` lacks, as dotted names."""
    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        name = f"{where}{f.name}"
        if f.name not in data:
            missing.append(name)
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(data[f.name], dict):
            missing += missing_keys(hints[f.name], data[f.name], f"{name}.")
    return missing


def load_config(path: str | Path, overrides: list[tuple[str, str]] = (), complete: bool = False) -> TrainConfig:
    """Read a JSON config file, apply ``--key.sub value`` overrides, check everything.

    ``complete``: the file is a saved config (a run's or a checkpoint's): every key must be there,
    since a missing one would silently take today's default instead of the value the run used.
    """
    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).parent / "configs"
        names = sorted(p.stem for p in shipped.glob("*.json"))
        raise FileNotFoundError(f"config file not found: {path} (shipped configs in {shipped}: "
                                f"{', '.join(names)})")
    data = _read_json_object(path, str(path))
    if complete:
        missing = missing_keys(TrainConfig, data)
        if missing:
            raise ConfigError(f"{path}: a saved config must be complete, but it lacks "
                              f"{', '.join(missing)}; restore the file or pass --config with every key")
    data.setdefault("name", path.stem)
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))


# ----------------------------------------------------------------------------- resuming
# Keys a resumed run may change: how the run is observed, saved and evaluated in batches, and the
# kernels backend (e.g. a GPU run resumed on another machine), never what it trains on or how.
RESUME_MAY_CHANGE = ("name", "log_every", "eval_batch_size", "keep_checkpoints", "save_every_steps",
                     "save_every_minutes", "stop_check_every", "model.kernels",
                     "deepspeed.monitor_csv", "deepspeed.monitor_tensorboard")


def resume_differences(saved: TrainConfig, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key outside ``RESUME_MAY_CHANGE`` that differs."""
    a, b = _flatten(saved.to_dict()), _flatten(cfg.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RESUME_MAY_CHANGE and a.get(k) != b.get(k)]


def check_resume(saved: TrainConfig, cfg: TrainConfig, source: str | Path) -> None:
    """Stop, naming the keys and both values, if ``cfg`` would not continue the run ``saved``
    (the config in the checkpoint ``source``) describes."""
    diff = resume_differences(saved, cfg)
    if diff:
        parts = "; ".join(f"{k}: {json.dumps(old)} in the checkpoint, {json.dumps(new)} now"
                          for k, old, new in diff)
        raise ConfigError(f"cannot resume {source} with a different config ({parts}). Only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change on resume; drop --config and "
                          "the overrides of the other keys, or start a new run")
