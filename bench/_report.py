"""Shared output helpers for the benches and kernel reports: plain-text tables and JSON rows.

Results are data: ``write_json`` stores the rows with the environment they came from (device,
time, git sha, torch/triton versions), so tables can be compared across machines and commits.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Column = tuple  # (key, header) or (key, header, formatter)


def _cell(value: Any, formatter: Callable[[Any], str] | None) -> str:
    if formatter is not None:
        return formatter(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Rows (dicts) as an aligned text table; numbers right-aligned, text left-aligned.

    Args:
        rows: one dict per line; missing keys print as ``-``.
        columns: ``(key, header)`` or ``(key, header, formatter)``; formatter(value) -> str.
    """
    headers = [c[1] for c in columns]
    cells = [[_cell(r.get(c[0]), c[2] if len(c) > 2 else None) for c in columns] for r in rows]
    right = [all(_is_numeric(r.get(c[0])) or r.get(c[0]) is None for r in rows) and bool(rows)
             for c in columns]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]

    def line(values: Iterable[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


def fmt_bytes(n: int | float | None) -> str:
    """Bytes in decimal megabytes (MB = 1e6 B), the unit of bandwidth figures (GB/s = 1e9 B/s)."""
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def progress(message: str) -> None:
    """A progress line on stderr (tables go to stdout, so they can be piped cleanly)."""
    print(message, file=sys.stderr, flush=True)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_metadata(device: str | None = None) -> dict:
    """Where and with what a result was produced."""
    meta: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
    }
    try:
        import torch

        meta["torch"] = torch.__version__
        if device is None:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    meta["device"] = device
    return meta


def write_json(path: str | Path, tool: str, rows: list[dict], device: str | None = None, **extra) -> None:
    """Write ``{"tool", "meta", ..., "rows"}`` to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"tool": tool, "meta": run_metadata(device), **extra, "rows": rows}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
