"""A recipe: several training runs and the ensemble of their best exports, from one command.

    python -m train.recipe NAME|FILE --data DIR [--out DIR] [--num_gpus N] [--overwrite] [--keep-checkpoints]

``NAME`` is a shipped recipe (``train/recipes/NAME.json``), ``FILE`` any recipe JSON:

    {"name": "cpu_best",
     "members": [{"name": "seed0", "config": "train/configs/cpu_best.json", "overrides": {"seed": 0}},
                 {"name": "seed1", "config": "train/configs/cpu_best.json", "overrides": {"seed": 1}}],
     "weights": null,          # ensemble weights, one per member (null: equal)
     "dtype": "fp32"}          # the ensemble's inference precision

Each member is a ``deepspeed --num_gpus N train/run.py --config CONFIG --key value ...`` run in
``OUT/members/NAME``; then ``OUT/predictions/`` gets the CS224N files of the ensemble (of the
one member, for a recipe of one) and ``OUT/summary.json`` the dev scores of every member and of
the ensemble, with the wall time of each part. Every member config is checked before the first
run starts. Run the same command again after an interruption: finished members are kept,
interrupted ones resume from their last checkpoint (``--resume``), and a member that saved
nothing starts again. ``OUT`` holding another recipe is refused (``--overwrite`` moves it to
``OUT.replaced-<time>``). A member that finishes has its resumable DeepSpeed checkpoints removed
(the ensemble reads its ``best/`` export; each checkpoint holds the optimizer state, several
times the model: 620-700 MiB a member of ``cpu_best``); ``--keep-checkpoints`` keeps
them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kernels._cli import UserError, check_writable, run_cli
from train.checkpoints import CHECKPOINTS, list_checkpoints, move_aside, run_contents
from train.config import ConfigError, load_config

RECIPES = Path(__file__).parent / "recipes"
REPO = Path(__file__).resolve().parents[1]
RECIPE_FILE, SUMMARY = "recipe.json", "summary.json"


@dataclass
class Member:
    name: str
    config: str
    overrides: dict = field(default_factory=dict)

    def args(self) -> list[str]:
        """The ``--key value`` overrides for train/run.py (values as JSON, which it parses)."""
        return [a for k, v in self.overrides.items() for a in (f"--{k}", json.dumps(v))]


@dataclass
class Recipe:
    name: str
    members: list[Member]
    weights: list[float] | None = None
    dtype: str = "fp32"

    def to_dict(self) -> dict:
        return {"name": self.name, "members": [vars(m) for m in self.members], "weights": self.weights,
                "dtype": self.dtype}


def load_recipe(spec: str) -> Recipe:
    """A shipped recipe's name or a recipe file; every member's config is loaded and checked."""
    path = Path(spec)
    if not path.is_file():
        shipped = RECIPES / f"{spec}.json"
        if not shipped.is_file():
            names = sorted(p.stem for p in RECIPES.glob("*.json"))
            raise UserError(f"recipe {spec!r} is neither a file nor a shipped recipe ({', '.join(names)})")
        path = shipped
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a JSON object")
    unknown = set(data) - {"name", "members", "weights", "dtype"}
    if unknown:
        raise UserError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))}")
    members_raw = data.get("members")
    if not isinstance(members_raw, list) or not members_raw:
        raise UserError(f"{path}: 'members' must be a non-empty list of {{name, config, overrides}}")
    members = []
    for i, m in enumerate(members_raw):
        if not isinstance(m, dict) or "config" not in m or set(m) - {"name", "config", "overrides"}:
            raise UserError(f"{path}: member {i + 1} must be an object with 'config' and optional "
                            f"'name' and 'overrides', got {m!r}")
        member = Member(str(m.get("name", f"member{i + 1}")), str(m["config"]), dict(m.get("overrides", {})))
        if not Path(member.config).is_file() and (REPO / member.config).is_file():  # repository-relative
            member.config = str(REPO / member.config)
        try:
            load_config(member.config, [(k, json.dumps(v)) for k, v in member.overrides.items()])
        except (ConfigError, FileNotFoundError) as e:
            raise UserError(f"{path}: member {member.name!r}: {e}") from None
        members.append(member)
    names = [m.name for m in members]
    if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
        raise UserError(f"{path}: member names must be distinct and plain, got {names}")
    weights = data.get("weights")
    if weights is not None and (len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0):
        raise UserError(f"{path}: 'weights' needs one non-negative number per member, not all zero")
    dtype = data.get("dtype", "fp32")
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"{path}: 'dtype' must be 'fp32' or 'bf16', got {dtype!r}")
    return Recipe(str(data.get("name", path.stem)), members, weights, dtype)


def member_command(member: Member, data: str, run_dir: Path, num_gpus: int, port: int) -> list[str]:
    """The launch of one member on ``port``: new, or ``--resume`` of an interrupted one (the
    config and overrides again, which train/run.py checks against the saved ones)."""
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_gpus),
                f"--master_port={port}", str(REPO / "train" / "run.py")]
    if list_checkpoints(run_dir / CHECKPOINTS):
        where = ["--resume", str(run_dir)]
    else:
        where = ["--out", str(run_dir)] + (["--overwrite"] if run_contents(run_dir) else [])
    return [*launcher, "--config", member.config, "--data", data, *where, *member.args()]


def drop_checkpoints(run_dir: Path, name: str) -> int:
    """Remove a finished member's resumable checkpoints (``run_dir/checkpoints``); its ``best/``
    export, log and predictions stay. Returns the bytes freed."""
    from train.export import MULTITASK_META  # here: it imports torch, which --help and refusals skip

    root = run_dir / CHECKPOINTS
    if not root.is_dir() or not (run_dir / "best" / MULTITASK_META).is_file():
        return 0  # nothing to remove, or no export to stand in for them: keep them
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(root)
    print(f"[recipe] member {name}: finished; its resumable checkpoints removed ({size / 2**20:.0f} MiB; "
          f"--keep-checkpoints keeps them), its export {run_dir / 'best'} kept", flush=True)
    return size


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="a shipped recipe (train/recipes/NAME.json) or a recipe file")
    ap.add_argument("--data", default="data/", help="directory of the CS224N files (default: data/)")
    ap.add_argument("--out", default=None, help="the recipe's directory (default: runs/NAME)")
    ap.add_argument("--num_gpus", "--num-gpus", type=int, default=None,
                    help="ranks per member run (default: the GPUs here, or 2 CPU ranks without one)")
    ap.add_argument("--overwrite", action="store_true",
                    help="OUT holds another recipe: move it to OUT.replaced-TIME and start anew")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished member's resumable DeepSpeed checkpoints (default: removed; "
                         "its best/ export stays)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    started = time.monotonic()

    import torch

    from train.data import check_data_dir
    from train.stage import free_port, release_shared_buffers

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    check_writable(out, "--out")
    check_data_dir(args.data)
    num_gpus = args.num_gpus or (torch.cuda.device_count() or 2)
    if num_gpus < 1:
        raise UserError(f"--num_gpus must be >= 1, got {num_gpus}")
    saved = out / RECIPE_FILE
    if out.is_dir() and any(out.iterdir()):
        same = saved.is_file() and json.loads(saved.read_text()) == recipe.to_dict()
        if not same and not args.overwrite:
            held = "another recipe" if saved.is_file() else "something else"
            raise UserError(f"--out {out} holds {held}: give another --out, or --overwrite (the old "
                            f"directory is moved to {out.name}.replaced-<time>, not deleted)")
        if not same:
            print(f"--overwrite: the previous contents of {out} are now in {move_aside(out)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    seconds: dict[str, float] = {}
    for i, member in enumerate(recipe.members):
        run_dir = out / "members" / member.name
        if (run_dir / SUMMARY).is_file():
            print(f"[recipe] member {i + 1}/{len(recipe.members)} {member.name}: done before, kept", flush=True)
            continue
        port = free_port()
        cmd = member_command(member, args.data, run_dir, num_gpus, port)
        if args.no_progress:
            cmd.append("--no-progress")
        print(f"[recipe] member {i + 1}/{len(recipe.members)} {member.name}: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        status = subprocess.call(cmd, env=env)
        seconds[member.name] = round(time.monotonic() - t0, 1)
        release_shared_buffers(port)  # a rank killed before its exit hook left its buffer behind
        if status != 0 or not (run_dir / SUMMARY).is_file():
            print(f"[recipe] member {member.name} stopped (status {status}); run the same command again "
                  f"to resume it", file=sys.stderr, flush=True)
            return status or 1
        if not args.keep_checkpoints:
            drop_checkpoints(run_dir, member.name)

    from train.predict import load_member, write_all, write_ensemble

    t0 = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    members = [load_member(out / "members" / m.name, device, recipe.dtype) for m in recipe.members]
    if len(members) == 1:
        m = members[0]
        dev = {"ensemble": write_all(m.model, m.tokenizer, Path(args.data), out / "predictions", m.max_lengths,
                                     device=device, progress=not args.no_progress), "members": {}}
    else:
        dev = write_ensemble(members, recipe.weights, Path(args.data), out / "predictions", device=device,
                             progress=not args.no_progress)
    summaries = {m.name: json.loads((out / "members" / m.name / SUMMARY).read_text()) for m in recipe.members}
    summary = {"name": recipe.name, "dev": dev["ensemble"],
               "members": {n: {"dev": s["best_dev"], "seconds": s.get("seconds")} for n, s in summaries.items()},
               "predict_seconds": round(time.monotonic() - t0, 1),
               # this command's own wall time (a resumed recipe: this part only)
               "seconds": round(time.monotonic() - started, 1)}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
