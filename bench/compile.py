"""Compile report of every Triton kernel for real GPUs, built on a CPU: ``python -m bench.compile``.

For each op module's ``compile_specs()`` (kernel x configuration its launcher can choose) and each
arch, ``triton.compile`` builds PTX and a cubin for ``GPUTarget("cuda", 80 | 90, 32)`` with the
spec's num_warps / num_stages; no GPU is needed (ptxas ships in the triton wheel). Per row:

  - regs, stack, local, static smem: ``cuobjdump --dump-resource-usage`` on the cubin (REG, STACK,
    LOCAL, SHARED). ptxas puts register spills in the stack frame (STACK), not in LOCAL.
  - spill: bytes of spill stores + loads from ``ptxas -v`` re-run on the same PTX with Triton's
    ptxas flags (its registers must match cuobjdump's, which the report checks).
  - smem: the dynamic shared memory Triton requests at launch (``metadata.shared``), checked
    against the arch's per-block opt-in maximum, as Triton's own launcher does.
  - dot: ``n/a`` when the kernel has no ``tt.dot`` in its TTIR, else the PTX instruction it became:
    ``wgmma`` (Hopper warpgroup MMA), ``mma.sync`` or ``fma``.
  - sass: what the hardware will execute, from ``cuobjdump -sass`` on the cubin: static counts of
    instruction classes (``SASS_CLASSES``: mma, int, fp, mem_global, mem_shared, control, other;
    ``total`` is every instruction but the NOP / self-branch padding after the last EXIT) and
    ``non_mma_per_mma`` = (total - mma) / mma. Static: an instruction inside a loop counts once,
    so a loop body's overhead (e.g. Philox rounds for dropout) shows as extra instructions per
    MMA without a GPU to run them.

Exit status 1 on any spill (ptxas spill bytes or LOCAL > 0), shared memory above the limit, or a
compile error. Pointer arguments are compiled as 16-byte aligned (``tt.divisibility=16``), as the
Triton runtime specializes them for torch allocations; integers are not specialized.

    python -m bench.compile [--arch sm_80,sm_90] [--json FILE] [--op NAME] [--jobs 2] [--per-kernel N]

Compilation runs in spawned worker processes with ``TRITON_INTERPRET`` removed from their
environment: under the interpreter ``@triton.jit`` yields functions ``triton.compile`` cannot
take, and a fresh process imports the op modules as real JIT functions. Only Triton's own cache
(``~/.triton/cache``) is written to disk.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

# Max shared memory per thread block (opt-in, cudaDevAttrMaxSharedMemoryPerBlockOptin), from the
# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": 163 KB for
# compute capability 8.0 (A100) and 227 KB for 9.0 (H100); also the NVIDIA Ampere and Hopper
# tuning guides ("a single thread block can address up to 163 KB / 227 KB of shared memory").
SMEM_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}

_RESOURCE_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS_RE = re.compile(r"Used (\d+) registers")


def parse_arch(text: str) -> list[int]:
    archs = []
    for item in (t.strip() for t in text.split(",")):
        m = re.fullmatch(r"sm_?(\d+)a?", item)
        if not m or int(m.group(1)) not in SMEM_LIMIT_BYTES:
            raise SystemExit(f"unsupported arch {item!r}; choose from "
                             + ", ".join(f"sm_{a}" for a in SMEM_LIMIT_BYTES))
        archs.append(int(m.group(1)))
    return archs


def parse_resource_usage(text: str, kernel_name: str | None = None) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of one function from ``cuobjdump --dump-resource-usage`` output.

    Picks the function named ``kernel_name`` when present, else the first function listed.
    """
    functions: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            functions[current] = {k: int(v) for k, v in _RESOURCE_RE.findall(line)}
            current = None
    if not functions:
        raise ValueError(f"no function resource usage in cuobjdump output:\n{text}")
    if kernel_name in functions:
        return functions[kernel_name]
    return next(iter(functions.values()))


def _nvidia_bin(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path} (it ships with the triton wheel)")
    return path


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """stdout of ``cuobjdump <flag>`` on a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_nvidia_bin("cuobjdump"), flag, path],
                              capture_output=True, text=True, check=True).stdout


def _cuobjdump_usage(cubin: bytes, kernel_name: str) -> dict[str, int]:
    return parse_resource_usage(_cuobjdump(cubin, "--dump-resource-usage"), kernel_name)


def _ptxas_report(ptx: str, arch: int, enable_fp_fusion: bool) -> dict[str, int]:
    """Spill stores/loads and registers from ``ptxas -v`` with the flags Triton compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               *([] if enable_fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "kernel.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spills = _SPILL_RE.search(log)
    regs = _PTXAS_REGS_RE.search(log)
    if not spills or not regs:
        raise ValueError(f"could not parse ptxas -v output:\n{log}")
    return {"spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "ptxas_regs": int(regs.group(1))}


def dot_instruction(ttir: str, ptx: str) -> str:
    """``n/a`` without ``tt.dot`` in the TTIR; else ``wgmma``, ``mma.sync`` or ``fma`` (from the PTX)."""
    if "tt.dot" not in ttir:
        return "n/a"
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma"


# ----------------------------------------------------------------------------- SASS classes
# Opcode (the mnemonic before its first ".") -> class. Uniform-datapath opcodes (UIADD3, ULOP3,
# USHF, ...) take their class from the opcode without the leading U when it is not listed itself.
# Async copies into shared memory (LDGSTS = cp.async, UTMALDG/UTMASTG/UBLKCP = TMA) count as
# mem_shared; mbarrier traffic (SYNCS), fences and warpgroup arrive/wait as control.
SASS_CLASSES: dict[str, tuple[str, ...]] = {
    "mma": ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BMMA", "BGMMA", "DMMA", "OMMA", "UTCHMMA",
            "UTCQMMA", "UTCIMMA"),
    "int": ("IMAD", "IMADSP", "IMUL", "IADD", "IADD3", "IADD32I", "VIADD", "VIADDMNMX", "LOP",
            "LOP3", "LOP32I", "SHF", "SHL", "SHR", "LEA", "ISETP", "ICMP", "IMNMX", "VIMNMX",
            "VIMNMX3", "IABS", "POPC", "FLO", "BREV", "BMSK", "PRMT", "SGXT", "IDP", "IDE", "SEL",
            "ISCADD", "BFE", "BFI", "XMAD", "VABSDIFF", "VABSDIFF4"),
    "fp": ("FADD", "FADD32I", "FMUL", "FMUL32I", "FFMA", "FFMA32I", "FMNMX", "FMNMX3", "FSETP",
           "FSET", "FSEL", "FCHK", "FRND", "FSWZADD", "MUFU", "FCMP", "HADD2", "HADD2_32I", "HMUL2",
           "HMUL2_32I", "HFMA2", "HFMA2_32I", "HMNMX2", "HSETP2", "HSET2", "DADD", "DMUL", "DFMA",
           "DSETP", "DMNMX", "F2F", "F2I", "I2F", "I2FP", "F2FP", "F2IP", "FADD2",
           "FMUL2", "FFMA2"),
    "mem_global": ("LDG", "STG", "LD", "ST", "RED", "REDG", "ATOM", "ATOMG", "CCTL", "CCTLL",
                   "SUATOM", "SULD", "SUST", "TLD", "TEX", "LDL", "STL"),
    "mem_shared": ("LDS", "STS", "LDSM", "STSM", "ATOMS", "LDGSTS", "UTMALDG", "UTMASTG", "UTMAPF",
                   "UTMACCTL", "UTMAREDG", "UBLKCP", "UBLKRED", "UBLKPF", "LDTM", "STTM"),
    "control": ("BAR", "BRA", "BRX", "BRXU", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC",
                "BREAK", "BMOV", "BPT", "KILL", "WARPSYNC", "SYNCS", "MEMBAR", "FENCE", "DEPBAR",
                "LDGDEPBAR", "ERRBAR", "WARPGROUP", "ELECT", "YIELD", "NANOSLEEP", "ACQBULK",
                "ARRIVES", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT", "CGABAR", "WARPGROUPSET"),
}
SASS_KEYS = (*SASS_CLASSES, "other")
_SASS_CLASS_OF = {op: cls for cls, ops in SASS_CLASSES.items() for op in ops}
# one instruction of a cuobjdump -sass listing: "/*0a30*/  @!P0 IMAD.WIDE.U32 R4, R15, 0x2, R4 ;"
_SASS_LINE_RE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")
_SASS_FUNCTION_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")


def sass_class(opcode: str) -> str:
    """The class of one SASS opcode (mnemonic without modifiers): a key of ``SASS_CLASSES`` or
    ``other`` (moves, constant loads, special registers, shuffles, predicate logic)."""
    if opcode in _SASS_CLASS_OF:
        return _SASS_CLASS_OF[opcode]
    if opcode.startswith("U") and opcode[1:] in _SASS_CLASS_OF:
        return _SASS_CLASS_OF[opcode[1:]]
    return "other"


def parse_sass(text: str, kernel_name: str | None = None) -> dict[str, list[str]]:
    """Opcodes (with modifiers, e.g. ``IMAD.WIDE.U32``) per function of a ``cuobjdump -sass`` listing.

    Dropped: ``NOP`` and a branch to its own address (the padding after the last ``EXIT``).
    Returns ``{function: [opcode, ...]}``, only ``kernel_name``'s entry when it is present.
    """
    functions: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = _SASS_FUNCTION_RE.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _SASS_LINE_RE.match(line)
        if m is None or current is None:
            continue
        addr, opcode, rest = m.groups()
        full = opcode + (rest.split(None, 1)[0] if rest.startswith(".") else "")
        if opcode == "NOP" or (opcode == "BRA" and rest.strip().lower() == f"0x{int(addr, 16):x}"):
            continue
        current.append(full)
    if not functions:
        raise ValueError("no function in cuobjdump -sass output")
    if kernel_name in functions:
        return {kernel_name: functions[kernel_name]}
    return functions


def sass_counts(opcodes: list[str]) -> dict:
    """Instruction-class counts of one function's opcodes: ``SASS_KEYS``, ``total`` and
    ``non_mma_per_mma`` = (total - mma) / mma (None without MMA)."""
    counts = dict.fromkeys(SASS_KEYS, 0)
    for op in opcodes:
        counts[sass_class(op.split(".", 1)[0])] += 1
    counts["total"] = len(opcodes)
    counts["non_mma_per_mma"] = (round((counts["total"] - counts["mma"]) / counts["mma"], 2)
                                 if counts["mma"] else None)
    return counts


def _cuobjdump_sass(cubin: bytes, kernel_name: str) -> dict:
    functions = parse_sass(_cuobjdump(cubin, "-sass"), kernel_name)
    return sass_counts(next(iter(functions.values())) if len(functions) == 1 else
                       [op for ops in functions.values() for op in ops])


# ----------------------------------------------------------------------------- worker processes
def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _specs(module_name: str):
    from kernels.check import import_op_module

    module = import_op_module(module_name)
    return module.compile_specs()


def list_specs(module_name: str, op: str | None, per_kernel: int | None = None) -> list[tuple[int, str, str]]:
    """(index, kernel, label) of a module's compile specs selected by ``--op``, at most
    ``per_kernel`` per kernel name (the first ones listed)."""
    from kernels.check import selected, short_name

    short = short_name(module_name)
    out, seen = [], {}
    for i, s in enumerate(_specs(module_name)):
        if not selected(op, short, f"{s.kernel} {s.label}"):
            continue
        seen[s.kernel] = seen.get(s.kernel, 0) + 1
        if per_kernel is None or seen[s.kernel] <= per_kernel:
            out.append((i, s.kernel, s.label))
    return out


def compile_spec(spec, arch: int) -> dict:
    """Compile one spec for ``sm_<arch>`` and read its resources; a row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.fn
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise TypeError(f"{spec.kernel}: fn is {type(fn).__name__}, not a JITFunction "
                        "(was it decorated with TRITON_INTERPRET=1 set?)")
    signature = dict(spec.signature)
    for name in spec.constexprs:
        signature.setdefault(name, "constexpr")
    # Pointers 16-byte aligned, as the runtime specializes them for torch allocations.
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in signature.items() if isinstance(ty, str) and ty.startswith("*")}
    attrs.update(getattr(spec, "attrs", None) or {})
    src = ASTSource(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    compile_s = time.perf_counter() - t0
    md = kernel.metadata
    usage = _cuobjdump_usage(kernel.asm["cubin"], md.name)
    ptxas = _ptxas_report(kernel.asm["ptx"], arch, md.enable_fp_fusion)
    dot = dot_instruction(kernel.asm["ttir"], kernel.asm["ptx"])
    sass = _cuobjdump_sass(kernel.asm["cubin"], md.name)
    row = {
        "kernel": spec.kernel, "label": spec.label, "arch": f"sm_{arch}",
        "num_warps": spec.num_warps, "num_stages": spec.num_stages,
        "regs": usage.get("REG", 0), "stack": usage.get("STACK", 0), "local": usage.get("LOCAL", 0),
        "static_smem": usage.get("SHARED", 0),
        "spill_stores": ptxas["spill_stores"], "spill_loads": ptxas["spill_loads"],
        "spill": ptxas["spill_stores"] + ptxas["spill_loads"],
        "smem": md.shared, "smem_limit": SMEM_LIMIT_BYTES[arch],
        "dot": dot, "wgmma": (dot == "wgmma") if (arch >= 90 and dot != "n/a") else None,
        "sass": sass,
        "compile_s": round(compile_s, 3),
    }
    problems = []
    if row["spill"] > 0 or row["local"] > 0:
        problems.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded, "
                        f"local {row['local']} B")
    if row["smem"] > row["smem_limit"]:
        problems.append(f"shared memory {row['smem']} B > {row['smem_limit']} B per block on sm_{arch}")
    if ptxas["ptxas_regs"] != row["regs"]:
        problems.append(f"ptxas -v re-run used {ptxas['ptxas_regs']} registers, the cubin {row['regs']}")
    if arch >= 90 and dot not in ("n/a", "wgmma"):
        row["note"] = f"tt.dot became {dot}, not wgmma"
    row["problems"] = problems
    row["ok"] = not problems
    return row


def _compile_task(task: tuple[str, int, int, str, str]) -> dict:
    module_name, index, arch, kernel, label = task
    from kernels.check import short_name

    base = {"op": short_name(module_name), "module": module_name, "index": index, "arch": f"sm_{arch}",
            "kernel": kernel, "label": label}
    try:
        # each worker imports the module afresh: find the spec listed, even if the list moved
        specs = _specs(module_name)
        matches = [s for s in specs[index:] + specs[:index] if (s.kernel, s.label) == (kernel, label)]
        if not matches:
            raise LookupError(f"spec {kernel} [{label}] no longer in compile_specs() (module edited during the run?)")
        return {**base, **compile_spec(matches[0], arch)}
    except Exception as e:
        tb = traceback.format_exc(limit=3)
        return {**base, "ok": False, "problems": [f"compile failed: {type(e).__name__}: {e}"[:500]],
                "traceback": tb}


def _pool(processes: int):
    """Spawned workers whose environment lacks TRITON_INTERPRET (restored here afterwards)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return multiprocessing.get_context("spawn").Pool(processes, initializer=_worker_init)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def run(archs: list[int], op: str | None = None, modules: list[str] | None = None,
        jobs: int = 2, per_kernel: int | None = None) -> tuple[list[dict], list[str]]:
    """Compile every selected spec for every arch; returns (rows, skipped-module notes)."""
    from bench._report import progress
    from kernels.check import OP_MODULES

    names = list(OP_MODULES if modules is None else modules)
    with _pool(max(1, jobs)) as pool:
        found = pool.map(_probe_module, names)
        notes = [note for _, note in found if note]
        for note in notes:
            progress(note)
        present = [name for name, note in found if not note]
        listed = pool.starmap(list_specs, [(name, op, per_kernel) for name in present])
        tasks = [(name, i, arch, k, lab) for name, specs in zip(present, listed) for i, k, lab in specs
                 for arch in archs]
        rows = []
        t0 = time.perf_counter()
        for n, row in enumerate(pool.imap_unordered(_compile_task, tasks), 1):
            rows.append(row)
            status = "ok" if row["ok"] else "PROBLEM: " + "; ".join(row["problems"])
            progress(f"[{n}/{len(tasks)}] {row['op']}/{row['kernel']} [{row['label']}] {row['arch']}: "
                     f"{status} ({time.perf_counter() - t0:.1f} s)")
    order = {t[:3]: i for i, t in enumerate(tasks)}
    rows.sort(key=lambda r: order[(r["module"], r["index"], int(r["arch"][3:]))])
    return rows, notes


def _probe_module(name: str) -> tuple[str, str | None]:
    """(name, None) when the module exists and has compile_specs(); else (name, why it is skipped)."""
    notes: list[str] = []
    from kernels.check import load_op_modules

    load_op_modules("compile_specs", [name], log=notes.append)
    return name, (notes[0] if notes else None)


def _kib(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KiB"


COLUMNS = [
    ("op", "op"), ("kernel", "kernel"), ("label", "config"), ("arch", "arch"),
    ("num_warps", "warps"), ("num_stages", "stages"), ("regs", "regs"),
    ("spill", "spill B"), ("stack", "stack B"), ("local", "local B"),
    ("smem", "smem", _kib), ("smem_limit", "smem limit", _kib), ("dot", "dot"),
    ("result", "result"),
]

# The SASS table: instruction classes per row (``row["sass"]``), flattened by ``_sass_row``.
SASS_COLUMNS = [
    ("op", "op"), ("kernel", "kernel"), ("label", "config"), ("arch", "arch"),
    *((f"sass_{k}", k) for k in SASS_KEYS), ("sass_total", "total"),
    ("sass_non_mma_per_mma", "non-mma/mma", lambda v: "-" if v is None else f"{v:.2f}"),
]


def _sass_row(row: dict) -> dict:
    return {**row, **{f"sass_{k}": v for k, v in (row.get("sass") or {}).items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="sm_80,sm_90", help="comma list of sm_80, sm_90")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--op", default=None, help="an op module (e.g. layernorm_gelu) or a substring of kernel/config")
    p.add_argument("--module", action="append", default=None,
                   help="report this module (dotted name or .py path) instead of OP_MODULES; repeatable")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--per-kernel", type=int, default=None,
                   help="compile at most this many configurations per kernel (a quick smoke run)")
    p.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
    args = p.parse_args(argv)
    if args.jobs < 1 or (args.per_kernel is not None and args.per_kernel < 1):
        p.error("--jobs and --per-kernel must be >= 1")
    from kernels._cli import check_output_file

    check_output_file(args.json, "--json")
    archs = parse_arch(args.arch)

    from bench._report import format_table, write_json

    t0 = time.perf_counter()
    rows, notes = run(archs, args.op, args.module, args.jobs, args.per_kernel)
    for r in rows:
        r["result"] = "ok" if r["ok"] else "FAIL"
    print(format_table(rows, COLUMNS))
    with_sass = [_sass_row(r) for r in rows if r.get("sass")]
    if with_sass:
        print("\nSASS instruction classes (static counts, cuobjdump -sass):")
        print(format_table(with_sass, SASS_COLUMNS))
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAIL {r['op']}/{r.get('kernel', '?')} [{r.get('label', '?')}] {r['arch']}: "
              + "; ".join(r["problems"]))
    for r in rows:
        if r.get("note"):
            print(f"note {r['op']}/{r['kernel']} [{r['label']}] {r['arch']}: {r['note']}")
    print(f"\n{len(rows)} compiled kernels, {len(bad)} failing, {time.perf_counter() - t0:.1f} s")
    if args.json:
        write_json(args.json, "bench.compile", rows, device="compile-only (no GPU)", archs=args.arch,
                   smem_limit_bytes={f"sm_{a}": SMEM_LIMIT_BYTES[a] for a in archs}, skipped=notes)
    if not rows:
        print("no compile specs found")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    from kernels._cli import run_cli

    sys.exit(run_cli(main))
