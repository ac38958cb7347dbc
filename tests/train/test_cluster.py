"""What a cluster run relies on, without DeepSpeed: checkpoint manifests, verification and
fall-back, pruning, the log cut on resume, the resume config check, the user's DeepSpeed JSON,
the run directory checks and one-line errors of every command, and stop requests.
The drills that need ranks (SIGTERM mid-epoch, a truncated checkpoint, ZeRO-Offload) are in
test_training.py; the ones through the real launcher are in test_cluster_drills.py (slow)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernels._cli import UserError, check_writable, run_cli
from train.checkpoints import (CheckpointError, choose_checkpoint, cut_log, list_checkpoints, move_aside,
                               prune, read_latest, tag_for, verify, write_manifest)
from train.config import (RESUME_MAY_CHANGE, ConfigError, TrainConfig, check_resume, from_dict,
                          load_config, merge_deepspeed, resume_differences)
from train.stage import STOP, Stage

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- checkpoints on disk
def fake_checkpoint(root: Path, step: int, files: dict[str, bytes] | None = None, latest: bool = True) -> Path:
    """A checkpoint directory with a manifest, as Stage.save_checkpoint leaves it."""
    path = root / tag_for(step)
    path.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"m" * 100 + bytes([step % 256]),
                                 "rng_rank0.pt": b"r" * 10}).items():
        (path / name).write_bytes(data)
    write_manifest(path, step, world_size=1)
    if latest:
        (root / "latest").write_text(path.name + "\n")
    return path


def test_manifest_verifies_and_names_the_damaged_file(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 5)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 5 and manifest["world_size"] == 1
    assert manifest["files"]["rng_rank0.pt"] == {"size": 10, "sha256": hashlib.sha256(b"r" * 10).hexdigest()}
    assert verify(ckpt) is None
    model = ckpt / "mp_rank_00_model_states.pt"
    original = model.read_bytes()
    model.write_bytes(original[:50])  # truncated
    assert verify(ckpt) == f"{model} has 50 bytes, its manifest says 101"
    model.write_bytes(b"x" + original[1:])  # same size, other bytes
    assert verify(ckpt) == f"{model} does not match the SHA-256 in its manifest"
    model.unlink()
    assert verify(ckpt) == f"{model} is missing"
    (ckpt / "manifest.json").unlink()
    assert "no manifest.json (its save did not finish)" in verify(ckpt)


def test_choose_checkpoint_falls_back_past_damaged_ones_with_a_warning(tmp_path):
    first, second = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    third = fake_checkpoint(tmp_path, 6)
    unfinished = tmp_path / tag_for(8)  # a save that never finished: after `latest`, ignored
    unfinished.mkdir()
    assert choose_checkpoint(tmp_path) == third
    for ckpt in (third, second):
        f = ckpt / "rng_rank0.pt"
        f.write_bytes(f.read_bytes()[:3])
    warnings: list[str] = []
    assert choose_checkpoint(tmp_path, warn=warnings.append) == first
    assert len(warnings) == 2
    assert str(third / "rng_rank0.pt") in warnings[0] and warnings[0].endswith(f"falling back to {second}")
    assert str(second / "rng_rank0.pt") in warnings[1] and warnings[1].endswith(f"falling back to {first}")
    (first / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*rng_rank0.pt"):
        choose_checkpoint(tmp_path, warn=warnings.append)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step0000004: .*rng_rank0\.pt has 3 bytes"):
        choose_checkpoint(tmp_path, explicit=second)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        choose_checkpoint(tmp_path / "empty")


def test_prune_orders_by_step_number_and_never_removes_latest(tmp_path):
    # names sort 'step10000000' < 'step9999999'; the step numbers say otherwise
    for step in (9_999_998, 9_999_999):
        fake_checkpoint(tmp_path, step, latest=False)
    newest = fake_checkpoint(tmp_path, 10_000_000)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir())[0] == "step10000000"
    removed = prune(tmp_path, keep=2, latest=newest)
    assert [p.name for p in removed] == ["step9999998"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9_999_999, 10_000_000]
    # keep=1 keeps exactly latest, even when a later-numbered stale one exists (a timeline resumed
    # from an earlier checkpoint): the stale one goes, latest stays
    stale = fake_checkpoint(tmp_path, 10_000_005, latest=False)
    prune(tmp_path, keep=1, latest=newest)
    assert [p for _, p in list_checkpoints(tmp_path)] == [newest] and not stale.exists()
    assert read_latest(tmp_path) == newest


def test_log_is_cut_back_to_the_checkpoint_step(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"stage": "simcse", "step": 9, "loss": 1.0}, {"step": 1, "loss": {}}, {"step": 2, "loss": {}},
               {"epoch": 1, "step": 2, "dev": {}}, {"step": 3, "loss": {}}, {"step": 4, "loss": {}}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')  # torn line
    assert cut_log(log, 2) == 3
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert kept == records[:4]  # the SimCSE stage's records are not the multitask stage's
    assert cut_log(log, 2) == 0
    assert cut_log(log, 0, "simcse") == 1 and len(log.read_text().splitlines()) == 3


# ----------------------------------------------------------------------------- resume config
def test_resume_refuses_keys_that_shape_the_run_naming_both_values():
    saved = from_dict(TrainConfig, {"tasks": {"sst": {"max_train": 256}}, "epochs": 1})
    same_run = from_dict(TrainConfig, {"tasks": {"sst": {"max_train": 256}}, "epochs": 1, "log_every": 5,
                                       "name": "other", "save_every_minutes": 30.0,
                                       "deepspeed": {"monitor_csv": True}, "model": {"kernels": "eager"}})
    assert resume_differences(saved, same_run) == []
    check_resume(saved, same_run, "ckpt")
    changed = from_dict(TrainConfig, {"tasks": {"sst": {"max_train": 1024}}, "epochs": 4,
                                      "optim": {"lr": 1e6}})
    assert resume_differences(saved, changed) == [("epochs", 1, 4), ("optim.lr", 5e-5, 1e6),
                                                  ("tasks.sst.max_train", 256, 1024)]
    with pytest.raises(ConfigError) as info:
        check_resume(saved, changed, "runs/x/checkpoints/step0000048")
    message = str(info.value)
    for part in ("runs/x/checkpoints/step0000048", "epochs: 1 in the checkpoint, 4 now",
                 "optim.lr: 5e-05 in the checkpoint, 1000000.0 now",
                 "tasks.sst.max_train: 256 in the checkpoint, 1024 now", "log_every"):
        assert part in message, message
    assert set(RESUME_MAY_CHANGE) <= set(json.loads(json.dumps(_flat_keys(TrainConfig().to_dict()))))


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def test_a_saved_config_loads_only_if_complete(tmp_path):
    full = TrainConfig().to_dict()
    (tmp_path / "ok.json").write_text(json.dumps(full))
    assert load_config(tmp_path / "ok.json", complete=True) == TrainConfig()
    del full["optim"]["lr"], full["epochs"]
    (tmp_path / "cut.json").write_text(json.dumps(full))
    with pytest.raises(ConfigError, match=r"cut\.json: a saved config must be complete, but it lacks "
                                          r"epochs, optim\.lr"):
        load_config(tmp_path / "cut.json", complete=True)
    assert load_config(tmp_path / "cut.json").epochs == 3  # a user's config may leave keys out


# ----------------------------------------------------------------------------- the user's DeepSpeed JSON
def derived(**changes) -> dict:
    return from_dict(TrainConfig, {"deepspeed": {"global_batch": 64, "micro_batch_per_device": 16},
                                   **changes}).deepspeed_config(2)


def test_deepspeed_json_auto_values_are_filled_and_the_rest_merged():
    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "steps_per_print": 50,
            "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                  "overlap_comm": True, "reduce_bucket_size": "auto",
                                  "stage3_prefetch_bucket_size": "auto"},
            "activation_checkpointing": {"partition_activations": True}}
    merged = merge_deepspeed(derived(), user, "my.json", hidden_size=384)
    assert (merged["train_batch_size"], merged["train_micro_batch_size_per_gpu"],
            merged["gradient_accumulation_steps"]) == (64, 16, 2)
    assert merged["gradient_clipping"] == 1.0 and merged["bf16"] == {"enabled": True}
    assert merged["fp16"] == {"enabled": False} and merged["steps_per_print"] == 50
    assert merged["zero_optimization"] == {
        "stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
        "reduce_bucket_size": 384 * 384, "stage3_prefetch_bucket_size": int(0.9 * 384 * 384)}
    assert merged["activation_checkpointing"] == {"partition_activations": True}
    # before the model is known (run.py's check), model-sized "auto" values wait
    assert "reduce_bucket_size" not in merge_deepspeed(derived(), user, "my.json")["zero_optimization"]


@pytest.mark.parametrize("user, message", [
    ({"train_batch_size": 128}, 'my.json: train_batch_size is 128 but the run config gives 64 '
                                '(deepspeed.global_batch); make them agree or write "auto"'),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu is 8 but the run config gives 16"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps is 1 but the run config gives 2"),
    ({"bf16": {"enabled": False}}, "bf16.enabled is False but the run config gives True (deepspeed.bf16)"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage is 3 but the run config gives 2 "
                                          "(deepspeed.zero_stage)"),
    ({"gradient_clipping": 0.5}, "gradient_clipping is 0.5 but the run config gives 1.0 (optim.grad_clip)"),
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"zero_optimization": {"overlap_comm": "auto"}},
     'zero_optimization.overlap_comm is "auto" but the run config has nothing'),
    ({"zero_optimization": 2}, "zero_optimization must be an object"),
])
def test_deepspeed_json_conflicts_are_errors_naming_both_values(user, message):
    with pytest.raises(ConfigError) as info:
        merge_deepspeed(derived(), user, "my.json", hidden_size=64)
    assert message in str(info.value)


def test_deepspeed_config_file_is_read_and_checked(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3}}))
    cfg = from_dict(TrainConfig, {"deepspeed": {"config_file": str(path)}})
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage is 3 but the run config gives 2"):
        cfg.deepspeed_config(1)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"deepspeed\.config_file .*ds\.json: not valid JSON"):
        cfg.deepspeed_config(1)
    path.unlink()
    with pytest.raises(ConfigError, match=r"deepspeed\.config_file .*ds\.json: no such file"):
        cfg.deepspeed_config(1)
    # the SimCSE stage takes the user's settings but not the multitask stage's batch sizes
    path.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"overlap_comm": True}}))
    simcse = from_dict(TrainConfig, {"deepspeed": {"config_file": str(path), "micro_batch_per_device": 16},
                                     "simcse": {"global_batch": 16}})
    ds = simcse.simcse_deepspeed_config(2)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["overlap_comm"] is True


# ----------------------------------------------------------------------------- run.py before any work
def run_main(capsys, *args: str) -> tuple[int, str]:
    from train.run import main

    status = main(list(args))
    return status, capsys.readouterr().err


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fake_run(out: Path, cfg: TrainConfig | None = None, checkpoint: bool = True) -> Path:
    """A run directory as a run leaves it (config, log, a checkpoint with a manifest)."""
    cfg = cfg or load_config(REPO / "train" / "configs" / "cpu_smoke.json")
    out.mkdir(parents=True)
    cfg.save(out / "config.json")
    (out / "log.jsonl").write_text('{"step": 1}\n')
    if checkpoint:
        ckpt = fake_checkpoint(out / "checkpoints", 8)
        cfg.save(ckpt / "config.json")
        write_manifest(ckpt, 8, world_size=1)
    return out


SMOKE = str(REPO / "train" / "configs" / "cpu_smoke.json")


def test_run_py_refuses_an_out_that_holds_a_run_and_changes_nothing(tmp_path, capsys, data_dir):
    out = fake_run(tmp_path / "run")
    before = tree_digest(out)
    status, err = run_main(capsys, "--config", SMOKE, "--data", str(data_dir), "--out", str(out))
    assert status == 2 and err.count("\n") == 1, err
    assert f"error: --out {out} already holds a run (config.json, log.jsonl, checkpoints)" in err
    assert "--resume" in err and "--overwrite" in err
    assert tree_digest(out) == before


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["--resume", str(d / "nope")], "--resume {d}/nope: no such directory"),
    (lambda d: ["--resume", str(d / "run"), "--overwrite"], "--resume continues a run and --overwrite"),
    (lambda d: ["--resume", str(d / "run"), "--out", str(d / "elsewhere")],
     "--resume continues the run in its own directory {d}/run, but --out is {d}/elsewhere"),
    (lambda d: ["--resume", str(d / "run"), "--tasks.sst.max_train", "4096"],
     "tasks.sst.max_train: 1024 in the checkpoint, 4096 now"),
    (lambda d: ["--resume", str(d / "run"), "--config", SMOKE, "--optim.lr", "1e6"],
     "optim.lr: 0.0001 in the checkpoint, 1000000.0 now"),
    (lambda d: ["--resume", str(d / "bare")], "the run saved no checkpoint yet"),
    (lambda d: ["--resume", str(d / "two")], "was saved by 2 rank(s) and this run has 1: resume with 2"),
    (lambda d: ["--resume", str(d / "cut")], "a saved config must be complete, but it lacks optim.lr"),
    (lambda d: ["--config", SMOKE, "--out", str(d / "file")], "--out {d}/file is a file, not a directory"),
    (lambda d: ["--config", SMOKE, "--out", str(d / "file" / "run")], "cannot be created: {d}/file is a file"),
    (lambda d: ["--config", SMOKE, "--out", "/proc/minbert-run"], "--out /proc/minbert-run is not writable"),
    (lambda d: ["--config", SMOKE, "--out", str(d / "new"), "--deepspeed_config", str(d / "ds.json")],
     "train_batch_size is 7 but the run config gives 32 (deepspeed.global_batch)"),
    (lambda d: ["--config", SMOKE, "--out", str(d / "new"), "--deepspeed_config", str(d / "none.json")],
     "none.json: no such file"),
    (lambda d: ["--config", SMOKE, "--out", str(d / "new"), "--deepspeed_config", str(d / "typo.json")],
     "DeepSpeed rejects {d}/typo.json (DeepSpeedZeroConfig): overlap_com: Extra inputs are not permitted "
     "(got True)"),
    (lambda d: ["--config", SMOKE, "--out", str(d / "new"), "--data", str(d / "bare")],
     "lacks ids-sst-dev.csv, ids-sst-test-student.csv"),
])
def test_run_py_user_errors_are_one_line_before_any_process_group(tmp_path, capsys, data_dir, make_args, message):
    fake_run(tmp_path / "run")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    (bare / "ids-sst-train.csv").write_text("")
    cut = fake_run(tmp_path / "cut")
    saved = json.loads((cut / "checkpoints" / "step0000008" / "config.json").read_text())
    del saved["optim"]["lr"]
    (cut / "checkpoints" / "step0000008" / "config.json").write_text(json.dumps(saved))
    two = fake_run(tmp_path / "two")
    write_manifest(two / "checkpoints" / "step0000008", 8, world_size=2)
    (tmp_path / "file").write_text("x")
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 7}))
    (tmp_path / "typo.json").write_text(json.dumps({"zero_optimization": {"overlap_com": True}}))
    args = make_args(tmp_path)
    if "--data" not in args:
        args += ["--data", str(data_dir)]
    t0 = time.perf_counter()
    status, err = run_main(capsys, *args)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(d=tmp_path) in err, err
    assert time.perf_counter() - t0 < 30  # before DeepSpeed, data loading and the process group
    assert not (tmp_path / "nope").exists() and not (tmp_path / "new").exists()


def test_run_py_debug_shows_the_traceback(tmp_path, data_dir):
    from train.run import main

    with pytest.raises(UserError, match="no such directory"):
        main(["--resume", str(tmp_path / "nope"), "--data", str(data_dir), "--debug"])


def test_overwrite_moves_the_old_run_aside(tmp_path):
    out = fake_run(tmp_path / "run")
    before = tree_digest(out)
    moved = move_aside(out)
    assert not out.exists() and moved.parent == tmp_path and moved.name.startswith("run.replaced-")
    assert tree_digest(moved) == before
    fake_run(out)
    assert move_aside(out) != moved  # a second one in the same second gets its own name


# ----------------------------------------------------------------------------- other commands
def test_predict_on_a_broken_export_is_one_line(tmp_path, capsys, data_dir):
    import torch

    from minbert import BertConfig, BertModel, Tokenizer
    from minbert.heads import HeadSpec, MultitaskBert, MultitaskSpec
    from train.export import save_multitask
    from train.predict import main

    torch.manual_seed(0)
    model = MultitaskBert(BertModel(BertConfig.preset("debug")), MultitaskSpec(tasks={"sst": HeadSpec()}))
    export = tmp_path / "best"
    save_multitask(model.state_dict(), model.bert.config, model.spec, Tokenizer.from_pretrained(), export)
    args = ["--checkpoint", str(export), "--data", str(data_dir), "--out", str(tmp_path / "p"), "--no-progress"]
    heads = (export / "heads.safetensors").read_bytes()
    (export / "heads.safetensors").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {export} is not a complete exported multitask model: heads.safetensors is "
                   "missing (export it again, e.g. by resuming the run)\n")
    (export / "heads.safetensors").write_bytes(heads)
    config = json.loads((export / "config.json").read_text())
    del config["hidden_size"]
    (export / "config.json").write_text(json.dumps(config))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {export}: the encoder does not load") and "hidden_size" in err
    assert err.count("\n") == 1
    assert main(["--checkpoint", str(tmp_path / "nothing"), *args[2:]]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("module, args, message", [
    ("kernels.check", ["--json", "{d}/f/x.json"], "--json {d}/f/x.json: the directory {d}/f is a file, "
                                                    "not a directory"),
    ("bench.compile", ["--json", "{d}"], "--json {d} is a directory"),
    ("bench.io", ["--json", "{d}/f/io.json"], "--json {d}/f/io.json: the directory"),
    ("bench.report", ["--out", "{d}/f"], "--out {d}/f is a file, not a directory"),
    ("bench.profile", ["--train", "--out", "{d}/f"], "--out {d}/f is a file"),
    ("bench.throughput", ["--config", "{d}/missing.json"], "config file not found: {d}/missing.json"),
])
def test_tools_print_one_line_for_user_errors(tmp_path, capsys, module, args, message):
    import importlib

    (tmp_path / "f").write_text("x")
    main = importlib.import_module(module).main
    status = run_cli(main, [a.format(d=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(d=tmp_path) in err, err


def test_data_file_that_is_not_utf8_is_one_line(tmp_path):
    from train.data import DataError, load_task

    (tmp_path / "sts-dev.csv").write_bytes(b"\tid\tsentence1\tsentence2\tsimilarity\n0\ta\t\xff\tb\t1\n")
    with pytest.raises(DataError, match=r"sts-dev\.csv is not valid UTF-8 \(byte \d+: invalid start byte\)"):
        load_task("sts", "dev", tmp_path)
    assert issubclass(DataError, UserError)


def test_check_writable_probes_instead_of_guessing(tmp_path):
    check_writable(tmp_path / "a" / "b", "--out")  # creatable: fine, and nothing is created
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- stop requests
def test_stop_signals_set_the_reason_and_a_dead_launcher_does_too(tmp_path):
    import psutil

    from train.stage import StopRequests

    stop = StopRequests()
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.reason == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal (the process group's) changes nothing
        assert stop.reason == "SIGUSR1"
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    stop.clear()
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import threading

        watcher = threading.Thread(target=stop._watch, args=([psutil.Process(launcher.pid)], 0.05), daemon=True)
        watcher.start()
        time.sleep(0.2)
        assert stop.reason is None
        launcher.kill()  # not reaped yet: a zombie counts as gone
        watcher.join(timeout=10)
        assert stop.reason == f"the launcher (pid {launcher.pid}) exited"
    finally:
        launcher.kill()
        launcher.wait()


# ----------------------------------------------------------------------------- the loop's saving rules
class CountingStage(Stage):
    """The skeleton's loop (Stage.fit) with a step that only counts and a save that only records:
    when it saves and when it stops, without DeepSpeed."""

    def __init__(self, **cfg):
        self.cfg = from_dict(TrainConfig, {"steps_per_epoch": 5, "epochs": 2, **cfg})
        self.step, self.total_steps, self.steps_per_epoch = 0, 10, 5
        self.world, self.is_main, self.show_progress = 1, True, False
        self.stopped, self._saved_step, self._last_save = None, None, time.monotonic()
        self.saves, self.epochs, self.on_step = [], [], None

    def train_step(self):
        self.step += 1
        if self.on_step:
            self.on_step(self)

    def end_of_epoch(self, bar):
        self.epochs.append(self.step)

    def save_checkpoint(self):
        if self._saved_step != self.step:
            self.saves.append(self.step)
            self._saved_step, self._last_save = self.step, time.monotonic()
        return Path(f"step{self.step}")


def test_loop_saves_at_epoch_ends_and_every_n_steps():
    stage = CountingStage(save_every_steps=3)
    stage.fit()
    assert stage.epochs == [5, 10] and stage.saves == [3, 5, 6, 9, 10] and stage.stopped is None


def test_loop_saves_every_n_minutes_at_the_agreement_steps(monkeypatch):
    from train import stage as stage_module

    clock = [1000.0]
    monkeypatch.setattr(stage_module.time, "monotonic", lambda: clock[0])
    stage = CountingStage(save_every_minutes=1.0, stop_check_every=2)

    def tick(s):
        clock[0] += 25.0  # 25 s per step: a minute has passed after 3 steps

    stage.on_step = tick
    stage.fit()
    # checks at 2, 4, 5 (epoch end, saved), 6, 8, 10: due at 4 (100 s), 8 (75 s after 5)
    assert stage.saves == [4, 5, 8, 10]


def test_loop_stops_at_the_next_agreement_step_after_a_signal():
    stage = CountingStage(stop_check_every=4)
    stage.on_step = lambda s: STOP.request("SIGTERM") if s.step == 5 else None
    try:
        stage.fit()
    finally:
        STOP.clear()
    # step 5 is an epoch end (saved, then checked: the request is seen there)
    assert stage.saves == [5] and stage.stopped == {"reason": "SIGTERM", "step": 5, "total_steps": 10,
                                                   "checkpoint": "step5"}
    stage = CountingStage(stop_check_every=4)
    stage.on_step = lambda s: STOP.request("SIGUSR1") if s.step == 6 else None
    try:
        stage.fit()
    finally:
        STOP.clear()
    assert stage.saves == [5, 8] and stage.stopped["step"] == 8 and stage.stopped["reason"] == "SIGUSR1"


def test_loop_asked_to_stop_while_starting_up_saves_before_the_first_step():
    stage = CountingStage()
    STOP.request("SIGTERM")
    try:
        stage.fit()
    finally:
        STOP.clear()
    assert stage.saves == [0] and stage.stopped["step"] == 0 and stage.epochs == []
