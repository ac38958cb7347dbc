"""Multitask minBERT training: parse the config, build, train, predict.

    deepspeed [--num_gpus N] train/run.py --config train/configs/NAME.json [--data DIR] [--out DIR]
              [--resume DIR] [--key.sub value ...]
    python train/run.py ...            # one process, the same code path

With ``simcse.enabled`` the contrastive stage (``train/simcse.py``) runs first and the multitask
stage starts from its encoder (``OUT/simcse``).

``--key.sub value`` overrides any config field (e.g. ``--optim.lr 3e-5 --epochs 1``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed train/run.py): make `train` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="training config JSON (train/configs/*.json)")
    ap.add_argument("--data", default="data/", help="directory of the CS224N files (default: data/)")
    ap.add_argument("--out", default=None, help="checkpoints, logs and predictions (default: runs/NAME)")
    ap.add_argument("--resume", default=None, help="continue the run saved in this directory")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    overrides = []
    i = 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--") or len(key) == 2:
            ap.error(f"unexpected argument {key!r}; overrides look like --key.sub value")
        key = key[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            value = rest[i + 1]
            i += 2
        else:
            ap.error(f"override --{key} needs a value")
        overrides.append((key, value))
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    config_path = args.config
    if config_path is None:
        if args.resume is None:
            print("error: --config is required (or --resume a saved run)", file=sys.stderr)
            return 2
        config_path = Path(args.resume) / "config.json"
    try:
        cfg = load_config(config_path, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / cfg.name

    import torch
    import torch.distributed as dist

    from train.loop import Trainer, TrainingError, load_multitask
    from train.predict import write_all
    from train.simcse import REPORT, STAGE_DIR, run_stage

    try:
        init_checkpoint, simcse_report = None, None
        if cfg.simcse.enabled and args.resume is None:
            init_checkpoint, simcse_report = run_stage(cfg, args.data, out, progress=not args.no_progress)
        elif cfg.simcse.enabled and (out / STAGE_DIR / REPORT).is_file():  # resuming: weights come
            simcse_report = json.loads((out / STAGE_DIR / REPORT).read_text())  # from the checkpoint
        trainer = Trainer(cfg, args.data, out, resume=args.resume, progress=not args.no_progress,
                          init_checkpoint=init_checkpoint)
        result = trainer.fit()
    except (TrainingError, ConfigError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # Predictions from the best model (by overall dev score), sharded over the ranks, in the
    # precision it was trained in.
    model, _ = load_multitask(out / "best", trainer.device)
    if cfg.deepspeed.bf16:
        model = model.to(torch.bfloat16)
    max_lengths = {t: getattr(cfg.tasks, t).max_length for t in cfg.tasks.enabled()}
    scores = write_all(model, trainer.tokenizer, args.data, out / "predictions", max_lengths,
                       cfg.eval_batch_size, trainer.device, progress=not args.no_progress)
    if trainer.is_main:
        summary = {"name": cfg.name, "best_dev_overall": result["best_score"], "best_dev": scores,
                   "steps": trainer.step, "out": str(out)}
        if simcse_report is not None:
            summary["simcse"] = {k: simcse_report[k] for k in
                                 ("mode", "steps", "zero_shot_sts_before", "zero_shot_sts_after")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
