"""pytest plumbing of the kernel benchmarks: grid size, parametrisation, results history.

    pytest bench/ --benchmark-only [--bench-size small|full] [--cpu-threads N] [--results FILE]
                  [--benchmark-json FILE] [-k EXPR]

  - ``--bench-size``: ``small`` (default on CPU: a few shapes, about a minute on 2 cores) or
    ``full`` (default on CUDA: the whole BERT grid of ``bench.harness``).
  - ``--cpu-threads N``: torch's intra-op threads on CPU. On a 2-core machine shared with other
    jobs, 2 OpenMP threads spend most of an op waiting for each other (timings in multiples of
    the scheduler's time slice); 1 thread gives stable, size-proportional times.
  - Each benchmark function carries ``@harness.bench_grid(grid_fn)``; ``grid_fn(size)`` returns
    its ``harness.Case``s, parametrised here as the ``case`` argument.
  - At the end of the session, one JSON line is appended to ``--results`` (default
    ``bench/results/kernels.jsonl``; ``--results none`` records nothing): timestamp, git sha,
    device, versions, and per benchmark its name, provider, mode, shape, dtype, median / p20 /
    p80 time and derived units, plus the skipped cases and why.

This file leaves ``TRITON_INTERPRET`` alone: Triton cases need CUDA and skip without it.
"""
from __future__ import annotations

import json
import subprocess
from collections import Counter
from importlib import metadata
from pathlib import Path

import pytest

from bench import harness

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "kernels.jsonl"
_SKIPPED: Counter = Counter()  # skip reason -> number of benchmarks skipped for it, this session
_WRITTEN = pytest.StashKey[str]()


def pytest_addoption(parser):
    group = parser.getgroup("minbert kernel benchmarks")
    group.addoption("--bench-size", choices=harness.SIZES, default=None,
                    help="benchmark grid: small (default on CPU) or full (default on CUDA)")
    group.addoption("--cpu-threads", type=int, default=None, metavar="N",
                    help="torch.set_num_threads(N) for the session (default: torch's own). On a shared "
                         "CPU, fewer threads than busy cores avoid OpenMP threads waiting for each "
                         "other; the count is part of the recorded device name")
    group.addoption("--results", default=str(DEFAULT_RESULTS), metavar="FILE",
                    help="JSON-lines history this run is appended to (default: bench/results/"
                         "kernels.jsonl; 'none' to record nothing)")


def pytest_configure(config):
    _SKIPPED.clear()
    harness.RESULTS.clear()
    threads = config.getoption("cpu_threads", None)
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--cpu-threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def bench_size(config) -> str:
    return config.getoption("bench_size") or harness.default_size()


def pytest_generate_tests(metafunc):
    grid_fn = getattr(metafunc.function, harness.GRID_ATTR, None)
    if grid_fn is None:
        return
    if "case" not in metafunc.fixturenames:
        raise pytest.UsageError(f"{metafunc.function.__name__}: a bench_grid benchmark takes a 'case' argument")
    metafunc.parametrize("case", harness.params(grid_fn(bench_size(metafunc.config))))


def pytest_report_header(config):
    dev = harness.device()
    return (f"minbert bench: size {bench_size(config)}, device {harness.device_name(dev)}, "
            f"results -> {config.getoption('results')}")


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED[reason.removeprefix("Skipped: ")] += 1


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_record(config, rows: list[dict]) -> dict:
    """The history line of this session: where, with what, and every benchmark's figures."""
    import platform

    import torch

    from bench._report import run_metadata

    dev = harness.device()
    meta = run_metadata(harness.device_name(dev))
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    keep = ("name", "kernel", "provider", "mode", "shape", "shape_label", "dtype", "median_ms", "p20_ms",
            "p80_ms", "bytes", "flops", "metric", "value", "GB/s", "TFLOP/s", "peak_memory_mb", "warnings")
    return {
        "tool": "bench.kernels",
        "timestamp": meta["timestamp"],
        "git_sha": meta["git_sha"],
        "git_dirty": None if dirty is None else bool(dirty),
        "device": meta["device"],
        "device_count": harness.device_count(dev),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "python": platform.python_version(),
        "host_cpu": meta.get("host_cpu"),
        "cuda": torch.version.cuda,
        "bench_size": bench_size(config),
        "timer": rows[0]["timer"] if rows else None,
        "benchmarks": [{k: r[k] for k in keep if k in r} for r in rows],
        "skipped": dict(_SKIPPED),
    }


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    target = config.getoption("results", None)
    rows = list(harness.RESULTS)
    if not rows or target is None or target.lower() == "none":
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(run_record(config, rows), default=str) + "\n")
    config.stash[_WRITTEN] = f"kernel benchmarks: appended {len(rows)} results to {path}"


def pytest_terminal_summary(terminalreporter, config):
    message = config.stash.get(_WRITTEN, None)
    if message:
        terminalreporter.write_line(message)
