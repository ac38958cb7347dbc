"""Per-task glue: batches for the model, dev metrics, and the CS224N prediction files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from minbert.checkpoint import atomic_write_text
from minbert.heads import MultitaskBert
from minbert.packing import Packing
from minbert.tokenizer import Tokenizer

# CS224N output files: (file stem, header column); "Similiarity" is the project's own spelling.
OUTPUT_FILES = {
    "sst": ("sst", "Predicted_Sentiment"),
    "quora": ("para", "Predicted_Is_Paraphrase"),
    "sts": ("sts", "Predicted_Similiarity"),
}


def encode_batch(tokenizer: Tokenizer, task: str, examples: Sequence, form: str, max_length: int,
                 device: torch.device) -> tuple[dict, torch.Tensor | None, int]:
    """Examples -> (model keyword arguments, labels or None, number of real tokens).

    The keyword arguments hold the padded (B, L) tensors and, computed here on the host from the
    tokenizer's mask, the ``Packing`` of each batch (``packing``, ``packing_b``): the model runs
    unpadded without reading anything back from the device. The token count is a host int too.
    """
    if task == "sst":
        batches = {"": tokenizer([e.sentence for e in examples], max_length=max_length)}
    elif form == "cross":
        batches = {"": tokenizer([e.sentence1 for e in examples], [e.sentence2 for e in examples],
                                 max_length=max_length)}
    else:
        batches = {"": tokenizer([e.sentence1 for e in examples], max_length=max_length),
                   "_b": tokenizer([e.sentence2 for e in examples], max_length=max_length)}
    kwargs, tokens = {}, 0
    for suffix, enc in batches.items():
        packing = Packing.from_mask(enc.attention_mask)  # CPU: no device read
        tokens += packing.total
        kwargs.update({f"input_ids{suffix}": enc.input_ids.to(device, non_blocking=True),
                       f"attention_mask{suffix}": enc.attention_mask.to(device, non_blocking=True),
                       f"token_type_ids{suffix}": enc.token_type_ids.to(device, non_blocking=True),
                       f"packing{suffix}": packing.to(device, non_blocking=True)})
    labels = None
    if examples and examples[0].label is not None:
        dtype = torch.long if task == "sst" else torch.float32
        labels = torch.tensor([e.label for e in examples], dtype=dtype).to(device, non_blocking=True)
    return kwargs, labels, tokens


def token_lengths(tokenizer: Tokenizer, task: str, examples: Sequence, form: str, max_length: int,
                  chunk: int = 2048) -> np.ndarray:
    """Tokens each example costs a batch (pairs: both sentences), after truncation."""
    out = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        if task == "sst":
            encs = [tokenizer([e.sentence for e in part], max_length=max_length, return_tensors=False)]
        elif form == "cross":
            encs = [tokenizer([e.sentence1 for e in part], [e.sentence2 for e in part],
                              max_length=max_length, return_tensors=False)]
        else:
            encs = [tokenizer([getattr(e, f) for e in part], max_length=max_length, return_tensors=False)
                    for f in ("sentence1", "sentence2")]
        out.append(np.sum([[sum(m) for m in enc.attention_mask] for enc in encs], axis=0))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def build_samplers(cfg, train_data: dict[str, Sequence], tokenizer: Tokenizer) -> dict:
    """One ``TaskSampler`` per task; length-grouped (by token count) when
    ``cfg.data.group_by_length``, in windows of ``cfg.data.group_window`` micro-batches rounded
    to whole steps."""
    from .schedules import TaskSampler

    # a window of group_window micro-batches, in steps: every task takes the same number of
    # micro-batches a step (its own batch split into DeepSpeed's accumulation steps)
    window = max(1, round(cfg.data.group_window * cfg.deepspeed.micro_batch_per_device
                          / cfg.deepspeed.global_batch))
    samplers = {}
    for i, (t, examples) in enumerate(train_data.items()):
        lengths = None
        if cfg.data.group_by_length:
            tc = getattr(cfg.tasks, t)
            lengths = token_lengths(tokenizer, t, examples, tc.form, tc.max_length)
        samplers[t] = TaskSampler(len(examples), cfg.seed, i, lengths, cfg.task_batch(t), window)
    return samplers


def padded_tokens(kwargs: dict) -> int:
    """Token slots of a batch from ``encode_batch``, padding included (sum of B x L)."""
    return sum(v.batch * v.length for k, v in kwargs.items() if k.startswith("packing"))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def predict(model, tokenizer: Tokenizer, task: str, examples: Sequence, form: str, max_length: int,
            batch_size: int, device: torch.device, progress=None) -> torch.Tensor:
    """Decided predictions (class ids, 0/1, or similarity) for ``examples``, in their order,
    computed over the ranks (``sharded_map``: batches of similar lengths, the model unpadded)."""
    def run(batch: list) -> torch.Tensor:
        kwargs, _, _ = encode_batch(tokenizer, task, batch, form, max_length, device)
        return MultitaskBert.decide(task, model(task, **kwargs)).float()  # stays on the device

    return sharded_map(run, examples, batch_size, _length, progress, device=device)


def _collective_device(device: torch.device | None) -> torch.device:
    """Where a collective's tensors must live: ``device``, else the process group's own device
    (NCCL takes CUDA tensors only)."""
    if device is not None:
        return torch.device(device)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def predict_scores(model, tokenizer: Tokenizer, task: str, examples: Sequence, form: str,
                   max_length: int, batch_size: int, device: torch.device, progress=None) -> torch.Tensor:
    """Like ``predict``, before the decision: sst (N, 5) class probabilities, quora (N,)
    probability of a paraphrase, sts (N,) similarity clipped to [0, 5], all float64.
    ``decide_scores`` turns them (or an average of several models' scores) into predictions."""
    def run(batch: list) -> torch.Tensor:
        kwargs, _, _ = encode_batch(tokenizer, task, batch, form, max_length, device)
        out = model(task, **kwargs).double()  # float64: sigmoid(logit) > 0.5 iff logit > 0
        if task == "sst":
            return out.softmax(-1)  # stays on the device (sharded_map gathers there)
        return out.sigmoid() if task == "quora" else MultitaskBert.decide(task, out).double()

    return sharded_map(run, examples, batch_size, _length, progress, device=device)


def decide_scores(task: str, scores: torch.Tensor) -> torch.Tensor:
    """``predict_scores``'s output -> what ``predict`` returns (class id, 0/1, similarity)."""
    if task == "sst":
        return scores.argmax(-1).float()
    if task == "quora":
        return (scores > 0.5).float()
    return scores.float()


@torch.no_grad()
def sharded_map(fn, items: Sequence, batch_size: int, length, progress=None,
                device: torch.device | None = None) -> torch.Tensor:
    """``fn(batch) -> tensor of len(batch) rows`` over ``items``, split over the ranks; every rank
    gets the whole result (on the CPU), rows in the order of ``items``.

    Each rank runs the same number of batches over its share (ZeRO-3 needs every rank in every
    forward; a rank out of items runs a dummy batch). Items go longest first (``length(item)``),
    so batches hold sequences of similar length (little padding); the ranks take turns along
    that order. The results stay where ``fn`` leaves them until one ``all_gather`` on ``device``
    (default: the process group's device) and one copy to the host at the end.
    """
    rank, world = _world()
    if not items:
        return torch.zeros(0)
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    mine = order[rank::world]
    per_rank = math.ceil(len(items) / world)
    n_batches = math.ceil(per_rank / batch_size)
    out: list[torch.Tensor] = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        batch = [items[i] for i in idx] or [items[0]]  # a dummy batch keeps ranks in step
        out.append(fn(batch)[:len(idx)])
        if progress is not None:
            progress.update(len(idx) * world)
    local = torch.cat(out)  # (len(mine), ...)
    if world == 1:
        parts = [local.cpu()]
    else:  # ranks hold per_rank or per_rank - 1 rows: pad to per_rank, gather, cut
        padded = local.new_zeros((per_rank, *local.shape[1:]), device=_collective_device(device))
        padded[:len(mine)] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        parts = [g[:len(order[r::world])] for r, g in enumerate(torch.stack(gathered).cpu())]
    result = torch.zeros((len(items), *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        result[torch.tensor(order[r::world], dtype=torch.long)] = part
    return result


def _length(example) -> int:
    if hasattr(example, "sentence"):
        return len(example.sentence)
    return len(example.sentence1) + len(example.sentence2)


def metric(task: str, predictions: torch.Tensor, labels: Sequence[float]) -> float:
    """SST and Quora: accuracy; STS: Pearson correlation."""
    y = torch.tensor(list(labels), dtype=torch.float64)
    p = predictions.to(torch.float64)
    if task in ("sst", "quora"):
        return float((p == y).double().mean())
    p, y = p - p.mean(), y - y.mean()
    denom = math.sqrt(float((p * p).sum() * (y * y).sum()))
    return float((p * y).sum() / denom) if denom > 0 else 0.0


def overall_score(scores: dict[str, float]) -> float:
    """(sst_acc + para_acc + (sts_pearson + 1) / 2) / 3 over the tasks present."""
    parts = [scores["sst"]] if "sst" in scores else []
    parts += [scores["quora"]] if "quora" in scores else []
    parts += [(scores["sts"] + 1.0) / 2.0] if "sts" in scores else []
    return sum(parts) / len(parts)


def write_predictions(path: Path, task: str, ids: Sequence[str], predictions: torch.Tensor) -> None:
    """One CS224N output file: header ``id \\t <column>``, rows ``<id> , <prediction>``."""
    _, column = OUTPUT_FILES[task]
    lines = [f"id \t {column} \n"]
    for i, p in zip(ids, predictions.tolist()):
        value = f"{p:.4f}" if task == "sts" else str(int(p))
        lines.append(f"{i} , {value} \n")
    atomic_write_text(path, "".join(lines))
