"""Data-parallel scaling on the CPU: tokens/s of `pretrain` with 1 and 2 gloo ranks, DDP and FSDP2.

Runs the tiny recipe (`qwen25_tiny_pretrain_config()` as shipped: 2 layers, hidden 128, seq 128,
global batch 16, micro batch 4, fp32) with checkpoints off, TensorBoard off, validation off
(`eval_iters=0`) and a fixed number of steps, one thread per rank (`OMP_NUM_THREADS=1` and
`torch.set_num_threads(1)`). The global batch stays 16 whatever the number of ranks (strong
scaling: with 2 ranks each rank runs half the micro-batches), so ideal scaling doubles tokens/s.

Each configuration is launched as its own job with `python -m torch.distributed.run
--nproc-per-node N` (this file, `--worker`). Inside the worker a step-end callback records
`time.perf_counter()` after every step; a step's time is the gap between two consecutive step
ends (so it covers everything the loop does), the first `--warmup` gaps are dropped, and the
median of the next `--steps` gaps is kept. A job's step time is its slowest rank's median;
tokens/s = global_batch_size * seq_length / step time, and

    efficiency = tokens/s(2 ranks) / (2 * tokens/s(1 rank))

With `--rounds R` every configuration runs R times (interleaved) and the best round is kept, which
filters out other processes on a shared machine; the load average is printed below the table.
Two ranks need two free cores to scale.

Run it from the repository root:

    .venv/bin/python bench/scaling.py
    .venv/bin/python bench/scaling.py --steps 40 --warmup 10 --rounds 3 --modes ddp fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = "scaling (CPU, gloo, tiny recipe, 1 thread per rank)"


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)

    from megatron.bridge.recipes.qwen import qwen25_tiny_pretrain_config
    from megatron.bridge.training.callbacks import CallbackManager
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    cfg = qwen25_tiny_pretrain_config()
    cfg.checkpoint.save = cfg.checkpoint.load = None
    cfg.logger.tensorboard_dir = None
    cfg.validation.eval_iters = 0
    cfg.train.train_iters = args.warmup + args.steps + 1  # steps + 1 step ends give steps gaps after warm-up
    cfg.ddp.use_distributed_optimizer = args.mode == "fsdp"

    ends: list[float] = []
    where: dict[str, int] = {}

    def on_step_end(context) -> None:
        ends.append(time.perf_counter())
        where["rank"], where["world_size"] = dist.get_rank(), dist.get_world_size()

    manager = CallbackManager()
    manager.register("on_train_step_end", on_step_end)
    pretrain(cfg, forward_step, callbacks=manager)

    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)][args.warmup:]
    result = {
        "rank": where["rank"], "world_size": where["world_size"], "mode": args.mode,
        "median_step_s": statistics.median(gaps), "steps": len(gaps),
        "tokens_per_step": cfg.train.global_batch_size * cfg.model.seq_length,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{where['rank']}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(ranks: int, mode: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one job; return its step time (slowest rank) and tokens/s."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--worker", "--mode", mode,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks}-rank {mode} job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-6000:]}")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert all(r["world_size"] == ranks for r in results), results
    step_s = max(r["median_step_s"] for r in results)
    return {"step_s": step_s, "tokens_per_s": results[0]["tokens_per_step"] / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per job")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded before measuring")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration; the best is kept")
    parser.add_argument("--modes", nargs="+", choices=("ddp", "fsdp"), default=["ddp", "fsdp"])
    parser.add_argument("--timeout", type=float, default=600, help="seconds per job")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    configs = [(1, "ddp")] + [(2, mode) for mode in args.modes]
    best: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for round_index in range(args.rounds):
            for ranks, mode in configs:
                result = _launch(ranks, mode, args, Path(tmp) / f"r{round_index}-{ranks}-{mode}")
                print(f"  round {round_index + 1}: {ranks} rank(s) {mode if ranks > 1 else '-':4s} "
                      f"{result['tokens_per_s']:8.0f} tokens/s ({result['step_s'] * 1e3:.1f} ms/step)", flush=True)
                key = (ranks, mode)
                if key not in best or result["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = result

    single = best[(1, "ddp")]["tokens_per_s"]
    print()
    print(HEADER)
    print(f"{'ranks':<7}{'mode':<7}{'tokens/s':<10}efficiency")
    for ranks, mode in configs:
        tps = best[(ranks, mode)]["tokens_per_s"]
        label = "-" if ranks == 1 else mode
        print(f"{ranks:<7}{label:<7}{tps:<10.0f}{tps / (ranks * single):.2f}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.steps} measured steps after {args.warmup} warm-up, best of {args.rounds} round(s); "
          f"{os.cpu_count()} CPUs, load average {load}")


if __name__ == "__main__":
    main()
