"""Write CS224N prediction files from an exported multitask model.

    python -m train.predict --checkpoint runs/NAME/best --data data/ --out runs/NAME/predictions
    python -m train.predict --checkpoint runs/A --checkpoint runs/B [--weights 0.6 0.4] ...

Several ``--checkpoint``s make an ensemble: the members' class probabilities (SST, Quora) and
similarity scores (STS) are averaged (weighted by ``--weights``), and the dev scores of each
member and of the ensemble are printed. Members may differ in heads and forms, not in tokenizer
or task set.

Writes ``{sst,para,sts}-{dev,test}-output.csv`` (header ``id \\t Predicted_...``, rows
``id , prediction``) and prints the dev scores. Every id of a test file gets a prediction: rows
the loader skipped as malformed get the task's fallback (the most frequent training class, or the
mean training similarity) and are listed.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from minbert.heads import MultitaskBert
from minbert.tokenizer import Tokenizer

from .data import load_task
from .tasks import (OUTPUT_FILES, decide_scores, metric, overall_score, predict, predict_scores,
                    write_predictions)

SPLIT_NAMES = {"dev": "dev", "test": "test"}


def fallback_prediction(task: str, data_dir: Path) -> float:
    """What to predict for a row that could not be read: the training set's mode or mean."""
    labels = [e.label for e in load_task(task, "train", data_dir, warn=False).examples]
    if task == "sts":
        return float(sum(labels) / len(labels))
    return float(max(set(labels), key=labels.count))


def write_all(model, tokenizer, data_dir: Path, out_dir: Path, max_lengths: dict[str, int],
              batch_size: int = 64, device: torch.device | str = "cpu", splits=("dev", "test"),
              progress: bool = True) -> dict:
    """Predict every task's dev and test file (``max_lengths``: tokens per sequence, per task, as
    in training); returns the dev scores.

    Safe to call on every rank of a process group: the work is sharded and rank 0 writes.
    """
    def run(task: str, examples: list, bar) -> dict[str, torch.Tensor]:
        return {"model": predict(model, tokenizer, task, examples, model.spec.tasks[task].form,
                                 max_lengths[task], batch_size, torch.device(device), progress=bar)}

    return _write(list(model.spec.tasks), run, ["model"], 1, data_dir, out_dir, splits, progress)["model"]


@dataclass
class Member:
    """An exported model ready to predict (``load_member``)."""

    name: str  # the path it was loaded from
    model: MultitaskBert
    tokenizer: Tokenizer
    max_lengths: dict[str, int]  # tokens per sequence, per task, as in training
    meta: dict  # multitask.json


def load_member(checkpoint: str | Path, device: torch.device | str = "cpu", dtype: str | None = None) -> Member:
    """Load an export (or the ``best/`` export of a run directory) in ``dtype`` ("fp32", "bf16";
    default: bf16 if it was trained in bf16)."""
    from .export import load_multitask

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist (or is not a directory); "
                                "pass an export (runs/NAME/best) or a run directory holding best/")
    if (ckpt / "best" / "multitask.json").is_file():
        ckpt = ckpt / "best"
    model, meta = load_multitask(ckpt, device)
    trained_bf16 = meta.get("train_config", {}).get("deepspeed", {}).get("bf16", False)
    if (dtype or ("bf16" if trained_bf16 else "fp32")) == "bf16":
        model = model.to(torch.bfloat16)
    tokenizer = Tokenizer.from_pretrained(ckpt)
    trained = meta.get("train_config", {}).get("tasks", {})  # predict with the training lengths
    max_lengths = {t: trained.get(t, {}).get("max_length", tokenizer.max_length) for t in model.spec.tasks}
    return Member(str(checkpoint), model, tokenizer, max_lengths, meta)


def member_scores(member: Member, task: str, examples: list, batch_size: int,
                  device: torch.device | str, progress=None) -> torch.Tensor:
    """``tasks.predict_scores`` of one member (probabilities for SST / Quora, similarity for STS)."""
    return predict_scores(member.model, member.tokenizer, task, examples,
                          member.model.spec.tasks[task].form, member.max_lengths[task], batch_size,
                          torch.device(device), progress=progress)


def check_ensemble(members: list[Member], weights: list[float] | None) -> list[float]:
    """Members must share a tokenizer and a task set; returns the weights, normalised to sum 1."""
    first = members[0]
    for m in members[1:]:
        if set(m.model.spec.tasks) != set(first.model.spec.tasks):
            raise ValueError(f"ensemble members need the same tasks: {m.name} has "
                             f"{sorted(m.model.spec.tasks)}, {first.name} has "
                             f"{sorted(first.model.spec.tasks)}; leave one of them out")
        va, vb = first.tokenizer.backend.get_vocab(), m.tokenizer.backend.get_vocab()
        if va != vb:
            differ = len(set(va.items()) ^ set(vb.items()))
            raise ValueError(f"ensemble members need the same tokenizer: the vocabularies of "
                             f"{first.name} ({len(va)} tokens) and {m.name} ({len(vb)} tokens) "
                             f"differ in {differ} entries; ensemble models trained from one checkpoint")
    if weights is None:
        weights = [1.0] * len(members)
    if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights needs one non-negative number per --checkpoint ({len(members)}), "
                         f"not all zero; got {weights}")
    return [w / sum(weights) for w in weights]


def write_ensemble(members: list[Member], weights: list[float] | None, data_dir: Path, out_dir: Path,
                   batch_size: int = 64, device: torch.device | str = "cpu", splits=("dev", "test"),
                   progress: bool = True) -> dict[str, dict]:
    """Predict every task's files with the weighted average of the members' probabilities (SST,
    Quora) and similarities (STS); returns the dev scores of the ensemble and of every member:
    ``{"ensemble": {...}, "members": {name: {...}}}``."""
    weights = check_ensemble(members, weights)
    names = [f"{i + 1}: {m.name}" for i, m in enumerate(members)]

    def run(task: str, examples: list, bar) -> dict[str, torch.Tensor]:
        scores = [member_scores(m, task, examples, batch_size, device, bar) for m in members]
        mean = sum(w * s for w, s in zip(weights, scores))
        out = {"ensemble": decide_scores(task, mean)}
        out.update({n: decide_scores(task, s) for n, s in zip(names, scores)})
        return out

    scores = _write(list(members[0].model.spec.tasks), run, ["ensemble", *names], len(members),
                    data_dir, out_dir, splits, progress)
    return {"ensemble": scores.pop("ensemble"), "members": scores, "weights": weights}


def _write(tasks: list[str], run, names: list[str], passes: int, data_dir: Path, out_dir: Path,
           splits, progress: bool) -> dict[str, dict]:
    """``run(task, examples, bar) -> {name: predictions}`` (``names``; ``passes`` model passes
    over the examples) over every task and split; writes the predictions of ``names[0]`` and
    returns every name's dev scores."""
    from tqdm import tqdm

    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    out_dir = Path(out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    loaded = {(t, s): load_task(t, s, data_dir, warn=False) for t in tasks for s in splits}
    total = passes * sum(len(v) for v in loaded.values())
    bar = tqdm(total=total, desc="predict", disable=not (progress and is_main), dynamic_ncols=True)
    scores: dict[str, dict] = {name: {} for name in names}
    notes = []
    for (task, split), data in loaded.items():
        examples = data.examples
        named = run(task, examples, bar)
        preds = named[names[0]]
        ids = [e.id for e in examples]
        if split == "dev":
            for name, p in named.items():
                scores[name][task] = metric(task, p, [e.label for e in examples])
        if data.skipped_ids:
            fill = fallback_prediction(task, data_dir)
            ids += data.skipped_ids
            preds = torch.cat([preds, torch.full((len(data.skipped_ids),), fill)])
            notes.append(f"{data.path.name}: {len(data.skipped_ids)} malformed row(s) "
                         f"({', '.join(data.skipped_ids)}) got the fallback prediction {fill:g}")
        if is_main:
            stem, _ = OUTPUT_FILES[task]
            write_predictions(out_dir / f"{stem}-{SPLIT_NAMES[split]}-output.csv", task, ids, preds)
    bar.close()
    for named in scores.values():
        if named:
            named["overall"] = overall_score(named)
    if is_main:
        for note in notes:
            print(f"predict: {note}", flush=True)
    return scores


def main(argv: list[str] | None = None) -> int:
    """``python -m train.predict``: one line on stderr for a missing or broken export or data
    directory (``--debug`` for the traceback)."""
    from kernels._cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    from minbert.tokenizer import Tokenizer

    from kernels._cli import check_writable
    from .data import check_data_dir
    from .export import load_multitask

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, action="append",
                    help="an exported model (runs/NAME/best) or a run directory holding best/; "
                         "repeat it for an ensemble")
    ap.add_argument("--weights", type=float, nargs="+", default=None,
                    help="ensemble weights, one per --checkpoint (default: equal)")
    ap.add_argument("--data", default="data/", help="directory of the CS224N files (default: data/)")
    ap.add_argument("--out", required=True, help="directory for the *-output.csv files")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="precision (default: bf16 if the model was trained in bf16, else fp32)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")

    check_writable(Path(args.out), "--out")
    check_data_dir(args.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if len(args.checkpoint) == 1 and args.weights is not None:
        ap.error("--weights is for an ensemble (several --checkpoint)")
    try:
        members = [load_member(c, device, args.dtype) for c in args.checkpoint]
        if len(members) == 1:
            m = members[0]
            scores = write_all(m.model, m.tokenizer, Path(args.data), Path(args.out), m.max_lengths,
                               args.batch_size, device, progress=not args.no_progress)
        else:
            scores = write_ensemble(members, args.weights, Path(args.data), Path(args.out),
                                    args.batch_size, device, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(json.dumps({"dev": scores, "out": str(args.out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
