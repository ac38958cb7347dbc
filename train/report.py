"""Training curves and a comparison table of runs, from their ``log.jsonl`` and ``config.json``.

    python -m train.report RUN [RUN ...] --out DIR [--names A B ...]

Writes ``report.png`` (a 3x3 grid: the loss of each task, learning rate, samples/s, dev overall,
and the dev score of each task per epoch; several runs overlaid, one colour each, labelled),
``report.json`` (every series drawn, with the smoothing used) and ``report.md`` (each run's best
dev scores, and the config keys whose values differ between the runs). The SimCSE stage's
records (``"stage": "simcse"``) are left out of the curves. After a resume, the last record of
a step or epoch wins (a resumed run logs the steps after its last checkpoint twice).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .figures import AnalysisError, pyplot, run_cli, save_figure, write_json

TASKS = ("sst", "quora", "sts")
DEV_LABELS = {"sst": "SST acc", "quora": "Quora acc", "sts": "STS Pearson", "overall": "overall"}
# (series key, panel title, y label) in reading order of the 3x3 grid
PANELS = [("loss/sst", "SST loss (cross-entropy)", "loss"), ("loss/quora", "Quora loss (BCE)", "loss"),
          ("loss/sts", "STS loss (MSE)", "loss"), ("lr", "learning rate", "lr"),
          ("samples_per_s", "throughput", "samples/s"), ("dev/overall", "dev overall", "score"),
          ("dev/sst", "dev SST accuracy", "accuracy"), ("dev/quora", "dev Quora accuracy", "accuracy"),
          ("dev/sts", "dev STS Pearson", "Pearson")]


@dataclass
class Run:
    name: str
    path: Path
    steps: list[dict] = field(default_factory=list)  # training-step records, by step
    epochs: list[dict] = field(default_factory=list)  # dev records, by epoch
    config: dict = field(default_factory=dict)
    skipped_stage_records: int = 0


def read_run(path: str | Path, name: str | None = None) -> Run:
    """Parse a run directory's ``log.jsonl`` (and ``config.json`` when present)."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"run directory {str(path)!r} does not exist; pass the --out directory "
                            "of a train/run.py run")
    log = path / "log.jsonl"
    if not log.is_file():
        raise AnalysisError(f"{path} holds no log.jsonl: pass the --out directory of a train/run.py run "
                            "(it writes log.jsonl from its first logged step)")
    steps: dict[int, dict] = {}
    epochs: dict[int, dict] = {}
    skipped = 0
    for n, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{log} line {n} is not JSON ({e.msg}); remove or repair that line") from None
        if "stage" in record:
            skipped += 1
        elif "dev" in record and "epoch" in record:
            epochs[int(record["epoch"])] = record
        elif "loss" in record and "step" in record:
            steps[int(record["step"])] = record
    if not steps and not epochs:
        raise AnalysisError(f"{log} holds no training records yet (no step or dev lines); wait for the "
                            "run to log its first steps")
    config = {}
    if (path / "config.json").is_file():
        config = with_defaults(json.loads((path / "config.json").read_text()))
    return Run(name or path.name, path, [steps[k] for k in sorted(steps)],
               [epochs[k] for k in sorted(epochs)], config, skipped)


def with_defaults(config: dict) -> dict:
    """``config`` over today's ``TrainConfig`` defaults: a key that a run's config.json lacks (it
    was written before the key existed) is compared as its default, not as a difference."""
    from .config import TrainConfig

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    return merge(TrainConfig().to_dict(), config)


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average (the window shrinks at the ends)."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half):i + half + 1]
        out.append(sum(part) / len(part))
    return out


def series(run: Run) -> dict[str, dict]:
    """Every curve of a run: ``{key: {"x": [...], "y": [...], "x_label": ..., "smoothed": [...]}}``."""
    out: dict[str, dict] = {}
    for task in TASKS:
        pts = [(r["step"], r["loss"][task]) for r in run.steps if isinstance(r["loss"], dict) and task in r["loss"]]
        if pts:
            ys = [y for _, y in pts]
            window = max(1, min(25, len(ys) // 10)) | 1  # odd
            out[f"loss/{task}"] = {"x": [x for x, _ in pts], "y": ys, "x_label": "step",
                                   "smoothing_window": window, "smoothed": smooth(ys, window)}
    for key in ("lr", "samples_per_s", "tokens_per_s"):
        pts = [(r["step"], r[key]) for r in run.steps if key in r]
        if pts:
            out[key] = {"x": [x for x, _ in pts], "y": [y for _, y in pts], "x_label": "step"}
    for key in (*TASKS, "overall"):
        pts = [(r["epoch"], r["dev"][key]) for r in run.epochs if key in r["dev"]]
        if pts:
            out[f"dev/{key}"] = {"x": [x for x, _ in pts], "y": [y for _, y in pts], "x_label": "epoch"}
    return out


def best_epoch(run: Run) -> dict | None:
    """The dev record with the best overall score (the one a run exports as ``best/``)."""
    scored = [r for r in run.epochs if "overall" in r["dev"]]
    return max(scored, key=lambda r: r["dev"]["overall"]) if scored else None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(runs: list[Run]) -> list[str]:
    """Config keys (dotted) whose values are not the same in every run."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if len({json.dumps(f[k], sort_keys=True) if k in f else None for f in flat}) > 1]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def markdown_table(runs: list[Run], differing: list[str]) -> str:
    head = ["run", "best epoch", "overall", "SST acc", "Quora acc", "STS Pearson", "steps", *differing]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run in runs:
        best = best_epoch(run)
        dev = best["dev"] if best else {}
        flat = flatten(run.config)
        cells = [run.name, str(best["epoch"]) if best else "-",
                 *(f"{dev[k]:.4f}" if k in dev else "-" for k in ("overall", *TASKS)),
                 str(run.steps[-1]["step"]) if run.steps else "-",
                 *(_cell(flat.get(k)) if k in flat else "(absent)" for k in differing)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def report(paths: list[str | Path], out_dir: str | Path, names: list[str] | None = None) -> dict:
    """Read the runs, draw ``report.png``, write ``report.json`` and ``report.md``; returns the JSON."""
    if names is not None and len(names) != len(paths):
        raise AnalysisError(f"--names needs one name per run ({len(paths)}), got {len(names)}")
    runs = [read_run(p, names[i] if names else None) for i, p in enumerate(paths)]
    labels = [r.name for r in runs]
    if len(set(labels)) < len(labels):  # same directory names: label by path instead
        for r in runs:
            r.name = str(r.path)
    differing = config_differences(runs) if len(runs) > 1 else []
    data = {r.name: series(r) for r in runs}

    plt = pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(13, 9.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, ylabel) in zip(axes.flat, PANELS):
        drawn = False
        for i, run in enumerate(runs):
            s = data[run.name].get(key)
            if s is None:
                continue
            c = colors[i % len(colors)]
            if "smoothed" in s:
                ax.plot(s["x"], s["y"], color=c, alpha=0.25, lw=0.8)
                ax.plot(s["x"], s["smoothed"], color=c, lw=1.6, label=run.name)
            else:
                ax.plot(s["x"], s["y"], color=c, lw=1.4, label=run.name,
                        marker="o" if s["x_label"] == "epoch" else None)
            drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(key.startswith("dev/") and "epoch" or "step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        epochs = sorted({x for run in runs for x in data[run.name].get(key, {}).get("x", [])})
        if key.startswith("dev/") and epochs:
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    handles, legend_labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in legend_labels:
                handles.append(h)
                legend_labels.append(lab)
    title = "Training curves: " + ", ".join(r.name for r in runs)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.suptitle(title, y=0.995)
    fig.legend(handles, legend_labels, loc="upper center", bbox_to_anchor=(0.5, 0.965),
               ncol=min(len(runs), 4), frameon=False)
    out_dir = Path(out_dir)
    save_figure(fig, out_dir / "report.png")

    table = markdown_table(runs, differing)
    md = [f"# {title}", "", table, ""]
    if len(runs) > 1 and not differing:
        md += ["The runs' configs are identical.", ""]
    md += ["![training curves](report.png)", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    result = {
        "title": title, "figure": "report.png",
        "panels": [{"series": k, "title": t, "y_label": y} for k, t, y in PANELS],
        "config_differences": differing,
        "runs": [{"name": r.name, "path": str(r.path), "best": best_epoch(r),
                  "config": {k: flatten(r.config).get(k) for k in differing},
                  "skipped_stage_records": r.skipped_stage_records, "series": data[r.name]} for r in runs],
    }
    write_json(out_dir / "report.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (the --out of train/run.py)")
    ap.add_argument("--out", required=True, help="directory for report.png, report.json, report.md")
    ap.add_argument("--names", nargs="+", default=None, help="labels for the runs (default: directory names)")
    args = ap.parse_args(argv)
    result = report(args.runs, args.out, args.names)
    print((Path(args.out) / "report.md").read_text().split("\n\n")[1])
    print(f"wrote {Path(args.out) / 'report.png'}, report.json and report.md")
    return 0 if result["runs"] else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
