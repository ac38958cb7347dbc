"""End-to-end training throughput per device: ``Trainer.train_step`` itself, minBERT (eager and
Triton kernels) against ``transformers.BertModel``, on the same batches, interleaved.

    python -m bench.throughput --config train/configs/cpu_smoke.json --data DIR [--rounds 6]
        [--steps 6] [--warmup 2] [--variants ours-triton,ours-eager,transformers,transformers-eager]
    deepspeed --num_gpus N bench/throughput.py --config train/configs/zero2_bf16.json --data DIR

Every variant is a ``train.loop.Trainer`` built from the config, exactly as ``train/run.py``
builds it (sampler, schedule, tokenisation, DeepSpeed engine and its ZeRO stage, precision and
batch sizes), and the timed code is its ``train_step``. The baselines swap only the model and
optimizer: ``transformers.BertModel`` with the attention transformers picks by default (SDPA)
(``transformers``), or with its eager attention (``transformers-eager``), under the same heads,
with ``torch.optim.AdamW`` (fused on CUDA) on the same parameter groups, wrapped by DeepSpeed
with the same JSON. Each variant's samplers start from the same state, so step k of every
variant sees the same examples; the baselines get them padded (transformers cannot unpad).

Order must not decide the result (caches, clocks, other jobs on a shared machine): after
``--warmup`` untimed steps each, the variants run ``--rounds`` rounds of ``--steps`` steps,
interleaved A B C, C B A, A B C, ...; each round gives one samples/s figure per variant, and the
report holds each variant's median and spread (min, max) over rounds and the ratio of medians.
Per device: samples/s, real (non-padding) tokens/s, the step time split into data (sampling,
tokenisation, host-to-device), forward, backward and optimizer (``train.loop.PhaseTimer``: the
device is synchronised at each boundary), MFU, and the padding fraction of the measured batches.
One JSON line per run is appended to the results file (timestamp, git sha, devices, versions,
config, figures).

MFU = useful model FLOPs per second / device peak, counted on the real tokens only (the work
every variant must do; padding is waste, not work). Forward + backward = 3 x forward:
    forward = 2 * P_matmul * T  +  4 * layers * hidden * sum_i(l_i ** 2)
P_matmul counts the weights of every matmul a token goes through (Q, K, V, O and the two
feed-forward matrices per layer), T the real tokens, l_i each sequence's length (QK^T and PV).
Embeddings, norms and heads are left out (< 2% here). Peaks: a datasheet table for A100 / H100 /
H200 (dense bf16 or tf32 tensor-core peak); on CPU a GEMM measured in the same run with the same
threads and dtype.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script under the deepspeed launcher: import from the
    # repository root, not from bench/ (whose profile.py would shadow the standard library's)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

DEFAULT_RESULTS = Path("bench/results/throughput.jsonl")
VARIANTS = ("ours-triton", "ours-eager", "transformers", "transformers-eager")

# Dense tensor-core peaks, FLOP/s (vendor datasheets): bf16, and fp32 inputs through tf32.
GPU_PEAKS = {
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},  # SXM; PCIe is ~756e12 bf16
    "H200": {"bf16": 989e12, "fp32": 494e12},
}


def gpu_peak(name: str, dtype: str) -> float | None:
    for key, peaks in GPU_PEAKS.items():
        if key in name.upper():
            if key == "H100" and "PCIE" in name.upper():
                return {"bf16": 756e12, "fp32": 378e12}[dtype]
            return peaks[dtype]
    return None


def measure_cpu_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n GEMM in ``dtype`` with this process's threads (best of ``repeats``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def gpu_peak(name: str, dtype: str) -> float | None:
    for key, peaks in GPU_PEAKS.items():
        if key in name.upper():
            if key == "H100" and "PCIE" in name.upper():
                return {"bf16": 756e12, "fp32": 378e12}[dtype]
            return peaks[dtype]
    return None


def measure_cpu_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n GEMM in ``dtype`` with this process's threads (best of ``repeats``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def useful_flops(config, lengths: list[int]) -> float:
    """Forward + backward model FLOPs of one encoder pass over sequences of ``lengths`` real
    tokens (formula above)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    p_matmul = layers * (4 * h * h + 2 * h * i)
    forward = 2 * p_matmul * sum(lengths) + 4 * layers * h * sum(n * n for n in lengths)
    return 3.0 * forward


class NvmlSampler:
    """Samples every visible GPU every ``interval`` seconds in a thread; 'unavailable' without NVML."""

    FIELDS = ("memory_used_mb", "utilization_pct", "power_w", "temperature_c", "sm_clock_mhz")

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.samples: list[list[dict]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(k) for k in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:  # no library, no driver, no GPU
            self.nvml, self.handles, self.error = None, [], f"unavailable ({type(e).__name__}: {e})"
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> list[dict]:
        n = self.nvml
        out = []
        for h in self.handles:
            out.append({
                "memory_used_mb": n.nvmlDeviceGetMemoryInfo(h).used / 2 ** 20,
                "utilization_pct": n.nvmlDeviceGetUtilizationRates(h).gpu,
                "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temperature_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
                "sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            })
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self._sample())
            except Exception as e:
                self.error = f"sampling failed ({e})"
                return

    def __enter__(self):
        if self.nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict:
        if self.nvml is None or not self.samples:
            return {"nvml": self.error or "unavailable (no samples)"}
        per_gpu = []
        for k in range(len(self.handles)):
            rows = [s[k] for s in self.samples]
            per_gpu.append({f: {"mean": sum(r[f] for r in rows) / len(rows), "max": max(r[f] for r in rows)}
                            for f in self.FIELDS})
        return {"nvml": "ok", "samples": len(self.samples), "gpus": per_gpu}


class HFEncoder(torch.nn.Module):
    """``transformers.BertModel`` behind minBERT's encoder call (the heads read ``pooler_output``
    and ``last_hidden_state``); it runs padded, the ``packing`` argument is ignored."""

    def __init__(self, path, attn_implementation: str | None, config_changes: dict):
        super().__init__()
        import transformers

        from minbert.config import BertConfig

        kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        self.model = transformers.BertModel.from_pretrained(str(path), **kwargs, **config_changes)
        self.attn_implementation = self.model.config._attn_implementation
        self.config = BertConfig.from_json(Path(path) / "config.json")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, packing=None):
        from minbert.model import BertOutput

        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids)
        return BertOutput(pooler_output=out.pooler_output, last_hidden_state=out.last_hidden_state)


def make_trainer(variant: str, cfg, data_dir: str, out: Path):
    """A ``Trainer`` for ``variant``; the baselines get the transformers encoder and
    ``torch.optim.AdamW`` in the trainer's own DeepSpeed set-up."""
    import dataclasses

    import deepspeed

    from minbert.checkpoint import resolve_dir
    from train.loop import Trainer, build_model, lr_lambda, param_groups

    class MeasuredTrainer(Trainer):
        """Records the (input_ids, attention_mask) of every micro-batch it draws (read after
        the timed round: the lengths give the useful FLOPs and the padding)."""

        drawn: list

        def _micro_batches(self, task):
            batches = super()._micro_batches(task)
            self.drawn.extend(kwargs for kwargs, _, _ in batches)
            return batches

    kernels = "triton" if variant == "ours-triton" else "eager"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernels=kernels))
    trainer = MeasuredTrainer(cfg, data_dir, out / variant, progress=False)
    trainer.drawn = []
    trainer.attn_implementation = "kernels.attention_varlen" if variant.startswith("ours") else None
    if variant.startswith("transformers"):
        changes = {}
        if cfg.model.hidden_dropout is not None:
            changes["hidden_dropout_prob"] = cfg.model.hidden_dropout
        if cfg.model.attention_dropout is not None:
            changes["attention_probs_dropout_prob"] = cfg.model.attention_dropout
        model = build_model(cfg)
        model.bert = HFEncoder(resolve_dir(cfg.model.checkpoint),
                               "eager" if variant == "transformers-eager" else None, changes)
        trainer.attn_implementation = model.bert.attn_implementation
        optimizer = torch.optim.AdamW(param_groups(cfg, model), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                      eps=cfg.optim.eps, fused=trainer.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lr_lambda(cfg, trainer.schedule.total_steps))
        del trainer.engine, trainer.optimizer, trainer.scheduler
        trainer.engine, trainer.optimizer, _, trainer.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=trainer.ds_config)
        trainer.params = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    return trainer


def _set_backend(variant: str) -> None:
    import kernels

    kernels.set_backend("triton" if variant == "ours-triton" else "eager")


def run_round(trainer, variant: str, steps: int) -> dict:
    """``steps`` calls of ``train_step`` and the read-back of their losses; this rank's figures."""
    from train.loop import PhaseTimer

    _set_backend(variant)
    trainer.timer = PhaseTimer(trainer.device)
    trainer.drawn = []
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
        torch.cuda.reset_peak_memory_stats(trainer.device)
        base_mem = torch.cuda.memory_allocated(trainer.device)
    t0, c0 = time.perf_counter(), time.process_time()
    results = [trainer.train_step() for _ in range(steps)]
    losses, _ = trainer._check_finite(results)  # the loop's read-back, once per round
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    phases = dict(trainer.timer.seconds)
    trainer.timer = None
    lengths = [int(n) for kwargs in trainer.drawn for k, mask in kwargs.items()
               if k.startswith("attention_mask") for n in mask.sum(1).tolist()]
    slots = sum(r.padded_tokens for r in results)
    examples = sum(r.examples for r in results) / trainer.world  # this rank's share
    out = {"seconds": seconds, "samples_per_s": examples / seconds,
           "samples_per_cpu_s": examples / max(cpu_seconds, 1e-9),
           "tokens_per_s": sum(r.tokens for r in results) / seconds,
           "step_s": seconds / steps, "flops": useful_flops(trainer.engine.module.bert.config, lengths),
           "tokens": sum(r.tokens for r in results), "padded_tokens": slots, "losses": losses,
           **{f"{k}_s": phases.get(k, 0.0) / steps for k in PhaseTimer.PHASES}}
    if trainer.device.type == "cuda":
        out["peak_memory_mb"] = (torch.cuda.max_memory_allocated(trainer.device) - base_mem) / 2 ** 20
    return out


def summarise(rounds: list[dict], peak: float | None) -> dict:
    """Medians and spread (min, max) over rounds; MFU over all timed steps."""
    sps = [r["samples_per_s"] for r in rounds]
    seconds = sum(r["seconds"] for r in rounds)
    fig = {
        "samples_per_s": statistics.median(sps), "samples_per_s_min": min(sps),
        "samples_per_s_max": max(sps), "samples_per_s_rounds": sps,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
        # examples per second of this process's CPU time (all its threads): on a CPU shared with
        # other jobs, steadier than wall time, which counts the time others hold the cores
        "samples_per_cpu_s": statistics.median(r["samples_per_cpu_s"] for r in rounds),
        "step_s": statistics.median(r["step_s"] for r in rounds),
        "model_flops_per_s": sum(r["flops"] for r in rounds) / seconds,
    }
    for phase in ("data", "forward", "backward", "optimizer"):
        fig[f"{phase}_s"] = statistics.median(r[f"{phase}_s"] for r in rounds)
    if peak:
        fig["mfu"] = fig["model_flops_per_s"] / peak
    if "peak_memory_mb" in rounds[0]:
        fig["peak_memory_mb"] = max(r["peak_memory_mb"] for r in rounds)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config (train/configs/*.json)")
    ap.add_argument("--data", default="data/", help="CS224N data directory (default: data/)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round (default 6)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    ap.add_argument("--variants", default="ours-triton,ours-eager,transformers,transformers-eager",
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON-lines history to append to")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        ap.error("--rounds and --steps must be >= 1, --warmup >= 0")

    import deepspeed
    import torch.distributed as dist
    import triton

    from bench._report import format_table, run_metadata
    from train.config import load_config
    from train.run import parse_args as parse_run_args

    overrides = parse_run_args(["--config", args.config, *rest])[1] if rest else []
    cfg = load_config(args.config, overrides)
    dtype = "bf16" if cfg.deepspeed.bf16 else "fp32"
    out = Path(tempfile.mkdtemp(prefix="throughput-"))
    skipped, trainers = {}, {}
    try:
        for variant in variants:
            if variant == "ours-triton" and not torch.cuda.is_available():
                skipped[variant] = "the Triton backend needs CUDA (the interpreter is a correctness tool)"
                continue
            trainers[variant] = make_trainer(variant, cfg, args.data, out)
        first = next(iter(trainers.values()))
        rank, world, device = first.rank, first.world, first.device
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak, peak_source = gpu_peak(name, dtype), "datasheet"
        else:
            name = "cpu"
            peak = measure_cpu_peak(torch.bfloat16 if dtype == "bf16" else torch.float32)
            peak_source = f"measured {dtype} GEMM, {torch.get_num_threads()} threads"

        def say(text: str) -> None:
            if rank == 0:
                print(f"throughput: {text}", file=sys.stderr, flush=True)

        for variant, trainer in trainers.items():
            if args.warmup:
                say(f"{variant}: {args.warmup} warm-up step(s)")
                run_round(trainer, variant, args.warmup)
        rounds: dict[str, list[dict]] = {v: [] for v in trainers}
        with NvmlSampler() as nvml:
            for r in range(args.rounds):
                order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
                for variant in order:
                    rounds[variant].append(run_round(trainers[variant], variant, args.steps))
                say(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{v} {rounds[v][-1]['samples_per_s']:.2f}" for v in trainers) + " samples/s")
        telemetry = nvml.summary()
    finally:
        if dist.is_initialized():
            dist.barrier()
        shutil.rmtree(out, ignore_errors=True)

    figures = {v: summarise(rs, peak) for v, rs in rounds.items()}
    any_rounds = next(iter(rounds.values()))
    padding = 1.0 - sum(r["tokens"] for r in any_rounds) / max(sum(r["padded_tokens"] for r in any_rounds), 1)
    for v, t in trainers.items():
        figures[v]["attn_implementation"] = t.attn_implementation
    ratios, cpu_ratios = {}, {}
    for base in ("transformers", "transformers-eager"):
        for v in figures:
            if base in figures and v.startswith("ours"):
                ratios[f"{v}/{base}"] = figures[v]["samples_per_s"] / figures[base]["samples_per_s"]
                if device.type == "cpu":
                    cpu_ratios[f"{v}/{base}"] = (figures[v]["samples_per_cpu_s"]
                                                 / figures[base]["samples_per_cpu_s"])

    per_rank = [None] * world
    dist.all_gather_object(per_rank, figures)
    if rank == 0:
        record = {
            **run_metadata(name),
            "deepspeed": deepspeed.__version__, "triton": triton.__version__,
            "device_count": world, "dtype": dtype, "peak_flops": peak, "peak_source": peak_source,
            "config": cfg.to_dict(), "steps": args.steps * args.rounds, "rounds": args.rounds,
            "steps_per_round": args.steps, "warmup": args.warmup, "padding_fraction": padding,
            "figures": figures, "per_rank": per_rank, "ratios": ratios, "cpu_ratios": cpu_ratios, "skipped": skipped,
            "telemetry": telemetry,
        }
        results = Path(args.results)
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        rows = [{"variant": v, "attention": f["attn_implementation"],
                 "spread": f"{f['samples_per_s_min']:.2f}-{f['samples_per_s_max']:.2f}", **f}
                for v, f in figures.items()]
        cols = [("variant", "variant"), ("attention", "attention"), ("samples_per_s", "samples/s"),
                ("spread", "min-max"), ("tokens_per_s", "real tokens/s"), ("step_s", "step s"),
                ("data_s", "data s"), ("forward_s", "fwd s"), ("backward_s", "bwd s"),
                ("optimizer_s", "opt s"), ("samples_per_cpu_s", "samples/CPU-s"), ("mfu", "MFU"),
                ("peak_memory_mb", "peak MB")]
        print(f"device: {name} x {world} | {dtype} | config {cfg.name} | {args.rounds} rounds x "
              f"{args.steps} steps per variant after {args.warmup} warm-up | padding "
              f"{100 * padding:.1f}% of the token slots | "
              + (f"peak {peak:.3g} FLOP/s ({peak_source})" if peak else "peak unknown"))
        print("per device, medians over rounds:")
        print(format_table(rows, cols))
        for k, v in ratios.items():
            print(f"{k}: {v:.3f}x samples/s (ratio of medians)")
        for k, v in cpu_ratios.items():
            print(f"{k}: {v:.3f}x samples per CPU-second (ratio of medians)")
        for k, v in skipped.items():
            print(f"skipped {k}: {v}")
        print(f"NVML: {telemetry.get('nvml')}")
        print(f"appended to {results}")
    dist.barrier()
    return 0


if __name__ == "__main__":
    from kernels._cli import run_cli

    sys.exit(run_cli(main))
