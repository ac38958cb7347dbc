"""Write CS224N prediction files from an exported multitask model.

    python -m train.predict --checkpoint runs/NAME/best --data data/ --out runs/NAME/predictions

Writes ``{sst,para,sts}-{dev,test}-output.csv`` (header ``id \\t Predicted_...``, rows
``id , prediction``) and prints the dev scores. Every id of a test file gets a prediction: rows
the loader skipped as malformed get the task's fallback (the most frequent training class, or the
mean training similarity) and are listed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .data import load_task
from .tasks import OUTPUT_FILES, metric, overall_score, predict, write_predictions

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
    from tqdm import tqdm

    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    out_dir = Path(out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(model.spec.tasks)
    loaded = {(t, s): load_task(t, s, data_dir, warn=False) for t in tasks for s in splits}
    total = sum(len(v) for v in loaded.values())
    bar = tqdm(total=total, desc="predict", disable=not (progress and is_main), dynamic_ncols=True)
    scores, notes = {}, []
    for (task, split), data in loaded.items():
        hs = model.spec.tasks[task]
        examples = data.examples
        preds = predict(model, tokenizer, task, examples, hs.form, max_lengths[task], batch_size,
                        torch.device(device), progress=bar)
        ids = [e.id for e in examples]
        if split == "dev":
            scores[task] = metric(task, preds, [e.label for e in examples])
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
    if scores:
        scores["overall"] = overall_score(scores)
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
    ap.add_argument("--checkpoint", required=True,
                    help="an exported model (runs/NAME/best) or a run directory holding best/")
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

    ckpt = Path(args.checkpoint)
    if (ckpt / "best").is_dir():
        ckpt = ckpt / "best"
    check_writable(Path(args.out), "--out")
    check_data_dir(args.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_multitask(ckpt, device)
    check_data_dir(args.data, [(t, s) for t in model.spec.tasks for s in ("dev", "test")])
    trained_bf16 = meta.get("train_config", {}).get("deepspeed", {}).get("bf16", False)
    if (args.dtype or ("bf16" if trained_bf16 else "fp32")) == "bf16":
        model = model.to(torch.bfloat16)
    tokenizer = Tokenizer.from_pretrained(ckpt)
    trained = meta.get("train_config", {}).get("tasks", {})  # predict with the training lengths
    max_lengths = {t: trained.get(t, {}).get("max_length", tokenizer.max_length) for t in model.spec.tasks}
    scores = write_all(model, tokenizer, Path(args.data), Path(args.out), max_lengths,
                       args.batch_size, device, progress=not args.no_progress)
    print(json.dumps({"dev": scores, "out": str(args.out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
