"""bench.report on synthetic histories, and bench.profile --kernel on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import profile as bench_profile
from bench import report as bench_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _throughput(sha: str, eager: float, hf: float, ts: str, device: str = "cpu") -> dict:
    return {"timestamp": ts, "git_sha": sha, "device": device, "device_count": 1, "dtype": "bf16",
            "config": {"name": "cpu_smoke"}, "steps": 10, "warmup": 2,
            "figures": {"ours-eager": {"samples_per_s": eager, "tokens_per_s": 40 * eager, "step_s": 32 / eager},
                        "transformers": {"samples_per_s": hf}},
            "ratios": {"ours-eager/transformers": eager / hf},
            "skipped": {"ours-triton": "the Triton backend needs CUDA"}}


def _kernel_bench(value: float, median_ms: float) -> dict:
    return {"name": "test_layer_norm[eager-forward-T4096xH384-fp32]", "kernel": "layer_norm", "provider": "eager",
            "mode": "forward", "shape": {"tokens": 4096, "hidden": 384}, "shape_label": "T4096xH384",
            "dtype": "fp32", "median_ms": median_ms, "p20_ms": median_ms * 0.9, "p80_ms": median_ms * 1.1,
            "bytes": 12_585_984, "flops": None, "metric": "GB/s", "value": value, "GB/s": value}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000, path


def test_report_latest_previous_best(tmp_path):
    results, out = tmp_path / "results", tmp_path / "report"
    results.mkdir()
    _write_jsonl(results / "throughput.jsonl", [
        _throughput("1111111aaaa", 10.0, 8.0, "2026-01-01T00:00:00+00:00"),
        _throughput("2222222bbbb", 12.5, 8.2, "2026-01-02T00:00:00+00:00"),
        _throughput("9999999zzzz", 99.0, 9.9, "2026-01-02T12:00:00+00:00", device="NVIDIA H100"),  # not comparable
        _throughput("3333333cccc", 11.0, 8.4, "2026-01-03T00:00:00+00:00"),
    ])
    kernel_run = {"timestamp": "2026-01-03T00:00:00+00:00", "git_sha": "3333333cccc", "device": "cpu",
                  "device_count": 1, "bench_size": "small", "skipped": {"Triton kernels need CUDA": 3}}
    _write_jsonl(results / "kernels.jsonl", [
        {**kernel_run, "git_sha": "1111111aaaa", "benchmarks": [_kernel_bench(2.0, 12.6)]},
        {**kernel_run, "benchmarks": [_kernel_bench(1.5, 16.8)]},
    ])
    assert bench_report.main(["--results-dir", str(results), "--out", str(out)]) == 0

    md = (out / "report.md").read_text()
    # throughput: latest 11.0 (3333333), previous 12.5 (2222222), best 12.5; the H100 run left out
    row = next(line for line in md.splitlines() if line.startswith("| ours-eager |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["11", "12.5 (2222222)", "-12.0%", "12.5 (2222222)", "-12.0%"], cells
    assert "99" not in row and "1 other run(s) in the history left out" in md
    assert "`3333333`" in md and "ours-eager/transformers" in md and "skipped ours-triton" in md
    # kernels: latest 1.5, previous = best = 2.0 from 1111111
    row = next(line for line in md.splitlines() if line.startswith("| layer_norm |"))
    assert "| 1.5 | 2 (1111111) | -25.0% | 2 (1111111) | -25.0% |" in row, row
    assert "3 skipped: Triton kernels need CUDA" in md
    # no bench.io / bench.compile JSON: the report says how to make them
    assert "python -m bench.io --json" in md and "python -m bench.compile --json" in md

    for name in ("throughput.png", "kernels_layer_norm.png"):
        _assert_png(out / name)
        assert f"]({name})" in md


def test_report_tables_from_io_and_compile_json(tmp_path):
    io_json, compile_json = tmp_path / "io.json", tmp_path / "compile.json"
    io_json.write_text(json.dumps({"tool": "bench.io", "meta": {"git_sha": "abcdef0123"}, "rows": [
        {"op": "layernorm_gelu", "case": "layer_norm", "tokens": 4096, "hidden": 768, "dtype": "bf16",
         "unique": 12_600_000, "total": 12_700_000, "eager": 40_000_000, "lower_bound": 12_600_000}]}))
    compile_json.write_text(json.dumps({"tool": "bench.compile", "meta": {}, "rows": [
        {"op": "layernorm_gelu", "kernel": "_layer_norm_fwd_kernel", "label": "N=768", "arch": "sm_90",
         "regs": 40, "spill": 0, "result": "ok"}]}))
    out = tmp_path / "report"
    rc = bench_report.main(["--results-dir", str(tmp_path / "empty"), "--out", str(out),
                            "--io-json", str(io_json), "--compile-json", str(compile_json)])
    assert rc == 0  # no history, but tables to report
    md = (out / "report.md").read_text()
    assert "No throughput history" in md and "No kernel benchmark history" in md
    assert "_layer_norm_fwd_kernel" in md and "12.60 MB" in md


def test_report_nothing_at_all(tmp_path, capsys):
    rc = bench_report.main(["--results-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "report")])
    assert rc == 1
    assert "nothing to report" in capsys.readouterr().err
    assert "pytest bench/ --benchmark-only" in (tmp_path / "report" / "report.md").read_text()


def test_report_skips_malformed_lines(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "throughput.jsonl").write_text(json.dumps(_throughput("1111111", 10.0, 8.0, "t0")) + "\n{oops\n")
    assert bench_report.main(["--results-dir", str(results), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "throughput.jsonl:2: not JSON" in md
    row = next(line for line in md.splitlines() if line.startswith("| ours-eager |"))
    assert "| 10 | - | - | 10 (1111111) |" in row, row  # a single run: no previous


def test_profile_layer_norm_cpu(tmp_path, capsys):
    pytest.importorskip("torch.profiler")
    rc = bench_profile.main(["--kernel", "layer_norm", "--batch", "4", "--seq", "64", "--hidden", "256",
                             "--iters", "2", "--out", str(tmp_path)])
    assert rc == 0
    trace = json.loads((tmp_path / "trace_layer_norm.json").read_text())
    assert trace["traceEvents"]
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "layer_norm forward + backward #1" in names
    table = (tmp_path / "top_ops_layer_norm.txt").read_text()
    assert "aten::" in table and "layer_norm" in table
    if not __import__("torch").cuda.is_available():
        assert "eager backend" in table and "eager backend" in capsys.readouterr().out
