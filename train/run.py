"""Multitask minBERT training: parse the config, check every path, build, train, predict.

    deepspeed [--num_gpus N] train/run.py --config train/configs/NAME.json [--data DIR] [--out DIR]
              [--overwrite] [--deepspeed_config FILE] [--key.sub value ...]
    deepspeed [--num_gpus N] train/run.py --resume DIR [--key.sub value ...]
    python train/run.py ...            # one process, the same code path

With ``simcse.enabled`` the contrastive stage (``train/simcse.py``) runs first and the multitask
stage starts from its encoder (``OUT/simcse``).

``--key.sub value`` overrides any config field (e.g. ``--optim.lr 3e-5 --epochs 1``).

Before any process group starts, every path is checked (``--data`` and its files, the model
checkpoint, ``--out``, ``--resume``, ``--deepspeed_config``) and, when resuming, the config is
compared with the checkpoint's: a mistake is one line on stderr and exit status 2 (``--debug``
shows the traceback). A stop request (SIGTERM / SIGUSR1, see README "Running on a cluster") saves
a checkpoint and exits 0 with the line to resume.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed train/run.py): make `train` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels._cli import USER_ERROR_STATUS, USER_ERRORS, UserError, check_writable, run_cli  # noqa: E402
from train.checkpoints import (CHECKPOINTS, CONFIG, LOG, MANIFEST, check_world_size,  # noqa: E402
                               cut_log, list_checkpoints, move_aside, read_latest, resolve_run,
                               run_contents)
from train.config import TrainConfig, check_resume, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="training config JSON (train/configs/*.json)")
    ap.add_argument("--data", default="data/", help="directory of the CS224N files (default: data/)")
    ap.add_argument("--out", default=None,
                    help="checkpoints, logs and predictions (default: runs/NAME; with --resume: the "
                         "resumed run's directory)")
    ap.add_argument("--resume", default=None,
                    help="continue the run saved in this directory (or from this checkpoint)")
    ap.add_argument("--overwrite", action="store_true",
                    help="--out holds a run: move it aside to OUT.replaced-TIME and start a new one")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None, metavar="FILE",
                    help="your DeepSpeed JSON, merged over the derived one (deepspeed.config_file)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
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
    if args.deepspeed_config is not None:
        overrides.append(("deepspeed.config_file", json.dumps(args.deepspeed_config)))
    return args, overrides


# ----------------------------------------------------------------------------- checks before any work
@dataclass
class Plan:
    cfg: TrainConfig
    out: Path
    resume: bool  # continue the run in ``out``
    multitask_checkpoint: Path | None  # resume the multitask stage from here (a run dir or a checkpoint)


def _launch_world() -> int:
    """The world size the launcher set (before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def _check_model_dir(path: str | None) -> None:
    if path is None:
        return
    from minbert.checkpoint import WEIGHT_FILES
    from minbert.tokenizer import TOKENIZER_FILE, VOCAB_FILE

    d = Path(path)
    if not d.is_dir():
        raise UserError(f"model.checkpoint: directory {str(d)!r} does not exist (give an HF-format BERT "
                        "directory: config.json, model.safetensors, vocab.txt)")
    if not (d / "config.json").is_file():
        raise UserError(f"model.checkpoint {d} holds no config.json (give an HF-format BERT directory)")
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"model.checkpoint {d} holds no weights ({' or '.join(WEIGHT_FILES)})")
    if not any((d / f).is_file() for f in (TOKENIZER_FILE, VOCAB_FILE)):
        raise UserError(f"model.checkpoint {d} holds no tokenizer ({TOKENIZER_FILE} or {VOCAB_FILE})")


def _data_needs(cfg: TrainConfig) -> list[tuple[str, str]]:
    needs = [(t, s) for t in cfg.tasks.enabled() for s in ("train", "dev", "test")]
    if cfg.simcse.enabled:
        needs += [("quora", "train"), ("sts", "train"), ("sts", "dev")]
        if cfg.simcse.mode == "unsup":
            needs.append(("sst", "train"))
    return needs


def _saved_config_file(run_dir: Path, explicit: Path | None) -> Path:
    """The config a resumed run must match: the checkpoint's (the newest of either stage), else
    the run's ``config.json``."""
    from train.simcse import CHECKPOINT_DIR as SIMCSE_CHECKPOINTS

    candidates = [explicit] if explicit is not None else [
        read_latest(run_dir / CHECKPOINTS), read_latest(run_dir / SIMCSE_CHECKPOINTS)]
    for ckpt in candidates:
        if ckpt is not None and (ckpt / CONFIG).is_file():
            return ckpt / CONFIG
    return run_dir / CONFIG


def preflight(args, overrides: list[tuple[str, str]]) -> Plan:
    """Every check that needs no process group: paths, the config, and the resumed run's config.
    Nothing is written."""
    from train.data import check_data_dir
    from train.simcse import CHECKPOINT_DIR as SIMCSE_CHECKPOINTS, REPORT, STAGE_DIR

    if args.resume is not None and args.overwrite:
        raise UserError("--resume continues a run and --overwrite starts a new one: give one of them")
    multitask_checkpoint = None
    if args.resume is not None:
        run_dir, ckpt_dir, explicit = resolve_run(args.resume)
        if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
            raise UserError(f"--resume continues the run in its own directory {run_dir}, but --out is "
                            f"{args.out}: leave --out out (or copy the run there and resume the copy)")
        out = run_dir
        saved_file = _saved_config_file(run_dir, explicit)
        if not saved_file.is_file():
            raise UserError(f"--resume {args.resume}: no saved config ({saved_file}) to continue from")
        saved = load_config(saved_file, complete=True)
        cfg = load_config(args.config, overrides) if args.config else load_config(saved_file, overrides,
                                                                                 complete=True)
        check_resume(saved, cfg, saved_file.parent)
        if explicit is not None and ckpt_dir != CHECKPOINTS:
            raise UserError(f"--resume {explicit}: resume a SimCSE stage from its run directory {run_dir}")
        if explicit is not None or list_checkpoints(run_dir / CHECKPOINTS):
            multitask_checkpoint = explicit or run_dir
            newest = explicit or read_latest(run_dir / CHECKPOINTS)
            if newest is not None and (newest / MANIFEST).is_file():
                check_world_size(newest, _launch_world())
        elif not (cfg.simcse.enabled and ((run_dir / STAGE_DIR / REPORT).is_file()
                                          or list_checkpoints(run_dir / SIMCSE_CHECKPOINTS))):
            raise UserError(f"--resume {run_dir}: the run saved no checkpoint yet, so there is nothing to "
                            "continue; start it again with --overwrite")
        check_writable(out, "--resume")
    else:
        if args.config is None:
            raise UserError("--config is required (or --resume a saved run)")
        cfg = load_config(args.config, overrides)
        out = Path(args.out) if args.out else Path("runs") / cfg.name
        check_writable(out, "--out")
        held = run_contents(out)
        if held and not args.overwrite:
            raise UserError(f"--out {out} already holds a run ({', '.join(held)}): continue it with "
                            f"--resume {out}, start over with --overwrite (the old run is moved to "
                            f"{out.name}.replaced-<time>, not deleted), or choose another --out")
    check_data_dir(args.data, _data_needs(cfg))
    _check_model_dir(cfg.model.checkpoint)
    world = _launch_world()
    ds_config = cfg.deepspeed_config(world, monitor_dir=str(out / "monitor"))  # batch sizes, user JSON
    if cfg.deepspeed.config_file is not None:
        from train.stage import check_deepspeed_config

        check_deepspeed_config(ds_config, cfg.deepspeed.config_file)
    if cfg.simcse.enabled:
        cfg.simcse_deepspeed_config(world)
    return Plan(cfg, out, args.resume is not None, multitask_checkpoint)


# ----------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", 0))
    return run_cli(_main, argv, prefix=f"[rank {rank}] " if rank else "")


def _main(argv: list[str]) -> int:
    started = time.monotonic()
    args, overrides = parse_args(argv)
    try:
        plan = preflight(args, overrides)
    except USER_ERRORS:
        if int(os.environ.get("RANK", 0)) != 0:  # the same on every rank: rank 0 says it
            return USER_ERROR_STATUS
        raise
    cfg, out = plan.cfg, plan.out
    progress = not args.no_progress

    import torch
    import torch.distributed as dist

    from minbert.checkpoint import atomic_write_text
    from train.export import load_multitask
    from train.loop import Trainer
    from train.predict import write_all
    from train.simcse import REPORT, STAGE_DIR, run_stage
    from train.stage import start_process

    rank, world, _ = start_process(cfg)
    if rank == 0:
        if args.overwrite and run_contents(out):
            moved = move_aside(out)
            print(f"--overwrite: the previous run in {out} is now in {moved}", flush=True)
        if plan.resume and plan.multitask_checkpoint is None:  # the multitask stage starts afresh
            cut_log(out / LOG, 0, None)
    if world > 1:
        dist.barrier()

    def stopped(where: dict) -> int:
        if rank == 0:
            print(f"stopped at step {where['step']} of {where['total_steps']} ({where['reason']}); "
                  f"checkpoint {where['checkpoint']}. To resume: train/run.py --resume {out} (the same "
                  f"launcher, {world} rank(s))", flush=True)
        _finish(dist)
        return 0

    init_checkpoint, simcse_report = None, None
    if cfg.simcse.enabled and plan.multitask_checkpoint is None:
        init_checkpoint, simcse_report, where = run_stage(cfg, args.data, out, progress, resume=plan.resume)
        if where is not None:
            return stopped(where)
    elif cfg.simcse.enabled and (out / STAGE_DIR / REPORT).is_file():  # resuming: weights come
        simcse_report = json.loads((out / STAGE_DIR / REPORT).read_text())  # from the checkpoint
    trainer = Trainer(cfg, args.data, out, resume=plan.multitask_checkpoint, progress=progress,
                      init_checkpoint=init_checkpoint)
    result = trainer.fit()
    if trainer.stopped is not None:
        return stopped(trainer.stopped)
    # Predictions from the best model (by overall dev score), sharded over the ranks, in the
    # precision it was trained in.
    model, _ = load_multitask(out / "best", trainer.device)
    if cfg.deepspeed.bf16:
        model = model.to(torch.bfloat16)
    max_lengths = {t: getattr(cfg.tasks, t).max_length for t in cfg.tasks.enabled()}
    scores = write_all(model, trainer.tokenizer, args.data, out / "predictions", max_lengths,
                       cfg.eval_batch_size, trainer.device, progress=progress)
    memory = memory_report(trainer.device, trainer.optimizer)
    if trainer.is_main:
        summary = {"name": cfg.name, "best_dev_overall": result["best_score"], "best_dev": scores,
                   "steps": trainer.step, "out": str(out),
                   "trainable_parameters": result["trainable_parameters"],
                   "parameters": result["parameters"], **memory,
                   # examples over training seconds (evaluation excluded), this process's part
                   "train_examples": result["train_examples"],
                   "train_samples_per_s": result["train_samples_per_s"],
                   # this process's start (after the launcher) to here; a resumed run: this part
                   "seconds": round(time.monotonic() - started, 1)}
        if result["finished_early"] is not None:
            summary["early_stop"] = result["finished_early"]
        if simcse_report is not None:
            summary["simcse"] = {k: simcse_report[k] for k in
                                 ("mode", "steps", "zero_shot_sts_before", "zero_shot_sts_after")}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2), flush=True)
    _finish(dist)
    return 0


def memory_report(device, optimizer) -> dict:
    """The run's memory, each the largest over the ranks (a collective: every rank calls it):
    ``optimizer_state_mib``, what the optimizer holds on a rank (its master weights and AdamW
    moments, one ZeRO partition of them); and the peak, on CUDA the most the caching allocator
    held for tensors (``peak_gpu_memory_mib``), elsewhere the rank process's peak resident set
    (``peak_rss_mib``: the Python runtime and libraries, about 0.5 GiB, the allocator's cached
    blocks, and the evaluation and prediction passes after training, all included)."""
    import resource

    import torch
    import torch.distributed as dist

    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO / bf16 wrapper holds it
    tensors = {id(t): t for t in [p for g in base.param_groups for p in g["params"]]
               + [t for state in base.state.values() for t in state.values() if torch.is_tensor(t)]}
    state = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    if device.type == "cuda":
        key, peak = "peak_gpu_memory_mib", torch.cuda.max_memory_allocated(device) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        key, peak = "peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    values = torch.tensor([state, peak], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return {"optimizer_state_mib": round(float(values[0]), 1), key: round(float(values[1]), 1)}


def _finish(dist) -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
