"""Reading a checkpoint into a run: verified, checked against its schema, and all or nothing.

Two kinds of load, both collective (every rank calls them together):

- `CheckpointReader.load_weights(directory, model)`: model weights only, into a model that has not
  been transformed or wrapped yet (the base weights of a finetuning run, before LoRA and DDP/FSDP2);
- `CheckpointReader.resume(directory, ...)`: the model entries a run saves (all of them, or only the
  adapters of a LoRA run), the optimizer and scheduler, the counters, RNG streams and callback state.

Every file is verified against the manifest and every JSON entry against its schema on every rank,
and all ranks agree, before any tensor, counter or state is changed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from megatron.bridge.checkpoint import integrity, io
from megatron.bridge.training import checkpoint_state as saved
from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.mixed_precision import MixedPrecision
from megatron.bridge.training.optim import OptimizerParamScheduler
from megatron.bridge.training.state import GlobalState
from megatron.bridge.utils.logging import print_rank_0

__all__ = ["MODEL_PREFIX", "OPTIMIZER_PREFIX", "CheckpointReader", "KeepEntry", "capture_rng",
           "flatten_optimizer_state", "keep_all", "model_entries", "restore_rng"]

MODEL_PREFIX, OPTIMIZER_PREFIX = "model.", "optimizer."

KeepEntry = Callable[[str], bool]
"""Which model state-dict entries a run saves and resumes (all of them, or a LoRA run's adapters)."""


def keep_all(name: str) -> bool:
    """Every model entry: what a run without adapters saves."""
    return True


def model_entries(model: torch.nn.Module, keep: KeepEntry) -> dict[str, torch.Tensor]:
    """`model`'s state-dict entries that `keep` selects, under the checkpoint's `model.` prefix."""
    return {MODEL_PREFIX + key: value for key, value in get_model_state_dict(model).items() if keep(key)}


def flatten_optimizer_state(optim_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors under `optimizer.<param>.<entry>` keys."""
    flat = {}
    for param_name, entries in optim_state["state"].items():
        for entry, value in entries.items():
            assert isinstance(value, torch.Tensor), f"optimizer state {param_name}.{entry} is not a tensor"
            flat[f"{OPTIMIZER_PREFIX}{param_name}.{entry}"] = value
    return flat


@dataclass
class _LoadPlan:
    """What a load will change, all of it checked: the tensors to fill, the states to set."""

    common: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optim_state: dict[str, Any] | None
    tensors: dict[str, torch.Tensor]
    rank_state: saved.RankState | None
    has_optimizer: bool

    def describe(self, *, load_optim: bool) -> str:
        """What was loaded, in words, for the log line."""
        if self.rank_state is None:
            return "model weights"
        if self.optim_state is not None:
            return "model, optimizer and training state"
        if load_optim and not self.has_optimizer:
            return "model and training state (the checkpoint holds no optimizer state: the optimizer starts fresh)"
        return "model and training state"


class CheckpointReader:
    """Loads checkpoints for this rank, in step with every other rank (`group`: the checkpoint I/O group)."""

    def __init__(self, *, rank: int, world_size: int, group: dist.ProcessGroup | None, load_rng: bool = True,
                 load_optim: bool = True) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self.load_rng, self.load_optim = load_rng, load_optim

    def load_weights(self, directory: Path, model: torch.nn.Module) -> None:
        """Fill every weight of `model` from the checkpoint; nothing else of it is read into the run."""
        started = time.perf_counter()
        plan = self._agreed(lambda: self._plan(directory, model, keep_all, weights_only=True))
        io.load_tensors(plan.tensors, directory, process_group=self.group)
        set_model_state_dict(model, {k[len(MODEL_PREFIX):]: v for k, v in plan.model_state.items()})
        self._report(plan, directory, started)

    def resume(self, directory: Path, *, model: torch.nn.Module, keep: KeepEntry, optimizer: torch.optim.Optimizer,
               scheduler: OptimizerParamScheduler, precision: MixedPrecision, state: GlobalState,
               callbacks: CallbackManager | None) -> None:
        """Continue a run: its model entries (`keep`), optimizer, schedule, counters, RNG and callback state."""
        started = time.perf_counter()
        plan = self._agreed(lambda: self._plan(directory, model, keep, weights_only=False, optimizer=optimizer,
                                               scheduler=scheduler, scaler=precision.scaler))
        # Everything was checked on every rank: only now change the model, optimizer and run state.
        common = plan.common
        io.load_tensors(plan.tensors, directory, process_group=self.group)
        set_model_state_dict(model, {k[len(MODEL_PREFIX):]: v for k, v in plan.model_state.items()},
                             options=_partial(keep))
        if plan.optim_state is not None:
            set_optimizer_state_dict(model, optimizer, plan.optim_state)
            scheduler.load_state_dict(common["scheduler"])
            if precision.scaler is not None and "grad_scaler" in common:
                precision.scaler.load_state_dict(common["grad_scaler"])
        state.train_state = common["train_state"]
        _restore_rank_state(plan.rank_state, callbacks)
        self._report(plan, directory, started)

    def _report(self, plan: _LoadPlan, directory: Path, started: float) -> None:
        print_rank_0(f"> loaded {plan.describe(load_optim=self.load_optim)} from {directory} "
                     f"(iteration {plan.common['train_state'].step}, {time.perf_counter() - started:.2f} s)")

    def _plan(self, directory: Path, model: torch.nn.Module, keep: KeepEntry, *, weights_only: bool,
              optimizer: torch.optim.Optimizer | None = None, scheduler: OptimizerParamScheduler | None = None,
              scaler: Any = None) -> _LoadPlan:
        files = saved.CheckpointFiles(directory, self._verified_manifest(directory))
        if files.manifest is None:
            print_rank_0(f"> warning: {directory} has no {integrity.MANIFEST_FILE} (written before checkpoints had "
                         "checksums, or removed since): its files are loaded unverified")
        index = files.read_index()
        common = files.read_common(scheduler=scheduler, scaler=scaler, index=index)
        model_state = model_entries(model, keep)
        has_optimizer = "scheduler" in common
        load_optim = not weights_only and self.load_optim and has_optimizer
        optim_state = get_optimizer_state_dict(model, optimizer) if load_optim else None
        tensors = dict(model_state)
        if optim_state is not None:
            tensors.update(flatten_optimizer_state(optim_state))
        # A LoRA run's checkpoint holds its adapters: the model entries it does not keep are expected absent.
        io.check_compatible(directory, {k: v.shape for k, v in tensors.items()}, index, strict_prefix=MODEL_PREFIX)
        rank_state = None if weights_only else files.read_rank_state(self.rank, restore_rng=self.load_rng)
        return _LoadPlan(common=common, model_state=model_state, optim_state=optim_state, tensors=tensors,
                         rank_state=rank_state, has_optimizer=has_optimizer)

    def _agreed(self, action: Callable[[], Any]) -> Any:
        # A checkpoint refused on one rank must be refused on all, before any of them enters a collective.
        error: str | None = None
        try:
            result = action()
        except io.CheckpointError as err:
            error, result = str(err), None
        if self.world_size > 1:
            errors: list[str | None] = [None] * self.world_size
            dist.all_gather_object(errors, error, group=self.group)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise io.CheckpointError(error)
        return result

    def _verified_manifest(self, directory: Path) -> integrity.Manifest | None:
        # Every rank reads the small manifest and hashes its share of the files; all learn every verdict.
        manifest = integrity.read_manifest(directory, io.step_of(directory))
        if manifest is None:
            return None
        problems = integrity.verify(directory, manifest, integrity.share(manifest, self.rank, self.world_size))
        if self.world_size > 1:
            everyone: list[list[str] | None] = [None] * self.world_size
            dist.all_gather_object(everyone, problems, group=self.group)
            problems = [problem for rank_problems in everyone for problem in rank_problems or []]
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise io.CheckpointError(f"checkpoint {directory} is damaged, nothing was loaded: {shown}")
        return manifest


def _partial(keep: KeepEntry) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Entries a run does not keep (a LoRA run's frozen base) are left as they are, not demanded.
    return None if keep is keep_all else StateDictOptions(strict=False)


def _restore_rank_state(rank_state: saved.RankState | None, callbacks: CallbackManager | None) -> None:
    assert rank_state is not None, "a resume reads the rank's state"
    if rank_state.fallback:
        print_rank_0("> the checkpoint was saved with fewer ranks: RNG states not restored on ranks beyond them")
    if rank_state.rng is not None:
        restore_rng(rank_state.rng)
    if callbacks is not None and rank_state.callbacks is not None:
        unclaimed = callbacks.load_state_dict({"callbacks": rank_state.callbacks, "user_state": rank_state.user_state})
        if unclaimed:
            print_rank_0(f"> checkpoint holds state for callbacks not registered in this run: {unclaimed}")


def capture_rng() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and CUDA) random states, as JSON-ready data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": io.encode_value(torch.get_rng_state(), "torch_cpu", []),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = [io.encode_value(s, "torch_cuda", []) for s in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Restore the states `capture_rng` took (already checked and decoded against the schema)."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["torch_cuda"])
