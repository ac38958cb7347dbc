"""Fixtures of the kernel tests: a guard against host reads, and a recorder of kernel launches."""
from __future__ import annotations

import sys

import pytest
import torch

# what reads a device tensor back to the host (a sync on a GPU; a graph break under torch.compile)
HOST_READS = ("item", "cpu", "tolist", "__bool__")


@pytest.fixture
def no_host_reads():
    """``Tensor.item``, ``.cpu``, ``.tolist`` and ``.__bool__`` raise while the test runs (or
    until the test calls ``.undo()`` on the fixture's value, a ``pytest.MonkeyPatch``).

    Calls from Triton's CPU interpreter (and our corrections of it) are let through: it moves
    tensors to numpy to emulate a launch, which a GPU launch does not do.
    """
    monkeypatch = pytest.MonkeyPatch()
    def guard(name, real):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(("triton.", "kernels._interpreter")):
                return real(self, *args, **kwargs)
            raise AssertionError(f"Tensor.{name}() called from {caller}: a host read")
        return method

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    yield monkeypatch
    monkeypatch.undo()


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch
    (``calls``: a list of (grid, args, kwargs)) and runs ``kernel`` when one is given."""

    def __init__(self, kernel=None):
        self.kernel = kernel
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((tuple(grid), args, kwargs))
            if self.kernel is not None:
                self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def record_launches(monkeypatch):
    """``record_launches(module, "_kernel_name", run=False)`` replaces that kernel by a
    ``LaunchRecorder`` (which also runs it when ``run``)."""
    def install(module, name: str, run: bool = False) -> LaunchRecorder:
        recorder = LaunchRecorder(getattr(module, name) if run else None)
        monkeypatch.setattr(module, name, recorder)
        return recorder
    return install
