"""Multitask training under DeepSpeed on CPU ranks: parity across ZeRO stages and world sizes,
PCGrad, resuming, stop requests, damaged checkpoints, ZeRO-Offload from a user's DeepSpeed JSON,
failure handling, and the `train/run.py` entry point with its predictions and refusals.

DeepSpeed starts are the slow part, so one 2-rank launch and one single-process launch of
tests/train/ds_worker.py run every scenario and the tests read their results. The preemption
drills through the real launcher (several launches each) are at the end, marked slow.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from minbert import BertModel
from train.checkpoints import read_latest, step_of, verify
from train.data import load_task

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "train" / "ds_worker.py"
TWO_RANK_SCENARIOS = ("zero0,zero1,zero2,zero2-padded,zero2-fused,pcgrad,fp32,fp32-resume,learn,nan,"
                      "interrupted-save,simcse-sup,simcse-unsup,sigterm,truncated,simcse-resume,offload,"
                      "simcse-sup-fp32,kernels-eager,kernels-triton,freeze-encoder,freeze-layers,"
                      "freeze-layers-zero3,early-stop,stop-after,mid-layer,lora,pair-heads,joint-simcse,smart,pcgrad-from-2,task-batch,"
                      "lora-zero3,mid-layer-zero3,pair-heads-zero3,joint-simcse-zero3,task-batch-zero3,"
                      "options-a-eager,options-a-triton,options-a-zero0,options-a-zero1,"
                      "options-b-eager,options-b-triton,options-b-zero0,options-b-zero1,"
                      "options-c-eager,options-c-triton,options-c-zero0,options-c-zero1,options-resume")
ONE_PROC_SCENARIOS = "zero2,pcgrad,simcse-sup,simcse-sup-fp32"


def _env(interpret: bool = False) -> dict:
    """Training here runs the eager kernels backend, except the ``kernels-triton`` scenario; the
    Triton kernels (it and the fused optimizer) run in Triton's interpreter where ``interpret``
    (no GPU)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    if interpret and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(cmd: list[str], timeout: int = 900, interpret: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(interpret), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(_failure(cmd, proc))
    return proc


def _failure(cmd: list[str], proc: subprocess.CompletedProcess) -> str:
    """The failed launch's last traceback first (a CI log shows only the start of a long message),
    then the tails of its output."""
    out = proc.stdout + proc.stderr
    start = out.rfind("Traceback (most recent call last)")
    cause = out[start:][:3000] if start >= 0 else "(no Python traceback in the output)"
    return (f"{' '.join(cmd)[:300]} failed ({proc.returncode})\nlast traceback:\n{cause}\n"
            f"--- stdout tail:\n{proc.stdout[-3000:]}\n--- stderr tail:\n{proc.stderr[-5000:]}")


def _deepspeed() -> str:
    return str(Path(sys.executable).parent / "deepspeed")


def _master_port(port: int | None = None) -> str:
    """``--master_port=N`` with a port free now (``train.stage.free_port``): DeepSpeed's default
    (29500) collides with any other launch on the machine (another checkout's test run)."""
    from train.stage import free_port

    return f"--master_port={free_port() if port is None else port}"


@pytest.fixture(scope="module")
def results(tiny_checkpoint, data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ds_runs")
    common = ["--checkpoint", str(tiny_checkpoint), "--data", str(data_dir)]
    _run([sys.executable, str(WORKER), *common, "--out", str(out / "one"), "--scenarios", ONE_PROC_SCENARIOS])
    _run([_deepspeed(), "--num_gpus", "2", _master_port(), str(WORKER), *common, "--out", str(out / "two"),
          "--scenarios", TWO_RANK_SCENARIOS], interpret=True)
    return {"one": json.loads((out / "one" / "results.json").read_text()),
            "two": json.loads((out / "two" / "results.json").read_text())}


def _assert_losses_close(a: list[dict], b: list[dict], rel: float) -> None:
    assert len(a) == len(b) and len(a) > 0
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), f"step {step}: tasks {list(x)} vs {list(y)}"
        for task in x:
            err = abs(x[task] - y[task]) / max(abs(y[task]), 1e-12)
            assert err <= rel, f"step {step} {task}: {x[task]} vs {y[task]} (relative {err:.2e} > {rel})"


# bf16 tolerance: the two runs split the global batch differently (padding, reduction order), so
# bf16 weights round differently after the first update; 2e-2 relative is ~ 5 bf16 ulps of loss.
BF16_REL = 2e-2


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stage_on_two_ranks_matches_one_process(results, stage):
    two = results["two"][f"zero{stage}"]["losses"]
    one = results["one"]["zero2"]["losses"]
    assert len(two) == 6
    _assert_losses_close(two, one, BF16_REL)
    # The first step sees the same weights: only the forward's rounding differs.
    _assert_losses_close(two[:1], one[:1], 2e-3)


def test_unpadded_training_matches_padded(results):
    """The default (unpadded) encoder trains like the padded one, step by step, on 2 ranks; the
    one-process comparison above runs unpadded too."""
    unpadded, padded = results["two"]["zero2"], results["two"]["zero2-padded"]
    assert unpadded["unpad"] is True and padded["unpad"] is False
    assert results["one"]["zero2"]["unpad"] is True
    _assert_losses_close(unpadded["losses"], padded["losses"], BF16_REL)
    _assert_losses_close(unpadded["losses"][:1], padded["losses"][:1], 2e-3)


def test_fused_adamw_under_zero2_bf16_matches_torch_adamw(results):
    """kernels.FusedAdamW as DeepSpeed's client optimizer (fp32 partitions) trains like AdamW."""
    _assert_losses_close(results["two"]["zero2-fused"]["losses"], results["two"]["zero2"]["losses"],
                         BF16_REL)


def test_pcgrad_two_ranks_equals_one_process(results):
    two, one = results["two"]["pcgrad"]["losses"], results["one"]["pcgrad"]["losses"]
    assert all(set(step) == {"sst", "quora", "sts"} for step in two)  # a superbatch: every task
    _assert_losses_close(two, one, BF16_REL)


def test_resume_continues_with_the_same_losses(results):
    full = results["two"]["fp32"]["losses"]
    split = results["two"]["fp32-resume"]
    assert len(split["first"]) == 2 and len(split["second"]) == 4
    resumed = split["first"] + split["second"]
    _assert_losses_close(resumed, full, 1e-6)
    # steps 3 and 4 were logged, then lost (no checkpoint): log.jsonl holds each step once
    assert split["logged_steps"] == [1, 2, 3, 4, 5, 6]


def test_sigterm_to_rank_0_mid_epoch_saves_there_and_resumes_like_an_uninterrupted_run(results):
    r, full = results["two"]["sigterm"], results["two"]["fp32"]
    # the signal came after step 3 on rank 0 only; both ranks agreed at the next check (step 4)
    assert [s["step"] for s in r["stopped"]] == [4, 4]
    assert r["stopped"][0]["reason"] == "SIGTERM" and r["stopped"][0]["total_steps"] == 6
    assert r["stopped"][0]["checkpoint"].endswith("step0000004") and r["checkpoint_problem"] is None
    assert len(r["first"]) == 4 and len(r["second"]) == 2
    _assert_losses_close(r["first"] + r["second"], full["losses"], 1e-6)
    assert r["history"] == full["history"] and r["best_step"] == 6  # the same dev scores


def test_truncated_checkpoint_falls_back_with_a_warning_naming_the_file(results):
    r = results["two"]["truncated"]
    assert r["damaged"] in r["warning"] and "falling back to" in r["warning"]
    assert r["warning"].rstrip().endswith("step0000002")
    assert r["resumed_step"] == 2
    # the run resumed from step 2 ends as the uninterrupted one (same config but save_every_steps)
    _assert_losses_close(r["losses"], results["two"]["zero2"]["losses"], 1e-6)
    # the damaged step 4 was rewritten on the new timeline; every checkpoint left verifies
    assert r["left"] == ["step0000002", "step0000004", "step0000006"] and r["latest"] == "step0000006"
    assert r["problems"] == [None, None, None]


def test_resume_with_another_subset_size_is_refused_naming_the_key(results):
    refused = results["two"]["truncated"]["refused"]
    assert refused is not None
    assert "tasks.sst.max_train: 48 in the checkpoint, 40 now" in refused


def test_simcse_stage_resumes_on_the_skeleton(results):
    r, full = results["two"]["simcse-resume"], results["two"]["simcse-sup"]
    assert r["resumed_step"] == 3 and r["report"]["steps"] == 6
    _assert_losses_close([{"simcse": v} for v in r["losses"]], [{"simcse": v} for v in full["losses"]], 1e-6)
    assert r["report"]["zero_shot_sts_before"] == full["report"]["zero_shot_sts_before"]
    assert not r["checkpoints_left"]  # the export is the stage's result; its checkpoints go


def test_zero_offload_from_the_users_deepspeed_json(results):
    """"auto" filled from the run config, the bucket size from the model, the optimizer on the
    CPU as DeepSpeed's CPU Adam; it trains like the GPU-resident optimizer."""
    r = results["two"]["offload"]
    ds = r["ds_config"]
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                       "reduce_bucket_size": 64 * 64, "overlap_comm": False}
    assert r["optimizer"] == "DeepSpeedCPUAdam"
    _assert_losses_close(r["losses"], results["two"]["zero2"]["losses"], BF16_REL)


def test_zero2_bf16_training_loss_falls(results):
    losses = results["two"]["learn"]["losses"]
    assert len(losses) == 24
    first = sum(sum(s.values()) for s in losses[:8]) / 8
    last = sum(sum(s.values()) for s in losses[-8:]) / 8
    assert last < 0.85 * first, f"loss did not fall: first 8 steps {first:.3f}, last 8 {last:.3f}"


def test_non_finite_loss_stops_with_step_task_and_checkpoint(results):
    r = results["two"]["nan"]
    assert r["error"] is not None
    assert "non-finite loss (nan) at step 2 on task 'quora' (seen at step 4)" in r["error"]
    assert r["latest"].endswith("step0000001") and r["latest"] in r["error"]


def test_interrupted_save_keeps_the_previous_checkpoint(results):
    r = results["two"]["interrupted-save"]
    assert r["latest"].endswith("step0000001")
    assert r["resumed_step"] == 1


# ----------------------------------------------------------------------------- SimCSE stage
def test_simcse_on_two_ranks_scores_the_whole_batch_like_one_process(results):
    """Gathered embeddings: each row meets all 8 - 1 in-batch negatives on 2 ranks as on 1."""
    two, one = results["two"]["simcse-sup"]["losses"], results["one"]["simcse-sup"]["losses"]
    assert len(two) == len(one) == 6
    _assert_losses_close([{"simcse": v} for v in two[:1]], [{"simcse": v} for v in one[:1]], 2e-3)
    _assert_losses_close([{"simcse": v} for v in two], [{"simcse": v} for v in one], BF16_REL)


def test_simcse_gather_and_loss_scale_give_the_whole_batch_gradient(results):
    check = results["two"]["simcse-sup"]["gather_check"]  # fp64, 2 ranks vs one process
    assert check["loss_diff"] <= 1e-12
    assert check["grad_diff"] <= 1e-12 * check["grad_scale"] and check["grad_scale"] > 0


def _first_step_grads(result: dict) -> dict[str, torch.Tensor]:
    return torch.load(result["grads_step1"], weights_only=True)


# softmax(q . k + q . b_k) does not depend on the key bias b_k: its gradient is zero in exact
# arithmetic, and what the runs hold there is rounding noise (~1e-12 of the others)
_ZERO_GRADS = ("attention.self.key.bias",)


def test_simcse_first_step_gradient_on_two_ranks_equals_one_process(results):
    """The real stage's gradient of every parameter at its first step (DeepSpeed's full fp32
    gradient after the backward, before the optimizer), 2 ranks against one process. fp32: equal
    to fp32 rounding, 2**-17 of the largest gradient (measured 1.3e-6). bf16: the two split the
    batch differently (each rank pads its own rows), so they differ by bf16 rounding (~5% here);
    each run's error against the fp32 gradient, per tensor, on 2 ranks is at most twice the one
    process's plus 2**-8 of the tensor (the kernels' budget rule), which a missing gather or a
    wrong world-size loss scale (gradients 2x off) cannot meet."""
    f2, f1 = _first_step_grads(results["two"]["simcse-sup-fp32"]), _first_step_grads(results["one"]["simcse-sup-fp32"])
    b2, b1 = _first_step_grads(results["two"]["simcse-sup"]), _first_step_grads(results["one"]["simcse-sup"])
    assert f1.keys() == f2.keys() == b1.keys() == b2.keys() and len(f1) > 30
    scale = max(g.abs().max().item() for g in f1.values())
    assert scale > 0
    for name, g in f1.items():
        if name.endswith(_ZERO_GRADS):
            assert g.abs().max().item() <= 1e-9 * scale, name
            continue
        assert (f2[name] - g).abs().max().item() <= 2.0**-17 * scale, name
        e2, e1 = (b2[name] - g).norm().item(), (b1[name] - g).norm().item()
        assert e2 <= 2 * e1 + 2.0**-8 * g.norm().item(), f"{name}: bf16 error on 2 ranks {e2:.3g}, one process {e1:.3g}"


def test_triton_kernels_train_like_eager_step_by_step(results):
    """bf16 steps with ``model.kernels = "triton"`` (the interpreter; head dim 32, padded batches
    of up to 48 tokens in 16 x 16 attention tiles: three key tiles) against the same run on the
    eager backend. Budget: 2% of the median step-to-step change of the eager run's loss (4e-4
    here; the two runs differ by about 1e-4 from bf16 weights rounding differently): a kernel a
    fraction of a step off fails."""
    tri, eager = results["two"]["kernels-triton"], results["two"]["kernels-eager"]
    launched = tri["launches"]
    for op in ("attention_fwd", "attention_bwd_preprocess", "attention_bwd_dkdv", "attention_bwd_dq",
               "layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd", "weight_grad_reduce"):
        assert launched.get(f"_{op}_kernel", 0) > 0, (op, launched)
    assert tri["max_len"] > 2 * tri["tile"] and tri["padded"]
    t, e = [s["sst"] for s in tri["losses"]], [s["sst"] for s in eager["losses"]]
    assert len(t) == len(e) == 4
    moves = sorted(abs(b - a) for a, b in zip(e, e[1:]))
    median = moves[len(moves) // 2]
    assert median > 1e-3, e  # the run moves: the budget below means something
    for step, (x, y) in enumerate(zip(t, e)):
        assert abs(x - y) <= 0.02 * median, f"step {step}: triton {x} vs eager {y} (budget {0.02 * median:.2g})"


def test_simcse_unsupervised_loss_falls(results):
    losses = results["two"]["simcse-unsup"]["losses"]
    assert len(losses) == 16
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, f"unsupervised SimCSE loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("scenario", ["simcse-sup", "simcse-unsup"])
def test_simcse_report_and_multitask_start(results, scenario):
    r = results["two"][scenario]
    report = r["report"]
    assert report["mode"] == scenario.split("-")[1] and report["world_size"] == 2
    assert report["steps"] == len(r["losses"])
    for when in ("before", "after"):
        z = report[f"zero_shot_sts_{when}"]
        assert z["pairs"] == 24 and -1 <= z["pearson"] <= 1 and -1 <= z["spearman"] <= 1
    # the zero-shot evaluation is split over the ranks: the same numbers as one process
    assert report["zero_shot_sts_before"] == results["one"]["simcse-sup"]["report"]["zero_shot_sts_before"]
    # training moved the encoder; the multitask stage starts exactly from the exported encoder
    assert report["zero_shot_sts_after"] != report["zero_shot_sts_before"]
    assert r["start_mismatch"] == 0.0
    if scenario == "simcse-sup":
        assert report["data"]["triples"] == 256


# ----------------------------------------------------------------------------- entry point
def _read_predictions(path: Path) -> tuple[list[str], dict[str, str]]:
    lines = path.read_text().splitlines()
    rows = {}
    for line in lines[1:]:
        ident, value = (part.strip() for part in line.split(" , "))
        rows[ident] = value
    return lines[0], rows


def test_run_py_two_ranks_writes_predictions_for_every_test_id(tiny_checkpoint, data_dir, tmp_path):
    from train.stage import free_port, shared_buffers

    out = tmp_path / "run"
    port = free_port()
    cmd = [_deepspeed(), "--num_gpus", "2", _master_port(port), "train/run.py",
           "--config", "train/configs/cpu_smoke.json",
           "--data", str(data_dir), "--out", str(out), "--no-progress",
           "--model.checkpoint", str(tiny_checkpoint), "--steps_per_epoch", "3",
           "--deepspeed.global_batch", "8", "--deepspeed.micro_batch_per_device=4",
           "--tasks.sts.form", "bi", "--tasks.sts.head", "cosine", "--tasks.quora.pooling", "mean",
           "--deepspeed.monitor_csv", "true", "--log_every", "1",
           "--simcse.enabled", "true", "--simcse.mode", "sup", "--simcse.max_steps", "2",
           "--simcse.global_batch", "8", "--simcse.eval_max", "16"]
    for task in ("sst", "quora", "sts"):
        cmd += [f"--tasks.{task}.max_eval", "32"]
    _run(cmd)
    # both ranks removed their DeepSpeed CPU all-reduce buffers from /dev/shm at exit
    assert shared_buffers(port) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["best_dev"]) == {"sst", "quora", "sts", "overall"}
    # peak memory, the larger of the two ranks' (CPU: resident set; torch alone takes > 200 MiB),
    # and the optimizer's share: fp32 master weights and two AdamW moments, half on each rank
    assert 200 < summary["peak_rss_mib"] < 24 * 1024 and summary["seconds"] > 0
    # every step's examples counted once: the steps' batches, over the ranks
    assert summary["train_examples"] == 3 * 8 and summary["train_samples_per_s"] > 0, summary
    expected = 12 * summary["trainable_parameters"] / 2 / 2**20
    assert abs(summary["optimizer_state_mib"] - expected) <= 0.02 * expected + 0.1, (summary, expected)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps if "stage" not in r] == [1, 2, 3]
    simcse_log = [r for r in log if r.get("stage") == "simcse"]
    assert [r.get("when") for r in simcse_log] == ["before", None, None, "after"]
    assert [r["step"] for r in simcse_log[1:3]] == [1, 2]
    assert summary["simcse"]["steps"] == 2
    assert summary["simcse"]["zero_shot_sts_before"] == simcse_log[0]["zero_shot_sts"]
    assert BertModel.from_pretrained(out / "simcse").config.hidden_size == 64
    steps = [r for r in steps if "stage" not in r]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    assert steps[0]["lr"] > steps[-1]["lr"] >= 0  # linear decay to 0 at the last step
    assert [r["epoch"] for r in log if "dev" in r] == [1]
    monitor_files = {p.name for p in (out / "monitor").rglob("*.csv")}
    assert {"Train_loss_sst.csv", "Train_lr.csv"} <= monitor_files, monitor_files
    saved = json.loads((out / "config.json").read_text())
    assert saved["tasks"]["sts"]["form"] == "bi" and saved["deepspeed"]["global_batch"] == 8

    headers = {"sst": "id \t Predicted_Sentiment ", "para": "id \t Predicted_Is_Paraphrase ",
               "sts": "id \t Predicted_Similiarity "}
    tasks = {"sst": "sst", "para": "quora", "sts": "sts"}
    for stem, task in tasks.items():
        for split in ("dev", "test"):
            header, rows = _read_predictions(out / "predictions" / f"{stem}-{split}-output.csv")
            assert header == headers[stem]
            source = data_dir / {"sst": "ids-sst", "quora": "quora", "sts": "sts"}[task]
            ids = _all_ids(Path(f"{source}-{'test-student' if split == 'test' else 'dev'}.csv"))
            assert set(rows) == ids, f"{stem}-{split}: ids differ from the data file"
            for value in rows.values():
                if task == "sts":
                    assert 0.0 <= float(value) <= 5.0
                else:
                    assert int(value) in (range(5) if task == "sst" else (0, 1))

    # The exported model loads in minbert and in transformers (a test dependency: setup.py's
    # "dev" extra; its absence fails here rather than skipping the checks below).
    encoder = BertModel.from_pretrained(out / "best")
    try:
        import transformers
    except ImportError as e:
        pytest.fail(f"transformers is needed by this test (pip install -e '.[dev]'): {e}")
    hf = transformers.BertModel.from_pretrained(str(out / "best"))
    for k, v in encoder.state_dict().items():
        assert torch.equal(hf.state_dict()[k], v), k

    # train.predict on the export reproduces the dev predictions written at the end of the run.
    again = tmp_path / "again"
    _run([sys.executable, "-m", "train.predict", "--checkpoint", str(out), "--data", str(data_dir),
          "--out", str(again), "--no-progress"])
    for name in ("sst-dev-output.csv", "para-test-output.csv", "sts-dev-output.csv"):
        assert (again / name).read_text() == (out / "predictions" / name).read_text(), name

    # The drills on the finished run: a new run into its --out, and a resume with another subset
    # size, are refused in one line before any work, and nothing of the run changes.
    before = _tree_digest(out)
    assert any(p.startswith("checkpoints/step") for p in before) and "summary.json" in before
    for args, message in ((["--config", "train/configs/cpu_smoke.json", "--out", str(out)],
                           f"--out {out} already holds a run"),
                          (["--resume", str(out), "--tasks.sst.max_train", "512"],
                           "tasks.sst.max_train: 1024 in the checkpoint, 512 now")):
        proc = subprocess.run([sys.executable, "train/run.py", "--data", str(data_dir), *args], cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    assert _tree_digest(out) == before


def _tree_digest(root: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _all_ids(path: Path) -> set[str]:
    """Every id in a data file, malformed rows included (the files must cover them too)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        col = header.index("id")
        return {row[col].strip() for row in reader if len(row) > col and row[col].strip()}


def test_quora_test_file_has_the_malformed_id(data_dir):
    """The prediction test above covers the malformed Quora test row (skipped by the loader)."""
    loaded = load_task("quora", "test", data_dir, warn=False)
    assert loaded.skipped_ids and loaded.skipped_ids[0] not in {e.id for e in loaded.examples}
    assert loaded.skipped_ids[0] in _all_ids(data_dir / "quora-test-student.csv")


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/data"], "data directory '/nonexistent/data' does not exist"),
    (["--model.checkpoint", "/nonexistent/ckpt"], "directory '/nonexistent/ckpt' does not exist"),
    (["--schedule.kind", "shuffle"], "schedule.kind must be one of"),
    (["--tasks.paraphrase.enabled", "true"], "unknown config key(s) tasks.paraphrase"),
    (["--deepspeed.global_batch", "30"], "is not a multiple of micro_batch_per_device (16)"),
])
def test_run_py_bad_input_fails_with_a_clear_message(tmp_path, data_dir, args, message):
    cmd = [sys.executable, "train/run.py", "--config", "train/configs/cpu_smoke.json", "--data",
           str(data_dir), "--out", str(tmp_path / "run"), "--no-progress", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]


def test_run_py_non_utf8_data_file_is_one_line(tmp_path, data_dir):
    """A user error found inside a stage (after the process group started) is one line too."""
    bad = tmp_path / "data"
    bad.mkdir()
    for f in data_dir.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "ids-sst-dev.csv").unlink()
    (bad / "ids-sst-dev.csv").write_bytes((data_dir / "ids-sst-dev.csv").read_bytes().replace(b"e", b"\xe9", 1))
    cmd = [sys.executable, "train/run.py", "--config", "train/configs/cpu_smoke.json", "--data", str(bad),
           "--out", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad / 'ids-sst-dev.csv'} is not valid UTF-8"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- preemption drills
# Through the real launcher (``deepspeed --num_gpus 2 train/run.py``), as a scheduler does them:
# SIGTERM to rank 0 in the middle of an epoch, to the ``deepspeed`` runner alone, and to the whole
# process group. Each launch costs 30-60 s on a 2-core machine, so these are ``slow``; the same
# stop / resume logic runs in the default suite inside one launch (scenarios sigterm, truncated).
DRILL_STEPS_PER_EPOCH = 16


def _drill_command(tiny: Path, data: Path, out: Path, *extra: str) -> list[str]:
    cmd = [_deepspeed(), "--num_gpus", "2", "train/run.py", "--data", str(data), "--out", str(out),
           "--no-progress"]
    if "--resume" in extra:
        return cmd[:4] + ["--data", str(data), "--no-progress", *extra]
    return cmd + ["--config", "train/configs/cpu_smoke.json", "--model.checkpoint", str(tiny),
                  "--epochs", "2", "--steps_per_epoch", str(DRILL_STEPS_PER_EPOCH), "--deepspeed.global_batch", "8",
                  "--deepspeed.micro_batch_per_device", "4", "--log_every", "1", "--stop_check_every", "2",
                  "--tasks.sst.max_eval", "32", "--tasks.quora.max_eval", "32", "--tasks.sts.max_eval", "32",
                  *extra]


def _launch(cmd: list[str], logs: Path, **kwargs) -> subprocess.Popen:
    """Output to files, not pipes: the ranks outlive a killed runner and would hold a pipe open."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(logs / "stdout", "w"),
                            stderr=open(logs / "stderr", "w"), **kwargs)


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}") and '"loss"' in line]
    return max(steps, default=0)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while _logged_step(out) < step:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        assert time.monotonic() - t0 < timeout, f"no step {step} after {timeout} s"
        time.sleep(0.05)


def _ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    found = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        cmd = " ".join(p.cmdline())
        if "train/run.py" in cmd and "--local_rank=" in cmd:
            found[int(cmd.split("--local_rank=")[1].split()[0])] = p
    return found


def _no_orphans(ranks: dict[int, psutil.Process], timeout: float = 120) -> None:
    gone, alive = psutil.wait_procs(list(ranks.values()), timeout=timeout)
    assert not alive, f"ranks still running: {[p.pid for p in alive]}"


def _read(logs: Path, name: str) -> str:
    return (logs / name).read_text()


def _stop_checkpoint(out: Path, mid_epoch: bool = True) -> Path:
    """The checkpoint a stop left: complete, at an agreement step (every 2), before the end."""
    latest = read_latest(out / "checkpoints")
    assert latest is not None and verify(latest) is None
    step = step_of(latest)
    assert step % 2 == 0 and 5 < step < 2 * DRILL_STEPS_PER_EPOCH, latest
    if mid_epoch:
        assert step % DRILL_STEPS_PER_EPOCH != 0, f"{latest} is not a mid-epoch stop"
    return latest


@pytest.mark.slow
def test_drill_sigterm_to_rank_0_mid_epoch_then_resume_equals_the_uninterrupted_run(tiny_checkpoint, data_dir,
                                                                               tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = _launch(_drill_command(tiny_checkpoint, data_dir, whole), tmp_path / "logs-whole")
    assert proc.wait(timeout=1800) == 0, _read(tmp_path / "logs-whole", "stderr")[-3000:]

    proc = _launch(_drill_command(tiny_checkpoint, data_dir, cut), tmp_path / "logs-cut")
    _wait_for_step(proc, cut, 5)
    ranks = _ranks(proc)
    assert set(ranks) == {0, 1}
    ranks[0].send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 0, _read(tmp_path / "logs-cut", "stderr")[-3000:]
    stdout = _read(tmp_path / "logs-cut", "stdout")
    latest = _stop_checkpoint(cut)
    assert f"stopped at step {step_of(latest)} of {2 * DRILL_STEPS_PER_EPOCH} (SIGTERM)" in stdout, stdout[-2000:]
    assert f"To resume: train/run.py --resume {cut}" in stdout
    assert not (cut / "predictions").exists()

    proc = _launch(_drill_command(tiny_checkpoint, data_dir, cut, "--resume", str(cut)),
                   tmp_path / "logs-resume")
    assert proc.wait(timeout=1800) == 0, _read(tmp_path / "logs-resume", "stderr")[-3000:]
    assert f"resumed from {latest} at step {step_of(latest)}" in _read(tmp_path / "logs-resume", "stdout")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert b["best_dev"] == a["best_dev"] and b["steps"] == a["steps"] == 2 * DRILL_STEPS_PER_EPOCH
    assert _tree_digest(cut / "predictions") == _tree_digest(whole / "predictions")
    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 2 * DRILL_STEPS_PER_EPOCH + 1))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["runner", "process group"])
def test_drill_sigterm_to_the_runner_or_the_process_group_saves_and_leaves_no_orphans(tiny_checkpoint, data_dir,
                                                                                 tmp_path, target):
    """SIGTERM to the ``deepspeed`` runner alone kills it at once (single node); the ranks notice
    their launcher is gone and stop as on SIGTERM. To the process group (what a scheduler does):
    the ranks get it directly and from deepspeed's launch.py, which waits for them."""
    out = tmp_path / "run"
    proc = _launch(_drill_command(tiny_checkpoint, data_dir, out), tmp_path / "logs", start_new_session=True)
    _wait_for_step(proc, out, 5)
    ranks = _ranks(proc)
    assert set(ranks) == {0, 1}
    if target == "runner":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    _no_orphans(ranks)
    stdout = _read(tmp_path / "logs", "stdout")
    latest = _stop_checkpoint(out, mid_epoch=False)  # the launcher's exit is seen within ~1 s
    reason = "the launcher (pid" if target == "runner" else "SIGTERM"
    assert f"stopped at step {step_of(latest)} of {2 * DRILL_STEPS_PER_EPOCH} ({reason}" in stdout, stdout[-3000:]
    assert f"To resume: train/run.py --resume {out}" in stdout


# ----------------------------------------------------------------------------- freezing, early stopping
def test_freeze_encoder_trains_the_heads_only(results):
    """model.freeze "encoder" (2 ranks, ZeRO-2, bf16): every encoder tensor is bit-for-bit what
    it was, every head moved, and the optimizer holds the heads' elements only."""
    r = results["two"]["freeze-encoder"]
    assert r["changed"] and all(k.startswith("heads.") for k in r["changed"]), r["changed"]
    assert all(k.startswith("bert.") for k in r["unchanged"])
    assert sorted(k for k in r["changed"]) == sorted(k for k in r["changed"] + r["unchanged"]
                                                     if k.startswith("heads."))
    assert r["frozen"] == sorted(k for k in r["unchanged"] if k.startswith("bert."))
    heads = r["trainable_parameters"]
    assert 0 < heads < r["parameters"] // 100
    # this rank's ZeRO partition of the heads (plus alignment padding), nothing of the encoder
    assert r["optimizer_elements"] <= heads // 2 + 64, (r["optimizer_elements"], heads)


@pytest.mark.parametrize("scenario", ["freeze-layers", "freeze-layers-zero3"])
def test_freeze_layers_keeps_those_layers(results, scenario):
    """model.freeze "layers:0-0" under ZeRO-2 and ZeRO-3: layer 0 unchanged bit for bit, layer 1,
    the embeddings and the heads trained."""
    r = results["two"][scenario]
    layer0 = [k for k in r["changed"] + r["unchanged"] if k.startswith("bert.encoder.layer.0.")]
    assert layer0 and sorted(layer0) == sorted(k for k in r["unchanged"] if k.startswith("bert.encoder.layer.0."))
    assert not any(k.startswith("bert.encoder.layer.0.") for k in r["changed"])
    for prefix in ("bert.encoder.layer.1.", "bert.embeddings.", "heads."):
        assert any(k.startswith(prefix) for k in r["changed"]), prefix
    assert r["frozen"] == sorted(layer0)
    assert len(r["losses"]) == 6


def test_early_stopping_ends_the_run_and_keeps_the_best(results):
    """Patience 1 with dev scores that cannot improve: the run ends after epoch 2 of 4 (step 4 of
    8), the best export is epoch 1's, the stop is logged, and resuming trains nothing more."""
    r = results["two"]["early-stop"]
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert r["history"][0]["dev"]["overall"] == r["history"][1]["dev"]["overall"]
    assert r["steps"] == 4 and r["finished_early"]["epoch"] == 2
    assert r["best_step"] == 2
    assert r["early_stop_logged"] == [r["finished_early"]]
    assert r["resumed_step"] == 4 and r["resumed_result"] == r["finished_early"]


def test_stop_after_epoch_cuts_the_longer_run_and_resumes_to_nothing(results):
    """``stop_after_epoch: 2`` of 3: the run logs the 3-epoch run's first 4 steps (same losses, and
    learning rates still decaying over 6 steps), ends at epoch 2 with it logged, exports its best
    epoch, and resuming trains nothing more."""
    r = results["two"]["stop-after"]
    assert [s["step"] for s in r["full"]] == list(range(1, 7))
    assert r["cut"] == r["full"][:4], (r["cut"], r["full"])
    assert r["cut"][-1]["lr"] > r["full"][-1]["lr"] >= 0  # the schedule spans 3 epochs, not 2
    assert r["cut_step"] == 4 and r["total_steps"] == 6 and r["epochs"] == [1, 2]
    assert r["finished_early"]["epoch"] == 2 and r["finished_early"]["stop_after_epoch"] == 2
    assert r["best_step"] in (2, 4)
    assert r["resumed_step"] == 4 and r["resumed_result"] == r["finished_early"]


def test_freeze_and_patience_config_errors():
    from train.config import ConfigError, ModelConfig, TrainConfig

    for bad in ("layers:3-1", "layers:0", "decoder", "layers:a-b"):
        with pytest.raises(ConfigError, match="model.freeze"):
            ModelConfig(freeze=bad)
    assert ModelConfig(freeze="layers:2-5").freeze_layers() == (2, 5)
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        TrainConfig(early_stopping_patience=-1)
    for bad in (0, 4):
        with pytest.raises(ConfigError, match="stop_after_epoch"):
            TrainConfig(epochs=3, stop_after_epoch=bad)
    assert TrainConfig(epochs=3, stop_after_epoch=3).stop_after_epoch == 3
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(pcgrad=True, pcgrad_from_epoch=1, schedule={"kind": "superbatch"})
    with pytest.raises(ConfigError, match=r"pcgrad_from_epoch must be in \[1, epochs = 3\]"):
        TrainConfig(pcgrad_from_epoch=4)
    from train.config import TaskConfig, TasksConfig

    for bad, match in ((dict(features=["u", "u"]), "features must be distinct"),
                       (dict(output="sigmoid"), "needs target '0-1'"),
                       (dict(head_layers=4), "head_layers"), (dict(layer=-2), "layer")):
        with pytest.raises(ConfigError, match=match):
            TaskConfig(**bad).check("sts")
    with pytest.raises(ConfigError, match="target and .output apply to sts only"):
        TaskConfig(target="0-1").check("quora")
    with pytest.raises(ConfigError, match="shared_pair_head needs quora and sts"):
        TasksConfig(sts=TaskConfig(enabled=False), shared_pair_head=True)


def test_freeze_names_a_layer_the_model_lacks(tiny_checkpoint):
    from train.config import ConfigError, TrainConfig, from_dict
    from train.loop import build_model

    cfg = from_dict(TrainConfig, {"model": {"checkpoint": str(tiny_checkpoint), "freeze": "layers:1-2"}})
    with pytest.raises(ConfigError, match="names layer 2, but the encoder has 2 layers"):
        build_model(cfg)


def test_heads_on_middle_layers_train_and_export(results):
    """tasks.<t>.layer / head_layers on 2 ranks (ZeRO-2, bf16): the run trains (finite losses),
    the head layers are parameters of their own, and the export reloads them as trained."""
    r = results["two"]["mid-layer"]
    assert len(r["losses"]) == 6 and all(math.isfinite(v) for step in r["losses"] for v in step.values())
    sst = r["spec"]["tasks"]["sst"]
    assert (sst["form"], sst["layer"], sst["head_layers"], sst["head_init"]) == ("cross", 1, 1, "random")
    assert r["spec"]["tasks"]["quora"]["head_layers"] == 1 and r["spec"]["tasks"]["sts"]["layer"] == -1
    assert {k.split(".")[1] for k in r["head_layer_keys"]} == {"sst", "quora"}
    assert r["export_matches"]


def test_lora_trains_adapters_and_exports_a_merged_bert(results):
    """model.lora r=4 (2 ranks, ZeRO-2, bf16): only lora_A / lora_B and the heads move; the base
    encoder is bit-for-bit unchanged; the export is W + s B A of the trained state (to bf16
    rounding of the trained weights' storage) and loads in transformers as a plain BERT."""
    r = results["two"]["lora"]
    assert r["changed"]
    for k in r["changed"]:
        assert k.startswith("heads.") or k.endswith((".lora_A", ".lora_B")), k
    assert any(k.endswith(".lora_B") for k in r["changed"]) and any(k.startswith("heads.") for k in r["changed"])
    assert any(".intermediate.dense.lora_B" in k for k in r["changed"])
    moved = r["merged_moved"]  # merged weights of the adapted layers differ from the base
    assert moved and all(k.endswith(".weight") and (".attention.self." in k or ".intermediate.dense." in k)
                         for k in moved)
    assert r["export_diff"] == 0.0
    assert r["trainable_parameters"] < r["parameters"] // 10


def test_pair_heads_train_and_export(results):
    """Chosen bi-encoder features, one shared Quora/STS projection and a sigmoid 0-1 STS head
    (2 ranks, ZeRO-2, bf16): finite losses, STS loss on the 0-1 scale (below 1 at every step),
    and an export that reloads with the shared projection."""
    r = results["two"]["pair-heads"]
    assert len(r["losses"]) == 6 and all(math.isfinite(v) for step in r["losses"] for v in step.values())
    assert all(step["sts"] <= 1.0 for step in r["losses"] if "sts" in step)
    assert r["spec"]["shared_pair_head"] is True
    assert r["spec"]["tasks"]["sts"]["features"] == ["u", "abs_diff", "cos"]
    assert r["spec"]["tasks"]["sts"]["target"] == "0-1" and r["spec"]["tasks"]["sts"]["output"] == "sigmoid"
    assert r["export_matches"] and any(k.startswith("shared_pair.") for k in r["own_keys"])


def test_joint_simcse_adds_a_contrastive_term_over_all_ranks(results):
    """simcse.joint_weight 0.5 (2 ranks, ZeRO-2, bf16, dropout 0.1): every micro-batch adds a
    contrastive loss over the rows of both ranks (global batch 8: 4 + 4), logged as "simcse"
    beside the task losses; the first step's task loss equals the run without it (the same
    weights and dropout draws), later ones differ (the joint gradient changed the weights)."""
    r = results["two"]["joint-simcse"]
    assert r["rows"] and set(r["rows"]) == {8} and len(r["rows"]) == 6
    assert all("simcse" in step and 0 < step["simcse"] < 10 for step in r["on"])
    assert all("simcse" not in step for step in r["off"])
    task = lambda step: {k: v for k, v in step.items() if k != "simcse"}  # noqa: E731
    assert task(r["on"][0]) == r["off"][0]
    assert any(task(a) != b for a, b in zip(r["on"][1:], r["off"][1:]))


def test_smart_adds_its_terms_and_resumes_its_momentum_copy(results):
    """smart.enabled (2 ranks, ZeRO-2, bf16): the logged "smart" term is positive at every step
    (the Bregman term is 0 only at step 1, where the copy equals the model); the step-1 task
    losses equal the plain zero2 run's (the regulariser changes the update, not the forward);
    the momentum copy moved from its start, trails the model, and a resumed run gets it back
    exactly as saved."""
    r = results["two"]["smart"]
    steps = r["first"] + r["second"]
    assert len(steps) == 6 and all(s["smart"] > 0 for s in steps)
    plain = results["two"]["zero2"]["losses"]
    first = {k: v for k, v in r["first"][0].items() if k != "smart"}
    assert first == plain[0]
    assert any({k: v for k, v in a.items() if k != "smart"} != b for a, b in zip(steps[1:], plain[1:]))
    assert r["restored"] and r["teacher_moved"] > 0 and r["teacher_from_model"] > 0


def test_pcgrad_from_epoch_projects_only_from_that_epoch(results):
    """pcgrad_from_epoch 2 (2 ranks, ZeRO-2, bf16, superbatch, 2 micro-batches a rank): PCGrad's
    projection runs in the 3 steps of epoch 2 only, DeepSpeed accumulates nothing (one backward
    per step, as under PCGrad), and epoch 1 trains like plain superbatch steps (losses within the
    bf16 budget: the gradient is summed per task instead of per micro-batch)."""
    r = results["two"]["pcgrad-from-2"]
    assert r["project_calls"] == 3
    assert r["ds_accum"] == 1
    _assert_losses_close(r["late"][:3], r["plain"][:3], BF16_REL)
    _assert_losses_close(r["late"][:1], r["plain"][:1], 2e-3)
    assert len(r["late"]) == 6


def test_per_task_batches_give_the_examples_per_step_they_say(results):
    """tasks.<t>.global_batch (2 ranks, ZeRO-2, bf16): SST steps take 16 examples, Quora the
    default 8 and STS 4, over both ranks, in DeepSpeed's accumulation steps."""
    r = results["two"]["task-batch"]
    want = {"sst": 16, "quora": 8, "sts": 4}
    assert {t for t, _ in r["seen"]} == set(want) and len(r["seen"]) == 6
    for task, sizes in r["seen"]:
        assert len(sizes) == r["accum"] and sum(sizes) * r["world"] == want[task], (task, sizes)
    assert r["world"] == 2 and len(r["losses"]) == 6


def test_per_task_batch_that_does_not_split_is_refused():
    """global batch 8 of micro-batches of 2 on one rank: 4 accumulation steps, so a task batch of
    6 cannot be split evenly and is refused naming the key; 12 is fine."""
    from train.config import ConfigError, TrainConfig, from_dict

    def cfg(sts_batch):
        return from_dict(TrainConfig, {"tasks": {"sts": {"global_batch": sts_batch}},
                                       "deepspeed": {"global_batch": 8, "micro_batch_per_device": 2}})

    with pytest.raises(ConfigError, match=r"tasks.sts.global_batch \(6\) is not a multiple"):
        cfg(6).check_task_batches(1)
    cfg(12).check_task_batches(1)
    assert cfg(12).task_batch("sts") == 12 and cfg(12).task_batch("sst") == 8


@pytest.mark.parametrize("option", ["lora", "mid-layer", "pair-heads", "joint-simcse", "task-batch"])
def test_options_train_under_zero3_like_zero2(results, option):
    """The same option runs under ZeRO-3 (parameters partitioned) on 2 ranks: step by step the
    losses of the ZeRO-2 run, within the bf16 budget (the first step to 2e-3)."""
    zero2 = results["two"][option]
    zero2 = zero2["on"] if option == "joint-simcse" else zero2["losses"]
    zero3 = results["two"][f"{option}-zero3"]["losses"]
    _assert_losses_close(zero3, zero2, BF16_REL)
    _assert_losses_close(zero3[:1], zero2[:1], 2e-3)


# what the Triton backend must launch in a training step of each option set (the interpreter on CPU)
def _assert_option_runs_close(run: list[dict], ref: list[dict]) -> None:
    """Two runs of one option set that differ in bf16 rounding only (backend or ZeRO stage): task
    and joint-SimCSE losses step by step within the bf16 budget, the first step (same weights) to
    2e-3. SMART's smoothness term (a divergence of two predictions under a 1e-2 perturbation,
    1e-7 to 1e-4 here) is rounding noise at that scale after the first update: it must be
    positive on both and within a factor of 2."""
    strip = lambda steps: [{k: v for k, v in s.items() if k != "smart"} for s in steps]  # noqa: E731
    _assert_losses_close(strip(run), strip(ref), BF16_REL)
    _assert_losses_close(strip(run[:1]), strip(ref[:1]), 2e-3)
    for step, (a, b) in enumerate(zip(run, ref)):
        assert ("smart" in a) == ("smart" in b), step
        if "smart" in a:
            assert a["smart"] > 0 and b["smart"] > 0 and 0.5 <= a["smart"] / b["smart"] <= 2, (step, a, b)


_ENCODER_KERNELS = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "layer_norm_fwd",
                    "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd")
_OPTION_KERNELS = {"options-a": _ENCODER_KERNELS + ("simcse_fwd", "simcse_bwd_dz1", "simcse_bwd_dc"),
                   "options-b": _ENCODER_KERNELS, "options-c": _ENCODER_KERNELS}


@pytest.mark.parametrize("name", sorted(_OPTION_KERNELS))
def test_options_train_on_the_triton_backend_like_eager(results, name):
    """Every option on ``model.kernels = "triton"`` (set a: LoRA, a mid-layer SST head with a layer
    of its own, bi-encoder pair heads with chosen features and a shared projection, a sigmoid 0-1
    STS head, a per-task batch, joint SimCSE; set b: frozen layer 0, a mid-layer Quora head with
    a copied layer, SMART with its Bregman term; set c: frozen embeddings, a mid-layer STS head,
    superbatch steps with PCGrad from epoch 2) against the same runs on eager, step by step: the
    Triton kernels ran, the losses agree within the bf16 budget (the first step, same weights, to
    2e-3), and the options did the same on both."""
    tri, eager = results["two"][f"{name}-triton"], results["two"][f"{name}-eager"]
    for kernel in _OPTION_KERNELS[name]:
        assert tri["launches"].get(f"_{kernel}_kernel", 0) > 0, (kernel, tri["launches"])
    assert not eager["launches"], eager["launches"]  # the eager backend launches no Triton kernel
    _assert_option_runs_close(tri["losses"], eager["losses"])
    assert tri["trainable_parameters"] == eager["trainable_parameters"] < tri["parameters"]
    assert tri["projections"] == eager["projections"] == (2 if name == "options-c" else 0)
    if name == "options-c":  # 2 epochs of 2 superbatch steps; PCGrad projects in the second epoch
        assert len(tri["losses"]) == 4 and all(set(s) == {"sst", "quora", "sts"} for s in tri["losses"])
        return
    extra = {"options-a": "simcse", "options-b": "smart"}[name]
    assert len(tri["losses"]) == 6 and all(step[extra] > 0 for step in tri["losses"])
    assert [next(t for t in step if t != extra) for step in tri["losses"]] == ["sst", "quora", "sts"] * 2


@pytest.mark.parametrize("option", ["lora", "freeze-layers", "mid-layer", "pair-heads", "joint-simcse",
                                    "task-batch", "pcgrad-from-2"])
def test_options_resume_like_an_uninterrupted_run(results, option):
    """Stop at a checkpoint (pcgrad-from-2: step 4, inside its PCGrad epoch; the others: step 3 of
    6), resume in a new trainer: the steps of both parts are the uninterrupted run's, to 1e-6
    (bf16, no data-dependent randomness left unrestored; joint SimCSE's dropout included)."""
    run = results["two"]["options-resume"][option]
    full = results["two"][option]
    full = {"joint-simcse": full.get("on"), "pcgrad-from-2": full.get("late")}.get(option) or full["losses"]
    stop = 4 if option == "pcgrad-from-2" else 3
    assert len(run["first"]) == stop and len(run["first"]) + len(run["second"]) == len(full) == 6
    _assert_losses_close(run["first"] + run["second"], full, 1e-6)


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("name", sorted(_OPTION_KERNELS))
def test_options_train_under_zero0_and_zero1_like_zero2(results, name, stage):
    """The option sets under ZeRO-0 (DeepSpeed's bf16 optimizer) and ZeRO-1 train like ZeRO-2
    (``_assert_option_runs_close``) and train the same parameters; set c's PCGrad projects in the
    same steps."""
    run, zero2 = results["two"][f"{name}-zero{stage}"], results["two"][f"{name}-eager"]
    _assert_option_runs_close(run["losses"], zero2["losses"])
    assert run["trainable_parameters"] == zero2["trainable_parameters"]
    assert run["projections"] == zero2["projections"]
