"""The SimCSE loss kernels (row norms, forward, dz1, dc) against the reference ``simcse_loss_ref``.

On CPU the kernels run in Triton's interpreter (tests/conftest.py chooses the device before
triton is imported). Every accuracy comparison goes through ``kernels.testing`` (error budget: 2x
eager's error against the fp32 reference, fp64 for fp32 cases, + ``REL_FLOOR[dtype]`` x max |ref|),
on the loss and on the gradient of z1, z2 and the hard negatives, and asserts that the four
kernels launched.

The grid is N in {1, 7, 64, 300, 1024} x d in {32, 384, 768} x temperature in {0.05, 1} x
with / without hard negatives x {fp32, bf16}. The default run takes a subset that covers every
value of every axis (``FAST``); the whole grid is marked slow (``pytest -m slow``).
"""
from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kernels
from kernels.testing import assert_case, compare_case, count_launches, kernels_device

# kernels/__init__.py may re-export the function ``simcse_loss``, shadowing the module attribute,
# so the module is taken from sys.modules
S = importlib.import_module("kernels.simcse_loss")

DEVICE = kernels_device()  # tests/conftest.py decides it (cpu: Triton's interpreter)
INTERPRET = DEVICE == "cpu"
# forward + backward of every case: the row norms, the logits pass and both gradient passes
LAUNCHES = ("_row_norm_kernel", "_simcse_fwd_kernel", "_simcse_bwd_dz1_kernel", "_simcse_bwd_dc_kernel")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
NS, DS, TAUS = (1, 7, 64, 300, 1024), (32, 384, 768), (0.05, 1.0)
HNS, GRID_DTYPES = (False, True), (F32, BF16)


def _id(N, d, tau, hn, dtype):
    return f"N{N}-d{d}-tau{tau:g}-{'hn' if hn else 'plain'}-{str(dtype)[6:]}"


# (N, d, temperature, hard negatives, dtype): every N, d, temperature, dtype and switch value
# appears; the costly corners (N = 1024 with d = 768, fp32 at large N x d) are left to the slow grid
FAST = [
    (1, 32, 0.05, False, F32),
    (1, 768, 1.0, True, BF16),
    (7, 384, 0.05, True, F32),
    (7, 768, 0.05, False, BF16),
    (64, 32, 1.0, True, BF16),
    (64, 384, 0.05, False, BF16),
    (33, 768, 1.0, True, F32),
    (300, 32, 0.05, False, F32),
    (300, 100, 1.0, True, BF16),  # d = 100: one masked chunk tail
    (1024, 32, 1.0, False, BF16),
]
SLOW = [c for c in itertools.product(NS, DS, TAUS, HNS, GRID_DTYPES) if c not in FAST]


@pytest.mark.parametrize("N, d, tau, hn, dtype", [pytest.param(*c, id=_id(*c)) for c in FAST])
def test_matches_reference(N, d, tau, hn, dtype):
    assert_case(S.simcse_case(N, d, tau, hn), DEVICE, dtype, launches=LAUNCHES)


@pytest.mark.slow
@pytest.mark.parametrize("N, d, tau, hn, dtype", [pytest.param(*c, id=_id(*c)) for c in SLOW])
def test_matches_reference_full_grid(N, d, tau, hn, dtype):
    assert_case(S.simcse_case(N, d, tau, hn), DEVICE, dtype, launches=LAUNCHES)


@pytest.mark.parametrize("N, d, hn", [(7, 384, True), (33, 100, False)], ids=["7x384-hn", "33x100"])
def test_matches_reference_fp16(N, d, hn):
    assert_case(S.simcse_case(N, d, 0.05, hn), DEVICE, F16, launches=LAUNCHES)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_zero_rows_follow_the_eps_clamp(dtype):
    """All-zero rows of z1 and of the hard negatives: 1 / max(||x||, eps) = 1 / eps, and the
    normalisation's Jacobian term drops out, as in ``F.normalize``'s backward."""
    assert_case(S.simcse_case(9, 300, 0.05, True, zero_row=True), DEVICE, dtype, launches=LAUNCHES)


def test_budget_catches_a_slightly_wrong_kernel():
    """The fp32 budget is tight enough to see a 0.1% error in the loss and in every gradient."""
    case = S.simcse_case(7, 48, 0.05, True)
    wrong = type(case)(case.name, case.make_inputs,
                       lambda **kw: S._simcse_loss_triton(**kw) * 1.001, case.ref_fn)
    results = compare_case(wrong, DEVICE, F32)
    assert [c.what for c in results] == ["out", "grad z1", "grad z2", "grad hard_negatives"]
    assert not any(c.ok for c in results), [str(c) for c in results]


def test_check_cases_pass_in_fp32():
    for case in S.check_cases()[:3]:
        assert_case(case, DEVICE, F32, launches=LAUNCHES)


# ----------------------------------------------------------------------------- memory
class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor any aten op returns (allocations included)."""

    def __init__(self):
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), t.numel()))
        return out


def test_nothing_of_n_by_n_is_allocated(monkeypatch):
    """Forward + backward at N = 2048 with hard negatives (M = 2N): no tensor created by the
    launchers, the autograd Function or the kernels has N x N elements or more (the logits only
    exist as on-chip tiles). The same detector sees the eager reference's (N, M) logits."""
    N, d = 2048, 32
    if INTERPRET:  # big tiles: fewer interpreted iterations; the allocations do not depend on them
        big = S._Tile(256, 256, 4, 1)
        monkeypatch.setattr(S, "_CONFIGS", {(768, "32"): S._SimCSEConfig(32, big, big, big)})
    g = torch.Generator().manual_seed(0)
    z1, z2, hn = (torch.randn(N, d, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    with _Allocations() as kernel_allocs:
        loss = S._simcse_loss_triton(z1, z2, 0.05, hn)
        grads = torch.autograd.grad(loss, (z1, z2, hn))
    assert all(gr.shape == (N, d) for gr in grads)
    biggest = max(kernel_allocs.numels, key=lambda x: x[1])
    assert biggest[1] < N * N, f"{biggest[0]} returned {biggest[1]} elements (N * N = {N * N})"
    assert any(n == N for _, n in kernel_allocs.numels)  # the detector saw the (N,) statistics
    with _Allocations() as eager_allocs:
        torch.autograd.grad(S.simcse_loss_ref(z1, z2, 0.05, hn), (z1, z2, hn))
    assert max(n for _, n in eager_allocs.numels) >= 2 * N * N


# ----------------------------------------------------------------------------- behaviour
def _inputs(N, d, dtype=F32, seed=0, hn=True):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(N, d, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]
    return out if hn else out[:2]


def test_backward_bitwise_deterministic():
    z1, z2, hn = _inputs(131, 100, BF16, seed=1)
    loss = S._simcse_loss_triton(z1, z2, 0.05, hn)
    first = torch.autograd.grad(loss, (z1, z2, hn), retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(loss, (z1, z2, hn), retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    assert torch.equal(loss, S._simcse_loss_triton(z1, z2, 0.05, hn))


def test_partial_gradients_and_no_grad():
    """Only the gradients autograd asks for are computed; each matches the full backward."""
    z1, z2, hn = _inputs(20, 48, seed=2)
    full = torch.autograd.grad(S._simcse_loss_triton(z1, z2, 0.1, hn), (z1, z2, hn))
    frozen = hn.detach()
    part = torch.autograd.grad(S._simcse_loss_triton(z1, z2, 0.1, frozen), (z1, z2))
    assert torch.equal(part[0], full[0]) and torch.equal(part[1], full[1])
    (only_z1,) = torch.autograd.grad(S._simcse_loss_triton(z1, z2.detach(), 0.1, frozen), (z1,))
    assert torch.equal(only_z1, full[0])
    with torch.no_grad():
        loss = S._simcse_loss_triton(z1, z2, 0.1, hn)
    assert loss.shape == () and not loss.requires_grad


def test_backward_launches_only_for_needed_gradients(record_launches):
    """needs_input_grad reaches the launches: no dz1 launch for a frozen z1, only the column tiles
    of the tensors that need a gradient in the dc launch (tile0 skips z2's)."""
    z1, z2, hn = _inputs(20, 48, seed=2)
    full = torch.autograd.grad(S._simcse_loss_triton(z1, z2, 0.1, hn), (z1, z2, hn))
    dz1 = record_launches(S, "_simcse_bwd_dz1_kernel", run=True)
    dc = record_launches(S, "_simcse_bwd_dc_kernel", run=True)
    tiles_z2 = -(-20 // S._config(48, F32).dc.block_n)
    (only_hn,) = torch.autograd.grad(S._simcse_loss_triton(z1.detach(), z2.detach(), 0.1, hn), (hn,))
    assert dz1.calls == [] and len(dc.calls) == 1
    grid, args, _ = dc.calls[0]
    assert grid[0] == tiles_z2 and args[-1] == tiles_z2  # hn's tiles only
    assert torch.equal(only_hn, full[2])
    dc.calls.clear()
    torch.autograd.grad(S._simcse_loss_triton(z1, z2, 0.1, hn.detach()), (z1, z2))
    (grid, args, _), = dc.calls
    assert grid[0] == tiles_z2 and args[-1] == 0 and len(dz1.calls) == 1


def test_non_contiguous_inputs_match_contiguous():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(17, 2 * 40, generator=g).to(DEVICE).requires_grad_()
    z1 = wide[:, ::2]  # strided rows: the launcher copies them
    z2 = torch.randn(40, 17, generator=g).to(DEVICE).t()
    assert not z1.is_contiguous() and not z2.is_contiguous()
    loss = S._simcse_loss_triton(z1, z2, 0.05)
    c1, c2 = z1.detach().contiguous().requires_grad_(), z2.detach().contiguous()
    assert torch.equal(loss, S._simcse_loss_triton(c1, c2, 0.05))
    loss.backward()
    S._simcse_loss_triton(c1, c2, 0.05).backward()
    assert torch.equal(wide.grad[:, ::2], c1.grad)


def test_module_and_dispatch():
    module = S.SimCSELoss(temperature=0.1)
    assert repr(module) == "SimCSELoss(temperature=0.1)"
    z1, z2, hn = _inputs(12, 24, seed=4)
    with kernels.use_backend("eager"), count_launches() as launched:
        eager = module(z1, z2, hn)
    assert not launched
    with kernels.use_backend("triton"), count_launches() as launched:
        fused = module(z1, z2, hn)
    assert launched == {"_row_norm_kernel": 3, "_simcse_fwd_kernel": 1}
    assert type(fused.grad_fn).__name__ == "GeneratedBackwardFor_minbert_simcse_loss_defaultBackward"
    # both against the loss written out in fp64 from its definition, row by row: cosine
    # similarities over the temperature, minus the positive's logit plus the log-sum-exp
    a, c = z1.detach().double(), torch.cat([z2, hn]).detach().double()
    losses = []
    for i in range(a.shape[0]):
        cos = (c @ a[i]) / (c.norm(dim=1) * a[i].norm())
        losses.append(torch.logsumexp(cos / 0.1, 0) - cos[i] / 0.1)
    expected = torch.stack(losses).mean()
    assert abs(eager.double() - expected).item() <= 1e-5 * expected.item()
    assert abs(fused.double() - expected).item() <= 1e-5 * expected.item()


# ----------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_value_error(monkeypatch):
    z1, z2 = _inputs(4, 8, seed=5, hn=False)
    for fn in (S.simcse_loss, S._simcse_loss_triton, S.simcse_loss_fwd):
        with pytest.raises(ValueError, match=r"z2 has shape \(5, 8\) but z1 has \(4, 8\)"):
            fn(z1, torch.randn(5, 8, device=DEVICE))
        with pytest.raises(ValueError, match=r"hard_negatives has shape \(4, 9\) but z1 has"):
            fn(z1, z2, 0.05, torch.randn(4, 9, device=DEVICE))
        with pytest.raises(ValueError, match="needs at least one pair: z1 has 0 rows"):
            fn(torch.randn(0, 8, device=DEVICE), torch.randn(0, 8, device=DEVICE))
        for tau in (0.0, -0.05, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="temperature must be a positive finite number"):
                fn(z1, z2, tau)
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            fn(z1, z2, "0.05")
        with pytest.raises(ValueError, match=r"z1 must have shape \(N, d\), got 3 dimensions"):
            fn(torch.randn(2, 4, 8, device=DEVICE), torch.randn(2, 4, 8, device=DEVICE))
        with pytest.raises(ValueError, match="z2 has dtype torch.float16 but z1 has torch.float32"):
            fn(z1, z2.half())
        with pytest.raises(ValueError, match="z1 has dtype torch.int64; SimCSE takes floating"):
            fn(*(torch.ones(4, 8, dtype=torch.long, device=DEVICE) for _ in range(2)))
        with pytest.raises(ValueError, match="z2 is on meta but z1 is on"):
            fn(z1, torch.empty(4, 8, device="meta"))
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        S.SimCSELoss(0.0)
    # what only the kernels reject
    fwd = S.simcse_loss_fwd
    with pytest.raises(ValueError, match="z1 has dtype torch.float64; the SimCSE kernels take"):
        fwd(z1.double(), z2.double())
    with pytest.raises(ValueError, match="embedding size 769 is above the maximum of 768"):
        fwd(torch.randn(2, 769, device=DEVICE), torch.randn(2, 769, device=DEVICE))
    with pytest.raises(ValueError, match="run on CUDA devices.*got meta"):
        fwd(torch.empty(4, 8, device="meta"), torch.empty(4, 8, device="meta"))
    with pytest.raises(ValueError, match="z1 has dtype torch.float64"), \
            kernels.use_backend("triton"):
        S.simcse_loss(z1.double(), z2.double())  # the public function, through the launcher
    _, norms, lse = fwd(z1, z2, 0.05)
    with pytest.raises(ValueError, match="norms and lse must be fp32"):
        S.simcse_loss_bwd(torch.ones((), device=DEVICE), z1, z2, 0.05, None, norms[:-1], lse)
    with pytest.raises(ValueError, match="grad must hold one element"):
        S.simcse_loss_bwd(torch.ones(2, device=DEVICE), z1, z2, 0.05, None, norms, lse)
    # CPU tensors need the interpreter: the check is called with the variable removed
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="got CPU tensors.*TRITON_INTERPRET=1"):
        fwd(z1.detach().cpu(), z2.detach().cpu())


# ----------------------------------------------------------------------------- report hooks
def test_compile_specs_cover_every_config():
    specs = S.compile_specs()
    assert {s.kernel for s in specs} == {"_simcse_fwd_kernel", "_simcse_bwd_dz1_kernel",
                                         "_simcse_bwd_dc_kernel", "_row_norm_kernel"}
    for s in specs:
        assert list(s.signature) == s.fn.arg_names, s.label
        assert {k for k, t in s.signature.items() if t == "constexpr"} == set(s.constexprs), s.label
    assert len({s.label for s in specs}) == len(specs)
    seen = {(s.kernel, s.signature.get("Z1"), *(s.constexprs.get(k) for k in
                                                 ("BLOCK_M", "BLOCK_N", "BLOCK_D", "NUM_D")),
             s.num_warps, s.num_stages) for s in specs}
    # the configuration the launchers pick at every compiled d, and d = 32, 384, 768 are among them
    for kind in ("16", "32"):
        dims = {d for (_, k), ds in S._COMPILE_DIMS.items() if k == kind for d in ds}
        assert {32, 384, 768} <= dims
    assert set(S._CONFIGS) == set(S._COMPILE_DIMS)
    for (_, kind), ds in S._COMPILE_DIMS.items():
        for d in ds:
            assert S._kind(d, F32 if kind.startswith("32") else BF16) == kind, (d, kind)
            for dtype in ((F32,) if kind.startswith("32") else (F16, BF16)):
                cfg = S._config(d, dtype)
                meta = S._meta(d, dtype, cfg, True)
                for kernel, t in (("_simcse_fwd_kernel", cfg.fwd),
                                  ("_simcse_bwd_dz1_kernel", cfg.dz1),
                                  ("_simcse_bwd_dc_kernel", cfg.dc)):
                    key = (kernel, f"*{S._TRITON_DTYPE[dtype]}", t.block_m, t.block_n,
                           meta["BLOCK_D"], meta["NUM_D"], t.num_warps, t.num_stages)
                    assert key in seen, (d, dtype, key)


@pytest.mark.interpreter
@pytest.mark.parametrize("d, dtype, hn", [(48, BF16, False), (48, BF16, True), (40, BF16, True),
                                         (48, F32, False)],
                         ids=["bf16-resident-plain", "bf16-resident-hn", "bf16-d40-streamed-hn",
                              "fp32-streamed-plain"])
def test_io_traffic_matches_formulas(d, dtype, hn):
    """Measured bytes of a small case: total = the tiled formula (both the resident and the
    streamed own block), unique = lower bound + the fp32 scratch (norms, LSE, row losses: 3N + M
    floats) + the upstream gradient (one fp32)."""
    from bench.io import measure_case

    N = 100
    assert S._config(d, dtype).resident == (dtype == BF16 and d % 16 == 0)
    (case,) = [c for c in S.io_cases(N, d, dtype) if ("hard negatives" in c.name) == hn]
    row = measure_case(case, with_eager=False)
    M = 2 * N if hn else N
    size = torch.empty((), dtype=dtype).element_size()
    assert row["lower_bound"] == S.simcse_lower_bound_bytes(N, d, dtype, hn)
    assert row["lower_bound"] == 2 * (N + M) * d * size
    assert row["unique"] == row["lower_bound"] + 4 * (3 * N + M) + 4
    assert row["total"] == S.simcse_tiled_bytes(N, d, dtype, hn)


def test_io_cases_skip_sizes_beyond_a_contrastive_batch():
    """bench.io's default grid (tokens 4096,16384) must not queue an N = 16384 case that the
    interpreter cannot finish; N = 4096 (the size the issue measures) stays."""
    assert len(S.io_cases(S.SIMCSE_IO_MAX_N, 768, BF16)) == 2
    assert S.io_cases(S.SIMCSE_IO_MAX_N + 1, 768, BF16) == []
    assert S.io_cases(64, S.SIMCSE_MAX_DIM + 1, BF16) == []
