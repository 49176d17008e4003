"""Checkpoint save and load time of the 0.5B-shaped model, and what the checksums cost.

The model is `Qwen25ModelProvider500M` with the recipe's vocabulary (32,000), fp32, with AdamW's
state materialised by one optimizer step: about 4.7 GB on disk. `CheckpointManager` saves it
(torch.distributed.checkpoint write with fsync, JSON files, then the manifest: every file hashed
with xxh3-128 in 64 MiB blocks, in parallel) and loads it back (every file checked against the manifest
first, its blocks hashed in parallel, then the tensors read into the model and optimizer).

Saving seals in a pass of its own after the files are written, so "without" is the save minus that
pass. A load without checksums is a second load that ignores the manifest (torch's plain reader, as
for a checkpoint written before checksums). Loads read the just-written files from the page cache,
then from the disk: the files are dropped from the page cache (`posix_fadvise(DONTNEED)`) before
each such load, as a resume after a restart reads them.

    .venv/bin/python bench/checkpoint_io.py [--dir /tmp] [--repeats 3] [--layers 24]

`--layers` shrinks the model (the embedding stays) where disk, memory or time are short.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron.bridge.checkpoint import integrity as checkpoint_integrity
from megatron.bridge.checkpoint.io import iteration_dir
from megatron.bridge.recipes.qwen import qwen25_500m_pretrain_config
from megatron.bridge.training import checkpoint_loading, checkpointing
from megatron.bridge.training.checkpoint_loading import CheckpointReader
from megatron.bridge.training.checkpointing import CheckpointManager, estimate_checkpoint_bytes
from megatron.bridge.training.mixed_precision import MixedPrecision
from megatron.bridge.training.optim import setup_optimizer
from megatron.bridge.training.state import GlobalState

PHASES: dict[str, list[float]] = {}
READ_MANIFEST = checkpoint_integrity.read_manifest


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, adding its wall time to `PHASES[name]` on every call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            PHASES.setdefault(name, []).append(time.perf_counter() - started)

    return wrapper


def build(layers: int, save: Path) -> tuple[CheckpointManager, int]:
    """A manager over the 0.5B-shaped model and AdamW with its state; (manager, parameter count)."""
    cfg = qwen25_500m_pretrain_config()
    cfg.model.num_layers = layers
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    cfg.checkpoint.save = str(save)
    cfg.checkpoint.most_recent_k = 1
    model = cfg.model.provide()
    optimizer, scheduler = setup_optimizer(cfg.optimizer, cfg.scheduler, [model], train_iters=cfg.train.train_iters)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # materialises exp_avg and exp_avg_sq
    optimizer.zero_grad(set_to_none=True)
    precision = MixedPrecision("fp32", torch.device("cpu"))
    manager = CheckpointManager(cfg.checkpoint, state=GlobalState(cfg), callbacks=None)
    manager.attach(model=[model], optimizer=optimizer, scheduler=scheduler, precision=precision)
    return manager, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp", help="where the checkpoints are written (needs ~2x their size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()

    checkpoint_integrity.seal = timed("seal", checkpoint_integrity.seal)
    CheckpointManager._write = timed("save", CheckpointManager._write)
    CheckpointReader.resume = timed("load", CheckpointReader.resume)

    work = Path(tempfile.mkdtemp(prefix="checkpoint_io_", dir=args.dir))
    try:
        manager, params = build(args.layers, work / "ckpt")
        needed = estimate_checkpoint_bytes(manager.model[0], manager.optimizer, save_optim=True)
        free = shutil.disk_usage(work).free
        if free < 2 * needed:
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, the bench needs {2 * needed / 1e9:.1f} GB")
        checkpointing.print_rank_0 = checkpoint_loading.print_rank_0 = lambda message: None  # keep the table readable
        runs: dict[str, list[tuple[float, float]]] = {"save": [], "load (page cache)": [], "load (from disk)": []}
        for step in range(1, args.repeats + 1):
            state = manager.state.train_state  # as training would have left it
            state.step, state.consumed_train_samples = step, step * manager.state.cfg.train.global_batch_size
            directory = iteration_dir(work / "ckpt", step)
            manager.config.load = str(directory)
            save = measure(lambda step=step: manager._save(step))
            runs["save"].append((save["save"], save["save"] - save["seal"]))  # sealing is a pass of its own
            for label, cold in (("load (page cache)", False), ("load (from disk)", True)):
                with_checksums = load_seconds(manager, directory, cold=cold, verify=True)
                runs[label].append((with_checksums, load_seconds(manager, directory, cold=cold, verify=False)))
        size = sum(p.stat().st_size for p in iteration_dir(work / "ckpt", args.repeats).iterdir())
        manager.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"model: {params / 1e6:.0f}M parameters ({args.layers} layers), checkpoint {size / 1e9:.2f} GB on disk, "
          f"{args.repeats} runs (median), {os.cpu_count()} CPUs")
    print(f"{'':18} {'with checksums':>15} {'without':>9} {'checksums':>10} {'share':>6}")
    for what, samples in runs.items():
        total = statistics.median(with_checksums for with_checksums, _ in samples)
        bare = statistics.median(without for _, without in samples)
        print(f"{what:18} {total:14.2f}s {bare:8.2f}s {total - bare:9.2f}s {(total - bare) / bare:6.1%}")


def load_seconds(manager: CheckpointManager, directory: Path, *, cold: bool, verify: bool) -> float:
    """Seconds of one `manager.resume()` from `directory`, from the disk when `cold`, verifying when `verify`."""
    if cold:
        evict(directory)
    # Without its manifest a checkpoint loads as one written before checksums: the plain, unverified read.
    checkpoint_integrity.read_manifest = READ_MANIFEST if verify else (lambda directory, step: None)
    try:
        manager._resume_directory = False  # look for the checkpoint again: `load` moved
        return measure(manager.resume)["load"]
    finally:
        checkpoint_integrity.read_manifest = READ_MANIFEST

def measure(action: Callable[[], Any]) -> dict[str, float]:
    """Seconds spent in each timed phase while `action` runs."""
    PHASES.clear()
    action()
    return {name: sum(times) for name, times in PHASES.items()}


def evict(directory: Path) -> None:
    """Drop `directory`'s files from the page cache, so the next read comes from the disk."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

if __name__ == "__main__":
    main()
