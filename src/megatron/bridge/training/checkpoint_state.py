"""Reading a checkpoint's files for a resume: each one verified, bounded, and checked against its schema.

`CheckpointFiles` opens only files the manifest lists (when there is one), never reads more than the
manifest records, and returns fully checked and converted values, so that the caller can change the
model, optimizer and run state only once all of them are known to be good.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from megatron.bridge.checkpoint import integrity, io, schema
from megatron.bridge.checkpoint.integrity import CheckpointError
from megatron.bridge.checkpoint.train_state import TrainState
from megatron.bridge.training.optim import OptimizerParamScheduler, schedule_state_template

__all__ = ["CheckpointFiles", "FIXED_OVERHEAD", "PER_TENSOR_OVERHEAD", "RankState", "rank_file"]

PER_TENSOR_OVERHEAD = 2048
"""Bytes a checkpoint adds per tensor: `torch.save`'s framing in the `.distcp` file and its index entry."""
FIXED_OVERHEAD = 256 << 10
"""Bytes of the JSON and YAML files and the manifest of a checkpoint (an upper bound for a few ranks)."""
_UINT32 = schema.integer(0, 2**32 - 1)


def rank_file(rank: int) -> str:
    """The name of the file holding rank `rank`'s own state (RNG states, callback state)."""
    return f"rank_{rank:05d}.json"


@dataclass
class RankState:
    """One rank's saved state, checked and decoded; `fallback` when it is rank 0's (saved with fewer ranks)."""

    rng: dict[str, Any] | None
    callbacks: dict[str, Any] | None
    user_state: Any
    fallback: bool


def _train_state_schema() -> schema.Check:
    kinds = {"int": schema.integer(), "float": schema.number(minimum=0.0), "bool": schema.boolean()}
    fields = {field.name: kinds.get(str(field.type), schema.encoded()) for field in dataclasses.fields(TrainState)}
    return schema.record(fields, optional=set(fields) - {"step", "consumed_train_samples"})


_RNG = schema.record({
    "python": schema.sequence(schema.integer(), schema.array(_UINT32, length=625),
                              schema.nullable(schema.number())),
    "numpy": schema.sequence(schema.string(choices=["MT19937"]), schema.array(_UINT32, length=624),
                             schema.integer(0, 624), schema.integer(0, 1), schema.number()),
    "torch_cpu": schema.tensor(dtype="uint8", numel=torch.get_rng_state().numel()),
    "torch_cuda": schema.array(schema.tensor(dtype="uint8")),
}, optional={"torch_cuda"})

_RANK_STATE = schema.record({
    "rng": schema.nullable(_RNG),
    "callbacks": schema.mapping(schema.string(), schema.encoded()),
    "user_state": schema.encoded(),
}, optional={"callbacks", "user_state"})


class CheckpointFiles:
    """The files of one checkpoint directory, read through its manifest (None: an unverified old one)."""

    def __init__(self, directory: Path, manifest: integrity.Manifest | None) -> None:
        self.directory, self.manifest = directory, manifest

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds `name`; a file on disk that its manifest does not list is refused."""
        on_disk = os.path.lexists(self.directory / name)
        if self.manifest is None or name in self.manifest.files:
            return on_disk or self.manifest is not None
        if on_disk:
            raise CheckpointError(f"{self.directory / name} is in the checkpoint, but {integrity.MANIFEST_FILE} "
                                  "does not list it: it was added after the checkpoint was written")
        return False

    def _require(self, name: str) -> Path:
        path = self.directory / name
        if not self.has(name):
            raise CheckpointError(f"{path} is missing")
        return path

    def read_json(self, name: str) -> Any:
        """A JSON file, read no further than its recorded size."""
        path = self._require(name)
        limit = self.manifest.files[name].size if self.manifest is not None else io.JSON_LIMIT
        return io.read_json(path, limit=limit)

    def read_index(self) -> Metadata:
        """The tensor index; every data file it names must be one the manifest lists."""
        self._require(".metadata")
        index = io.read_index(self.directory)
        if self.manifest is not None:
            for key, info in index.storage_data.items():
                if info.relative_path not in self.manifest.files:
                    raise CheckpointError(f"{self.directory / '.metadata'}, entry {getattr(key, 'fqn', key)!r}: "
                                          f"{info.relative_path!r} is not listed in {integrity.MANIFEST_FILE}")
        return index

    def read_common(self, *, scheduler: OptimizerParamScheduler | None, scaler: Any, index: Metadata) -> dict[str, Any]:
        """`common.json`, checked: `train_state` as a `TrainState`, `scheduler` and `grad_scaler` as dicts.

        The optimizer state is all or nothing: a `scheduler` entry exactly when `index` holds
        optimizer tensors. The schedule is tried on a scratch copy of `scheduler`, so a bad one is
        refused before the real scheduler is touched; with no `scheduler` (a load of weights only,
        before the optimizer exists) its entries are checked for their types alone.
        """
        path = self.directory / io.COMMON_FILE
        scaler_schema = (schema.like(scaler.state_dict(), required=scaler.state_dict()) if scaler is not None
                         else schema.mapping(schema.string(), schema.number()))
        check = schema.record({
            "format_version": schema.integer(io.FORMAT_VERSION, io.FORMAT_VERSION),
            "train_state": _train_state_schema(),
            "scheduler": schema.like(scheduler.state_dict() if scheduler is not None else schedule_state_template(),
                                     required=["num_steps"]),
            "grad_scaler": scaler_schema,
        }, optional={"scheduler", "grad_scaler"})
        common = schema.validate(check, self.read_json(io.COMMON_FILE), file=path, error=CheckpointError)
        train_state = TrainState(**common["train_state"])
        self._check_counters(path, train_state)
        has_optimizer = any(key.startswith("optimizer.") for key in index.state_dict_metadata)
        if has_optimizer != ("scheduler" in common):
            held = "holds optimizer state but" if has_optimizer else "holds no optimizer state but"
            raise CheckpointError(f"{path}: the checkpoint {held} common.json "
                                  f"{'has no' if has_optimizer else 'has a'} 'scheduler' entry: it is incomplete")
        if "scheduler" in common and scheduler is not None:
            _try_schedule(path, scheduler, common["scheduler"])
        return {**common, "train_state": train_state}

    def _check_counters(self, path: Path, train_state: TrainState) -> None:
        if io.ITER_DIR.match(self.directory.name) and train_state.step != io.step_of(self.directory):
            raise CheckpointError(f"{path}: train_state.step={train_state.step}, but the checkpoint is that of "
                                  f"iteration {io.step_of(self.directory)}")
        if train_state.consumed_train_samples < train_state.step:
            raise CheckpointError(f"{path}: train_state.consumed_train_samples={train_state.consumed_train_samples} "
                                  f"is less than train_state.step={train_state.step} (every step consumes samples)")
        if train_state.skipped_train_samples > train_state.consumed_train_samples:
            raise CheckpointError(f"{path}: train_state.skipped_train_samples={train_state.skipped_train_samples} "
                                  f"exceeds train_state.consumed_train_samples={train_state.consumed_train_samples}")

    def read_rank_state(self, rank: int, *, restore_rng: bool) -> RankState:
        """This rank's state file (rank 0's when the checkpoint was saved with fewer ranks), checked and decoded."""
        name, fallback = rank_file(rank), False
        if not self.has(name):
            name, fallback = rank_file(0), True
            if not self.has(name):  # a checkpoint made by the Hugging Face import holds no rank state
                return RankState(rng=None, callbacks=None, user_state={}, fallback=False)
        state = schema.validate(_RANK_STATE, self.read_json(name), file=self.directory / name, error=CheckpointError)
        return RankState(rng=state["rng"] if restore_rng and not fallback else None,
                         callbacks=state.get("callbacks"), user_state=state.get("user_state", {}), fallback=fallback)


def _try_schedule(path: Path, scheduler: OptimizerParamScheduler, state: dict[str, Any]) -> None:
    # A shallow copy with an optimizer of its own (no groups): loading into it changes nothing real.
    # It checks the saved schedule even where this run overrides it: a valid checkpoint holds a valid one.
    scratch = copy.copy(scheduler)
    scratch.optimizer = SimpleNamespace(param_groups=[])
    scratch.override_opt_param_scheduler = False
    try:
        scratch.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: scheduler: {err}") from err
