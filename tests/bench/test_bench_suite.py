"""The kernel benchmark suite (``pytest bench/ --benchmark-only``) end to end, on a tiny subset.

It runs in a subprocess, as a user runs it: pytest-benchmark's JSON must carry our extra_info,
Triton cases must skip with their reason on CPU, and the session must append its line to the
``--results`` history. Plain ``pytest`` (testpaths = tests) must not collect bench/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_REASON = "Triton kernels need CUDA; the interpreter is a correctness tool, not a benchmark"
# The smallest layer-norm shape, forward only, plus the attention forward: GB/s and TFLOP/s cases.
SUBSET = "(test_layer_norm and forward and H384) or (test_attention and forward and not pad)"


def _run_pytest(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it for the kernel tests; a bench run has not
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO_ROOT,
                          env=env, check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour (Triton cases skipped)")
def test_bench_subset_json_and_history(tmp_path):
    bench_json, history = tmp_path / "bench.json", tmp_path / "kernels.jsonl"
    proc = _run_pytest("bench/", "--benchmark-only", f"--benchmark-json={bench_json}", "--bench-size", "small",
                       "--results", str(history), "-k", SUBSET, "-rs")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out

    doc = json.loads(bench_json.read_text())
    rows = doc["benchmarks"]
    kernels_run = {r["extra_info"]["kernel"] for r in rows}
    assert kernels_run == {"layer_norm", "attention"}, kernels_run
    for r in rows:
        info = r["extra_info"]
        assert info["provider"] in ("eager", "sdpa") and info["mode"] == "forward", info
        assert isinstance(info["shape"], dict) and info["shape"] and info["dtype"] == "fp32"
        assert info["device"].startswith("cpu") and info["device_count"] == 1
        assert 0 < info["p20_ms"] <= info["median_ms"] <= info["p80_ms"]
        unit = "TFLOP/s" if info["kernel"] == "attention" else "GB/s"
        assert info["metric"] == unit and info["value"] == info[unit] > 0
        # the derived unit follows from the stored numerator and the median time
        numerator = info["flops"] / 1e12 if unit == "TFLOP/s" else info["bytes"] / 1e9
        assert info[unit] == pytest.approx(numerator / (info["median_ms"] * 1e-3))
        assert r["params"]["case"]["provider"] == info["provider"]  # the case is plain JSON
    assert {r["extra_info"]["provider"] for r in rows if r["extra_info"]["kernel"] == "attention"} == {"eager", "sdpa"}

    # every Triton case of the subset skipped, with the reason
    assert TRITON_REASON in out
    assert "2 skipped" in out, out[-2000:]

    lines = history.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    for key in ("timestamp", "git_sha", "device", "device_count", "torch", "triton", "deepspeed"):
        assert key in record, key
    assert record["skipped"] == {TRITON_REASON: 2}
    assert len(record["benchmarks"]) == len(rows)
    for b in record["benchmarks"]:
        for key in ("name", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "metric", "value"):
            assert key in b, key


def test_plain_pytest_does_not_collect_bench():
    # (a collection error in a test file being written elsewhere is not this test's business:
    # only what was collected is checked)
    proc = _run_pytest("--collect-only", "-q", timeout=300)
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert collected, proc.stdout[-3000:] + proc.stderr[-3000:]
    outside = [line for line in collected if not line.startswith("tests/")]
    assert not outside, outside[:5]
