"""Shared plumbing of the analysis commands (``train.analyze``, ``train.report``): matplotlib
without a display, small PNGs, the JSON each figure is drawn from, and the one-line CLI errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from minbert.checkpoint import atomic_write_text

DPI = 90  # README-sized pictures: a 3x3 grid of curves stays under ~150 KB


class AnalysisError(ValueError):
    """Bad input to an analysis command; the message says what, where, and what to do."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise AnalysisError("the figures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return path


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def run_cli(main, argv=None) -> int:
    """``main(argv)``, with bad input (missing files, wrong kinds of directory) reported as one
    line on stderr and exit code 2 instead of a traceback."""
    try:
        return main(argv)
    except (AnalysisError, FileNotFoundError, NotADirectoryError, KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2
