"""``python -m train.recipe``: member runs, the ensemble's prediction files, a rerun that keeps
finished members and resumes an unfinished one, finished members' checkpoints removed unless
``--keep-checkpoints``, and the refusals (another recipe in --out, a bad member config) before
anything runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.checkpoints import list_checkpoints

REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, tiny: Path, seeds=(0, 1), **member_overrides) -> Path:
    small = {f"tasks.{t}.{k}": v for t in ("sst", "quora", "sts")
             for k, v in (("max_train", 32), ("max_eval", 24), ("max_length", 24))}
    members = [{"name": f"seed{s}", "config": "train/configs/cpu_smoke.json",
                "overrides": {"seed": s, "model.checkpoint": str(tiny), "steps_per_epoch": 2,
                              "deepspeed.global_batch": 8, "deepspeed.micro_batch_per_device": 8,
                              **small, **member_overrides}} for s in seeds]
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"name": "tiny", "members": members, "dtype": "fp32"}))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "train.recipe", *args, "--num_gpus", "1", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _ids(path: Path) -> list[str]:
    return [line.split(",")[0].strip() for line in path.read_text().splitlines()[1:]]


def test_recipe_runs_members_ensembles_and_reruns_without_retraining(tmp_path, tiny_checkpoint, data_dir):
    recipe, out = _recipe(tmp_path, tiny_checkpoint), tmp_path / "out"
    proc = _run(str(recipe), "--data", str(data_dir), "--out", str(out), "--keep-checkpoints")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checkpoints removed" not in proc.stdout
    assert all(list_checkpoints(out / "members" / n / "checkpoints") for n in ("seed0", "seed1"))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["members"]) == {"seed0", "seed1"}
    for name, m in summary["members"].items():
        member = json.loads((out / "members" / name / "summary.json").read_text())
        assert m["dev"] == member["best_dev"] and member["steps"] == 2 and m["seconds"] > 0
    assert set(summary["dev"]) == {"sst", "quora", "sts", "overall"}
    # the two seeds trained different models: the ensemble is neither member
    first = (out / "members" / "seed0" / "predictions" / "sts-dev-output.csv").read_text()
    assert first != (out / "members" / "seed1" / "predictions" / "sts-dev-output.csv").read_text()
    assert (out / "predictions" / "sts-dev-output.csv").read_text() not in (
        first, (out / "members" / "seed1" / "predictions" / "sts-dev-output.csv").read_text())
    for stem, task in (("sst", "sst"), ("para", "quora"), ("sts", "sts")):
        for split in ("dev", "test"):
            ids = _ids(out / "predictions" / f"{stem}-{split}-output.csv")
            assert ids and len(ids) == len(set(ids))
            assert ids == _ids(out / "members" / "seed0" / "predictions" / f"{stem}-{split}-output.csv")

    # Again: both members are kept (their files untouched); the ensemble is written again.
    kept = {p: p.stat().st_mtime_ns for p in (out / "members").rglob("*") if p.is_file()}
    again = _run(str(recipe), "--data", str(data_dir), "--out", str(out))
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("done before, kept") == 2
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert json.loads((out / "summary.json").read_text())["dev"] == summary["dev"]

    # A member that stopped before its summary resumes from its checkpoint (nothing left to train);
    # without --keep-checkpoints, its checkpoints go once it has finished, its export stays. The
    # member kept from before keeps its own.
    (out / "members" / "seed1" / "summary.json").unlink()
    resumed = _run(str(recipe), "--data", str(data_dir), "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "--resume" in resumed.stdout and resumed.stdout.count("done before, kept") == 1
    assert json.loads((out / "members" / "seed1" / "summary.json").read_text())["best_dev"] == \
        summary["members"]["seed1"]["dev"]
    assert resumed.stdout.count("resumable checkpoints removed") == 1
    assert not (out / "members" / "seed1" / "checkpoints").exists()
    assert (out / "members" / "seed1" / "best" / "multitask.json").is_file()
    assert list_checkpoints(out / "members" / "seed0" / "checkpoints")
    assert json.loads((out / "summary.json").read_text())["dev"] == summary["dev"]


def test_recipe_refuses_another_recipe_in_out_and_bad_members_before_running(tmp_path, tiny_checkpoint,
                                                                             data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"name": "other"}))
    proc = _run(str(_recipe(tmp_path, tiny_checkpoint)), "--data", str(data_dir), "--out", str(out))
    assert proc.returncode == 2 and "holds another recipe" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["recipe.json"]  # nothing written

    bad = _recipe(tmp_path, tiny_checkpoint, seeds=(0,), **{"optim.learning_rate": 1e-3})
    proc = _run(str(bad), "--data", str(data_dir), "--out", str(tmp_path / "new"))
    assert proc.returncode == 2 and "member 'seed0'" in proc.stderr and "optim.learning_rate" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
    proc = _run("no_such_recipe", "--data", str(data_dir))
    assert proc.returncode == 2 and "neither a file nor a shipped recipe" in proc.stderr


@pytest.mark.parametrize("body, message", [
    ({"members": []}, "non-empty list"),
    ({"members": [{"name": "a"}]}, "must be an object with 'config'"),
    ({"members": [{"config": "train/configs/cpu_smoke.json"}], "weights": [1, 2]}, "one non-negative number"),
    ({"members": [{"config": "train/configs/cpu_smoke.json"}], "dtype": "fp16"}, "'dtype'"),
    ({"members": [{"name": "a", "config": "train/configs/cpu_smoke.json"}] * 2}, "distinct"),
    ({"members": [{"config": "train/configs/cpu_smoke.json"}], "ensemble": {}}, "unknown recipe key"),
])
def test_recipe_file_errors_name_the_problem(tmp_path, body, message):
    from kernels._cli import UserError
    from train.recipe import load_recipe

    path = tmp_path / "r.json"
    path.write_text(json.dumps(body))
    with pytest.raises(UserError, match=message):
        load_recipe(str(path))


def test_shipped_recipes_load():
    from train.recipe import RECIPES, load_recipe

    shipped = sorted(RECIPES.glob("*.json"))
    assert shipped
    for path in shipped:
        recipe = load_recipe(path.stem)
        assert recipe.name == path.stem and recipe.members


def test_drop_checkpoints_needs_the_export_and_frees_what_it_removes(tmp_path, capsys):
    from train.recipe import drop_checkpoints

    run = tmp_path / "member"
    (run / "checkpoints" / "step0000002").mkdir(parents=True)
    (run / "checkpoints" / "step0000002" / "model.pt").write_bytes(b"x" * 3000)
    (run / "checkpoints" / "latest").write_text("step0000002")
    assert drop_checkpoints(run, "m") == 0  # no best/ export to stand in for them: kept
    assert (run / "checkpoints" / "step0000002" / "model.pt").is_file()
    (run / "best").mkdir()
    (run / "best" / "multitask.json").write_text("{}")
    assert drop_checkpoints(run, "m") == 3000 + len("step0000002")
    assert not (run / "checkpoints").exists() and (run / "best" / "multitask.json").is_file()
    assert "member m: finished; its resumable checkpoints removed" in capsys.readouterr().out
    assert drop_checkpoints(run, "m") == 0  # nothing left
