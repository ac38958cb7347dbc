"""Benchmarks of ``kernels.simcse_loss`` (SimCSE / InfoNCE over cosine similarities).

Providers: ``triton`` and ``eager`` (``kernels.use_backend``; eager is ``simcse_loss_ref``, which
materialises the (N, M) logits). Shapes: N sentence embeddings of size d = a BERT hidden size,
with M = N columns, or 2N with hard negatives (full grid). The loss is a GEMM with a softmax on
top, so the headline unit is TFLOP/s of its matmuls (formula in ``simcse_flops``); GB/s of the
minimum traffic (``harness.traffic_bytes``) is stored too.
"""
from __future__ import annotations

import pytest
import torch

from bench import harness

try:
    from kernels.simcse_loss import SIMCSE_MAX_DIM, simcse_loss
except ImportError as e:  # the op is new: say so per case instead of failing the whole session
    simcse_loss, SIMCSE_MAX_DIM, _IMPORT_ERROR = None, None, e
else:
    _IMPORT_ERROR = None

PROVIDERS = ("triton", "eager")
BATCH = {"small": (512,), "full": (256, 1024, 4096)}  # sentences per batch (N)


def simcse_grid(size: str) -> list[harness.Case]:
    def shapes():
        for n in BATCH[size]:
            for d in harness.HIDDEN[size]:
                for hn in ((0,) if size == "small" else (0, 1)):
                    yield f"N{n}xD{d}{'-hn' if hn else ''}", {"N": n, "d": d, "hard_negatives": hn}

    return harness.grid(PROVIDERS, harness.MODES, shapes(), harness.float_dtypes(size, memory_bound=False))


def simcse_flops(mode: str, N: int, d: int, hard_negatives: bool) -> float:
    """Matmul FLOPs with M = N (2N with hard negatives) columns:

        forward  = 2 * N * M * d    (the logits a @ b^T)
        backward = 4 * N * M * d    (dA = dS @ b and dB = dS^T @ a)
        full     = 6 * N * M * d
    Norms, softmax and the kernels' recomputation are left out (model FLOPs, as for attention).
    """
    M = 2 * N if hard_negatives else N
    fwd = 2.0 * N * M * d
    return {"forward": fwd, "backward": 2 * fwd, "full": 3 * fwd}[mode]


def simcse_problem(N: int, d: int, dtype: torch.dtype, device: torch.device, hard_negatives: bool = False,
                   seed: int = 0):
    """(forward, inputs, kwargs): z1, z2 (and hard negatives) (N, d) requiring grad."""
    if simcse_loss is None:
        raise ImportError(f"kernels.simcse_loss is not importable: {_IMPORT_ERROR}")
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn((N, d), generator=g).to(device=device, dtype=dtype).requires_grad_()
              for _ in range(3 if hard_negatives else 2)]

    def forward(z1, z2, hn=None):
        return simcse_loss(z1, z2, temperature=0.05, hard_negatives=hn)

    return forward, inputs, {}


@harness.bench_grid(simcse_grid)
def test_simcse_loss(benchmark, case):
    if _IMPORT_ERROR is not None:
        pytest.skip(f"kernels.simcse_loss is not importable: {_IMPORT_ERROR}")
    harness.require(case.provider)
    d = case.dims
    if case.provider == "triton" and d["d"] > SIMCSE_MAX_DIM:
        pytest.skip(f"the Triton SimCSE kernels support d <= {SIMCSE_MAX_DIM} (kernels/simcse_loss.py)")
    dev = harness.device()
    with harness.backend(case.provider):
        forward, inputs, kwargs = simcse_problem(d["N"], d["d"], case.dtype, dev, bool(d["hard_negatives"]))
        timed = harness.make_callable(case.mode, forward, inputs, kwargs)
        harness.run(benchmark, "simcse_loss", case, timed, metric="TFLOP/s",
                    flops=simcse_flops(case.mode, d["N"], d["d"], bool(d["hard_negatives"])),
                    n_bytes=harness.traffic_bytes(case.mode, timed.inputs, timed.outputs))
