"""Callback overhead: `pretrain` with and without callbacks against a hand-written PyTorch loop.

Runs on the CPU with the tiny recipe (`qwen25_tiny_pretrain_config()`: fp32, no checkpoints, no
TensorBoard, validation off, logging effectively off) and measures the per-step time of

  (a) `pretrain(cfg, forward_step)` with no callbacks;
  (b) `pretrain(cfg, forward_step, callbacks=...)` with 10 no-op callbacks on every one of the 14 events;
  (c) a minimal hand-written loop doing the same model, data and optimizer work: the same model
      (`cfg.model.provide()`), the same mock micro-batches (`build_data_iterators`), the same AdamW
      and scheduler (`setup_optimizer`), token-weighted cross-entropy, backward, `clip_grad_norm_`,
      `optimizer.step()`, `scheduler.step()`.

How steps are timed (no callback involved, identical in all three variants): the forward step is
wrapped so that the first micro-batch of every step stamps `time.perf_counter()` (and
`time.process_time()`); a step lasts from one stamp to the next, so it includes everything the loop
does between two steps (firing callbacks, logging checks, the scheduler, ...). Each variant runs
`warmup + steps + 1` iterations; the first `warmup` steps are dropped and the median of the next
`steps` is kept.

Two schedules:

* lockstep (default): the three variants run in three worker processes that pass a token at every
  step boundary (inside the same wrapper, after the stamp), so only one runs at a time and step k
  of (c), (a) and (b) run within a fraction of a second of each other. Time spent waiting for the
  token is not counted. Bursts of load from other processes on a shared machine then hit all three
  variants alike instead of whichever happened to run at that moment. (Processes, not threads:
  torch's intra-op parallelism is lost in a non-main Python thread, which doubles the step time.)
  Caveat: absolute step times can come out higher than in a process of its own (on 2 cores from
  about 10% to 1.6x, depending on load), alike for all three variants; most likely the
  OpenMP threads of the process that just handed the token on, which spin-wait for a while after
  each parallel region (libgomp's default), share the cores with the one running.
  A fixed per-step overhead therefore shows as a slightly smaller ratio than it would sequentially.
* `--sequential`: run (c), (a), (b) one after another, as whole runs, in this process; the true
  single-process step times, but only trustworthy on an otherwise idle machine.

Either way the variants run for `rounds` rounds (after one short unmeasured run of each), each
round in another order: over 6 rounds every variant runs first twice and, in lockstep, runs right
after each of the other two three times (both cyclic directions). The table shows the median over
rounds of each variant's per-round median. A ratio is, in lockstep, the median over all measured
steps of step k's ratio (steps k of both variants ran back to back); sequentially, the median over
rounds of that round's ratio of medians. Below the table, 20th-percentile step times, process CPU
time per step and the load average tell whether a result is trustworthy.

It also micro-benchmarks `CallbackManager.fire()` with 0, 1 and 10 no-op callbacks on the event, and
the guarded `should_fire` check the loop makes when there are no callbacks.

Run it from the repository root (one to two minutes on 2 idle cores):

    .venv/bin/python bench/callback_overhead.py
    .venv/bin/python bench/callback_overhead.py --steps 24 --warmup 4 --rounds 6 --threads 2
    .venv/bin/python bench/callback_overhead.py --sequential
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
import timeit
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron.bridge.data.loaders import build_data_iterators
from megatron.bridge.recipes.qwen.qwen2 import qwen25_tiny_pretrain_config
from megatron.bridge.training import distributed
from megatron.bridge.training.callbacks import VALID_EVENTS, Callback, CallbackContext, CallbackManager, should_fire
from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.optim import setup_optimizer
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.setup import set_seed

N_CALLBACKS = 10
VARIANTS = ("c", "a", "b")
# Round r runs the variants in ORDERS[r % 6]: every variant goes first, and (in lockstep) follows
# each other variant, equally often over 6 rounds.
ORDERS = (("c", "a", "b"), ("a", "b", "c"), ("b", "c", "a"), ("c", "b", "a"), ("b", "a", "c"), ("a", "c", "b"))


class NoOpCallback(Callback):
    """Overrides every one of the 14 events with a no-op, so `add` registers all of them."""

    def on_data_init_start(self, context):
        pass

    def on_train_start(self, context):
        pass

    def on_train_step_start(self, context):
        pass

    def on_train_step_end(self, context):
        pass

    def on_train_end(self, context):
        pass

    def on_eval_start(self, context):
        pass

    def on_eval_step_start(self, context):
        pass

    def on_eval_step_end(self, context):
        pass

    def on_eval_end(self, context):
        pass

    def on_test_start(self, context):
        pass

    def on_test_step_start(self, context):
        pass

    def on_test_step_end(self, context):
        pass

    def on_test_end(self, context):
        pass

    def on_checkpoint_save(self, context):
        pass


class Aborted(RuntimeError):
    """Raised in a lockstep worker when another one failed."""


class TokenRing:
    """Lets the worker processes of the lockstep schedule run one at a time, in a fixed cyclic order.

    Participant `i` runs until its next step boundary, then `pass_on(i)` hands the token to the next
    participant still running and `wait(i)` blocks until the token comes back. `go` and `ready` let
    the parent set the workers up one at a time before each round.
    """

    def __init__(self, size: int, ctx: Any) -> None:
        self.size = size
        self.turn = [ctx.Semaphore(0) for _ in range(size)]
        self.go = [ctx.Semaphore(0) for _ in range(size)]
        self.ready = [ctx.Event() for _ in range(size)]
        self.done = ctx.Array("b", size)
        self.order = ctx.Array("i", list(range(size)))  # the cyclic order: participant at each position
        self.aborted = ctx.Value("b", 0)

    def reset(self, order: list[int]) -> None:
        """Before a round: set the cyclic order; everyone is running again and nobody is ready yet."""
        with self.done.get_lock():
            for position, index in enumerate(order):
                self.order[position] = index
            for i in range(self.size):
                self.done[i] = 0
        for event in self.ready:
            event.clear()

    def wait(self, index: int) -> None:
        """Block until it is `index`'s turn."""
        self.turn[index].acquire()
        if self.aborted.value:
            raise Aborted("another lockstep worker failed")

    def pass_on(self, index: int) -> None:
        """Hand the token to the next participant still running (`index` itself if it is the last)."""
        with self.done.get_lock():
            order = list(self.order)
            position = order.index(index)
            for offset in range(1, self.size + 1):
                nxt = order[(position + offset) % self.size]
                if not self.done[nxt]:
                    self.turn[nxt].release()
                    return

    def finish(self, index: int) -> None:
        """`index` has run its last step of the round and leaves the ring."""
        with self.done.get_lock():
            self.done[index] = 1
        self.pass_on(index)

    def abort(self) -> None:
        """Wake every waiting participant so that it raises `Aborted`."""
        self.aborted.value = 1
        for semaphore in (*self.turn, *self.go):
            semaphore.release()


class StepClock:
    """Stamps the start and end of every step at the first micro-batch of each step (all variants alike)."""

    def __init__(self, num_microbatches: int, ring: TokenRing | None = None, index: int = 0) -> None:
        self.num_microbatches = num_microbatches
        self.ring, self.index = ring, index
        self.calls = 0
        self.starts: list[tuple[float, float]] = []
        self.ends: list[tuple[float, float]] = []

    def tick(self) -> None:
        """Call once per micro-batch, before its forward pass."""
        if self.calls % self.num_microbatches == 0:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # a GPU runs behind the host: stamp when its queued work is done
            now = (time.perf_counter(), time.process_time())
            if self.calls:
                self.ends.append(now)
            if self.ring is not None:
                if self.calls:
                    self.ring.pass_on(self.index)
                else:
                    self.ring.ready[self.index].set()
                self.ring.wait(self.index)
                now = (time.perf_counter(), time.process_time())
            self.starts.append(now)
        self.calls += 1

    def step_times(self, warmup: int, steps: int, *, cpu: bool = False) -> list[float]:
        """Seconds per step (wall, or process CPU) for the `steps` steps after the first `warmup`."""
        which = 1 if cpu else 0
        times = [end[which] - start[which] for start, end in zip(self.starts, self.ends, strict=False)]
        assert len(times) >= warmup + steps, f"only {len(times)} complete steps recorded, need {warmup + steps}"
        return times[warmup:warmup + steps]


def make_config(train_iters: int) -> ConfigContainer:
    cfg = qwen25_tiny_pretrain_config()
    cfg.train.train_iters = train_iters
    cfg.scheduler.lr_warmup_iters = min(cfg.scheduler.lr_warmup_iters, train_iters)  # valid for short runs
    cfg.validation.eval_iters = 0
    cfg.validation.eval_interval = None
    cfg.logger.log_interval = 10**9
    cfg.logger.tensorboard_dir = None
    cfg.logger.wandb_project = None
    cfg.checkpoint.save = cfg.checkpoint.load = None
    cfg.checkpoint.save_interval = None
    cfg.mixed_precision = "fp32"
    cfg.optimizer.bf16 = cfg.optimizer.fp16 = False
    cfg.train.compile = False  # the hand-written loop runs the model eagerly, on a GPU too
    return cfg


def num_microbatches(cfg: ConfigContainer) -> int:
    return cfg.train.global_batch_size // cfg.train.micro_batch_size  # one process: data-parallel size 1


def run_pretrain(cfg: ConfigContainer, clock: StepClock, *, with_callbacks: bool) -> None:
    """Variant (a) (`with_callbacks=False`) or (b)."""

    def timed_forward_step(state, data_iterator, model):
        clock.tick()
        return forward_step(state, data_iterator, model)

    callbacks = [NoOpCallback() for _ in range(N_CALLBACKS)] if with_callbacks else None
    pretrain(cfg, timed_forward_step, callbacks=callbacks)


def run_hand_loop(cfg: ConfigContainer, clock: StepClock) -> None:
    """Variant (c): a minimal PyTorch loop doing the same model, data and optimizer work as `pretrain`."""
    train_iters = cfg.train.train_iters
    n_micro = num_microbatches(cfg)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size  # what pretrain does for recipes that leave it unset
    set_seed(cfg.rng.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = cfg.model.provide().to(device)
    optimizer, scheduler = setup_optimizer(cfg.optimizer, cfg.scheduler, [model], train_iters=train_iters)
    gbs = cfg.train.global_batch_size
    data = build_data_iterators(
        cfg.dataset, vocab_size=cfg.tokenizer.vocab_size, micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=gbs, train_samples=train_iters * gbs, valid_samples=0, test_samples=0,
    )
    train_iter: Iterator[dict[str, torch.Tensor]] = data.train
    params = [p for p in model.parameters() if p.requires_grad]
    clip_grad = cfg.optimizer.clip_grad

    def timed_forward(data_iterator, model):
        clock.tick()
        batch = {key: value.to(device, non_blocking=True) for key, value in next(data_iterator).items()}
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask = batch["loss_mask"].reshape(-1).float()
        return torch.sum(per_token.reshape(-1) * mask), mask.sum()

    model.train()
    for _ in range(train_iters):
        optimizer.zero_grad(set_to_none=True)
        loss_sum_total = torch.zeros((), device=device)
        tokens_total = torch.zeros((), device=device)
        for _ in range(n_micro):
            loss_sum, num_tokens = timed_forward(train_iter, model)
            loss_sum.backward()
            loss_sum_total += loss_sum.detach()
            tokens_total += num_tokens
        # Token-weighted mean over the whole global batch: divide the summed gradients once.
        torch._foreach_div_([p.grad for p in params if p.grad is not None], tokens_total.clamp(min=1))
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        scheduler.step(1)
        _loss = loss_sum_total / tokens_total  # the step's loss, as a real loop would keep for logging


def run_variant(name: str, train_iters: int, ring: TokenRing | None = None, index: int = 0) -> StepClock:
    cfg = make_config(train_iters)
    clock = StepClock(num_microbatches(cfg), ring, index)
    if name == "c":
        run_hand_loop(cfg, clock)
    else:
        run_pretrain(cfg, clock, with_callbacks=name == "b")
    return clock


def lockstep_worker(index: int, name: str, threads: int, plan: list[int], ring: TokenRing, results: Any) -> None:
    """One variant in its own process: one run per entry of `plan` (train_iters), in lockstep with the others."""
    torch.set_num_threads(threads)
    dist_ctx = distributed.initialize(make_config(1).dist)  # once, so no run creates or destroys a group
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pretrain's banner
            for train_iters in plan:
                ring.go[index].acquire()
                if ring.aborted.value:
                    return
                clock = run_variant(name, train_iters, ring, index)
                ring.finish(index)
                results.put((index, clock.starts, clock.ends))
    except BaseException:  # report, and wake the others so that they stop too
        results.put((index, None, traceback.format_exc()))
        ring.abort()
    finally:
        distributed.teardown(dist_ctx)


class LockstepRunner:
    """Three worker processes, one per variant, stepping in turn: step k of each runs back to back."""

    def __init__(self, threads: int, plan: list[int]) -> None:
        ctx = mp.get_context("spawn")
        self.ring = TokenRing(len(VARIANTS), ctx)
        self.results = ctx.Queue()
        self.workers = [
            ctx.Process(target=lockstep_worker, args=(i, name, threads, plan, self.ring, self.results), daemon=True)
            for i, name in enumerate(VARIANTS)
        ]
        for worker in self.workers:
            worker.start()

    def _check(self) -> None:
        dead = [w.exitcode for w in self.workers if not w.is_alive() and w.exitcode]
        if self.ring.aborted.value or dead:
            self.close()
            raise RuntimeError(f"a lockstep worker failed (exit codes {dead}); see its traceback above")

    def run_round(self, order: list[str]) -> dict[str, StepClock]:
        """Set the workers up one at a time, then step them in turn, cyclically in `order`."""
        self.ring.reset([VARIANTS.index(name) for name in order])
        for index in range(len(VARIANTS)):
            self.ring.go[index].release()
            while not self.ring.ready[index].wait(0.1):
                self._check()
        self.ring.turn[VARIANTS.index(order[0])].release()
        clocks = {}
        while len(clocks) < len(VARIANTS):
            try:
                index, starts, ends = self.results.get(timeout=0.5)
            except queue.Empty:
                self._check()
                continue
            if starts is None:
                print(ends, file=sys.stderr)
                self._check()
                raise RuntimeError(f"lockstep worker ({VARIANTS[index]}) failed")
            clock = StepClock(1)
            clock.starts, clock.ends = starts, ends
            clocks[VARIANTS[index]] = clock
        return clocks

    def close(self) -> None:
        """Stop the workers (they exit by themselves once their plan is done)."""
        for worker in self.workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join()


def run_sequential_round(order: list[str], train_iters: int) -> dict[str, StepClock]:
    """One run of each variant, one after another, in this process."""
    with contextlib.redirect_stdout(io.StringIO()):  # pretrain's banner
        return {name: run_variant(name, train_iters) for name in order}


def time_ns(stmt: Callable[[], Any], *, number: int, repeat: int = 25) -> float:
    """Best-of-`repeat` nanoseconds per call of `stmt` (many short repeats: the best one escapes other load)."""
    timer = timeit.Timer(stmt)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def fire_costs(number: int) -> dict[str, float]:
    """Nanoseconds per `fire()` / `should_fire()` call, with a ready-made context."""
    event = "on_train_step_end"
    context = CallbackContext(state=None, model=[])  # type: ignore[arg-type]
    managers = {}
    for count in (0, 1, N_CALLBACKS):
        manager = CallbackManager()
        manager.add([NoOpCallback() for _ in range(count)])
        managers[count] = manager
    costs = {f"fire, {count} cb": time_ns(lambda m=m: m.fire(event, context), number=number)
             for count, m in managers.items()}
    costs["should_fire(None)"] = time_ns(lambda: should_fire(None, event), number=number)
    empty = managers[0]
    costs["should_fire(empty manager)"] = time_ns(lambda: should_fire(empty, event), number=number)
    costs["empty loop body (timeit floor)"] = time_ns(lambda: None, number=number)
    return costs


def low_quantile(values: list[float]) -> float:
    """The 20th percentile: robust to steps slowed down by other processes on a shared machine."""
    return statistics.quantiles(values, n=5, method="inclusive")[0] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="measured steps per run (default 24)")
    parser.add_argument("--warmup", type=int, default=4, help="warm-up steps per run, not measured (default 4)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds of (a), (b), (c), each in another order (default 6: every order once)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--sequential", action="store_true",
                        help="run the variants one after another instead of in lockstep threads")
    parser.add_argument("--fire-iters", type=int, default=20_000,
                        help="calls per timeit repeat in the fire() micro-benchmark (best of 25 repeats)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("need --steps >= 1, --warmup >= 1, --rounds >= 1, --threads >= 1")
    if torch.cuda.is_available():
        parser.error('this is a CPU benchmark: run it with CUDA_VISIBLE_DEVICES=""')

    torch.set_num_threads(args.threads)
    lockstep = not args.sequential
    train_iters = args.warmup + args.steps + 1  # +1: the last measured step ends at the next step's start
    warmup_iters = 4  # one short unmeasured run of each variant first: imports, allocator, thread pools
    runner = LockstepRunner(args.threads, [warmup_iters] + [train_iters] * args.rounds) if lockstep else None
    # One process group for the whole benchmark, so no run creates or destroys one (world size 1).
    dist_ctx = None if lockstep else distributed.initialize(make_config(1).dist)
    try:
        if runner is not None:
            runner.run_round(list(VARIANTS))
        else:
            run_sequential_round(list(VARIANTS), warmup_iters)
        load_before = os.getloadavg()[0]
        medians: dict[str, list[float]] = {name: [] for name in VARIANTS}
        lows: dict[str, list[float]] = {name: [] for name in VARIANTS}
        cpus: dict[str, list[float]] = {name: [] for name in VARIANTS}
        step_ms: dict[str, list[float]] = {name: [] for name in VARIANTS}  # every measured step, all rounds
        started = time.perf_counter()
        for round_index in range(args.rounds):
            order = list(ORDERS[round_index % len(ORDERS)])
            clocks = runner.run_round(order) if runner is not None else run_sequential_round(order, train_iters)
            for name, clock in clocks.items():
                times_ms = [t * 1e3 for t in clock.step_times(args.warmup, args.steps)]
                step_ms[name].extend(times_ms)
                medians[name].append(statistics.median(times_ms))
                lows[name].append(low_quantile(times_ms))
                cpus[name].append(statistics.median(clock.step_times(args.warmup, args.steps, cpu=True)) * 1e3)
            print(f"round {round_index + 1}/{args.rounds} ({' '.join(order)}): " + ", ".join(
                f"({name}) {medians[name][-1]:.2f} ms" for name in VARIANTS), flush=True)
        elapsed = time.perf_counter() - started
        load_after = os.getloadavg()[0]
    finally:
        if runner is not None:
            runner.close()
        distributed.teardown(dist_ctx)

    def paired_ratio(per_round: dict[str, list[float]], num: str, den: str) -> float:
        return statistics.median(x / y for x, y in zip(per_round[num], per_round[den], strict=True))

    ms = {name: statistics.median(values) for name, values in medians.items()}
    low_ms = {name: statistics.median(values) for name, values in lows.items()}
    cpu_ms = {name: statistics.median(values) for name, values in cpus.items()}
    if lockstep:
        # Step k of each variant ran back to back: compare them step by step, then take the median.
        a_over_c = statistics.median(a / c for a, c in zip(step_ms["a"], step_ms["c"], strict=True))
        b_over_a = statistics.median(b / a for b, a in zip(step_ms["b"], step_ms["a"], strict=True))
        ratio_how = "median over all steps of step k's ratio"
    else:
        a_over_c, b_over_a = paired_ratio(medians, "a", "c"), paired_ratio(medians, "b", "a")
        ratio_how = "median over rounds of per-round ratios"
    a_over_c_low, b_over_a_low = paired_ratio(lows, "a", "c"), paired_ratio(lows, "b", "a")
    a_over_c_cpu, b_over_a_cpu = paired_ratio(cpus, "a", "c"), paired_ratio(cpus, "b", "a")
    costs = fire_costs(args.fire_iters)

    def verdict(ratio: float, target: float) -> str:
        return "ok" if ratio <= target else "ABOVE TARGET"

    label_b = f"(b) pretrain, {N_CALLBACKS} no-op x {len(VALID_EVENTS)} ev"
    schedule = "lockstep" if lockstep else "sequential"
    print()
    print(f"callback overhead (CPU, tiny recipe, {args.threads} threads, median of {args.steps} steps "
          f"after {args.warmup} warm-up, {args.rounds} rounds, {schedule})")
    print(f"{'variant':<32}{'ms/step':>9}   ratio ({ratio_how})")
    print(f"{'(c) hand-written loop':<32}{ms['c']:>9.2f}   1.000")
    print(f"{'(a) pretrain, no callbacks':<32}{ms['a']:>9.2f}   (a)/(c) = {a_over_c:.3f}  target <= 1.03  "
          f"{verdict(a_over_c, 1.03)}")
    print(f"{label_b:<32}{ms['b']:>9.2f}   (b)/(a) = {b_over_a:.3f}  target <= 1.01  {verdict(b_over_a, 1.01)}")
    print(f"fire() cost: 0 callbacks: {costs['fire, 0 cb']:.0f} ns, 1: {costs['fire, 1 cb']:.0f} ns, "
          f"{N_CALLBACKS}: {costs[f'fire, {N_CALLBACKS} cb']:.0f} ns; "
          f"should_fire(None-manager): {costs['should_fire(None)']:.0f} ns")
    print()
    print("noise check (ratios here: median over rounds of per-round ratios)")
    print(f"  20th-percentile ms/step: (c) {low_ms['c']:.2f}, (a) {low_ms['a']:.2f}, (b) {low_ms['b']:.2f} "
          f"-> (a)/(c) = {a_over_c_low:.3f}, (b)/(a) = {b_over_a_low:.3f}")
    print(f"  process CPU ms/step (all threads, median): (c) {cpu_ms['c']:.2f}, (a) {cpu_ms['a']:.2f}, "
          f"(b) {cpu_ms['b']:.2f} -> (a)/(c) = {a_over_c_cpu:.3f}, (b)/(a) = {b_over_a_cpu:.3f}")
    if lockstep:
        print(f"  ratio of medians over rounds: (a)/(c) = {paired_ratio(medians, 'a', 'c'):.3f}, "
              f"(b)/(a) = {paired_ratio(medians, 'b', 'a'):.3f}")
    # Rounds that other processes left (nearly) alone: every variant within 25% of the fastest round.
    fastest = min(min(medians[name][r] for name in VARIANTS) for r in range(args.rounds))
    quiet = [r for r in range(args.rounds) if max(medians[name][r] for name in VARIANTS) <= 1.25 * fastest]
    quiet_medians = {name: [medians[name][r] for r in quiet] for name in VARIANTS}
    print(f"  quiet rounds (every variant within 25% of the fastest round): {len(quiet)} of {args.rounds}"
          + (f"; their ms/step (c) {statistics.median(quiet_medians['c']):.2f}, "
             f"(a) {statistics.median(quiet_medians['a']):.2f}, (b) {statistics.median(quiet_medians['b']):.2f} "
             f"-> (a)/(c) = {paired_ratio(quiet_medians, 'a', 'c'):.3f}, "
             f"(b)/(a) = {paired_ratio(quiet_medians, 'b', 'a'):.3f}" if quiet else ""))
    print("  per-round median ms/step: " + "; ".join(
        f"({name}) " + " ".join(f"{v:.2f}" for v in medians[name]) for name in VARIANTS))
    print(f"  should_fire(empty manager): {costs['should_fire(empty manager)']:.0f} ns; timeit floor (a no-op "
          f"lambda, included in every figure above): {costs['empty loop body (timeit floor)']:.0f} ns")
    print(f"  {elapsed:.0f} s measured; 1-min load average {load_before:.2f} before, {load_after:.2f} after "
          f"({os.cpu_count()} CPUs: a load above the CPU count means other processes competed)")


if __name__ == "__main__":
    main()
