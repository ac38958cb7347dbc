"""``torch.profiler`` traces of one kernel or of a few training steps: ``python -m bench.profile``.

    python -m bench.profile --kernel NAME [--batch 32] [--seq 128] [--hidden 768] [--iters 3] [--out DIR]
    python -m bench.profile --train [--config train/configs/cpu_smoke.json] [--data DIR] [--steps 3]
                            [--out DIR] [--key.sub value ...]

Writes, under ``--out`` (default ``runs/profile``):
  - ``trace_<name>.json``: a Chrome trace (``export_chrome_trace``; open it in chrome://tracing or
    https://ui.perfetto.dev);
  - ``top_ops_<name>.txt``: ``key_averages().table(...)`` of the top operators, sorted by self
    device time on CUDA and self CPU time on CPU (``--sort-by`` to change), also printed.

``--kernel``: forward + backward of the op (``layer_norm``, ``bias_gelu``, ``gelu_layer_norm``,
``attention``, ``simcse_loss``) or one step (``adamw``) at a BERT shape (defaults: 32 sequences
of 128 tokens, hidden 768; attention heads of 64; bias_gelu on the 4 x hidden FFN intermediate;
SimCSE over the batch's sentence embeddings; AdamW over ``--layers`` encoder layers), on the
kernels backend in force: Triton on CUDA; on CPU the eager backend (the interpreter is a
correctness tool, its profile says nothing about the kernels), which the output says. One
un-profiled warm-up call, then ``--iters`` profiled ones, each in a ``record_function`` range.

``--train``: ``train.loop.Trainer`` built from the config plus ``--key.sub value`` overrides (the
same as ``train/run.py``), one un-profiled warm-up step, then ``--steps`` calls of
``trainer.train_step()`` under the profiler: the training code path itself, DeepSpeed included
(one-process group when not launched by ``deepspeed``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

KERNELS = ("layer_norm", "bias_gelu", "gelu_layer_norm", "attention", "simcse_loss", "adamw")
DEFAULT_OUT = Path("runs/profile")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "cpu_smoke.json"


def _activities(dev: torch.device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def default_sort(dev: torch.device) -> str:
    return "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"


def _write(prof, name: str, out: Path, sort_by: str, row_limit: int, header: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"trace_{name}.json"
    prof.export_chrome_trace(str(trace))
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    ops = out / f"top_ops_{name}.txt"
    ops.write_text(f"{header}\nsorted by {sort_by}, top {row_limit}\n\n{table}\n")
    print(header)
    print(table)
    print(f"wrote {trace}\nwrote {ops}")
    return trace, ops


# ----------------------------------------------------------------------------- one kernel
def kernel_problem(name: str, batch: int, seq: int, hidden: int, layers: int, dtype: torch.dtype,
                   dev: torch.device):
    """(callable of one profiled iteration, shape description), built by the bench modules."""
    from bench import harness

    tokens = batch * seq
    if name in ("layer_norm", "bias_gelu", "gelu_layer_norm"):
        from bench import bench_layernorm_gelu as m

        if name == "bias_gelu":
            width = m.FFN_MULT * hidden
            forward, inputs = m.bias_gelu_problem(tokens, width, dtype, dev)
            shape = f"x ({tokens}, {width}), bias ({width},)"
        else:
            forward, inputs = getattr(m, f"{name}_problem")(tokens, hidden, dtype, dev)
            shape = f"x ({tokens}, {hidden})"
        return harness.make_callable("full", forward, inputs), shape
    if name == "attention":
        from bench.bench_attention import attention_problem

        H = max(1, hidden // harness.HEAD_DIM)
        forward, inputs, kwargs = attention_problem(batch, H, seq, harness.HEAD_DIM, dtype, dev)
        return (harness.make_callable("full", forward, inputs, kwargs),
                f"q, k, v ({batch}, {H}, {seq}, {harness.HEAD_DIM})")
    if name == "simcse_loss":
        from bench.bench_simcse_loss import simcse_problem

        forward, inputs, kwargs = simcse_problem(batch, hidden, dtype, dev)
        return harness.make_callable("full", forward, inputs, kwargs), f"z1, z2 ({batch}, {hidden})"
    if name == "adamw":
        from bench.bench_adamw import adamw_problem

        step, params = adamw_problem("triton" if dev.type == "cuda" else "torch-foreach", hidden, layers,
                                     torch.float32, dev)
        n = sum(p.numel() for p in params)
        provider = "kernels.FusedAdamW" if dev.type == "cuda" else "torch.optim.AdamW(foreach=True)"
        return harness.Timed(step), f"{len(params)} fp32 tensors, {n} parameters ({layers} layers), {provider}"
    raise SystemExit(f"unknown kernel {name!r}; choose from {', '.join(KERNELS)}")


def profile_kernel(args) -> int:
    import kernels
    from bench import harness

    dev = harness.device()
    if dev.type == "cuda":
        backend, note = "triton", "Triton kernels"
        dtype = torch.bfloat16
    else:
        backend = "eager"
        note = ("eager backend: no CUDA here, and the Triton interpreter is a correctness tool, "
                "so this profiles the eager reference")
        dtype = torch.float32
    what = "one optimizer step" if args.kernel == "adamw" else "forward + backward"
    with kernels.use_backend(backend):
        timed, shape = kernel_problem(args.kernel, args.batch, args.seq, args.hidden, args.layers, dtype, dev)
        if timed.setup:
            timed.setup()
        timed.fn()  # warm-up, not profiled
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=_activities(dev), record_shapes=True) as prof:
            for i in range(args.iters):
                if timed.setup:
                    timed.setup()
                with torch.profiler.record_function(f"{args.kernel} {what} #{i}"):
                    timed.fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
    header = (f"bench.profile --kernel {args.kernel}: {what}, {shape}, {harness.dtype_name(dtype)}, "
              f"{args.iters} iterations on {harness.device_name(dev)}; {note}")
    _write(prof, args.kernel, Path(args.out), args.sort_by or default_sort(dev), args.row_limit, header)
    return 0


# ----------------------------------------------------------------------------- training steps
def profile_train(args, overrides: list[tuple[str, str]]) -> int:
    import torch.distributed as dist

    import kernels
    from train.config import load_config
    from train.loop import Trainer

    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    trainer = Trainer(cfg, args.data, out / "train_run", progress=False)
    dev = trainer.device
    t0 = time.perf_counter()
    trainer.train_step()  # warm-up (allocations, DeepSpeed buffers), not profiled
    warm = time.perf_counter() - t0
    seconds = []
    with torch.profiler.profile(activities=_activities(dev), record_shapes=False) as prof:
        for i in range(args.steps):
            with torch.profiler.record_function(f"train_step #{i}"):
                result = trainer.train_step()
            seconds.append(result.seconds)
    header = (f"bench.profile --train: config {cfg.name} ({args.config}), {args.steps} steps of "
              f"{cfg.deepspeed.global_batch} examples per task, kernels backend {kernels.get_backend()}, "
              f"ZeRO {cfg.deepspeed.zero_stage}, bf16 {cfg.deepspeed.bf16}, world {trainer.world}, "
              f"{dev}; step s (profiled): {', '.join(f'{s:.2f}' for s in seconds)}, warm-up {warm:.2f}")
    _write(prof, "train", out, args.sort_by or default_sort(dev), args.row_limit, header)
    if dist.is_initialized() and trainer.world == 1:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0],
                                epilog="--train also takes --key.sub value config overrides, as train/run.py")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--kernel", choices=KERNELS, help="profile one op")
    what.add_argument("--train", action="store_true", help="profile training steps")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: runs/profile)")
    p.add_argument("--sort-by", default=None,
                   help="key_averages().table sort key (default: self device time on CUDA, self CPU time on CPU)")
    p.add_argument("--row-limit", type=int, default=25, help="operators in the table (default 25)")
    k = p.add_argument_group("--kernel")
    k.add_argument("--batch", type=int, default=32, help="sequences (SimCSE: sentences) (default 32)")
    k.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    k.add_argument("--hidden", type=int, default=768, help="hidden size (default 768)")
    k.add_argument("--layers", type=int, default=2, help="AdamW: encoder layers of parameters (default 2)")
    k.add_argument("--iters", type=int, default=3, help="profiled iterations (default 3)")
    t = p.add_argument_group("--train")
    t.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: cpu_smoke)")
    t.add_argument("--data", default="data/", help="CS224N data directory (default: data/)")
    t.add_argument("--steps", type=int, default=3, help="profiled training steps (default 3)")
    p.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
    args, rest = p.parse_known_args(argv)
    from kernels._cli import check_writable

    check_writable(Path(args.out), "--out")
    if args.kernel and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if min(args.iters, args.steps, args.batch, args.seq, args.hidden, args.layers) < 1:
        p.error("--iters, --steps, --batch, --seq, --hidden and --layers must be >= 1")
    if args.kernel:
        return profile_kernel(args)
    from train.run import parse_args as parse_run_args

    overrides = parse_run_args(["--config", args.config, *rest])[1] if rest else []
    return profile_train(args, overrides)


if __name__ == "__main__":
    from kernels._cli import run_cli

    sys.exit(run_cli(main))
