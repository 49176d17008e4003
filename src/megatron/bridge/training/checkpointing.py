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
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
)

from megatron.bridge.checkpoint import io
from megatron.bridge.checkpoint.lock import (
    CheckpointSaveError,
    SaveFolderInUseError,
    SaveFolderLock,
    check_room,
    claim_save_folder,
    format_bytes,
)
from megatron.bridge.training import checkpoint_state as saved
from megatron.bridge.training.callbacks import CallbackContext, CallbackManager, should_fire
from megatron.bridge.training.checkpoint_loading import (
    CheckpointReader,
    KeepEntry,
    capture_rng,
    flatten_optimizer_state,
    keep_all,
    model_entries,
)
from megatron.bridge.training.config import CheckpointConfig
from megatron.bridge.training.mixed_precision import MixedPrecision
from megatron.bridge.training.optim import OptimizerParamScheduler
from megatron.bridge.training.state import GlobalState
from megatron.bridge.utils.errors import ConfigError, short_repr
from megatron.bridge.utils.logging import print_rank_0
from megatron.bridge.utils.parallel import current_layout

__all__ = ["CheckpointManager", "estimate_checkpoint_bytes", "is_hf_model_folder", "missing_load_path",
           "require_load_path"]


class CheckpointManager:
    """Loads the checkpoint a run starts from and saves new ones; a no-op when nothing is configured.

    With `checkpoint.save` set, constructing it claims the save folder for this run (raising
    `CheckpointSaveError` naming the reason); `close` gives the folder back.
    """

    def __init__(self, config: CheckpointConfig, *, state: GlobalState, callbacks: CallbackManager | None) -> None:
        self.config, self.state, self.callbacks = config, state, callbacks
        self.model: list[torch.nn.Module] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: OptimizerParamScheduler | None = None
        self.precision: MixedPrecision | None = None
        self.keep: KeepEntry = keep_all
        layout = current_layout()
        self.rank, self.world_size = layout.rank, layout.world_size
        self._last_saved_step: int | None = None
        self._pending: tuple[int, float, Future] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock: SaveFolderLock | None = None
        self._resume_directory: Path | None | bool = False  # False: not looked for yet
        # Checkpoint I/O gets its own gloo group: it may run in a background thread beside training's collectives.
        uses_checkpoints = config.save or config.load or config.pretrained_checkpoint
        self._group = dist.new_group(backend="gloo") if (uses_checkpoints and self.world_size > 1) else None
        self._reader = CheckpointReader(rank=self.rank, world_size=self.world_size, group=self._group,
                                        load_rng=config.load_rng, load_optim=config.load_optim)
        self.needed_bytes = 0
        if config.save:
            self._on_rank_0_for_all(lambda: setattr(self, "_lock", claim_save_folder(Path(config.save))))

    def attach(self, *, model: list[torch.nn.Module], optimizer: torch.optim.Optimizer,
               scheduler: OptimizerParamScheduler, precision: MixedPrecision, keep: KeepEntry = keep_all) -> None:
        """Give the run's model, optimizer and schedule (`keep`: the model entries it saves), and check the room.

        Raises `CheckpointSaveError` when one checkpoint of what is saved would not fit into `checkpoint.save`.
        """
        self.model, self.optimizer, self.scheduler, self.precision = model, optimizer, scheduler, precision
        self.keep = keep
        if not self.config.save:
            return
        self.needed_bytes = estimate_checkpoint_bytes(model[0], optimizer, save_optim=self.config.save_optim, keep=keep)
        # A run that does not train never saves: it needs the lock, not the room.
        if self.state.cfg is None or not self.state.cfg.validation.skip_train:
            self._on_rank_0_for_all(lambda: check_room(Path(self.config.save), self.needed_bytes))

    def _on_rank_0_for_all(self, action: Callable[[], None]) -> None:
        # Rank 0 acts on the save folder; every rank learns the outcome before anything is loaded or deleted.
        outcome: tuple[str, str] | None = None
        if self.rank == 0:
            try:
                action()
            except CheckpointSaveError as err:
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
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
        tensors = model_entries(chunk, self.keep)
        common: dict[str, Any] = {
            "format_version": io.FORMAT_VERSION,
            "train_state": self.state.train_state.state_dict(),
        }
        if self.config.save_optim:
            tensors.update(flatten_optimizer_state(get_optimizer_state_dict(chunk, self.optimizer)))
            common["scheduler"] = self.scheduler.state_dict()
            if self.precision.scaler is not None:
                common["grad_scaler"] = self.precision.scaler.state_dict()
        return tensors, common

    def _capture_rank_state(self) -> dict[str, Any]:
        # Per rank: RNG streams and callback state may differ between ranks.
        state: dict[str, Any] = {"rng": capture_rng() if self.config.save_rng else None}
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

    def _resume_source(self) -> Path | None:
        # The newest checkpoint of `load` (or `save`): what a resume continues from. Read once, under the lock.
        if self._resume_directory is False:
            source = self.config.load or self.config.save
            self._resume_directory = _latest(source) if source else None
        return self._resume_directory

    def load_base_weights(self, model: torch.nn.Module, *, adapted: bool) -> None:
        """Before transforms and wrapping: fill `model` with the weights the run starts from, if a checkpoint has them.

        The first that applies: `load`'s checkpoint with `finetune=True` (weights only, step 0); nothing,
        when a resume will restore the whole model anyway; `pretrained_checkpoint` (a training checkpoint
        or a Hugging Face model folder), always for an `adapted` (LoRA) run, whose own checkpoints hold
        its adapters only. Otherwise the model keeps the weights it was built with.
        """
        cfg, resume = self.config, self._resume_source()
        missing = missing_load_path(cfg)
        if missing is not None:
            start = (f"the weights come from checkpoint.pretrained_checkpoint={cfg.pretrained_checkpoint!r}"
                     if cfg.pretrained_checkpoint else "training starts from random weights")
            print_rank_0(f"> WARNING: checkpoint.load={missing!r} does not exist (a typo?): nothing is resumed and "
                         f"{start}; set checkpoint.load to an existing checkpoint folder, or to null")
        if resume is not None and cfg.finetune:
            self._reader.load_weights(resume, model)
        elif resume is not None and not adapted:
            return
        elif cfg.pretrained_checkpoint:
            self._load_pretrained(Path(cfg.pretrained_checkpoint), model)
        elif cfg.load and resume is None and missing is None:
            print_rank_0(f"> no checkpoint found in checkpoint.load={cfg.load!r}; starting from scratch")

    def _load_pretrained(self, source: Path, model: torch.nn.Module) -> None:
        if is_hf_model_folder(source):
            from megatron.bridge.models.conversion.auto_bridge import AutoBridge

            started = time.perf_counter()
            AutoBridge.from_hf_pretrained(source).load_hf_weights(model)
            print_rank_0(f"> loaded model weights from the Hugging Face folder {source} "
                         f"({time.perf_counter() - started:.2f} s)")
            return
        pretrained = _latest(str(source))
        if pretrained is None:
            raise io.CheckpointError(
                f"checkpoint.pretrained_checkpoint={str(source)!r} holds no checkpoint (expected {io.TRACKER_FILE} "
                "and iter_* directories, an iter_* directory, or a Hugging Face folder with config.json)"
            )
        self._reader.load_weights(pretrained, model)

    def resume_directory(self) -> Path | None:
        """The checkpoint `resume()` continues from: the newest in `load` (or `save`); None if none or finetuning."""
        return None if self.config.finetune else self._resume_source()

    def resume(self) -> None:
        """Continue from `load`'s (or `save`'s) newest checkpoint, unless there is none or `finetune` is set."""
        resume = self.resume_directory()
        if resume is None:
            return
        assert self.model is not None and self.optimizer is not None, "attach() comes before resume()"
        self._reader.resume(resume, model=self.model[0], keep=self.keep, optimizer=self.optimizer,
                            scheduler=self.scheduler, precision=self.precision, state=self.state,
                            callbacks=self.callbacks)
        self._last_saved_step = self.state.train_state.step


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


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, save_optim: bool,
                              keep: KeepEntry = keep_all) -> int:
    """About how many bytes one checkpoint of `model`'s kept entries and `optimizer`'s state takes, all ranks together.

    The optimizer state does not exist before the first step, so it is counted from the optimizer's
    kind: AdamW keeps two tensors per parameter, SGD with momentum one.
    """
    tensors = [value for value in model_entries(model, keep).values() if isinstance(value, torch.Tensor)]
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


def is_hf_model_folder(path: Path) -> bool:
    """True for a local Hugging Face model folder (config.json, no training checkpoint in it)."""
    return (path / "config.json").is_file() and not (path / io.TRACKER_FILE).exists() and io.find_latest(path) is None
