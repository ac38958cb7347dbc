"""bench.compile: rows are parsed from real cubins, and spills / shared-memory excess fail the run.

This file is also the op module of the toy specs: ``python -m bench.compile --module <this file>``
imports it in a worker (without TRITON_INTERPRET) and calls ``compile_specs()`` below.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import triton
import triton.language as tl

from bench import compile as bench_compile
from kernels.check import OP_MODULES, load_op_modules
from kernels.testing import CompileSpec

THIS_FILE = str(Path(__file__).resolve())


@triton.jit
def _toy_copy_kernel(
    x_ptr,  # (n,)
    y_ptr,  # (n,)
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _toy_dot_kernel(
    a_ptr,  # (BM, BK)
    b_ptr,  # (BK, BN)
    c_ptr,  # (BM, BN) fp32
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))


@triton.jit
def _toy_row_kernel(
    x_ptr,  # (n,) one row
    y_ptr,  # (n,)
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    d = x - tl.sum(x, axis=0) / n
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / n + 1e-5)
    tl.store(y_ptr + offs, d * rstd + x, mask=offs < n)


_COPY_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
_DOT_SIG = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BM": "constexpr", "BN": "constexpr",
            "BK": "constexpr"}


def compile_specs() -> list[CompileSpec]:
    return [
        CompileSpec("_toy_copy_kernel", _toy_copy_kernel, _COPY_SIG, {"BLOCK": 1024}, 4, 1, "good BLOCK=1024"),
        CompileSpec("_toy_dot_kernel", _toy_dot_kernel, _DOT_SIG, {"BM": 64, "BN": 64, "BK": 64}, 4, 1,
                    "good 64x64x64"),
        # 8192 fp32 per row held by one warp: 2 x 256 values per thread, far above 255 registers
        CompileSpec("_toy_row_kernel", _toy_row_kernel, _COPY_SIG, {"BLOCK": 8192}, 1, 1,
                    "absurd BLOCK=8192 1 warp"),
        # A (64 x 1024) and B (1024 x 64) fp16 staged in shared memory: 256 KiB > 163 / 227 KiB
        CompileSpec("_toy_dot_kernel", _toy_dot_kernel, _DOT_SIG, {"BM": 64, "BN": 64, "BK": 1024}, 4, 1,
                    "absurd BK=1024"),
    ]


def _run(tmp_path, capsys, *args) -> tuple[int, list[dict], str]:
    out_json = tmp_path / "compile.json"
    rc = bench_compile.main(["--arch", "sm_80,sm_90", "--json", str(out_json), *args])
    text = capsys.readouterr().out
    return rc, json.loads(out_json.read_text())["rows"], text


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out_json = tmp_path_factory.mktemp("compile") / "toy.json"
    rc = bench_compile.main(["--arch", "sm_80,sm_90", "--json", str(out_json), "--module", THIS_FILE])
    doc = json.loads(out_json.read_text())
    return rc, {(r["label"], r["arch"]): r for r in doc["rows"]}, doc


def test_toy_rows_are_parsed(toy_run):
    _, rows, doc = toy_run
    assert len(rows) == 8 and doc["meta"]["triton"] == triton.__version__
    for row in rows.values():
        assert row["regs"] > 0 and row["compile_s"] >= 0, row
    copy80, copy90 = rows[("good BLOCK=1024", "sm_80")], rows[("good BLOCK=1024", "sm_90")]
    assert copy80["spill"] == copy90["spill"] == 0 and copy80["ok"] and copy90["ok"]
    assert copy80["dot"] == copy90["dot"] == "n/a" and copy90["wgmma"] is None
    dot80, dot90 = rows[("good 64x64x64", "sm_80")], rows[("good 64x64x64", "sm_90")]
    assert dot80["dot"] == "mma.sync" and dot80["wgmma"] is None
    assert dot90["dot"] == "wgmma" and dot90["wgmma"] is True
    assert 0 < dot90["smem"] <= dot90["smem_limit"] == 227 * 1024 and dot80["smem_limit"] == 163 * 1024


def test_spills_and_shared_memory_excess_fail(toy_run):
    rc, rows, _ = toy_run
    assert rc == 1
    for arch in ("sm_80", "sm_90"):
        spill = rows[("absurd BLOCK=8192 1 warp", arch)]
        assert spill["spill_stores"] > 0 and spill["stack"] > 0 and not spill["ok"]
        assert any("spills" in p for p in spill["problems"])
        smem = rows[("absurd BK=1024", arch)]
        assert smem["smem"] == 256 * 1024 > smem["smem_limit"] and not smem["ok"]
        assert any("shared memory" in p for p in smem["problems"])


def test_good_specs_pass(tmp_path, capsys):
    rc, rows, text = _run(tmp_path, capsys, "--module", THIS_FILE, "--op", "good")
    assert rc == 0, text
    assert sorted(r["label"] for r in rows) == ["good 64x64x64"] * 2 + ["good BLOCK=1024"] * 2
    assert "wgmma" in text and "FAIL" not in text


def _tile_bytes_per_thread(spec: CompileSpec) -> float:
    """A register-pressure proxy: the tile elements a thread holds (product of the BLOCK_* and
    HEAD_DIM / NUM_D sizes over the threads), x 2 for fp32 data. Larger is nearer to spilling."""
    size = 1
    for name, value in spec.constexprs.items():
        if isinstance(value, int) and not isinstance(value, bool) and (
                name.startswith("BLOCK") or name in ("HEAD_DIM", "NUM_D", "D_CHUNK")):
            size *= value
    return size * (2 if _fp32(spec) else 1) / spec.num_warps


def _fp32(spec: CompileSpec) -> bool:
    return "fp32" in spec.label.split()


def _representative_labels() -> list[str]:
    """Per real kernel, in fp32 and in 16-bit data, the configuration its launchers can choose
    with the most tile data per thread (the likeliest to spill), as ``--op`` items (labels cut at
    commas, which --op splits on: a cut label may select a sibling configuration too)."""
    best: dict[tuple[str, bool], CompileSpec] = {}
    for _, module in load_op_modules("compile_specs", OP_MODULES, log=lambda msg: None):
        for spec in module.compile_specs():
            key = (spec.kernel, _fp32(spec))
            if key not in best or _tile_bytes_per_thread(spec) > _tile_bytes_per_thread(best[key]):
                best[key] = spec
    return [spec.label.rsplit(",", 1)[-1].strip() for spec in best.values()]


def _assert_no_spills(rc: int, rows: list[dict], text: str) -> None:
    for row in rows:
        assert not any(p.startswith("compile failed") for p in row["problems"]), row
        assert row["regs"] > 0 and row["dot"] in ("n/a", "mma.sync", "wgmma", "fma"), row
    # "no spills" is a promise of the kernels (README): a spill, local memory or shared memory
    # above the arch's limit in any configuration a launcher can pick fails
    bad = [f"{r['op']}/{r['kernel']} [{r['label']}] {r['arch']}: {'; '.join(r['problems'])}"
           for r in rows if not r["ok"]]
    assert not bad, "\n".join(bad)
    assert rc == 0, text


def test_real_kernels_do_not_spill(tmp_path, capsys):
    """The configuration of every real kernel nearest to spilling (``_representative_labels``),
    for sm_80 and sm_90; the full sweep is the slow test below (and ``python -m bench.compile``)."""
    labels = _representative_labels()
    rc, rows, text = _run(tmp_path, capsys, "--op", ",".join(labels))
    kernels = {spec.kernel for _, m in load_op_modules("compile_specs", OP_MODULES, log=lambda msg: None)
               for spec in m.compile_specs()}
    assert {r["kernel"] for r in rows} == kernels
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    _assert_no_spills(rc, rows, text)


@pytest.mark.slow
def test_every_real_kernel_configuration_compiles_without_spills(tmp_path, capsys):
    rc, rows, text = _run(tmp_path, capsys)
    assert len(rows) == 2 * sum(len(m.compile_specs()) for _, m in
                                load_op_modules("compile_specs", OP_MODULES, log=lambda msg: None))
    _assert_no_spills(rc, rows, text)


def test_parse_resource_usage_picks_the_kernel():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function helper:
  REG:8 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _fwd_kernel:
  REG:40 STACK:0 SHARED:1024 LOCAL:24 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert bench_compile.parse_resource_usage(text, "_fwd_kernel") == {"REG": 40, "STACK": 0, "SHARED": 1024,
                                                                     "LOCAL": 24}
    assert bench_compile.parse_resource_usage(text, "missing")["REG"] == 8
    with pytest.raises(ValueError):
        bench_compile.parse_resource_usage("nothing here")


def test_sass_classifier_on_known_lines():
    text = """
	code for sm_90a
		Function : _attn_kernel
	.headerflags	@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                 /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R2, SR_TID.X ;                                     /* 0x0000000000027919 */
        /*0020*/                   IMAD.WIDE.U32 R4, R15, 0x2, R4 ;                       /* 0x000000020f047825 */
        /*0030*/                   IMAD.HI.U32 R6, R7, -0x2daee0ad, RZ ;                  /* 0x0 */
        /*0040*/                   LOP3.LUT R68, R14, 0x70, R15, 0x78, !PT ;              /* 0x0 */
        /*0050*/               @!P0 SHF.L.U32 R15, R2, 0x1, RZ ;                          /* 0x0 */
        /*0060*/                   UIADD3 UR4, UR4, 0x400, URZ ;                          /* 0x0 */
        /*0070*/                   ISETP.GE.AND P0, PT, R3, 0x10, PT ;                    /* 0x0 */
        /*0080*/                   FFMA R3, R2, R4, R5 ;                                  /* 0x0 */
        /*0090*/                   MUFU.EX2 R3, R3 ;                                      /* 0x0 */
        /*00a0*/                   F2FP.BF16.F32.PACK_AB R3, R4, R3 ;                     /* 0x0 */
        /*00b0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4].tnspB, RZ, !UPT ;   /* 0x0 */
        /*00c0*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;                 /* 0x0 */
        /*00d0*/                   LDG.E.128 R8, desc[UR12][R24.64] ;                     /* 0x0 */
        /*00e0*/               @P1 STG.E.128 desc[UR12][R2.64+0x800], R8 ;                /* 0x0 */
        /*00f0*/                   LDSM.16.M88.4 R4, [R3] ;                               /* 0x0 */
        /*0100*/                   STS.128 [R68], R8 ;                                    /* 0x0 */
        /*0110*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR12][R2.64] ;          /* 0x0 */
        /*0120*/                   UTMALDG.2D [UR8], [UR4] ;                              /* 0x0 */
        /*0130*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R2 ;                 /* 0x0 */
        /*0140*/                   WARPGROUP.ARRIVE ;                                     /* 0x0 */
        /*0150*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                          /* 0x0 */
        /*0160*/               @!P0 BRA 0x40 ;                                            /* 0x0 */
        /*0170*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;                      /* 0x0 */
        /*0180*/                   EXIT ;                                                 /* 0x0 */
        /*0190*/                   BRA 0x190;                                             /* 0x0 */
        /*01a0*/                   NOP;                                                   /* 0x0 */
		Function : helper
        /*0000*/                   RET.REL.NODEC R20 0x0 ;                                /* 0x0 */
"""
    funcs = bench_compile.parse_sass(text, "_attn_kernel")
    assert list(funcs) == ["_attn_kernel"]
    ops = funcs["_attn_kernel"]
    assert ops[2] == "IMAD.WIDE.U32" and ops[5] == "SHF.L.U32" and ops[-1] == "EXIT"  # predicate dropped
    counts = bench_compile.sass_counts(ops)
    assert counts == {"mma": 2, "int": 6, "fp": 3, "mem_global": 2, "mem_shared": 4, "control": 5,
                      "other": 3, "total": 25, "non_mma_per_mma": 11.5}
    assert set(bench_compile.parse_sass(text)) == {"_attn_kernel", "helper"}  # name absent: all of them
    assert bench_compile.sass_counts(["FADD"])["non_mma_per_mma"] is None
    with pytest.raises(ValueError):
        bench_compile.parse_sass("nothing here")


def test_sass_counts_of_real_cubins(toy_run):
    _, rows, _ = toy_run
    for row in rows.values():
        sass = row["sass"]
        assert sass["total"] == sum(sass[k] for k in bench_compile.SASS_KEYS) > 0, row
    copy = rows[("good BLOCK=1024", "sm_90")]["sass"]
    # BLOCK=1024 fp32 over 128 threads: 8 values each, two 128-bit loads and stores per thread
    assert copy["mma"] == 0 and copy["mem_shared"] == 0 and copy["non_mma_per_mma"] is None
    assert copy["mem_global"] >= 4 and copy["control"] >= 1  # EXIT
    dot80, dot90 = rows[("good 64x64x64", "sm_80")]["sass"], rows[("good 64x64x64", "sm_90")]["sass"]
    # 64x64x64 on 4 warps: mma.sync m16n8k16 -> 64*64*64 / (16*8*16) / 4 = 32 HMMA per warp;
    # wgmma 64x64x16 on one warpgroup -> 4 HGMMA
    assert dot80["mma"] == 32 and dot90["mma"] == 4
    assert dot90["non_mma_per_mma"] == (dot90["total"] - 4) / 4
    assert dot80["mem_shared"] > 0 and dot90["mem_shared"] > 0
