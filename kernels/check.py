"""Accuracy check of every fused op against its fp32 reference: ``python -m kernels.check``.

For each op module's ``check_cases()`` and each dtype, runs ``kernels.testing.compare_case`` and
prints one line per compared tensor (the forward outputs and every gradient): the kernel's max
error against the fp32-upcast reference, eager PyTorch's error in the same dtype, the budget
(2 x eager error + a floor relative to max |ref|, kernels.testing.REL_FLOOR) and PASS/FAIL. Exits with status 1 when anything fails.

    python -m kernels.check [--device cpu|cuda] [--dtype fp32,fp16,bf16] [--op NAME] [--json FILE]

On ``cpu`` the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
triton is imported (the CLI re-executes itself with it when it is not) and the interpreter's
bf16 fixes (``kernels._interpreter``: ``tl.dot``, fp32 -> bf16 rounding) are installed. On
``cuda`` the compiled kernels run. The default device is cuda when available, else cpu.

``OP_MODULES`` is the one list of op modules; ``bench.compile`` and ``bench.io`` read it too.
Modules not written yet, or lacking the function a tool needs, are skipped with a note.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from kernels._cli import check_output_file

# Every fused-op module; each exports check_cases(), compile_specs(), io_cases(tokens, hidden, dtype).
OP_MODULES = [
    "kernels.layernorm_gelu",
    "kernels.attention",
    "kernels.attention_varlen",
    "kernels.simcse_loss",
    "kernels.adamw",
]

DTYPE_NAMES = ("fp32", "fp16", "bf16")


def short_name(module_name: str) -> str:
    """``kernels.layernorm_gelu`` -> ``layernorm_gelu``; ``tests/x/toy.py`` -> ``toy``."""
    if module_name.endswith(".py"):
        return Path(module_name).stem
    return module_name.rsplit(".", 1)[-1]


def import_op_module(name: str) -> ModuleType | None:
    """Import an op module by dotted name or ``.py`` path; None when it does not exist (yet).

    An import error raised *inside* an existing module propagates: a broken module must not be
    mistaken for a missing one.
    """
    if name.endswith(".py"):
        path = Path(name).resolve()
        if not path.is_file():
            return None
        mod_name = "_opmodule_" + re.sub(r"\W", "_", str(path))
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            return None
        raise


def load_op_modules(attr: str, modules: list[str] | None = None,
                    log: Callable[[str], None] | None = None) -> list[tuple[str, ModuleType]]:
    """The op modules (default ``OP_MODULES``) that exist and define ``attr``, as (short name, module).

    Each skipped module is reported through ``log`` (default: stderr).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    found = []
    for name in OP_MODULES if modules is None else modules:
        module = import_op_module(name)
        if module is None:
            log(f"skipped {name}: module does not exist yet")
        elif not callable(getattr(module, attr, None)):
            log(f"skipped {name}: no {attr}() yet")
        else:
            found.append((short_name(name), module))
    return found


def selected(op: str | None, module_short: str, item_name: str) -> bool:
    """``--op NAME`` keeps a whole module (its short name) or the items whose name contains NAME."""
    if not op:
        return True
    names = [n.strip() for n in op.split(",") if n.strip()]
    return any(n == module_short or n in item_name for n in names)


def parse_dtypes(text: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = []
    for name in (t.strip() for t in text.split(",")):
        if name not in table:
            raise SystemExit(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
        out.append(table[name])
    return out


def dtype_name(dtype) -> str:
    return {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(dtype), str(dtype))


def require_interpreter(reexec_argv: list[str] | None = None) -> None:
    """Make sure Triton kernels run in the interpreter, with the ``kernels._interpreter`` fixes in.

    ``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is decorated, so it must be set
    before the op modules are imported. Unset and triton already imported: with ``reexec_argv``
    the CLI restarts itself with the variable set; otherwise this is an error.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            if reexec_argv is None:
                raise RuntimeError(
                    "triton was imported before TRITON_INTERPRET=1 was set, so the kernels are not "
                    "interpretable on CPU; set TRITON_INTERPRET=1 in the environment before importing "
                    "triton or kernels (e.g. TRITON_INTERPRET=1 python -m kernels.check)")
            tool = reexec_argv[1] if reexec_argv[:1] == ["-m"] else "this tool"
            print(f"{tool}: restarting with TRITON_INTERPRET=1 (triton was already imported)",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            env = dict(os.environ, TRITON_INTERPRET="1")
            os.execve(sys.executable, [sys.executable, *reexec_argv], env)
        os.environ["TRITON_INTERPRET"] = "1"
    from kernels import _interpreter

    _interpreter.install()


def _case_name(case) -> str:
    return getattr(case, "name", None) or str(case)


def _fmt_err(x) -> str:
    return "-" if x is None else f"{float(x):.3e}"


def _row(module_short: str, comp, elapsed_s: float | None = None) -> dict:
    err, budget = float(comp.err), float(comp.budget)
    return {
        "op": module_short,
        "case": _case_name(comp.case),
        "dtype": dtype_name(comp.dtype),
        "what": comp.what,
        "err": err,
        "eager_err": float(comp.eager_err),
        "budget": budget,
        "err_over_budget": err / budget if budget > 0 else float("inf"),
        "ok": bool(comp.ok),
        "result": "PASS" if comp.ok else "FAIL",
        "where": "" if comp.ok else str(comp.where),
    }


COLUMNS = [
    ("case", "case"), ("dtype", "dtype"), ("what", "what"),
    ("err", "max err vs ref", _fmt_err), ("eager_err", "eager err", _fmt_err),
    ("budget", "budget", _fmt_err), ("err_over_budget", "err/budget", lambda x: f"{x:.2f}"),
    ("result", "result"), ("where", "where"),
]


def run_checks(device: str, dtypes, op: str | None = None, modules: list[str] | None = None,
               seed: int = 0) -> tuple[list[dict], list[str]]:
    """Compare every selected case in every dtype; returns (rows, errors raised by cases)."""
    from bench._report import progress
    from kernels.testing import compare_case

    jobs = []
    for short, module in load_op_modules("check_cases", modules):
        for case in module.check_cases():
            if selected(op, short, _case_name(case)):
                jobs += [(short, case, dt) for dt in dtypes]
    if not jobs:
        progress("kernels.check: no cases selected")
    rows, errors = [], []
    for i, (short, case, dt) in enumerate(jobs, 1):
        label = f"{short}/{_case_name(case)} {dtype_name(dt)}"
        progress(f"[{i}/{len(jobs)}] {label} ...")
        t0 = time.perf_counter()
        try:
            comps = compare_case(case, device, dt, seed=seed)
        except Exception as e:  # one broken case must not hide the others' results
            errors.append(f"{label}: {type(e).__name__}: {e}")
            progress(f"[{i}/{len(jobs)}] {label}: ERROR {type(e).__name__}: {e}")
            rows.append({"op": short, "case": _case_name(case), "dtype": dtype_name(dt), "what": "(error)",
                         "ok": False, "result": "ERROR", "where": f"{type(e).__name__}: {e}"[:120]})
            continue
        dt_s = time.perf_counter() - t0
        new = [_row(short, c) for c in comps]
        if not new:
            errors.append(f"{label}: compare_case returned no comparisons")
            new = [{"op": short, "case": _case_name(case), "dtype": dtype_name(dt), "what": "(none)",
                    "ok": False, "result": "FAIL", "where": "no comparisons"}]
        rows += new
        bad = sum(not r["ok"] for r in new)
        progress(f"[{i}/{len(jobs)}] {label}: {len(new)} tensors, "
                 f"{'all PASS' if not bad else f'{bad} FAIL'} ({dt_s:.1f} s)")
    return rows, errors


def _wrong_kernels(device: str, dtypes, base: str, op: str | None, modules: list[str] | None) -> int:
    """The budget's self-test: a table op x dtype x wrong kernel, and how many comparisons of the
    right (eager-accurate) kernels would accept an all-zero output."""
    from bench._report import progress
    from kernels.testing import (OpCase, compare_case, self_test, self_test_cases, self_test_table,
                                 zero_acceptance)

    cases = [(o, c) for o, c in self_test_cases(modules) if selected(op, o, _case_name(c))]
    progress(f"kernels.check: {len(cases)} cases x {len(dtypes)} dtypes, wrong kernels from {base}")
    results = self_test(device, dtypes, base, cases)
    print(self_test_table(results))
    eager = [c for _, case in cases for dt in dtypes for c in compare_case(
        OpCase(case.name, case.make_inputs, lambda _c=case, **kw: _c.ref_fn(**kw, upcast=False),
               case.ref_fn), device, dt)]
    n, accept, exact = zero_acceptance(eager)
    print(f"\n{n} comparisons of eager-accurate kernels; an all-zero output would pass {accept} "
          f"({exact} of them with an exactly-zero reference, where zeros are right)")
    missed = [r for r in results if r.caught is False]
    for r in missed:
        print(f"NOT CAUGHT: {r.op} {r.case} [{dtype_name(r.dtype)}] {r.variant}")
    return 1 if missed or accept > exact else 0


def main(argv: list[str] | None = None, reexec: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m kernels.check", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="cuda (compiled kernels) or cpu (Triton interpreter); default: cuda if available")
    p.add_argument("--dtype", default=",".join(DTYPE_NAMES), help="comma list of fp32,fp16,bf16")
    p.add_argument("--op", default=None, help="an op module (e.g. layernorm_gelu) or a substring of case names")
    p.add_argument("--module", action="append", default=None,
                   help="check this module (dotted name or .py path) instead of OP_MODULES; repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--wrong-kernels", choices=["eager", "kernel"], default=None,
                   help="instead: the error budget's self-test, wrong kernels (zeros, out x 0.9, grad "
                        "x 0.9, transposed output, no-op, no weight decay, half lr) built from the "
                        "eager reference or the Triton kernels, each must fail")
    p.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        require_interpreter(["-m", "kernels.check", *sys.argv[1:]] if reexec else None)
    else:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("kernels.check --device cuda runs the compiled kernels: unset TRITON_INTERPRET")
        if not torch.cuda.is_available():
            raise SystemExit("kernels.check --device cuda: CUDA is not available")
    dtypes = parse_dtypes(args.dtype)

    from bench._report import format_table, write_json

    t0 = time.perf_counter()
    if args.wrong_kernels:
        return _wrong_kernels(device, dtypes, args.wrong_kernels, args.op, args.module)
    rows, errors = run_checks(device, dtypes, args.op, args.module, args.seed)
    print(format_table(rows, COLUMNS))
    n_fail = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows)} comparisons, {n_fail} failed, {len(errors)} case errors, "
          f"device={device}, {time.perf_counter() - t0:.1f} s")
    for e in errors:
        print(f"ERROR {e}")
    if args.json:
        write_json(args.json, "kernels.check", rows, device=device if device == "cpu" else None,
                   errors=errors)
    return 1 if (n_fail or errors or not rows) else 0


if __name__ == "__main__":
    from kernels._cli import run_cli

    sys.exit(run_cli(lambda argv: main(argv, reexec=True)))
