"""Backend switch shared by every fused op.

Two backends compute the same math:
  - ``eager``:  the PyTorch reference of each op (``<op>_ref`` beside its kernel).
  - ``triton``: the fused Triton kernels.

The choice comes from, in order: ``set_backend()`` / ``use_backend()``, the environment variable
``MINBERT_KERNELS``, then the default (``triton`` when CUDA is available, ``eager`` elsewhere).
Under ``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors through Triton's interpreter,
which is how they are tested without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("eager", "triton")
ENV_VAR = "MINBERT_KERNELS"

_backend: str | None = None  # None: not chosen yet, resolved lazily
_warned_missing: set[str] = set()


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r} from {source}; choose one of {BACKENDS}")
    return name


def default_backend() -> str:
    """The backend used when none was set: ``$MINBERT_KERNELS``, else by device."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check(env, f"${ENV_VAR}")
    return "triton" if torch.cuda.is_available() else "eager"


def get_backend() -> str:
    """The backend in force now: ``"eager"`` or ``"triton"``."""
    return _backend if _backend is not None else default_backend()


def set_backend(name: str | None) -> None:
    """Choose the backend for every fused op: ``"eager"``, ``"triton"``, or None for the default."""
    global _backend
    _backend = None if name is None else _check(name, "set_backend()")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the block under ``name``, then restore the previous choice."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def dispatch(op: str, eager: Callable, triton: Callable | None) -> Callable:
    """Pick the implementation of ``op`` for the backend in force.

    ``triton`` is None while an op has no kernel yet: it then runs its eager reference and says so
    once, rather than failing on machines whose default backend is ``triton``.
    """
    if get_backend() == "eager":
        return eager
    if triton is None:
        if op not in _warned_missing:
            _warned_missing.add(op)
            warnings.warn(f"kernels: no Triton kernel for {op!r} yet; running its eager reference",
                          stacklevel=3)
        return eager
    return triton
