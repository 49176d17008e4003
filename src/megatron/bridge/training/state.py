"""Run-wide state: the training counters, named timers and the loggers.

`GlobalState` is what callbacks see as `context.state`. `TrainState` (the counters) lives with the
checkpoint format, which records it, and `Timers` (Megatron's timer API) in `training.timers`; both
are re-exported here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megatron.bridge.checkpoint.train_state import TrainState
from megatron.bridge.training.timers import Timer, Timers
from megatron.bridge.utils.parallel import current_layout

if TYPE_CHECKING:
    from megatron.bridge.training.config import ConfigContainer

__all__ = ["GlobalState", "RunRequests", "Timer", "Timers", "TrainState"]


@dataclass
class RunRequests:
    """What callbacks asked for during the current step; each is a reason, or None."""

    stop: str | None = None
    checkpoint: str | None = None
    validation: str | None = None


class GlobalState:
    """The config, training counters, timers and loggers of one run."""

    def __init__(self, cfg: ConfigContainer | None = None) -> None:
        self.cfg = cfg
        self.train_state = TrainState()
        self.timers = Timers() if cfg is None else Timers(cfg.logger.timing_log_level, cfg.logger.timing_log_option)
        """Megatron's `Timers`, filtered by `logger.timing_log_level` (see `training.timers`)."""
        self.requests = RunRequests()
        """Requests made by callbacks since the last step end (see `request_stop`)."""
        self.start_time = time.time()
        """Wall-clock time at which `pretrain` started (for `exit_duration_in_mins`)."""
        self._tensorboard_logger: Any = None
        self._wandb_logger: Any = None
        self._loggers_made = False

    def request_stop(self, reason: str) -> None:
        """Ask training to stop after the current step, on every rank, with a final checkpoint.

        Requests from all ranks are combined once per step, so a request made on one rank stops
        every rank at the same step. The stop is a normal end: `on_train_end` fires and the
        post-training validation and test passes run.
        """
        self.requests.stop = reason

    def request_checkpoint(self, reason: str) -> None:
        """Ask for a checkpoint at the end of the current step (on every rank)."""
        self.requests.checkpoint = reason

    def request_validation(self, reason: str) -> None:
        """Ask for a validation pass at the end of the current step (on every rank)."""
        self.requests.validation = reason

    @property
    def tensorboard_logger(self) -> Any:
        """A `SummaryWriter` on rank 0 when `logger.tensorboard_dir` is set, else None."""
        self._make_loggers()
        return self._tensorboard_logger

    @property
    def wandb_logger(self) -> Any:
        """The `wandb` run on rank 0 when `logger.wandb_project` is set, else None."""
        self._make_loggers()
        return self._wandb_logger

    def _make_loggers(self) -> None:
        if self._loggers_made or self.cfg is None:
            return
        self._loggers_made = True
        if _rank() != 0:
            return
        log_cfg = self.cfg.logger
        if log_cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard_logger = SummaryWriter(log_dir=log_cfg.tensorboard_dir,
                                                     max_queue=log_cfg.tensorboard_queue_size)
        if log_cfg.wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError(
                    f"logger.wandb_project={log_cfg.wandb_project!r} needs wandb: "
                    "pip install 'megatron-bridge-lite[wandb]'"
                ) from err
            self._wandb_logger = wandb.init(
                project=log_cfg.wandb_project, name=log_cfg.wandb_exp_name, dir=log_cfg.wandb_save_dir,
                entity=log_cfg.wandb_entity, config=self.cfg.to_dict(),
            )

    def close_loggers(self) -> None:
        """Flush and close the loggers this state opened."""
        if self._tensorboard_logger is not None:
            self._tensorboard_logger.close()
            self._tensorboard_logger = None
        if self._wandb_logger is not None:
            self._wandb_logger.finish()
            self._wandb_logger = None


def _rank() -> int:
    return current_layout().rank
