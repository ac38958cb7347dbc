"""Benchmark report from the results history: ``python -m bench.report``.

    python -m bench.report [--results-dir bench/results] [--out bench/report]
                           [--io-json F] [--compile-json F]

Reads the JSON-lines histories in ``--results-dir``:
  - ``throughput.jsonl`` (``python -m bench.throughput``): samples/s per device per variant;
  - ``kernels.jsonl`` (``pytest bench/ --benchmark-only``): GB/s or TFLOP/s per kernel benchmark;
and writes ``report.md`` and PNG plots to ``--out``:
  - for each metric, the latest run against the previous one and the best one. Only comparable
    runs are compared: the same device and device count (and for throughput the same config
    name and dtype); other runs in the history are counted but left out;
  - ``throughput.png``: samples/s per variant over the comparable runs (x: run index, labelled
    with the short git sha);
  - ``kernels_<kernel>.png``: the latest kernel run's GB/s or TFLOP/s against problem size (bytes
    moved or FLOPs) per provider and dtype, one panel per mode;
  - the ``bench.io`` and ``bench.compile`` tables from their JSON (``--io-json`` /
    ``--compile-json``, else ``io.json`` / ``compile.json`` in the results dir when present), or
    the command that produces them.

Exit status 0 when anything was reported, 1 when there was nothing at all (no history, no tables).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_OUT = BENCH_DIR / "report"
THROUGHPUT_FILE, KERNELS_FILE = "throughput.jsonl", "kernels.jsonl"
MODE_ORDER = ("forward", "backward", "full", "step")


# ----------------------------------------------------------------------------- reading
def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a JSON-lines file in file (= time) order, and a note per unreadable line."""
    records, problems = [], []
    if not path.is_file():
        return records, problems
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path.name}:{n}: not JSON ({e.msg}); line skipped")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{path.name}:{n}: not a JSON object; line skipped")
            continue
        records.append(rec)
    return records, problems


def short_sha(rec: dict) -> str:
    sha = rec.get("git_sha") or "?"
    return sha[:7] + ("*" if rec.get("git_dirty") else "")


def _pct(new: float | None, old: float | None) -> str:
    if new is None or old is None or old == 0:
        return "-"
    return f"{(new / old - 1) * 100:+.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def compare(history: list[tuple[dict, float]]) -> dict:
    """(record, value) pairs of one metric in time order, the latest last -> latest/previous/best."""
    (latest_rec, latest), earlier = history[-1], history[:-1]
    prev_rec, prev = earlier[-1] if earlier else (None, None)
    best_rec, best = max(history, key=lambda rv: rv[1])
    return {"latest": latest, "latest_rec": latest_rec, "previous": prev, "previous_rec": prev_rec,
            "best": best, "best_rec": best_rec, "runs": len(history)}


def _with_sha(value: float | None, rec: dict | None) -> str:
    return "-" if value is None else f"{_num(value)} ({short_sha(rec)})"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- throughput
def _throughput_group(rec: dict) -> tuple:
    cfg = rec.get("config") or {}
    return (rec.get("device"), rec.get("device_count"), rec.get("dtype"), cfg.get("name"))


def throughput_section(records: list[dict], out: Path) -> tuple[list[str], list[Path]]:
    lines = ["## Training throughput (`bench.throughput`)", ""]
    records = [r for r in records if isinstance(r.get("figures"), dict)]
    if not records:
        return lines + [(f"No throughput history (`{THROUGHPUT_FILE}`): run "
                        "`python -m bench.throughput --config train/configs/cpu_smoke.json --data DIR` "
                        "to record one."), ""], []
    latest = records[-1]
    group = _throughput_group(latest)
    runs = [r for r in records if _throughput_group(r) == group]
    device, count, dtype, name = group
    lines += [(f"Latest run: {latest.get('timestamp', '?')}, commit `{short_sha(latest)}`, "
              f"{device} x {count}, {dtype}, config `{name}`, {latest.get('steps', '?')} timed steps "
              f"after {latest.get('warmup', '?')} warm-up."),
              (f"Compared with the {len(runs) - 1} earlier run(s) on the same device, device count, dtype "
              f"and config ({len(records) - len(runs)} other run(s) in the history left out)."), ""]
    rows = []
    for variant, fig in latest["figures"].items():
        if not isinstance(fig, dict) or fig.get("samples_per_s") is None:
            continue
        history = [(r, r["figures"][variant]["samples_per_s"]) for r in runs
                   if isinstance(r["figures"].get(variant), dict)
                   and r["figures"][variant].get("samples_per_s") is not None]
        c = compare(history)
        rows.append([variant, _num(c["latest"]), _with_sha(c["previous"], c["previous_rec"]),
                     _pct(c["latest"], c["previous"]), _with_sha(c["best"], c["best_rec"]),
                     _pct(c["latest"], c["best"]), _num(fig.get("tokens_per_s")),
                     _num(fig.get("step_s")), _num(fig.get("mfu"), 2), str(c["runs"])])
    lines += md_table(["variant", "samples/s (latest)", "previous", "vs previous", "best", "vs best",
                       "tokens/s", "step s", "MFU", "runs"], rows)
    lines.append("")
    for k, v in (latest.get("ratios") or {}).items():
        lines.append(f"- {k}: {v:.3f}x samples/s")
    for k, v in (latest.get("skipped") or {}).items():
        lines.append(f"- skipped {k}: {v}")
    if latest.get("peak_flops"):
        lines.append(f"- MFU peak: {latest['peak_flops']:.3g} FLOP/s ({latest.get('peak_source', '?')})")
    lines.append("")

    plt = _plt()
    variants = list(dict.fromkeys(v for r in runs for v in r["figures"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(runs) + 3), 4))
    xs = list(range(len(runs)))
    for variant in variants:
        ys = [(r["figures"].get(variant) or {}).get("samples_per_s") for r in runs]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{i}\n{short_sha(r)}" for i, r in zip(xs, runs)], fontsize=8)
    ax.set_xlabel("run (index, git sha)")
    ax.set_ylabel("samples/s per device")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Training throughput: {name} on {device} x {count} ({dtype})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out / "throughput.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    lines += [f"![throughput over commits]({png.name})", ""]
    return lines, [png]


# ----------------------------------------------------------------------------- kernels
def _kernel_group(rec: dict) -> tuple:
    return (rec.get("device"), rec.get("device_count"))


def _size(b: dict) -> tuple[float | None, str]:
    """x of the size plot: MB moved for GB/s benchmarks, GFLOP for TFLOP/s ones."""
    if b.get("metric") == "TFLOP/s" and b.get("flops"):
        return b["flops"] / 1e9, "GFLOP per call"
    if b.get("bytes"):
        return b["bytes"] / 1e6, "MB moved per call (minimum traffic)"
    return None, ""


def kernels_section(records: list[dict], out: Path) -> tuple[list[str], list[Path]]:
    lines = ["## Kernels (`pytest bench/ --benchmark-only`)", ""]
    records = [r for r in records if isinstance(r.get("benchmarks"), list)]
    if not records:
        return lines + [(f"No kernel benchmark history (`{KERNELS_FILE}`): run "
                        "`pytest bench/ --benchmark-only` to record one."), ""], []
    latest = records[-1]
    runs = [r for r in records if _kernel_group(r) == _kernel_group(latest)]
    benches = [b for b in latest["benchmarks"] if b.get("value") is not None]
    skipped = latest.get("skipped") or {}
    lines += [(f"Latest run: {latest.get('timestamp', '?')}, commit `{short_sha(latest)}`"
              f"{' (uncommitted changes)' if latest.get('git_dirty') else ''}, {latest.get('device')} x "
              f"{latest.get('device_count')}, grid `{latest.get('bench_size')}`, torch {latest.get('torch')}, "
              f"triton {latest.get('triton')}; timer: {latest.get('timer')}."),
              f"{len(benches)} benchmarks; {sum(skipped.values())} skipped"
              + "".join(f"\n- {n} skipped: {reason}" for reason, n in skipped.items()),
              "",
              (f"Previous and best: over the {len(runs) - 1} earlier run(s) on the same device "
              f"({len(records) - len(runs)} other run(s) left out). 'vs eager': the eager provider's "
              "median time over this one's, same kernel, mode, shape and dtype (> 1: faster)."), ""]

    by_name: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for r in runs:
        for b in r["benchmarks"]:
            if b.get("name") and b.get("value") is not None:
                by_name[b["name"]].append((r, b))
    eager_ms = {(b.get("kernel"), b.get("mode"), b.get("shape_label"), b.get("dtype")): b.get("median_ms")
                for b in benches if b.get("provider") == "eager"}

    def order(b: dict) -> tuple:
        mode = b.get("mode")
        dims = tuple(v for v in (b.get("shape") or {}).values() if isinstance(v, (int, float)))
        return (b.get("kernel") or "", dims, b.get("shape_label") or "", b.get("dtype") or "",
                MODE_ORDER.index(mode) if mode in MODE_ORDER else 9, b.get("provider") or "")

    rows = []
    for b in sorted(benches, key=order):
        history = [(r, hb["value"]) for r, hb in by_name[b["name"]] if hb.get("metric") == b.get("metric")]
        c = compare(history)
        ref = eager_ms.get((b.get("kernel"), b.get("mode"), b.get("shape_label"), b.get("dtype")))
        vs_eager = "-" if not ref or b.get("provider") == "eager" else f"{ref / b['median_ms']:.2f}x"
        rows.append([b.get("kernel", "?"), b.get("provider", "?"), b.get("mode", "?"), b.get("shape_label", "?"),
                     b.get("dtype", "?"), _num(b.get("median_ms")),
                     f"{_num(b.get('p20_ms'))}-{_num(b.get('p80_ms'))}", b.get("metric", "?"),
                     _num(c["latest"]), _with_sha(c["previous"], c["previous_rec"]),
                     _pct(c["latest"], c["previous"]), _with_sha(c["best"], c["best_rec"]),
                     _pct(c["latest"], c["best"]), vs_eager])
    lines += md_table(["kernel", "provider", "mode", "shape", "dtype", "median ms", "p20-p80 ms", "unit",
                       "latest", "previous", "vs previous", "best", "vs best", "vs eager"], rows)
    lines.append("")
    pngs = plot_kernels(benches, latest, out)
    lines += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    return lines, pngs


def plot_kernels(benches: list[dict], latest: dict, out: Path) -> list[Path]:
    """One PNG per kernel: the headline unit against size, a panel per mode, a line per provider/dtype."""
    plt = _plt()
    by_kernel: dict[str, list[dict]] = defaultdict(list)
    for b in benches:
        if _size(b)[0] is not None:
            by_kernel[b.get("kernel", "?")].append(b)
    pngs = []
    for kernel, bs in sorted(by_kernel.items()):
        modes = sorted({b["mode"] for b in bs}, key=lambda m: MODE_ORDER.index(m) if m in MODE_ORDER else 9)
        fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes) + 1, 3.8), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            lines: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
            for b in bs:
                if b["mode"] != mode:
                    continue
                label = b.get("shape_label") or ""
                variant = label.split("-", 1)[1] if "-" in label else ""
                key = f"{b['provider']} {b.get('dtype', '')}" + (f" {variant}" if variant else "")
                lines[key].append((_size(b)[0], b["value"], label))
            for key, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
                if len(pts) <= 6:
                    for x, y, label in pts:
                        ax.annotate(label.split("-")[0], (x, y), fontsize=6, alpha=0.7,
                                    textcoords="offset points", xytext=(3, 3))
            xs = [p[0] for pts in lines.values() for p in pts]
            if xs and max(xs) / max(min(xs), 1e-12) > 8:
                ax.set_xscale("log")
            ax.margins(x=0.12, y=0.12)  # room for the point labels
            ax.set_xlabel(_size(bs[0])[1], fontsize=8)
            ax.set_ylabel(bs[0].get("metric", ""))
            ax.set_ylim(bottom=0)
            ax.set_title(f"{kernel}: {mode}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{latest.get('device')} | commit {short_sha(latest)} | {latest.get('timestamp', '')}",
                     fontsize=8)
        fig.tight_layout()
        png = out / f"kernels_{kernel}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        pngs.append(png)
    return pngs


# ----------------------------------------------------------------------------- io / compile tables
def _table_section(title: str, path: Path | None, how: str, flag: str, columns_fn) -> tuple[list[str], bool]:
    lines = [f"## {title}", ""]
    if path is None or not path.is_file():
        where = f" ({path} not found)" if path is not None else ""
        return lines + [f"No results{where}: produce them with `{how}` (or pass the file with {flag}).", ""], False
    try:
        doc = json.loads(path.read_text())
        rows = doc["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return lines + [f"Could not read {path}: {type(e).__name__}: {e}", ""], False
    from bench._report import format_table

    meta = doc.get("meta") or {}
    lines += [(f"From `{path}`: {len(rows)} rows, {meta.get('timestamp', '?')}, commit "
              f"`{(meta.get('git_sha') or '?')[:7]}`, {meta.get('device', '?')}."), "",
              "```text", format_table(rows, columns_fn()), "```", ""]
    for key in ("errors", "skipped"):
        for item in doc.get(key) or []:
            lines.append(f"- {key[:-1] if key == 'errors' else 'skipped'}: {item}")
    return lines + [""], bool(rows)


def _io_columns():
    from bench.io import _columns

    return _columns()


def _compile_columns():
    from bench.compile import COLUMNS

    return COLUMNS


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR),
                   help="directory of throughput.jsonl and kernels.jsonl (default: bench/results)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where report.md and the PNGs go (default: bench/report)")
    p.add_argument("--io-json", default=None, help="bench.io --json output (default: RESULTS_DIR/io.json if present)")
    p.add_argument("--compile-json", default=None,
                   help="bench.compile --json output (default: RESULTS_DIR/compile.json if present)")
    p.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
    args = p.parse_args(argv)

    from kernels._cli import check_writable

    results, out = Path(args.results_dir), Path(args.out)
    check_writable(out, "--out")
    throughput, problems = read_jsonl(results / THROUGHPUT_FILE)
    kernel_runs, more = read_jsonl(results / KERNELS_FILE)
    problems += more
    io_path = Path(args.io_json) if args.io_json else results / "io.json"
    compile_path = Path(args.compile_json) if args.compile_json else results / "compile.json"
    for given, path in ((args.io_json, io_path), (args.compile_json, compile_path)):
        if given and not path.is_file():
            problems.append(f"{path}: no such file")

    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    md = ["# minBERT benchmark report", "",
          (f"Generated {now} by `python -m bench.report` from `{results}`: {len(throughput)} throughput "
          f"run(s), {len(kernel_runs)} kernel benchmark run(s). Commits marked `*` had uncommitted changes."),
          ""]
    md += [f"- warning: {p_}" for p_ in problems] + ([""] if problems else [])
    t_lines, t_png = throughput_section(throughput, out)
    k_lines, k_png = kernels_section(kernel_runs, out)
    io_lines, has_io = _table_section(
        "Kernel memory traffic (`bench.io`)", io_path,
        "python -m bench.io --json bench/results/io.json", "--io-json; it runs on CPU in the Triton "
        "interpreter, --tokens 4096 for a quicker grid", _io_columns)
    c_lines, has_compile = _table_section(
        "Kernel compile report (`bench.compile`)", compile_path,
        "python -m bench.compile --json bench/results/compile.json", "--compile-json", _compile_columns)
    md += t_lines + k_lines + io_lines + c_lines
    report = out / "report.md"
    report.write_text("\n".join(md).rstrip() + "\n")

    for p_ in problems:
        print(f"warning: {p_}", file=sys.stderr)
    anything = bool(t_png or k_png or has_io or has_compile)
    if not anything:
        print(f"nothing to report: no {THROUGHPUT_FILE} or {KERNELS_FILE} history in {results} and no "
              f"bench.io / bench.compile JSON; wrote {report} saying how to produce them", file=sys.stderr)
        return 1
    print(f"wrote {report}" + "".join(f"\nwrote {p_}" for p_ in t_png + k_png))
    return 0


if __name__ == "__main__":
    from kernels._cli import run_cli

    sys.exit(run_cli(main))
