"""Per-task glue: batches for the model, dev metrics, and the CS224N prediction files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from minbert.checkpoint import atomic_write_text
from minbert.heads import MultitaskBert
from minbert.tokenizer import Tokenizer

# CS224N output files: (file stem, header column); "Similiarity" is the project's own spelling.
OUTPUT_FILES = {
    "sst": ("sst", "Predicted_Sentiment"),
    "quora": ("para", "Predicted_Is_Paraphrase"),
    "sts": ("sts", "Predicted_Similiarity"),
}


def encode_batch(tokenizer: Tokenizer, task: str, examples: Sequence, form: str, max_length: int,
                 device: torch.device) -> tuple[dict, torch.Tensor | None, int]:
    """Examples -> (model keyword arguments, labels or None, number of real tokens)."""
    if task == "sst":
        enc = tokenizer([e.sentence for e in examples], max_length=max_length)
        kwargs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                  "token_type_ids": enc.token_type_ids}
    elif form == "cross":
        enc = tokenizer([e.sentence1 for e in examples], [e.sentence2 for e in examples],
                        max_length=max_length)
        kwargs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                  "token_type_ids": enc.token_type_ids}
    else:
        a = tokenizer([e.sentence1 for e in examples], max_length=max_length)
        b = tokenizer([e.sentence2 for e in examples], max_length=max_length)
        kwargs = {"input_ids": a.input_ids, "attention_mask": a.attention_mask,
                  "token_type_ids": a.token_type_ids, "input_ids_b": b.input_ids,
                  "attention_mask_b": b.attention_mask, "token_type_ids_b": b.token_type_ids}
    tokens = int(sum(v.sum() for k, v in kwargs.items() if k.startswith("attention_mask")))
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    labels = None
    if examples and examples[0].label is not None:
        dtype = torch.long if task == "sst" else torch.float32
        labels = torch.tensor([e.label for e in examples], dtype=dtype, device=device)
    return kwargs, labels, tokens


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def predict(model, tokenizer: Tokenizer, task: str, examples: Sequence, form: str, max_length: int,
            batch_size: int, device: torch.device, progress=None) -> torch.Tensor:
    """Decided predictions (class ids, 0/1, or similarity) for ``examples``, in their order,
    computed over the ranks (``sharded_map``)."""
    def run(batch: list) -> torch.Tensor:
        kwargs, _, _ = encode_batch(tokenizer, task, batch, form, max_length, device)
        return MultitaskBert.decide(task, model(task, **kwargs)).float().cpu()

    return sharded_map(run, examples, batch_size, _length, progress)


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
            return out.softmax(-1).cpu()
        return (out.sigmoid() if task == "quora" else MultitaskBert.decide(task, out).double()).cpu()

    return sharded_map(run, examples, batch_size, _length, progress)


def decide_scores(task: str, scores: torch.Tensor) -> torch.Tensor:
    """``predict_scores``'s output -> what ``predict`` returns (class id, 0/1, similarity)."""
    if task == "sst":
        return scores.argmax(-1).float()
    if task == "quora":
        return (scores > 0.5).float()
    return scores.float()


@torch.no_grad()
def sharded_map(fn, items: Sequence, batch_size: int, length, progress=None) -> torch.Tensor:
    """``fn(batch) -> tensor of len(batch) rows`` over ``items``, split over the ranks; every rank
    gets the whole result, rows in the order of ``items``.

    Each rank runs the same number of batches over its share (ZeRO-3 needs every rank in every
    forward; a rank out of items runs a dummy batch). Items go longest first (``length(item)``),
    so batches hold sequences of similar length (little padding); the ranks take turns along
    that order.
    """
    rank, world = _world()
    if not items:
        return torch.zeros(0)
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    mine = order[rank::world]
    n_batches = math.ceil(math.ceil(len(items) / world) / batch_size)
    out: list[torch.Tensor] = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        batch = [items[i] for i in idx] or [items[0]]  # a dummy batch keeps ranks in step
        out.append(fn(batch)[:len(idx)])
        if progress is not None:
            progress.update(len(idx) * world)
    local = torch.cat(out)
    gathered: list = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    result = torch.zeros((len(items), *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(gathered):
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
