"""Saving and resuming: what goes into a checkpoint, when it is written, and on_checkpoint_save.

The on-disk format lives in `checkpoint_io`; this module decides what state to capture and when.
A checkpoint holds the model, the optimizer and scheduler, `TrainState` (which carries the data
position: consumed samples), every rank's RNG states and the run's configuration.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from megatron.bridge.training import checkpoint_io as io
from megatron.bridge.training.callbacks import CallbackContext, CallbackManager, should_fire
from megatron.bridge.training.config import CheckpointConfig
from megatron.bridge.training.distributed import print_rank_0
from megatron.bridge.training.mixed_precision import MixedPrecision
from megatron.bridge.training.optim import OptimizerParamScheduler
from megatron.bridge.training.state import GlobalState, TrainState

FORMAT_VERSION = 1
_MODEL, _OPTIM = "model.", "optimizer."


class CheckpointManager:
    """Loads the checkpoint a run starts from and saves new ones; a no-op when nothing is configured."""

    def __init__(self, config: CheckpointConfig, *, state: GlobalState, callbacks: CallbackManager | None,
                 model: list[torch.nn.Module], optimizer: torch.optim.Optimizer,
                 scheduler: OptimizerParamScheduler, precision: MixedPrecision) -> None:
        self.config, self.state, self.callbacks = config, state, callbacks
        self.model, self.optimizer, self.scheduler, self.precision = model, optimizer, scheduler, precision
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._last_saved_step: int | None = None
        self._pending: tuple[int, float, Future] | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Checkpoint I/O gets its own gloo group: it may run in a background thread beside training's collectives.
        self._group = dist.new_group(backend="gloo") if (config.save and dist.is_initialized()) else None

    # ------------------------------------------------------------------------------------------- saving

    def is_due(self, step: int) -> bool:
        """True when `step` is a multiple of `save_interval` and saving is configured."""
        interval = self.config.save_interval
        return bool(self.config.save and interval and step % interval == 0)

    def maybe_save(self, step: int) -> None:
        """Save when `is_due(step)`; also reports a finished background save."""
        self._drain(block=False)
        if self.is_due(step):
            self._save(step)

    def save(self, step: int) -> None:
        """Save now unless this step is already saved (a checkpoint a callback asked for)."""
        if not self.config.save:
            print_rank_0(f"> a checkpoint was requested at iteration {step} but checkpoint.save is not set")
        elif self._last_saved_step != step:
            self._save(step)

    def save_final(self, step: int) -> None:
        """After the loop: save unless this step was just saved, then wait for any background save."""
        if self.config.save and step != 0 and self._last_saved_step != step:
            self._save(step)
        self.wait()

    def wait(self) -> None:
        """Block until a background save has finished, then report it."""
        self._drain(block=True)
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def close(self) -> None:
        """Let a background write finish without reporting it (the run is ending on an error)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._pending = None

    def _drain(self, *, block: bool) -> None:
        # Report a finished background save from the training thread, where callbacks run.
        if self._pending is not None and (block or self._pending[2].done()):
            step, started, future = self._pending
            self._pending = None
            future.result()  # re-raises a failed write
            self._on_saved(step, started)

    def _save(self, step: int) -> None:
        self._drain(block=True)
        started = time.perf_counter()
        tensors, common = self._capture()
        rank_state = self._capture_rank_state()
        self._last_saved_step = step
        if not self.config.async_save:
            self._write(step, tensors, common, rank_state)
            self._on_saved(step, started)
            return
        # Training goes on mutating parameters in place, so the background write needs its own copy.
        staged = {key: value.detach().to("cpu", copy=True) for key, value in tensors.items()}
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending = (step, started, self._executor.submit(self._write, step, staged, common, rank_state))

    def _capture(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        chunk = self.model[0]
        tensors = {_MODEL + key: value for key, value in get_model_state_dict(chunk).items()}
        common: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "train_state": self.state.train_state.state_dict(),
        }
        if self.config.save_optim:
            tensors.update(_flatten_optimizer_state(get_optimizer_state_dict(chunk, self.optimizer)))
            common["scheduler"] = self.scheduler.state_dict()
            if self.precision.scaler is not None:
                common["grad_scaler"] = self.precision.scaler.state_dict()
        return tensors, common

    def _capture_rank_state(self) -> dict[str, Any]:
        # Per rank: RNG streams and callback state may differ between ranks.
        state: dict[str, Any] = {"rng": _capture_rng() if self.config.save_rng else None}
        if self.callbacks is not None:
            unsupported: list[str] = []
            callback_state = self.callbacks.state_dict()
            state["callbacks"] = io.encode_value(callback_state["callbacks"], "", unsupported)
            if unsupported:
                raise ValueError(f"callback state cannot be saved safely: {', '.join(unsupported)} "
                                 "(state_dict() may hold numbers, strings, lists, dicts, tuples and tensors)")
            state["user_state"] = io.encode_value(callback_state["user_state"], "user_state", unsupported)
            if unsupported and self.rank == 0:
                print(f"> warning: not saved in the checkpoint (not JSON, tensors or tuples): {', '.join(unsupported)}",
                      flush=True)
        return state

    def _write(self, step: int, tensors: dict[str, torch.Tensor], common: dict[str, Any],
               rank_state: dict[str, Any]) -> None:
        root = Path(self.config.save)
        if self.rank == 0:
            io.prepare_temporary_dir(root, step)
        self._barrier()
        tmp = io.temporary_dir(root, step)
        io.save_tensors(tensors, tmp, process_group=self._group)
        io.write_json(tmp / _rank_file(self.rank), rank_state)
        if self.rank == 0:
            io.write_json(tmp / io.COMMON_FILE, common)
            config_yaml = yaml.safe_dump(self.state.cfg.to_dict(), sort_keys=False)
            io.write_file_durably(tmp / io.CONFIG_FILE, config_yaml.encode())
        self._barrier()
        if self.rank == 0:
            io.commit(root, step)
            if self.config.most_recent_k > 0:
                io.delete_old(root, self.config.most_recent_k)
        self._barrier()

    def _barrier(self) -> None:
        if self._group is not None and dist.get_world_size() > 1:
            dist.barrier(group=self._group)

    def _on_saved(self, step: int, started: float) -> None:
        print_rank_0(f"> saved checkpoint at iteration {step} to {self.config.save} "
                     f"({time.perf_counter() - started:.2f} s)")
        if should_fire(self.callbacks, "on_checkpoint_save"):
            self.callbacks.fire("on_checkpoint_save", CallbackContext(
                state=self.state, model=self.model, user_state=self.callbacks.user_state, optimizer=self.optimizer,
            ))

    # ------------------------------------------------------------------------------------------ loading

    def load(self) -> None:
        """Resume from `load` (or `save`), or take weights from `pretrained_checkpoint`; else start fresh."""
        cfg = self.config
        source = cfg.load or cfg.save
        directory = io.find_latest(source) if source else None
        if directory is not None:
            self._load(directory, weights_only=cfg.finetune)
        elif cfg.pretrained_checkpoint:
            pretrained = io.find_latest(cfg.pretrained_checkpoint)
            if pretrained is None:
                raise io.CheckpointError(
                    f"checkpoint.pretrained_checkpoint={cfg.pretrained_checkpoint!r} holds no checkpoint "
                    f"(expected {io.TRACKER_FILE} and iter_* directories, or an iter_* directory)"
                )
            self._load(pretrained, weights_only=True)
        elif cfg.load:
            print_rank_0(f"> no checkpoint found in checkpoint.load={cfg.load!r}; starting from scratch")

    def _restore_rank_state(self, directory: Path) -> None:
        path = directory / _rank_file(self.rank)
        if not path.exists():  # saved with fewer ranks: RNG streams cannot be matched, callbacks take rank 0's
            path = directory / _rank_file(0)
            if not path.exists():
                return
            print_rank_0(f"> {directory} was saved with fewer ranks: RNG states not restored on ranks beyond them")
        rank_state = io.read_json(path)
        if self.config.load_rng and rank_state.get("rng") and path.name == _rank_file(self.rank):
            _restore_rng(path, rank_state["rng"])
        if self.callbacks is not None and "callbacks" in rank_state:
            unclaimed = self.callbacks.load_state_dict({
                "callbacks": io.decode_value(rank_state["callbacks"]),
                "user_state": io.decode_value(rank_state.get("user_state", {})),
            })
            if unclaimed:
                print_rank_0(f"> checkpoint holds state for callbacks not registered in this run: {unclaimed}")

    def _load(self, directory: Path, *, weights_only: bool) -> None:
        started = time.perf_counter()
        common = io.read_json(directory / io.COMMON_FILE)
        if not isinstance(common, dict) or common.get("format_version") != FORMAT_VERSION:
            raise io.CheckpointError(f"{directory / io.COMMON_FILE}: unknown checkpoint format (expected "
                                     f"format_version {FORMAT_VERSION})")
        train_state = _parse_train_state(directory, common)
        index = io.read_index(directory)
        chunk = self.model[0]
        model_state = {_MODEL + k: v for k, v in get_model_state_dict(chunk).items()}
        load_optim = not weights_only and self.config.load_optim and "scheduler" in common
        optim_state = get_optimizer_state_dict(chunk, self.optimizer) if load_optim else None
        tensors = dict(model_state)
        if optim_state is not None:
            tensors.update(_flatten_optimizer_state(optim_state))
        io.check_compatible(directory, {k: v.shape for k, v in tensors.items()}, index, strict_prefix=_MODEL)
        io.load_tensors(tensors, directory, process_group=self._group)

        set_model_state_dict(chunk, {k[len(_MODEL):]: v for k, v in model_state.items()})
        if optim_state is not None:
            set_optimizer_state_dict(chunk, self.optimizer, optim_state)
            try:
                self.scheduler.load_state_dict(common["scheduler"])
            except (KeyError, TypeError, ValueError) as err:
                raise io.CheckpointError(f"{directory / io.COMMON_FILE}: invalid scheduler state ({err})") from err
            if self.precision.scaler is not None and "grad_scaler" in common:
                self.precision.scaler.load_state_dict(common["grad_scaler"])
        if not weights_only:
            self.state.train_state = train_state
            self._last_saved_step = self.state.train_state.step
            self._restore_rank_state(directory)
        what = "model weights" if weights_only else "model, optimizer and training state" if load_optim else (
            "model and training state")
        print_rank_0(f"> loaded {what} from {directory} (iteration {train_state.step}, "
                     f"{time.perf_counter() - started:.2f} s)")


def _parse_train_state(directory: Path, common: dict[str, Any]) -> TrainState:
    train_state = TrainState()
    try:
        train_state.load_state_dict(common["train_state"])
    except (KeyError, TypeError, ValueError) as err:
        raise io.CheckpointError(f"{directory / io.COMMON_FILE}: invalid train_state ({err!r})") from err
    return train_state


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def _flatten_optimizer_state(optim_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    flat = {}
    for param_name, entries in optim_state["state"].items():
        for entry, value in entries.items():
            assert isinstance(value, torch.Tensor), f"optimizer state {param_name}.{entry} is not a tensor"
            flat[f"{_OPTIM}{param_name}.{entry}"] = value
    return flat


def _capture_rng() -> dict[str, Any]:
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


def _restore_rng(path: Path, rng: dict[str, Any]) -> None:
    try:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(io.decode_value(rng["torch_cpu"]))
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([io.decode_value(s) for s in rng["torch_cuda"]])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise io.CheckpointError(f"{path}: invalid RNG state ({err})") from err
