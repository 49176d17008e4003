"""Where a step of the `qwen25_500m` recipe spends its GPU time, and what the attention kernels reach.

    python bench/gpu_profile.py attention     # SDPA forward+backward per backend at the recipe's shape
    python bench/gpu_profile.py step --mbs 8  # one profiled training step: GPU time by kernel family

Companion to `bench/gpu_throughput.py`: it explains the table rather than producing it.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
import torch.nn.functional as F

HEADS, GROUPS, HEAD_DIM, SEQ, HIDDEN = 14, 2, 64, 4096, 896  # Qwen2.5-0.5B


def _time(fn, *, repeats: int = 10) -> float:
    """Median seconds of `fn()` over `repeats` runs after two warm-ups, timed with CUDA events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def attention(batch: int) -> None:
    """Forward+backward of causal SDPA with grouped k/v, per backend, in TFLOP/s of the model formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.backends.cuda.enable_cudnn_sdp(True)
    q = torch.randn(batch, HEADS, SEQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, GROUPS, SEQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    # The model formula's attention term: 6 * seq * (heads * head_dim) per token, causal.
    flops = 6 * SEQ * HEADS * HEAD_DIM * batch * SEQ
    print(f"causal attention fwd+bwd, q {tuple(q.shape)}, k/v {tuple(k.shape)}, bf16")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for native_gqa in (True, False):
            def run(backend=backend, native_gqa=native_gqa) -> None:
                kk, vv = (k, v) if native_gqa else (k.repeat_interleave(HEADS // GROUPS, 1),
                                                    v.repeat_interleave(HEADS // GROUPS, 1))
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=native_gqa)
                out.backward(torch.ones_like(out))

            label = f"{backend.name:20s} {'enable_gqa' if native_gqa else 'repeated k/v':12s}"
            try:
                seconds = _time(run)
                print(f"{label} {1000 * seconds:8.2f} ms {flops / seconds / 1e12:7.1f} TFLOP/s")
            except Exception as err:  # a backend that refuses the shape says why
                print(f"{label} refused: {str(err).splitlines()[0][:100]}")


def _family(name: str) -> str:
    lowered = name.lower()
    for family, keys in (("attention", ("flash", "fmha", "attention", "cudnn")), ("optimizer", ("adam",)),
                         ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "cublas")),
                         ("compiled fusion", ("triton",)), ("cross-entropy / softmax", ("softmax", "nll", "log_")),
                         ("norms / grad clip", ("norm",)), ("copies / casts", ("copy", "cast", "fill"))):
        if any(key in lowered for key in keys):
            return family
    return "other elementwise"


def step(mbs: int, compile_blocks: bool) -> None:
    """Profile one training step after warm-up and print GPU time by kernel family and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from gpu_throughput import short_recipe
    from megatron.bridge.training.callbacks import CallbackManager
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    warmup = 3
    cfg = short_recipe(train_iters=warmup + 2, mbs=mbs, global_batch=8, compile_blocks=compile_blocks)
    cfg.logger.log_interval = 1000
    prof = profile(activities=[ProfilerActivity.CUDA])
    marks = {}

    def on_step_start(context) -> None:
        current = context.state.train_state.step
        if current == warmup:
            torch.cuda.synchronize()
            prof.start()
            marks["start"] = time.perf_counter()
        elif current == warmup + 1:
            torch.cuda.synchronize()
            marks["end"] = time.perf_counter()
            prof.stop()

    manager = CallbackManager()
    manager.register("on_train_step_start", on_step_start)
    pretrain(cfg, forward_step, callbacks=manager)
    by_kernel: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[event.name] += event.device_time_total
    total = sum(by_kernel.values())
    families: collections.Counter = collections.Counter()
    for name, us in by_kernel.items():
        families[_family(name)] += us
    wall = 1000 * (marks["end"] - marks["start"])
    print(f"\none step, mbs {mbs}, compile {'on' if compile_blocks else 'off'}: wall {wall:.1f} ms, "
          f"GPU kernel time {total / 1000:.1f} ms")
    for family, us in families.most_common():
        print(f"  {family:26s} {us / 1000:8.1f} ms {100 * us / total:5.1f}%")
    print("top kernels:")
    for name, us in by_kernel.most_common(20):
        print(f"  {us / 1000:8.2f} ms  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["attention", "step"])
    parser.add_argument("--mbs", type=int, default=8)
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    args = parser.parse_args()
    if args.what == "attention":
        attention(args.mbs)
    else:
        step(args.mbs, args.compile == "on")


if __name__ == "__main__":
    main()
