"""Multitask training under DeepSpeed on CPU ranks: parity across ZeRO stages and world sizes,
PCGrad, resuming, failure handling, and the `train/run.py` entry point with its predictions.

DeepSpeed starts are the slow part, so one 2-rank launch and one single-process launch of
tests/train/ds_worker.py run every scenario and the tests read their per-step losses.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minbert import BertConfig, BertModel, Tokenizer
from train.data import load_task

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "train" / "ds_worker.py"
TWO_RANK_SCENARIOS = ("zero0,zero1,zero2,zero2-padded,zero2-fused,pcgrad,fp32,fp32-resume,learn,nan,interrupted-save,"
                      "simcse-sup,simcse-unsup")
ONE_PROC_SCENARIOS = "zero2,pcgrad,simcse-sup"


def _env(interpret: bool = False) -> dict:
    """Training here runs the eager kernels backend; the fused optimizer runs in Triton's
    interpreter where ``interpret`` (no GPU)."""
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
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _deepspeed() -> str:
    return str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small random BERT with the real vocabulary, saved in HF format with its tokenizer."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(path)
    Tokenizer.from_pretrained().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def results(tiny_checkpoint, data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ds_runs")
    common = ["--checkpoint", str(tiny_checkpoint), "--data", str(data_dir)]
    _run([sys.executable, str(WORKER), *common, "--out", str(out / "one"), "--scenarios", ONE_PROC_SCENARIOS])
    _run([_deepspeed(), "--num_gpus", "2", str(WORKER), *common, "--out", str(out / "two"),
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
    out = tmp_path / "run"
    cmd = [_deepspeed(), "--num_gpus", "2", "train/run.py", "--config", "train/configs/cpu_smoke.json",
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
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["best_dev"]) == {"sst", "quora", "sts", "overall"}
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

    # The exported model loads in minbert and in transformers.
    encoder = BertModel.from_pretrained(out / "best")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(str(out / "best"))
    for k, v in encoder.state_dict().items():
        assert torch.equal(hf.state_dict()[k], v), k

    # train.predict on the export reproduces the dev predictions written at the end of the run.
    again = tmp_path / "again"
    _run([sys.executable, "-m", "train.predict", "--checkpoint", str(out), "--data", str(data_dir),
          "--out", str(again), "--no-progress"])
    for name in ("sst-dev-output.csv", "para-test-output.csv", "sts-dev-output.csv"):
        assert (again / name).read_text() == (out / "predictions" / name).read_text(), name


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
