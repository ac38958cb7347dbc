"""What only a GPU can check (``pytest -m gpu --kernels-device cuda``; skipped with a reason on CPU).

Triton's interpreter runs one program at a time in numpy, exactly in fp32: it cannot show
  - whether compiled launches are bitwise reproducible (the order programs and warps finish in,
    any atomics): every op's forward and gradients over 20 runs;
  - the fp32 matmul precision: the interpreter computes ``tl.dot`` in exact fp32 whatever
    ``input_precision`` says, so fp32 attention or SimCSE on plain TF32 (10-bit mantissa
    products) passes on CPU; here "tf32x3" must pass and plain "tf32" must fail the budget;
  - compiled code for every op and dtype (the interpreter never compiles): one case each.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from kernels.testing import assert_case, compare_case, count_launches, kernels_device

DEVICE = kernels_device()
pytestmark = pytest.mark.gpu
DTYPES = [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.float16, torch.bfloat16)]

A = importlib.import_module("kernels.attention")
S = importlib.import_module("kernels.simcse_loss")
LG = importlib.import_module("kernels.layernorm_gelu")
AW = importlib.import_module("kernels.adamw")

# (op, case, the kernels its forward + backward must launch)
CASES = {
    "attention": (A.attention_case(2, 3, 130, 64, dropout_p=0.1),
                  ("_attention_fwd_kernel", "_attention_bwd_preprocess_kernel",
                   "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")),
    "layer_norm": (LG.layer_norm_case((3, 97, 768), residual=True, dropout_p=0.1, return_prenorm=True),
                   ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_weight_grad_reduce_kernel")),
    "bias_gelu": (LG.bias_gelu_case((97, 3072), "none"),
                  ("_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_weight_grad_reduce_kernel")),
    "gelu_layer_norm": (LG.gelu_layer_norm_case((97, 768), "tanh"),
                        ("_gelu_layer_norm_fwd_kernel", "_gelu_layer_norm_bwd_kernel",
                         "_weight_grad_reduce_kernel")),
    "simcse_loss": (S.simcse_case(300, 768, 0.05, True),
                    ("_row_norm_kernel", "_simcse_fwd_kernel", "_simcse_bwd_dz1_kernel",
                     "_simcse_bwd_dc_kernel")),
    "adamw": (AW.adamw_case((4096, 13, 2053), master=True, max_grad_norm=1.0),
              ("_adamw_grad_sumsq_kernel", "_adamw_update_kernel")),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(CASES))
def test_compiled_kernels_match_reference(op, dtype):
    case, launches = CASES[op]
    assert_case(case, DEVICE, dtype, launches=launches)


def _run_once(case, dtype) -> list[torch.Tensor]:
    """Outputs and input gradients of one kernel run (upstream gradients fixed by the seed)."""
    inputs = case.make_inputs(torch.device(DEVICE), dtype, 0)
    outs = case.kernel_fn(**inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    outs = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    diff = [o for o in outs if o.requires_grad]
    if diff:
        g = torch.Generator(device=DEVICE).manual_seed(1)
        ups = [torch.randn(o.shape, generator=g, device=DEVICE).to(o.dtype) for o in diff]
        grads = torch.autograd.grad(diff, leaves, ups, allow_unused=True)
        outs += [gr for gr in grads if gr is not None]
    return [o.detach().clone() for o in outs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("op", list(CASES))
def test_bitwise_deterministic_over_20_runs(op, dtype):
    """The kernels promise no atomics and fixed reduction orders: 20 runs, identical bits."""
    case, _ = CASES[op]
    first = _run_once(case, dtype)
    assert first
    for run in range(19):
        again = _run_once(case, dtype)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"{op} {dtype}: tensor {i} differs on run {run + 2}"


@pytest.mark.parametrize("module, case", [
    (A, A.attention_case(2, 2, 257, 128)),
    (A, A.attention_case(2, 2, 130, 64, dropout_p=0.1)),
    (S, S.simcse_case(300, 384, 0.05, True)),
], ids=["attention-D128", "attention-D64-dropout", "simcse-d384"])
def test_fp32_precision_mode(module, case, monkeypatch):
    """fp32 on tensor cores: "tf32x3" (three TF32 products, ~fp32 accuracy) passes the budget
    against fp64; plain TF32 must fail it, or the budget could not tell the two apart."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # eager: true fp32
    assert module.FP32_INPUT_PRECISION == "tf32x3"
    assert_case(case, DEVICE, torch.float32)
    monkeypatch.setattr(module, "FP32_INPUT_PRECISION", "tf32")
    with count_launches() as launched:
        results = compare_case(case, DEVICE, torch.float32)
    assert launched, "the Triton kernels did not run"
    assert not all(c.ok for c in results), "plain TF32 passed the fp32 budget:\n" + "\n".join(map(str, results))
