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
multitask stage starts from. The stage is not resumable half-way (it is short): an interrupted
stage reruns; a finished one (``simcse.json`` present, same settings) is reused.

Reference: Gao, Yao, Chen, SimCSE (https://arxiv.org/abs/2104.08821).
"""
from __future__ import annotations

import json
import math
import random
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

from .config import TrainConfig
from .data import load_task
from .loop import (TrainingError, build_encoder, build_optimizer, fresh_temp_dir, lr_lambda,
                   seed_everything, start_process, swap_in)
from .tasks import sharded_map

STAGE_DIR = "simcse"
REPORT = "simcse.json"


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
class SimCSEStage:
    """One contrastive run: ``report = SimCSEStage(cfg, data, out).run()``."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, progress: bool = True):
        import deepspeed

        self.cfg, self.sc = cfg, cfg.simcse
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.rank, self.world, self.device = start_process(cfg)
        self.is_main = self.rank == 0
        self.show_progress = progress and self.is_main
        self.per_rank = self.sc.per_rank_batch(self.world)
        seed_everything(cfg.seed)

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

        bert = build_encoder(cfg)
        if self.sc.mode == "unsup" and bert.config.hidden_dropout_prob == 0 \
                and bert.config.attention_probs_dropout_prob == 0:
            raise TrainingError("unsupervised SimCSE needs dropout as its noise, but the model's "
                                "hidden and attention dropout are both 0 (model.hidden_dropout)")
        model = SentenceEncoder(bert, self.sc.pooling)
        optimizer = build_optimizer(cfg, model, lr=self.sc.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg, self.total_steps, self.sc.warmup_ratio))
        self.ds_config = cfg.simcse_deepspeed_config(self.world)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.step = 0
        self.losses: list[float] = []

    # ------------------------------------------------------------------ helpers
    def _log(self, record: dict) -> None:
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"stage": "simcse", **record}) + "\n")

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

    def train_step(self) -> float:
        self.engine.train()
        loss = self.loss(self._batch())
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"simcse: non-finite loss ({value}) at step {self.step + 1}; stopping "
                                "(nothing of the stage was saved)")
        # Every rank holds the loss of the whole batch and backpropagates into its own rows;
        # DeepSpeed averages the ranks' gradients, so the world factor makes it their sum.
        self.engine.backward(loss * self.world)
        self.engine.step()
        self.step += 1
        return value

    def evaluate(self) -> dict:
        """Zero-shot STS dev, sentences cut at ``tasks.sts.max_length`` tokens."""
        return zero_shot_sts(self.engine.module, self.tokenizer, self.dev, self.cfg.tasks.sts.max_length,
                             self.cfg.eval_batch_size, self.device)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        from tqdm import tqdm

        before = self.evaluate()
        self._log({"zero_shot_sts": before, "when": "before"})
        if self.is_main:
            print(f"simcse ({self.sc.mode}): zero-shot STS dev before: pearson {before['pearson']:.4f}, "
                  f"spearman {before['spearman']:.4f} ({before['pairs']} pairs); "
                  f"{self.total_steps} steps of {self.sc.global_batch} "
                  f"{'sentences' if self.sc.mode == 'unsup' else 'triples'}", flush=True)
        bar = tqdm(total=self.total_steps, desc=f"simcse {self.sc.mode}", disable=not self.show_progress,
                   dynamic_ncols=True)
        t0, window = time.perf_counter(), 0
        while self.step < self.total_steps:
            value = self.train_step()
            self.losses.append(value)
            window += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                secs = time.perf_counter() - t0
                self._log({"step": self.step, "loss": value, "lr": self.scheduler.get_last_lr()[0],
                           "samples_per_s": window * self.sc.global_batch / max(secs, 1e-9)})
                t0, window = time.perf_counter(), 0
        bar.close()
        after = self.evaluate()
        self._log({"zero_shot_sts": after, "when": "after"})
        report = {"mode": self.sc.mode, "steps": self.step, "world_size": self.world,
                  "data": self.data_counts, "zero_shot_sts_before": before, "zero_shot_sts_after": after,
                  "first_loss": self.losses[0], "last_loss": self.losses[-1],
                  "settings": stage_settings(self.cfg)}
        if self.is_main:
            print(f"simcse: zero-shot STS dev after {self.step} steps: pearson {after['pearson']:.4f}, "
                  f"spearman {after['spearman']:.4f}; loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}",
                  flush=True)
        self.export(report)
        return report

    def export(self, report: dict) -> Path:
        """Write the encoder and tokenizer (HF format) and the report to ``OUT/simcse``."""
        from deepspeed import zero

        module = self.engine.module
        with zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                     enabled=self.cfg.deepspeed.zero_stage == 3):
            state = {k[len("bert."):]: v.detach().float().cpu().clone()
                     for k, v in module.state_dict().items() if k.startswith("bert.")}
        directory = self.out_dir / STAGE_DIR
        if self.is_main:
            tmp = fresh_temp_dir(directory)
            bert = BertModel(module.bert.config)
            bert.load_state_dict(state)
            bert.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
            swap_in(tmp, directory)
        if self.world > 1:
            dist.barrier()
        return directory

    def close(self) -> None:
        """Drop the engine (its optimizer state) before the multitask stage builds its own."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        del self.engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def stage_settings(cfg: TrainConfig) -> dict:
    """What a finished stage's result depends on (a saved result is reused only if equal)."""
    return {"simcse": cfg.to_dict()["simcse"], "checkpoint": cfg.model.checkpoint, "seed": cfg.seed,
            "hidden_dropout": cfg.model.hidden_dropout, "attention_dropout": cfg.model.attention_dropout}


def run_stage(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path,
              progress: bool = True) -> tuple[Path, dict]:
    """Run the SimCSE stage, or reuse its finished result in ``OUT/simcse``; returns the
    encoder directory and the report."""
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
        return directory, report
    stage = SimCSEStage(cfg, data_dir, out_dir, progress)
    report = stage.run()
    stage.close()
    return directory, report
