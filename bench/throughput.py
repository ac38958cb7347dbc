"""End-to-end training throughput per device: ours (Triton and eager kernels) against
``transformers.BertModel`` with ``torch.optim.AdamW``, on identical batches, in one run.

    python -m bench.throughput --config train/configs/cpu_smoke.json [--steps 20] [--warmup 3]
    deepspeed --num_gpus N bench/throughput.py --config train/configs/zero2_bf16.json --data data/

Every variant runs the same DeepSpeed set-up as training (``deepspeed.initialize`` with the
config's ZeRO stage, precision and batch sizes) over the same pre-tokenised micro-batches. Per
device it reports samples/s, tokens/s (non-padding tokens), the step time split into forward /
backward / optimizer, MFU and peak memory, plus NVML telemetry per GPU (memory, utilisation,
power, temperature, SM clock) sampled during the run. One JSON line per run is appended to the
results file (timestamp, git sha, devices, versions, config, figures).

MFU = model FLOPs per second / device peak. Model FLOPs of one encoder pass over a padded
(B, L) batch, forward + backward = 3 x forward (backward costs twice the forward):
    forward = 2 * P_matmul * B * L  +  4 * layers * hidden * L * B * L
where P_matmul counts the weights of every matmul a token goes through (Q, K, V, O, the two
feed-forward matrices, per layer) and the second term is QK^T and PV. Embedding lookups, norms
and the heads are left out (standard practice; they are < 2% here). Peaks: a table for
A100 / H100 / H200 (dense bf16 or tf32 tensor-core peak), and on CPU a GEMM measured in the same
run with the same threads and dtype.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script under the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

DEFAULT_RESULTS = Path("bench/results/throughput.jsonl")

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


def encoder_flops(config, batch_shapes: list[tuple[int, int]]) -> float:
    """Forward + backward model FLOPs of encoder passes over padded (B, L) batches (formula above)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    p_matmul = layers * (4 * h * h + 2 * h * i)
    total = 0.0
    for B, L in batch_shapes:
        forward = 2 * p_matmul * B * L + 4 * layers * h * L * B * L
        total += 3 * forward
    return total


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
    """``transformers.BertModel`` behind minBERT's encoder call signature."""

    def __init__(self, path):
        super().__init__()
        import transformers

        self.model = transformers.BertModel.from_pretrained(str(path), attn_implementation="eager")
        from minbert.config import BertConfig

        self.config = BertConfig.from_json(Path(path) / "config.json")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def make_batches(cfg, tokenizer, data_dir, rank: int, world: int, n_steps: int, device) -> list:
    """This rank's micro-batches for ``n_steps`` steps (task round-robin), tokenised once."""
    from train.data import load_task
    from train.schedules import TaskSampler
    from train.tasks import encode_batch

    tasks = cfg.tasks.enabled()
    accum = cfg.deepspeed.grad_accum(world)
    data = {t: load_task(t, "train", data_dir, warn=False).examples for t in tasks}
    samplers = {t: TaskSampler(len(data[t]), cfg.seed, i) for i, t in enumerate(tasks)}
    steps = []
    for s in range(n_steps):
        task = tasks[s % len(tasks)]
        tc = getattr(cfg.tasks, task)
        idx = samplers[task].take(cfg.deepspeed.global_batch)
        per_rank = len(idx) // world
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        m = len(mine) // accum
        micro = []
        for j in range(accum):
            examples = [data[task][i] for i in mine[j * m:(j + 1) * m]]
            kwargs, labels, tokens = encode_batch(tokenizer, task, examples, tc.form, tc.max_length, device)
            shapes = [tuple(v.shape) for k, v in kwargs.items() if k.startswith("input_ids")]
            micro.append((task, kwargs, labels, tokens, shapes, len(examples)))
        steps.append(micro)
    return steps


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, cfg, batches: list, warmup: int, device, ds_config: dict) -> dict:
    """Train on ``batches`` with one model/optimizer variant; per-device figures."""
    import deepspeed

    import kernels
    from minbert.heads import MultitaskBert
    from train.loop import build_model, build_optimizer

    model = build_model(cfg)
    if name == "transformers":
        from minbert.checkpoint import resolve_dir

        model.bert = HFEncoder(resolve_dir(cfg.model.checkpoint))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                      eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    else:
        kernels.set_backend("triton" if name == "ours-triton" else "eager")
        optimizer = build_optimizer(cfg, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.train()
    config = model.bert.config
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0, "samples": 0, "tokens": 0,
              "flops": 0.0}
    for s, micro in enumerate(batches):
        timed = s >= warmup
        for task, kwargs, labels, tokens, shapes, n in micro:
            _sync(device)
            t0 = time.perf_counter()
            loss = MultitaskBert.loss(task, engine(task, **kwargs), labels)
            _sync(device)
            t1 = time.perf_counter()
            engine.backward(loss)
            _sync(device)
            t2 = time.perf_counter()
            engine.step()
            _sync(device)
            t3 = time.perf_counter()
            if timed:
                totals["forward_s"] += t1 - t0
                totals["backward_s"] += t2 - t1
                totals["optimizer_s"] += t3 - t2
                totals["samples"] += n
                totals["tokens"] += tokens
                totals["flops"] += encoder_flops(config, shapes)
    seconds = totals["forward_s"] + totals["backward_s"] + totals["optimizer_s"]
    timed_steps = len(batches) - warmup
    peak_mem = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {
        "samples_per_s": totals["samples"] / seconds,
        "tokens_per_s": totals["tokens"] / seconds,
        "step_s": seconds / timed_steps,
        "forward_s": totals["forward_s"] / timed_steps,
        "backward_s": totals["backward_s"] / timed_steps,
        "optimizer_s": totals["optimizer_s"] / timed_steps,
        "model_flops_per_s": totals["flops"] / seconds,
        "peak_memory_mb": peak_mem,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
    }
    del engine, optimizer, model
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config (train/configs/*.json)")
    ap.add_argument("--data", default="data/", help="CS224N data directory (default: data/)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--variants", default="ours-triton,ours-eager,transformers")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON-lines history to append to")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)

    import deepspeed
    import torch.distributed as dist
    import triton

    from bench._report import format_table, run_metadata
    from minbert.tokenizer import Tokenizer
    from train.config import load_config
    from train.stage import _device, init_distributed
    from train.run import parse_args as parse_run_args

    overrides = parse_run_args(["--config", args.config, *rest])[1] if rest else []
    cfg = load_config(args.config, overrides)
    rank, world, local_rank = init_distributed()
    device = _device(local_rank)
    tokenizer = Tokenizer.from_pretrained(cfg.model.checkpoint)
    batches = make_batches(cfg, tokenizer, args.data, rank, world, args.warmup + args.steps, device)
    ds_config = cfg.deepspeed_config(world)
    dtype = "bf16" if cfg.deepspeed.bf16 else "fp32"

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, peak_source = gpu_peak(name, dtype), "datasheet"
    else:
        name = "cpu"
        peak = measure_cpu_peak(torch.bfloat16 if dtype == "bf16" else torch.float32)
        peak_source = f"measured {dtype} GEMM, {torch.get_num_threads()} threads"

    figures, skipped = {}, {}
    with NvmlSampler() as nvml:
        for variant in args.variants.split(","):
            if variant == "ours-triton" and device.type != "cuda":
                skipped[variant] = "the Triton backend needs CUDA (the interpreter is a correctness tool)"
                continue
            if rank == 0:
                print(f"throughput: {variant} ...", file=sys.stderr, flush=True)
            figures[variant] = run_variant(variant, cfg, batches, args.warmup, device, ds_config)
            if peak:
                figures[variant]["mfu"] = figures[variant]["model_flops_per_s"] / peak
    telemetry = nvml.summary()

    # Every rank measured its own device; rank 0 reports them all.
    per_rank = [None] * world
    dist.all_gather_object(per_rank, figures)
    if rank == 0:
        ratios = {}
        base = figures.get("transformers")
        for variant in figures:
            if base and variant != "transformers":
                ratios[f"{variant}/transformers"] = figures[variant]["samples_per_s"] / base["samples_per_s"]
        record = {
            **run_metadata(name),
            "deepspeed": deepspeed.__version__, "triton": triton.__version__,
            "device_count": world, "dtype": dtype, "peak_flops": peak, "peak_source": peak_source,
            "config": cfg.to_dict(), "steps": args.steps, "warmup": args.warmup,
            "figures": figures, "per_rank": per_rank, "ratios": ratios, "skipped": skipped,
            "telemetry": telemetry,
        }
        results = Path(args.results)
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        rows = [{"variant": v, **f} for v, f in figures.items()]
        cols = [("variant", "variant"), ("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"),
                ("step_s", "step s"), ("forward_s", "fwd s"), ("backward_s", "bwd s"),
                ("optimizer_s", "opt s"), ("mfu", "MFU"), ("peak_memory_mb", "peak MB")]
        print(f"device: {name} x {world} | {dtype} | peak {peak:.3g} FLOP/s ({peak_source})"
              if peak else f"device: {name} x {world} | {dtype} | peak unknown")
        print(format_table(rows, cols))
        for k, v in ratios.items():
            print(f"{k}: {v:.3f}x samples/s")
        for k, v in skipped.items():
            print(f"skipped {k}: {v}")
        print(f"NVML: {telemetry.get('nvml')}")
        print(f"appended to {results}")
    dist.barrier()
    return 0


if __name__ == "__main__":
    from kernels._cli import run_cli

    sys.exit(run_cli(main))
