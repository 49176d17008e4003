"""Checkpoint saving and loading (placeholder until the checkpoint issue lands)."""

from __future__ import annotations

from typing import Any

from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.config import CheckpointConfig
from megatron.bridge.training.state import GlobalState


class CheckpointManager:
    """Saves and loads checkpoints."""

    def __init__(self, config: CheckpointConfig, *, state: GlobalState, callbacks: CallbackManager | None) -> None:
        self.config, self.state, self.callbacks = config, state, callbacks

    def load(self, **components: Any) -> None:
        """Resume from the newest checkpoint, if any."""

    def maybe_save(self, step: int, **components: Any) -> None:
        """Save when `step` is a multiple of save_interval."""

    def save_final(self, step: int, **components: Any) -> None:
        """Save after the loop unless this step was just saved."""
