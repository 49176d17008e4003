"""Saving and resuming: what goes into a checkpoint, when it is written, and on_checkpoint_save.

The on-disk format lives in `checkpoint_io`; this module decides what state to capture and when.
A checkpoint holds the model, the optimizer and scheduler, `TrainState` (which carries the data
position: consumed samples), every rank's RNG states and the run's configuration.

Before the first step the save folder is claimed (created, locked for this run, checked for room:
`checkpoint_lock`). Loading verifies every file against the manifest and checks every entry of every
JSON file against its schema before anything of the model, optimizer or run state is changed.
"""

from __future__ import annotations

import errno
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from megatron.bridge.checkpoint import integrity, io
from megatron.bridge.checkpoint.lock import (
    CheckpointSaveError,
    SaveFolderInUseError,
    SaveFolderLock,
    claim_save_folder,
    format_bytes,
)
from megatron.bridge.training import checkpoint_state as saved
from megatron.bridge.training.callbacks import CallbackContext, CallbackManager, should_fire
from megatron.bridge.training.config import CheckpointConfig
from megatron.bridge.training.mixed_precision import MixedPrecision
from megatron.bridge.training.optim import OptimizerParamScheduler
from megatron.bridge.training.state import GlobalState
from megatron.bridge.utils.errors import ConfigError, short_repr
from megatron.bridge.utils.logging import print_rank_0
from megatron.bridge.utils.parallel import current_layout

__all__ = ["CheckpointManager", "estimate_checkpoint_bytes", "missing_load_path", "require_load_path"]

_MODEL, _OPTIM = "model.", "optimizer."


class CheckpointManager:
    """Loads the checkpoint a run starts from and saves new ones; a no-op when nothing is configured.

    With `checkpoint.save` set, constructing it claims the save folder for this run (raising
    `CheckpointSaveError` naming the reason); `close` gives the folder back.
    """

    def __init__(self, config: CheckpointConfig, *, state: GlobalState, callbacks: CallbackManager | None,
                 model: list[torch.nn.Module], optimizer: torch.optim.Optimizer,
                 scheduler: OptimizerParamScheduler, precision: MixedPrecision) -> None:
        self.config, self.state, self.callbacks = config, state, callbacks
        self.model, self.optimizer, self.scheduler, self.precision = model, optimizer, scheduler, precision
        layout = current_layout()
        self.rank, self.world_size = layout.rank, layout.world_size
        self._last_saved_step: int | None = None
        self._pending: tuple[int, float, Future] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock: SaveFolderLock | None = None
        # Checkpoint I/O gets its own gloo group: it may run in a background thread beside training's collectives.
        uses_checkpoints = config.save or config.load or config.pretrained_checkpoint
        self._group = dist.new_group(backend="gloo") if (uses_checkpoints and self.world_size > 1) else None
        self.needed_bytes = estimate_checkpoint_bytes(model[0], optimizer, save_optim=config.save_optim) if (
            config.save) else 0
        if config.save:
            self._claim_save_folder()

    def _claim_save_folder(self) -> None:
        # Rank 0 claims the folder; every rank learns the outcome before anything is loaded or deleted.
        outcome: tuple[str, str] | None = None
        if self.rank == 0:
            try:
                # A run that does not train never saves: it needs the lock, not the room.
                trains = self.state.cfg is None or not self.state.cfg.validation.skip_train
                self._lock = claim_save_folder(Path(self.config.save), needed_bytes=self.needed_bytes if trains else 0)
            except CheckpointSaveError as err:
                outcome = (type(err).__name__, str(err))
        if self.world_size > 1:
            box = [outcome]
            dist.broadcast_object_list(box, src=0, group=self._group)
            outcome = box[0]
        if outcome is not None:
            kind, message = outcome
            raise (SaveFolderInUseError if kind == SaveFolderInUseError.__name__ else CheckpointSaveError)(message)

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
        """Let a background write finish without reporting it, then release the save folder."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._pending = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _drain(self, *, block: bool) -> None:
        # Report a finished background save from the training thread, where callbacks run.
        if self._pending is not None and (block or self._pending[2].done()):
            step, started, future = self._pending
            self._pending = None
            future.result()  # re-raises a failed write (a CheckpointSaveError)
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
            "format_version": io.FORMAT_VERSION,
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
        tmp = io.temporary_dir(root, step)
        assert self.rank != 0 or (self._lock is not None and self._lock.held), "saving without the folder's lock"
        try:
            # Each phase ends with every rank learning whether any rank failed, in place of a barrier.
            self._phase(lambda: io.prepare_temporary_dir(root, step), rank_0_only=True)
            self._phase(lambda: io.save_tensors(tensors, tmp, process_group=self._group))
            self._phase(lambda: self._write_state_files(tmp, common, rank_state))
            self._phase(lambda: self._commit(root, step), rank_0_only=True)
        except _WriteFailed as failure:
            free = _free_bytes(root)  # before the partial checkpoint is removed: what the save ran into
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(self._write_error(root, step, failure.reasons, free)) from None

    def _write_state_files(self, tmp: Path, common: dict[str, Any], rank_state: dict[str, Any]) -> None:
        io.write_json(tmp / saved.rank_file(self.rank), rank_state)
        if self.rank == 0:
            io.write_json(tmp / io.COMMON_FILE, common)
            config_yaml = yaml.safe_dump(self.state.cfg.to_dict(), sort_keys=False)
            io.write_file_durably(tmp / io.CONFIG_FILE, config_yaml.encode())

    def _commit(self, root: Path, step: int) -> None:
        io.commit(root, step)
        if self.config.most_recent_k > 0:
            io.delete_old(root, self.config.most_recent_k)

    def _phase(self, action: Callable[[], Any], *, rank_0_only: bool = False) -> None:
        reason = None
        if self.rank == 0 or not rank_0_only:
            try:
                action()
            except (OSError, CheckpointException, io.CheckpointError) as err:
                reason = _describe_failure(err)
        reasons = [reason]
        if self.world_size > 1:
            reasons = [None] * self.world_size
            dist.all_gather_object(reasons, reason, group=self._group)
        failed = [f"rank {rank}: {text}" if self.world_size > 1 else text
                  for rank, text in enumerate(reasons) if text is not None]
        if failed:
            raise _WriteFailed(failed)

    def _write_error(self, root: Path, step: int, reasons: list[str], free: int | None) -> str:
        # A full disk often shows only as torch's "unexpected pos" from a short write: say what it is.
        full = any(errno.errorcode[errno.ENOSPC] in reason for reason in reasons) or (
            free is not None and free < self.needed_bytes)
        cause = "; ".join(reasons)
        if full:
            cause = (f"no space left on the device (one checkpoint needs about {format_bytes(self.needed_bytes)}, "
                     f"{'an unknown amount' if free is None else format_bytes(free)} was free when it failed)")
        return (f"cannot save the checkpoint of iteration {step} into checkpoint.save={str(root)!r}: {cause}; "
                "nothing of it was kept, and the earlier checkpoints and the tracker are unchanged")

    def _on_saved(self, step: int, started: float) -> None:
        print_rank_0(f"> saved checkpoint at iteration {step} to {self.config.save} "
                     f"({time.perf_counter() - started:.2f} s)")
        if should_fire(self.callbacks, "on_checkpoint_save"):
            self.callbacks.fire("on_checkpoint_save", CallbackContext(
                state=self.state, model=self.model, user_state=self.callbacks.user_state, optimizer=self.optimizer,
            ))

    # ------------------------------------------------------------------------------------------ loading

    def load(self) -> None:
        """Resume from `load` (or `save`), or take weights from `pretrained_checkpoint`; else start fresh.

        A `load` path that does not exist (`missing_load_path`) is warned about loudly on rank 0.
        """
        cfg = self.config
        missing = missing_load_path(cfg)
        if missing is not None:
            start = (f"the weights come from checkpoint.pretrained_checkpoint={cfg.pretrained_checkpoint!r}"
                     if cfg.pretrained_checkpoint else "training starts from random weights")
            print_rank_0(f"> WARNING: checkpoint.load={missing!r} does not exist (a typo?): nothing is resumed and "
                         f"{start}; set checkpoint.load to an existing checkpoint folder, or to null")
        source = cfg.load or cfg.save
        directory = _latest(source) if source else None
        if directory is not None:
            self._load(directory, weights_only=cfg.finetune)
        elif cfg.pretrained_checkpoint:
            pretrained = _latest(cfg.pretrained_checkpoint)
            if pretrained is None:
                raise io.CheckpointError(
                    f"checkpoint.pretrained_checkpoint={cfg.pretrained_checkpoint!r} holds no checkpoint "
                    f"(expected {io.TRACKER_FILE} and iter_* directories, or an iter_* directory)"
                )
            self._load(pretrained, weights_only=True)
        elif cfg.load and missing is None:
            print_rank_0(f"> no checkpoint found in checkpoint.load={cfg.load!r}; starting from scratch")

    def _load(self, directory: Path, *, weights_only: bool) -> None:
        started = time.perf_counter()
        plan = self._agreed(lambda: self._plan_load(directory, weights_only=weights_only))
        # Everything was checked on every rank: only now change the model, optimizer and run state.
        chunk, common = self.model[0], plan.common
        io.load_tensors(plan.tensors, directory, process_group=self._group)
        set_model_state_dict(chunk, {k[len(_MODEL):]: v for k, v in plan.model_state.items()})
        if plan.optim_state is not None:
            set_optimizer_state_dict(chunk, self.optimizer, plan.optim_state)
            self.scheduler.load_state_dict(common["scheduler"])
            if self.precision.scaler is not None and "grad_scaler" in common:
                self.precision.scaler.load_state_dict(common["grad_scaler"])
        if plan.rank_state is not None:
            self.state.train_state = common["train_state"]
            self._last_saved_step = self.state.train_state.step
            self._restore_rank_state(plan.rank_state)
        print_rank_0(f"> loaded {plan.describe(self.config)} from {directory} "
                     f"(iteration {common['train_state'].step}, {time.perf_counter() - started:.2f} s)")

    def _plan_load(self, directory: Path, *, weights_only: bool) -> _LoadPlan:
        files = saved.CheckpointFiles(directory, self._verified_manifest(directory))
        if files.manifest is None:
            print_rank_0(f"> warning: {directory} has no {integrity.MANIFEST_FILE} (written before checkpoints had "
                         "checksums, or removed since): its files are loaded unverified")
        index = files.read_index()
        common = files.read_common(scheduler=self.scheduler, scaler=self.precision.scaler, index=index)
        chunk = self.model[0]
        model_state = {_MODEL + k: v for k, v in get_model_state_dict(chunk).items()}
        has_optimizer = "scheduler" in common
        load_optim = not weights_only and self.config.load_optim and has_optimizer
        optim_state = get_optimizer_state_dict(chunk, self.optimizer) if load_optim else None
        tensors = dict(model_state)
        if optim_state is not None:
            tensors.update(_flatten_optimizer_state(optim_state))
        io.check_compatible(directory, {k: v.shape for k, v in tensors.items()}, index, strict_prefix=_MODEL)
        rank_state = None if weights_only else files.read_rank_state(self.rank, restore_rng=self.config.load_rng)
        return _LoadPlan(common=common, model_state=model_state, optim_state=optim_state, tensors=tensors,
                         rank_state=rank_state, weights_only=weights_only, has_optimizer=has_optimizer)

    def _agreed(self, action: Callable[[], Any]) -> Any:
        # A checkpoint refused on one rank must be refused on all, before any of them enters a collective.
        error: str | None = None
        try:
            result = action()
        except io.CheckpointError as err:
            error, result = str(err), None
        if self.world_size > 1:
            errors: list[str | None] = [None] * self.world_size
            dist.all_gather_object(errors, error, group=self._group)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise io.CheckpointError(error)
        return result

    def _verified_manifest(self, directory: Path) -> integrity.Manifest | None:
        # Every rank reads the small manifest and hashes its share of the files; all learn every verdict.
        manifest = integrity.read_manifest(directory, saved.step_of(directory))
        if manifest is None:
            return None
        problems = integrity.verify(directory, manifest, integrity.share(manifest, self.rank, self.world_size))
        if self.world_size > 1:
            everyone: list[list[str] | None] = [None] * self.world_size
            dist.all_gather_object(everyone, problems, group=self._group)
            problems = [problem for rank_problems in everyone for problem in rank_problems or []]
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise io.CheckpointError(f"checkpoint {directory} is damaged, nothing was loaded: {shown}")
        return manifest

    def _restore_rank_state(self, rank_state: saved.RankState) -> None:
        if rank_state.fallback:
            print_rank_0("> the checkpoint was saved with fewer ranks: RNG states not restored on ranks beyond them")
        if rank_state.rng is not None:
            _restore_rng(rank_state.rng)
        if self.callbacks is not None and rank_state.callbacks is not None:
            unclaimed = self.callbacks.load_state_dict({
                "callbacks": rank_state.callbacks, "user_state": rank_state.user_state,
            })
            if unclaimed:
                print_rank_0(f"> checkpoint holds state for callbacks not registered in this run: {unclaimed}")


@dataclass
class _LoadPlan:
    """What a resume will change, all of it checked: the tensors to fill, the states to set."""

    common: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optim_state: dict[str, Any] | None
    tensors: dict[str, torch.Tensor]
    rank_state: saved.RankState | None
    weights_only: bool
    has_optimizer: bool

    def describe(self, config: CheckpointConfig) -> str:
        """What was loaded, in words, for the log line."""
        if self.weights_only:
            return "model weights"
        if self.optim_state is not None:
            return "model, optimizer and training state"
        if config.load_optim and not self.has_optimizer:
            return "model and training state (the checkpoint holds no optimizer state: the optimizer starts fresh)"
        return "model and training state"


class _WriteFailed(Exception):
    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def _describe_failure(err: BaseException) -> str:
    # torch's CheckpointException carries each rank's exception with a whole traceback: keep the cause.
    if isinstance(err, CheckpointException):
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in err.failures.values()]
        return "; ".join(_describe_failure(cause) for cause in causes) or "torch.distributed.checkpoint failed"
    if isinstance(err, OSError) and err.errno is not None:
        where = f" ({err.filename})" if err.filename else ""
        return f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror}{where}"
    return f"{type(err).__name__}: {err}"


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def missing_load_path(config: CheckpointConfig) -> str | None:
    """`checkpoint.load` when it names a path that does not exist, else None.

    Told apart from an empty folder, which is a run's normal first start: a path that does not exist
    is most likely a typo. A `load` equal to `save` is a first start too (the run creates the folder).
    """
    load = config.load
    if not load or Path(load).exists():
        return None
    if config.save and Path(load).absolute() == Path(config.save).absolute():
        return None
    return load


def require_load_path(config: CheckpointConfig) -> None:
    """Refuse a `checkpoint.load` that does not exist (see `missing_load_path`), as `finetune` does.

    Raises:
        ConfigError: naming `checkpoint.load` and the path, before any work starts.
    """
    missing = missing_load_path(config)
    if missing is not None:
        raise ConfigError(
            f"checkpoint.load={short_repr(missing)} is invalid: the path does not exist (a typo?), and finetuning "
            "from random weights is refused; set it to an existing checkpoint folder, or to null to start from "
            "checkpoint.pretrained_checkpoint"
        )


def _latest(source: str) -> Path | None:
    root = Path(source)
    directory = io.find_latest(root)
    if directory is not None and directory != root:
        io.check_tracker(root)
    elif directory is None and root.is_dir():
        io.check_tracker(root)  # a tracker without any checkpoint: its checkpoints were lost
    return directory


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, save_optim: bool) -> int:
    """About how many bytes one checkpoint of `model` (and `optimizer`'s state) takes on disk, all ranks together.

    The optimizer state does not exist before the first step, so it is counted from the optimizer's
    kind: AdamW keeps two tensors per parameter, SGD with momentum one.
    """
    tensors = [value for value in get_model_state_dict(model).values() if isinstance(value, torch.Tensor)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    count = len(tensors)
    if save_optim:
        params = list({id(p): p for group in optimizer.param_groups for p in group["params"]}.values())
        per_param = _state_tensors_per_param(optimizer)
        total += per_param * sum(p.numel() * p.element_size() for p in params) + 4 * len(params)
        count += (per_param + 1) * len(params)
    return total + count * saved.PER_TENSOR_OVERHEAD + saved.FIXED_OVERHEAD


def _state_tensors_per_param(optimizer: torch.optim.Optimizer) -> int:
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if optimizer.defaults.get("momentum") else 0
    return 2  # Adam, AdamW, and the safe guess for any other


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


def _restore_rng(rng: dict[str, Any]) -> None:
    # Already checked and decoded against the schema of `checkpoint_state`.
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["torch_cuda"])
