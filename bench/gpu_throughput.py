"""Single-GPU throughput of the shipped `qwen25_500m` recipe: tokens/s, TFLOP/s, MFU and peak memory.

The recipe as shipped (Qwen2.5-0.5B, seq 4096, bf16 with fp32 master weights, fused AdamW, clipping,
mock data) with only the run length, batch sizes and outputs changed, for micro-batch sizes 1, 2, 4
and 8 with `train.compile` on and off. Every configuration runs in its own process (a clean
allocator for the peak-memory reading, no compiled code shared between shapes). Each trains
`--warmup` steps, then `--steps` timed steps of `--global-batch` sequences, timed between two
device synchronisations; FLOPs are the log line's (6N plus attention, see
`megatron.bridge.training.metrics`) and MFU is against the device's dense bf16 peak (989 TFLOP/s
for an H100 SXM or H200).

    python bench/gpu_throughput.py                # the full table (about 3 minutes on an H200)
    python bench/gpu_throughput.py --mbs 4 --compile on --vocab-size 151936
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

FALLBACK_PEAK_TFLOPS = 989.0  # H100 SXM / H200, for a device metrics.peak_tflops does not know


def short_recipe(*, train_iters: int, mbs: int, global_batch: int, compile_blocks: bool):
    """`qwen25_500m_pretrain_config()` as shipped, cut to `train_iters` steps, with no eval, checkpoints or logs."""
    from megatron.bridge.recipes.qwen import qwen25_500m_pretrain_config

    cfg = qwen25_500m_pretrain_config(dir="/tmp/gpu_bench")
    cfg.train.train_iters = train_iters
    cfg.train.micro_batch_size = mbs
    cfg.train.global_batch_size = global_batch
    cfg.train.compile = compile_blocks
    cfg.scheduler.lr_warmup_iters = 1
    cfg.validation.eval_iters = 0
    cfg.validation.eval_interval = None
    cfg.checkpoint.save = cfg.checkpoint.load = None
    cfg.logger.tensorboard_dir = None
    return cfg


def measure(*, mbs: int, compile_blocks: bool, global_batch: int, warmup: int, steps: int,
            vocab_size: int | None) -> dict:
    """Train one configuration in this process and return its numbers."""
    from megatron.bridge.training.callbacks import CallbackManager
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.metrics import model_flops_per_token, peak_tflops
    from megatron.bridge.training.pretrain import pretrain

    cfg = short_recipe(train_iters=warmup + steps, mbs=mbs, global_batch=global_batch, compile_blocks=compile_blocks)
    cfg.logger.log_interval = warmup + steps  # one log line, at the end: the loop reads nothing before
    if vocab_size:
        cfg.tokenizer.vocab_size = vocab_size
    marks: dict[str, float] = {}
    found: dict[str, float] = {}

    def on_step_start(context) -> None:
        if context.state.train_state.step == warmup:
            torch.cuda.synchronize()
            marks["start"] = time.perf_counter()

    def on_train_end(context) -> None:
        torch.cuda.synchronize()
        marks["end"] = time.perf_counter()
        m = context.state.cfg.model
        found["flops_per_token"] = model_flops_per_token(
            context.model[0], num_layers=m.num_layers, seq_length=m.seq_length,
            attention_width=m.num_attention_heads * m.resolved_kv_channels)
        found["params"] = sum(p.numel() for p in context.model[0].parameters())
        found["vocab"] = m.padded_vocab_size

    manager = CallbackManager()
    manager.register("on_train_step_start", on_step_start)
    manager.register("on_train_end", on_train_end)
    torch.cuda.reset_peak_memory_stats()
    pretrain(cfg, forward_step, callbacks=manager)
    seconds = (marks["end"] - marks["start"]) / steps
    tokens_per_s = global_batch * cfg.model.seq_length / seconds
    tflops = tokens_per_s * found["flops_per_token"] / 1e12
    peak = peak_tflops(torch.device("cuda")) or FALLBACK_PEAK_TFLOPS
    return {
        "mbs": mbs, "compile": compile_blocks, "ms_per_step": 1000 * seconds, "tokens_per_s": tokens_per_s,
        "tflops": tflops, "mfu": tflops / peak, "peak_tflops": peak,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "params": found["params"], "vocab": found["vocab"], "flops_per_token": found["flops_per_token"],
        "graphs": _compiled_graphs(),
    }


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


def run_child(args: argparse.Namespace, mbs: int, compile_blocks: bool) -> dict:
    """One configuration in a fresh process; an out-of-memory or crash becomes a row with the error."""
    command = [sys.executable, __file__, "--one", "--mbs", str(mbs), "--compile", "on" if compile_blocks else "off",
               "--global-batch", str(args.global_batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.vocab_size:
        command += ["--vocab-size", str(args.vocab_size)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mbs": mbs, "compile": compile_blocks, "error": f"timed out after {args.timeout}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"mbs": mbs, "compile": compile_blocks, "error": " / ".join(tail)[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\nqwen25_500m recipe on one {name} (torch {torch.__version__}), seq 4096, global batch "
          f"{args.global_batch}, {args.steps} timed steps after {args.warmup}")
    first = next((row for row in rows if "error" not in row), None)
    if first:
        print(f"model: {first['params'] / 1e6:.1f}M parameters, vocab {first['vocab']}, "
              f"{first['flops_per_token'] / 1e9:.3f} GFLOP per token (6N + attention); "
              f"MFU against {first['peak_tflops']:.0f} TFLOP/s")
    print(f"{'mbs':>3s} {'compile':>7s} {'ms/step':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s}")
    for row in rows:
        label = f"{row['mbs']:3d} {'on' if row['compile'] else 'off':>7s}"
        if "error" in row:
            print(f"{label}  failed: {row['error']}")
        else:
            print(f"{label} {row['ms_per_step']:9.1f} {row['tokens_per_s']:10.0f} {row['tflops']:8.1f} "
                  f"{100 * row['mfu']:5.1f}% {row['peak_gib']:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--compile", choices=["on", "off", "both"], default="both")
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="tokenizer vocabulary (default: the recipe's; Qwen2.5's own is 151936)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per configuration")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_throughput.py needs a CUDA GPU")
    compile_settings = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
    if args.one:
        row = measure(mbs=args.mbs[0], compile_blocks=compile_settings[0], global_batch=args.global_batch,
                      warmup=args.warmup, steps=args.steps, vocab_size=args.vocab_size)
        print("RESULT " + json.dumps(row), flush=True)
        return
    rows = []
    for compile_blocks in compile_settings:
        for mbs in args.mbs:
            if args.global_batch % mbs:
                continue
            rows.append(run_child(args, mbs, compile_blocks))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    print_table(rows, args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
