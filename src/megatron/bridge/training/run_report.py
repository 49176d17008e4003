"""What a run tells its user (rank 0 prints): start-up phases, layout and memory, settings, and a summary.

Settings are compared with a baseline at start, as Megatron prints its arguments, but only those that
differ. `pretrain` is given a finished config and cannot know which recipe made it, so the baseline of
each section is the defaults of its own config class (for the model: the provider class the recipe
chose, e.g. `Qwen25ModelProvider500M`, whose defaults are the published shape); a section whose class
differs from the container's default (a LoRA `peft`, finetuning data) is named first. On resume the
run's settings are also compared with the checkpoint's `run_config.yaml`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron.bridge.checkpoint import io
from megatron.bridge.checkpoint.lock import format_bytes
from megatron.bridge.training.memory import MemoryEstimate, device_memory_bytes
from megatron.bridge.utils.config_fields import to_plain
from megatron.bridge.utils.logging import is_rank_zero, print_rank_0
from megatron.bridge.utils.parallel import ParallelLayout
from megatron.bridge.utils.safe_yaml import YAMLInputError, load_yaml_file

if TYPE_CHECKING:
    from megatron.bridge.training.config import ConfigContainer
    from megatron.bridge.training.metrics import RunTotals

__all__ = [
    "NO_DEFAULT",
    "describe_run",
    "differences_from_defaults",
    "phase",
    "print_config_differences",
    "print_memory_estimate",
    "print_resume_differences",
    "print_summary",
]

NO_DEFAULT = object()
"""The default `differences_from_defaults` reports for a field that has none."""
_MISSING = object()


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """Say that `what` starts, and when it is done, how long it took."""
    print_rank_0(f"> {what} ...")
    started = time.perf_counter()
    yield
    print_rank_0(f"> {what}: done in {time.perf_counter() - started:.2f} s")


def _row(name: str, value: str) -> str:
    return f"    {(name + ' ').ljust(40, '.')} {value}"


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# ------------------------------------------------------------------------------------- settings


def _flatten(plain: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(plain, dict) and plain:
        flat: dict[str, Any] = {}
        for key, value in plain.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: plain}


def _class_defaults(value: Any) -> dict[str, Any]:
    """The plain defaults of `value`'s config class, taken from the dataclass fields if it cannot be built bare."""
    try:
        return to_plain(type(value)())
    except (TypeError, ValueError):
        defaults = {}
        for spec in dataclasses.fields(value):
            if spec.default is not dataclasses.MISSING:
                defaults[spec.name] = to_plain(spec.default)
            elif spec.default_factory is not dataclasses.MISSING:
                defaults[spec.name] = to_plain(spec.default_factory())
        return defaults


def _container_default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return NO_DEFAULT


def differences_from_defaults(cfg: ConfigContainer) -> list[tuple[str, Any, Any]]:
    """(dotted name, value, default) for every setting that differs from its section class's default.

    The default is `NO_DEFAULT` for a field that has none.
    """
    found = []
    for spec in dataclasses.fields(cfg):
        value, default = getattr(cfg, spec.name), _container_default(spec)
        if not dataclasses.is_dataclass(value):
            if default is NO_DEFAULT or value != default:
                found.append((spec.name, value, default))
            continue
        if default is not NO_DEFAULT and type(default) is not type(value):
            found.append((spec.name, type(value).__name__, type(default).__name__ if default is not None else None))
        now, base = _flatten(to_plain(value), spec.name), _flatten(_class_defaults(value), spec.name)
        found += [(key, now[key], base.get(key, NO_DEFAULT)) for key in now
                  if not key.endswith("._target_") and now[key] != base.get(key, NO_DEFAULT)]
    return found


def print_config_differences(cfg: ConfigContainer) -> None:
    """Print the settings that differ from their defaults (rank 0), once at start."""
    if not is_rank_zero():
        return
    found = differences_from_defaults(cfg)
    lines = [f"> settings that differ from their defaults (the model's: {type(cfg.model).__name__}'s; "
             f"the other sections': their config classes'), {len(found)}:"]
    lines += [_row(name, f"{_show(value)}  ({'no default' if default is NO_DEFAULT else f'default: {_show(default)}'})")
              for name, value, default in found]
    print("\n".join(lines), flush=True)


def print_resume_differences(cfg: ConfigContainer, checkpoint: Path) -> None:
    """Print (rank 0) the settings that differ from those the checkpoint `checkpoint` was saved with."""
    if not is_rank_zero():
        return
    path = checkpoint / io.CONFIG_FILE
    try:
        saved = load_yaml_file(path)
    except YAMLInputError as err:
        print(f"> warning: cannot compare the settings with the checkpoint's: {err}", flush=True)
        return
    now, then = _flatten(cfg.to_dict()), _flatten(saved if isinstance(saved, dict) else {})
    changed = [key for key in [*now, *(key for key in then if key not in now)]
               if now.get(key, _MISSING) != then.get(key, _MISSING)]
    if not changed:
        print(f"> the settings are those of {path}", flush=True)
        return
    lines = [f"> settings that differ from {path}, {len(changed)}:"]
    lines += [_row(key, f"{_show(now.get(key, '(not set)'))}  (checkpoint: {_show(then.get(key, '(not set)'))})")
              for key in changed]
    print("\n".join(lines), flush=True)


# -------------------------------------------------------------------------------- layout, memory


def describe_run(cfg: ConfigContainer, model: torch.nn.Module, layout: ParallelLayout, *, sharded: bool,
                 num_microbatches: int) -> str:
    """The model, the parallel layout and the threads, in three lines."""
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    wrapping = "FSDP2" if sharded else "DDP" if layout.data_parallel_size > 1 else "single process"
    return (
        f"> model: {params / 1e6:.2f}M parameters, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"vocab {cfg.model.padded_vocab_size}, seq {cfg.model.seq_length}\n"
        f"> training on {layout.world_size} x {layout.device.type} ({wrapping}), precision {cfg.compute_dtype}, "
        f"global batch {cfg.train.global_batch_size} = {num_microbatches} micro-batches of "
        f"{cfg.train.micro_batch_size} x {layout.data_parallel_size} data-parallel ranks\n"
        f"> parallel layout: world {layout.world_size} = data-parallel {layout.data_parallel_size} x "
        f"tensor-parallel {layout.tensor_parallel_size}; rank {layout.rank} on {layout.device}, "
        f"CPU threads per rank: {torch.get_num_threads()}"
    )


def print_memory_estimate(estimate: MemoryEstimate, cfg: ConfigContainer, layout: ParallelLayout, *,
                          ranks_per_machine: int) -> None:
    """Print the per-rank estimate (rank 0), and a warning when it exceeds what the device has."""
    if not is_rank_zero():
        return
    mbs, seq = cfg.train.micro_batch_size, cfg.model.seq_length
    line = (f"> memory per rank (estimate): weights {format_bytes(estimate.weights)}, gradients "
            f"{format_bytes(estimate.gradients)}, optimizer state {format_bytes(estimate.optimizer)}, activations "
            f"{format_bytes(estimate.activations)} (micro-batch {mbs} x {seq} tokens); "
            f"total {format_bytes(estimate.total)}")
    has = device_memory_bytes(layout.device)
    # CPU ranks on one machine share its RAM; every GPU rank has its own device.
    sharing = ranks_per_machine if layout.device.type == "cpu" else 1
    where = "GPU memory" if layout.device.type == "cuda" else "RAM"
    if has is not None:
        line += f" of {format_bytes(has)} {where}" + (f" shared by {sharing} ranks" if sharing > 1 else "")
    print(line, flush=True)
    if has is not None and estimate.total * sharing > has:
        print(f"> warning: this run needs about {format_bytes(estimate.total * sharing)}, more than the "
              f"{format_bytes(has)} of {where} it has: lower train.micro_batch_size or model.seq_length, set "
              "model.recompute_granularity='full', or shard with ddp.use_distributed_optimizer=True "
              "on more ranks", flush=True)


# -------------------------------------------------------------------------------------- summary


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def print_summary(cfg: ConfigContainer, totals: RunTotals, *, wall_seconds: float, final_step: int,
                  results: dict[str, dict[str, torch.Tensor] | None], completed: bool) -> None:
    """Print what the run did (rank 0): times, steps, rates, final losses, where its checkpoint and logs are."""
    if not is_rank_zero():
        return
    rows = [_row("wall time", f"{_clock(wall_seconds)} (training loop {_clock(totals.train_seconds)})"),
            _row("steps", f"{totals.steps} this run, at iteration {final_step} of {cfg.train.train_iters}"
                 + ("" if completed else " (stopped early)"))]
    if totals.steps and totals.train_seconds > 0:
        samples = totals.steps * cfg.train.global_batch_size
        rows += [_row("samples/s", f"{samples / totals.train_seconds:.2f}"),
                 _row("tokens/s", f"{totals.tokens / totals.train_seconds:.0f}")]
    for name, value in totals.last_losses.items():
        rows.append(_row(f"train {name}", f"{value:.4f} (the last log line's)"))
    for mode, label in (("eval", "validation"), ("test", "test")):
        for name, value in (results.get(mode) or {}).items():
            rows.append(_row(f"{label} {name}", f"{float(value):.4f}"))
    if cfg.checkpoint.save:
        latest = io.find_latest(Path(cfg.checkpoint.save))
        rows.append(_row("checkpoint", str(latest) if latest is not None else f"none in {cfg.checkpoint.save}"))
    if cfg.logger.tensorboard_dir:
        rows.append(_row("TensorBoard logs", cfg.logger.tensorboard_dir))
    if cfg.logger.wandb_project:
        rows.append(_row("W&B project", cfg.logger.wandb_project))
    print("\n".join(["> training summary:", *rows]), flush=True)
