"""Run directories and checkpoints on disk: layout, manifests, verification, fall-back, pruning,
and the checks ``train/run.py`` makes before any process group starts. No torch, no DeepSpeed.

    OUT/
      config.json             the resolved config of the run
      deepspeed_config.json   the DeepSpeed JSON the engine was given
      log.jsonl               one JSON record per logged step / evaluation
      checkpoints/            the multitask stage's resumable checkpoints
        latest                the tag of the newest complete checkpoint
        step0000120/          DeepSpeed's files, rng_rank{r}.pt, config.json, manifest.json
      simcse-checkpoints/     the SimCSE stage's, while it runs
      simcse/  best/  predictions/  summary.json

A checkpoint is complete when its ``manifest.json`` exists and every file it lists has the listed
size and SHA-256. The manifest is written (by rank 0, after every rank has written its files)
before ``latest`` moves, so ``latest`` never names a checkpoint that was still being written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from kernels._cli import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
CONFIG = "config.json"
LOG = "log.jsonl"
# What a run leaves in its directory; a directory holding any of these holds a run.
RUN_MARKERS = (CONFIG, LOG, CHECKPOINTS, "simcse-checkpoints", "best", "simcse", "summary.json",
               "predictions", "deepspeed_config.json")
_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(UserError):
    """No usable checkpoint: the message names the directory, the damaged file, and what to do."""


# ----------------------------------------------------------------------------- checkpoints
def tag_for(step: int) -> str:
    return f"step{step:07d}"


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint directory name (``step0000120`` -> 120), None for other names."""
    m = _TAG.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """The checkpoint directories under ``root``, ordered by step number (not by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found)


def read_latest(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return Path(root) / tag if tag else None


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, step: int, world_size: int) -> dict:
    """List every file of the checkpoint ``directory`` with its size and SHA-256 in
    ``manifest.json`` (written atomically); returns the manifest."""
    from minbert.checkpoint import atomic_write_text

    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size,
                                                         "sha256": file_digest(path)}
    manifest = {"step": step, "world_size": world_size, "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict:
    """The manifest of a checkpoint; CheckpointError if it is missing or unreadable."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (its save did not finish)")
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return manifest


def verify(directory: Path) -> str | None:
    """Why the checkpoint ``directory`` is not complete (naming the file), or None if it is."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} does not exist"
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return str(e)
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != info["size"]:
            return f"{path} has {size} bytes, its manifest says {info['size']}"
        if file_digest(path) != info["sha256"]:
            return f"{path} does not match the SHA-256 in its manifest"
    return None


def check_world_size(directory: Path, world_size: int) -> None:
    """A ZeRO checkpoint loads only into as many ranks as saved it."""
    saved = read_manifest(directory).get("world_size")
    if saved is not None and saved != world_size:
        raise CheckpointError(f"{directory} was saved by {saved} rank(s) and this run has {world_size}: "
                              f"resume with {saved} (deepspeed --num_gpus {saved} ...)")


def choose_checkpoint(root: Path, explicit: Path | None = None,
                      warn: Callable[[str], None] = print) -> Path:
    """The checkpoint to resume from: ``explicit`` if given (it must be complete), else the one
    ``root/latest`` names, or, when that one is damaged, the newest complete one before it
    (each damaged one is reported through ``warn``, naming the file)."""
    if explicit is not None:
        problem = verify(explicit)
        if problem:
            raise CheckpointError(f"cannot resume from {explicit}: {problem}")
        return explicit
    latest = read_latest(root)
    found = list_checkpoints(root)
    if latest is not None:
        limit = step_of(latest)
        candidates = [latest] + [p for s, p in reversed(found) if limit is None or s < limit]
    else:  # no pointer (e.g. it was lost): every checkpoint, newest first
        candidates = [p for _, p in reversed(found)]
    if not candidates:
        raise CheckpointError(f"no checkpoint in {root}: nothing to resume (start a new run instead)")
    problems = []
    for i, path in enumerate(candidates):
        problem = verify(path)
        if problem is None:
            return path
        problems.append(problem)
        nxt = candidates[i + 1] if i + 1 < len(candidates) else None
        warn(f"warning: checkpoint {path} is damaged: {problem}; "
             + (f"falling back to {nxt}" if nxt else "no earlier checkpoint to fall back to"))
    raise CheckpointError(f"no complete checkpoint in {root} ({'; '.join(problems)}); start a new "
                          "run (--overwrite) or restore the files")


def prune(root: Path, keep: int, latest: Path) -> list[Path]:
    """Remove checkpoints beyond the newest ``keep`` by step number, never ``latest``; those after
    ``latest`` (an abandoned save, or a timeline resumed from an earlier step) go as well.
    Returns the removed directories."""
    latest_step = step_of(latest)
    found = list_checkpoints(root)
    kept = [p for s, p in found if s <= latest_step][-keep:]
    removed = []
    for _, path in found:
        if path != latest and path not in kept:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------- the run's log
def cut_log(path: Path, step: int, stage: str | None = None) -> int:
    """Drop the records of ``stage`` (None: the multitask stage's, which carry no ``stage`` key)
    logged after ``step`` (a resumed run logs them again), and torn lines; returns how many
    records were dropped."""
    from minbert.checkpoint import atomic_write_text

    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            dropped += 1
            continue
        if record.get("stage") == stage and record.get("step", 0) > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


# ----------------------------------------------------------------------------- run directories
def run_contents(out: Path) -> list[str]:
    """The names in ``out`` that show it holds a run."""
    out = Path(out)
    return [name for name in RUN_MARKERS if (out / name).exists()] if out.is_dir() else []


def resolve_run(path: str | Path) -> tuple[Path, str, Path | None]:
    """``--resume PATH`` -> (run directory, checkpoint directory name, an explicit checkpoint or
    None). PATH may be a run directory, its ``checkpoints`` directory, or one checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--resume {path}: no such directory (give the --out directory of the run to "
                        "continue)")
    if not path.is_dir():
        raise UserError(f"--resume {path} is a file: give the run's directory")
    if step_of(path) is not None and path.parent.name.endswith(CHECKPOINTS):
        return path.parent.parent, path.parent.name, path
    if path.name.endswith(CHECKPOINTS) and (list_checkpoints(path) or (path / LATEST).exists()):
        return path.parent, path.name, None
    if not run_contents(path):
        raise UserError(f"--resume {path} holds no run (no {CONFIG}, no {CHECKPOINTS}/): give the "
                        "--out directory of the run to continue")
    return path, CHECKPOINTS, None


def move_aside(out: Path) -> Path:
    """Rename the run in ``out`` to ``<out>.replaced-<time>`` (kept, never deleted); returns it."""
    out = Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    os.rename(out, target)
    return target
