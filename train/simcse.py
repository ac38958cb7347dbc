"""The SimCSE contrastive stage, run before the multitask stage when ``simcse.enabled``.

Unsupervised (``simcse.mode = "unsup"``): every distinct sentence of the SST, Quora and STS
training files; each batch goes through the encoder twice in one forward (the batch stacked on
itself), so the two views of a sentence differ only by dropout, and the loss is the contrastive
cross-entropy of each first view against all second views (``kernels.simcse_loss``).

Supervised (``"sup"``): (anchor, positive, hard negative) triples. Positives: the Quora duplicate
pairs and the STS pairs scored ``simcse.sts_threshold`` (4.0) or more. Hard negatives: Quora
non-duplicates: the partner of the anchor (or of the positive) in a non-duplicate pair when it
has one, else a sentence drawn (seeded) from the non-duplicate pairs. Every row is scored against
all positives and all hard negatives of the batch.

Distribution: each rank encodes its share of the step's batch in one forward; the embeddings are
gathered (``gather_rows``), so every rank computes the loss of the *whole* global batch (every
row has all ``global_batch - 1`` in-batch negatives, whatever the world size). The gather's
backward keeps each rank's own rows; DeepSpeed then averages the gradients over the ranks, so
the loss handed to it is scaled by the world size. No gradient accumulation: negatives must
share one loss.

Reported: zero-shot STS dev Pearson and Spearman (cosine of the pooled embeddings against the
gold scores) before and after the stage, in ``OUT/simcse/simcse.json``, ``OUT/log.jsonl`` and
on stdout. The result, ``OUT/simcse/``, is an HF-format BERT directory (encoder, tokenizer) the
multitask stage starts from. The stage runs on the skeleton of ``train/stage.py``: it saves to
``OUT/simcse-checkpoints/`` (epoch ends, ``save_every_*``, stop requests) and resumes from there
with ``--resume``; a finished one (``simcse.json`` present, same settings) is reused and its
checkpoints removed.

Reference: Gao, Yao, Chen, SimCSE (https://arxiv.org/abs/2104.08821).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import kernels
from minbert.heads import mean_pool
from minbert.model import BertModel
from minbert.tokenizer import Tokenizer

from .checkpoints import list_checkpoints
from .config import TrainConfig
from .data import load_task
from .export import save_encoder
from .stage import Stage, StepResult, TrainingError, build_encoder
from .tasks import sharded_map

STAGE_DIR = "simcse"
REPORT = "simcse.json"
CHECKPOINT_DIR = "simcse-checkpoints"


# ----------------------------------------------------------------------------- model
class SentenceEncoder(nn.Module):
    """A BERT encoder giving one vector per sentence: the pooler on [CLS] (``"cls"``, SimCSE's
    MLP) or the mean of the real tokens (``"mean"``)."""

    def __init__(self, bert: BertModel, pooling: str):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.bert, self.pooling = bert, pooling

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.pooling == "cls":
            return out.pooler_output
        return mean_pool(out.last_hidden_state, attention_mask)


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Triple:
    anchor: str
    positive: str
    negative: str


def _subset(items: list, limit: int | None, seed: int, what: str) -> list:
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(f"{seed}/simcse/{what}").sample(range(len(items)), limit))
    return [items[i] for i in keep]


def unsup_sentences(data_dir: str | Path, seed: int = 0, limit: int | None = None,
                    warn: bool = True) -> list[str]:
    """Every distinct sentence of the SST, Quora and STS training files (both sides of the
    pairs), in file order; ``limit``: a seeded random subset of that many."""
    seen: dict[str, None] = {}
    for task in ("sst", "quora", "sts"):
        for e in load_task(task, "train", data_dir, warn=warn).examples:
            for s in ((e.sentence,) if task == "sst" else (e.sentence1, e.sentence2)):
                seen.setdefault(s, None)
    return _subset(list(seen), limit, seed, "sentences")


def sup_triples(data_dir: str | Path, seed: int = 0, sts_threshold: float = 4.0,
                limit: int | None = None, warn: bool = True) -> tuple[list[Triple], dict]:
    """(anchor, positive, hard negative) triples and counts of where they came from.

    Positives: Quora duplicates, STS pairs scored >= ``sts_threshold``. The hard negative of a
    pair is a Quora non-duplicate partner of its anchor or positive when there is one
    ("matched"), else a seeded draw from the non-duplicate pairs' sentences ("drawn").
    """
    quora = load_task("quora", "train", data_dir, warn=warn).examples
    sts = load_task("sts", "train", data_dir, warn=warn).examples
    partners: dict[str, list[str]] = {}
    for e in quora:
        if e.label == 0:
            partners.setdefault(e.sentence1, []).append(e.sentence2)
            partners.setdefault(e.sentence2, []).append(e.sentence1)
    pool = list(partners)
    if not pool:
        raise TrainingError(f"simcse sup: no Quora non-duplicate pairs in {data_dir} for hard negatives")
    positives = [(e.sentence1, e.sentence2, "quora") for e in quora if e.label == 1]
    positives += [(e.sentence1, e.sentence2, "sts") for e in sts if e.label >= sts_threshold]
    rng = random.Random(f"{seed}/simcse/negatives")
    triples, counts = [], {"quora_positives": 0, "sts_positives": 0, "matched_negatives": 0,
                           "drawn_negatives": 0}
    for a, b, source in positives:
        matched = [s for s in partners.get(a, []) + partners.get(b, []) if s not in (a, b)]
        if matched:
            negative = rng.choice(matched)
            counts["matched_negatives"] += 1
        else:
            negative = rng.choice(pool)
            while negative in (a, b) and len(pool) > 2:
                negative = rng.choice(pool)
            counts["drawn_negatives"] += 1
        counts[f"{source}_positives"] += 1
        triples.append(Triple(a, b, negative))
    triples = _subset(triples, limit, seed, "triples")
    counts["triples"] = len(triples)
    return triples, counts


# ----------------------------------------------------------------------------- distributed
class _GatherRows(torch.autograd.Function):
    """All ranks' (n, d) rows stacked in rank order; the backward returns this rank's rows of
    the incoming gradient (every rank computes the same loss from the gathered rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Stack every rank's rows of ``x`` (same shape on each rank), differentiably."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)


# ----------------------------------------------------------------------------- metrics
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions (as Spearman's rho needs)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(average_ranks(x), average_ranks(y))


@torch.no_grad()
def zero_shot_sts(encoder: nn.Module, tokenizer: Tokenizer, pairs: Sequence, max_length: int,
                  batch_size: int, device: torch.device) -> dict:
    """Cosine similarity of the two sentences' embeddings against the gold STS scores."""
    was_training = encoder.training
    encoder.eval()

    def embed(batch: list[str]) -> torch.Tensor:
        enc = tokenizer(batch, max_length=max_length)
        z = encoder(enc.input_ids.to(device), enc.attention_mask.to(device),
                    enc.token_type_ids.to(device))
        return z.float().cpu()

    z1 = sharded_map(embed, [p.sentence1 for p in pairs], batch_size, len)
    z2 = sharded_map(embed, [p.sentence2 for p in pairs], batch_size, len)
    encoder.train(was_training)
    cos = torch.nn.functional.cosine_similarity(z1.double(), z2.double(), dim=-1).tolist()
    gold = [p.label for p in pairs]
    return {"pearson": pearson(cos, gold), "spearman": spearman(cos, gold), "pairs": len(pairs)}


# ----------------------------------------------------------------------------- the stage
class SimCSEStage(Stage):
    """One contrastive run on the stage skeleton: ``report = SimCSEStage(cfg, data, out).run()``
    (None if a stop request ended it early: ``stage.stopped`` says where it saved)."""

    checkpoint_dir = CHECKPOINT_DIR
    log_stage = "simcse"
    save_final = False  # the export at the end is the stage's result

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, progress: bool = True,
                 resume: str | Path | None = None):
        super().__init__(cfg, data_dir, out_dir, progress, resume)
        self.sc = cfg.simcse
        self.desc = f"simcse {self.sc.mode}"
        self.per_rank = self.sc.per_rank_batch(self.world)

        if self.sc.mode == "unsup":
            self.examples: list = unsup_sentences(self.data_dir, cfg.seed, self.sc.max_examples, self.is_main)
            self.data_counts = {"sentences": len(self.examples)}
        else:
            self.examples, self.data_counts = sup_triples(self.data_dir, cfg.seed, self.sc.sts_threshold,
                                                          self.sc.max_examples, self.is_main)
        self.steps_per_epoch = len(self.examples) // self.sc.global_batch
        if self.steps_per_epoch == 0:
            raise TrainingError(f"simcse: {len(self.examples)} examples make no batch of "
                                f"simcse.global_batch = {self.sc.global_batch}")
        self.total_steps = self.steps_per_epoch * self.sc.epochs
        if self.sc.max_steps is not None:
            self.total_steps = min(self.total_steps, self.sc.max_steps)
        dev = load_task("sts", "dev", self.data_dir, warn=self.is_main).examples
        self.dev = _subset(dev, self.sc.eval_max, cfg.seed, "sts-dev")
        self.tokenizer = Tokenizer.from_pretrained(cfg.model.checkpoint)
        self.losses: list[float] = []
        self.before: dict | None = None  # zero-shot STS before the stage (kept in checkpoints)
        self._window: list[StepResult] = []

        bert = build_encoder(cfg)
        if self.sc.mode == "unsup" and bert.config.hidden_dropout_prob == 0 \
                and bert.config.attention_probs_dropout_prob == 0:
            raise TrainingError("unsupervised SimCSE needs dropout as its noise, but the model's "
                                "hidden and attention dropout are both 0 (model.hidden_dropout)")
        model = SentenceEncoder(bert, self.sc.pooling)
        self.build_engine(model, cfg.simcse_deepspeed_config(self.world, bert.config.hidden_size),
                          lr=self.sc.lr, warmup_ratio=self.sc.warmup_ratio)

    # ------------------------------------------------------------------ helpers
    def _batch(self) -> list:
        """This rank's share of the step's examples: a seeded permutation per epoch, the same
        on every rank, cut into global batches (the last partial one dropped)."""
        epoch, k = divmod(self.step, self.steps_per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch, 7]).permutation(len(self.examples))
        chunk = order[k * self.sc.global_batch:(k + 1) * self.sc.global_batch]
        return [self.examples[i] for i in chunk[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]]

    def _embed(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, max_length=self.sc.max_length)
        return self.engine(enc.input_ids.to(self.device), enc.attention_mask.to(self.device),
                           enc.token_type_ids.to(self.device))

    def loss(self, batch: list) -> torch.Tensor:
        """The contrastive loss of the whole global batch (the same value on every rank)."""
        n = len(batch)
        if self.sc.mode == "unsup":
            z = self._embed(list(batch) + list(batch))  # two dropout views in one forward
            views = [z[:n], z[n:]]
        else:
            z = self._embed([t.anchor for t in batch] + [t.positive for t in batch]
                            + [t.negative for t in batch])
            views = [z[:n], z[n:2 * n], z[2 * n:]]
        views = [gather_rows(v) for v in views]
        if kernels.get_backend() == "eager":
            # the fused kernel accumulates the logits in fp32 from 16-bit rows; eager does so in fp32
            views = [v.float() for v in views]
        hard = views[2] if len(views) == 3 else None
        return kernels.simcse_loss(views[0], views[1], self.sc.temperature, hard)

    # ------------------------------------------------------------------ step and evaluation
    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        self.engine.train()
        loss = self.loss(self._batch())
        value = float(loss.detach())
        if not math.isfinite(value):
            latest = self.latest_checkpoint()
            raise TrainingError(f"simcse: non-finite loss ({value}) at step {self.step + 1}; stopping. "
                                f"The last good checkpoint is {latest if latest else 'none'}")
        # Every rank holds the loss of the whole batch and backpropagates into its own rows;
        # DeepSpeed averages the ranks' gradients, so the world factor makes it their sum.
        self.engine.backward(loss * self.world)
        self.engine.step()
        self.step += 1
        return StepResult(self.step, {"simcse": value}, self.sc.global_batch, 0, time.perf_counter() - t0)

    def evaluate(self) -> dict:
        """Zero-shot STS dev, sentences cut at ``tasks.sts.max_length`` tokens."""
        return zero_shot_sts(self.engine.module, self.tokenizer, self.dev, self.cfg.tasks.sts.max_length,
                             self.cfg.eval_batch_size, self.device)

    # ------------------------------------------------------------------ the skeleton's hooks
    def after_step(self, result: StepResult, bar) -> None:
        value = result.losses["simcse"]
        self.losses.append(value)
        self._window.append(result)
        bar.set_postfix(loss=f"{value:.4f}")
        if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            secs = sum(r.seconds for r in self._window)
            self.log({"step": self.step, "loss": value, "lr": self.scheduler.get_last_lr()[0],
                      "samples_per_s": sum(r.examples for r in self._window) / max(secs, 1e-9)})
            self._window = []

    def state_dict(self) -> dict:
        return {"losses": self.losses, "before": self.before}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.before = list(state["losses"]), state["before"]

    # ------------------------------------------------------------------ the run
    def run(self) -> dict | None:
        if self.before is None:  # a fresh stage (a resumed one has it from its checkpoint)
            self.before = self.evaluate()
            self.log({"zero_shot_sts": self.before, "when": "before"})
            self.say(f"simcse ({self.sc.mode}): zero-shot STS dev before: pearson "
                     f"{self.before['pearson']:.4f}, spearman {self.before['spearman']:.4f} "
                     f"({self.before['pairs']} pairs); {self.total_steps} steps of {self.sc.global_batch} "
                     f"{'sentences' if self.sc.mode == 'unsup' else 'triples'}")
        self.fit()
        if self.stopped is not None:
            return None
        after = self.evaluate()
        self.log({"zero_shot_sts": after, "when": "after"})
        report = {"mode": self.sc.mode, "steps": self.step, "world_size": self.world,
                  "data": self.data_counts, "zero_shot_sts_before": self.before,
                  "zero_shot_sts_after": after, "first_loss": self.losses[0],
                  "last_loss": self.losses[-1], "settings": stage_settings(self.cfg)}
        self.say(f"simcse: zero-shot STS dev after {self.step} steps: pearson {after['pearson']:.4f}, "
                 f"spearman {after['spearman']:.4f}; loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}")
        self.export(report)
        return report

    def export(self, report: dict) -> Path:
        """Write the encoder and tokenizer (HF format) and the report to ``OUT/simcse``; the
        stage's checkpoints are then of no further use and go."""
        state = self.gathered_state()
        directory = self.out_dir / STAGE_DIR
        if self.is_main:
            state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
            save_encoder(state, self.engine.module.bert.config, self.tokenizer, directory,
                         files={REPORT: json.dumps(report, indent=2) + "\n"})
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)
        self._barrier()
        return directory


def stage_settings(cfg: TrainConfig) -> dict:
    """What a finished stage's result depends on (a saved result is reused only if equal)."""
    return {"simcse": cfg.to_dict()["simcse"], "checkpoint": cfg.model.checkpoint, "seed": cfg.seed,
            "hidden_dropout": cfg.model.hidden_dropout, "attention_dropout": cfg.model.attention_dropout}


def run_stage(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, progress: bool = True,
              resume: bool = False) -> tuple[Path | None, dict | None, dict | None]:
    """Run the SimCSE stage, or reuse its finished result in ``OUT/simcse``; ``resume``: continue
    from the stage's checkpoints when it has some. Returns (encoder directory, report, None), or
    (None, None, where it stopped) when a stop request ended it early."""
    directory = Path(out_dir) / STAGE_DIR
    report_file = directory / REPORT
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        if report.get("settings") != json.loads(json.dumps(stage_settings(cfg))):
            raise TrainingError(f"{directory} holds a SimCSE stage run with other settings; remove it "
                                "or choose another --out")
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            print(f"simcse: reusing the finished stage in {directory}", flush=True)
        return directory, report, None
    has_checkpoints = bool(list_checkpoints(Path(out_dir) / CHECKPOINT_DIR))
    stage = SimCSEStage(cfg, data_dir, out_dir, progress, resume=out_dir if resume and has_checkpoints else None)
    report = stage.run()
    stage.close()
    if report is None:
        return None, None, stage.stopped
    return directory, report, None
