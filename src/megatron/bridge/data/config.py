"""Configuration of the pretraining data and of the tokenizer; re-exported by `megatron.bridge.training.config`.

They live with the data code, which reads them, so that the data package needs nothing from the training
package. Every check raises a `ConfigError` naming the field (`dataset.*`, `tokenizer.*`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megatron.bridge.data.blend import check_dataset_files, parse_blend
from megatron.bridge.utils.config_checks import check_choice, check_positive, check_seed, is_int
from megatron.bridge.utils.config_fields import KnownFieldsOnly
from megatron.bridge.utils.errors import config_error

__all__ = ["DATALOADER_TYPES", "GPTDatasetConfig", "MockGPTDatasetConfig", "TOKENIZER_TYPES", "TokenizerConfig"]

TOKENIZER_TYPES = ("NullTokenizer", "HuggingFaceTokenizer")
DATALOADER_TYPES = ("single", "cyclic")


@dataclass(kw_only=True)
class GPTDatasetConfig(KnownFieldsOnly):
    """Where training samples come from; with no `blend` and no `data_path`, seeded mock data."""

    _section = "dataset"

    seq_length: int = 4096
    """Tokens per sample; must equal `model.seq_length`."""
    random_seed: int = 1234
    """Seed for building and shuffling the datasets."""
    blend: Any = None
    """Indexed datasets (path prefixes), optionally weighted: `(["a", "b"], [0.3, 0.7])` (None: mock data)."""
    split: str = "969,30,1"
    """Relative sizes of the train, validation and test splits, e.g. "969,30,1"."""
    data_path: Any = None
    """Alternative spelling of `blend`: one path prefix, or a flat list as `blend` takes."""
    path_to_cache: str | None = None
    """Directory for the cached sample indices (None: `<prefix>_cache` next to each dataset)."""
    reset_position_ids: bool = False
    """Restart position ids at every end-of-document token."""
    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""
    num_workers: int = 0
    """DataLoader worker processes."""
    dataloader_type: str = "single"
    """`single` (each sample once, in order) or `cyclic` (wrap around when exhausted)."""

    @property
    def uses_mock_data(self) -> bool:
        """True when no real data source is configured."""
        return self.blend is None and self.data_path is None

    def resolved_blend(self) -> tuple[list[str], list[float] | None]:
        """The dataset path prefixes and their weights (None: unweighted) from `blend` or `data_path`."""
        return parse_blend(self.blend, self.data_path)

    def split_weights(self) -> tuple[float, float, float]:
        """The train/validation/test fractions parsed from `split`."""
        parts = [p.strip() for p in str(self.split).replace("/", ",").split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2, 3) or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            raise config_error("dataset.split", self.split, 'up to three finite numbers >= 0, e.g. "969,30,1"')
        values += [0.0] * (3 - len(values))
        total = sum(values)
        return values[0] / total, values[1] / total, values[2] / total

    def validate(self) -> None:
        check_positive("dataset.seq_length", self.seq_length, optional=False)
        check_seed("dataset.random_seed", self.random_seed)
        check_choice("dataset.dataloader_type", self.dataloader_type, DATALOADER_TYPES)
        if not is_int(self.num_workers) or self.num_workers < 0:
            raise config_error("dataset.num_workers", self.num_workers, "an integer >= 0")
        self.split_weights()
        if not self.uses_mock_data:
            paths, _ = self.resolved_blend()
            check_dataset_files(paths, "dataset.blend" if self.blend is not None else "dataset.data_path")


@dataclass(kw_only=True)
class MockGPTDatasetConfig(GPTDatasetConfig):
    """A dataset config that always serves the seeded mock data (`blend` and `data_path` are ignored)."""

    @property
    def uses_mock_data(self) -> bool:
        """Always True."""
        return True


@dataclass(kw_only=True)
class TokenizerConfig(KnownFieldsOnly):
    """Which tokenizer turns text into ids; the model's vocabulary follows its size."""

    _section = "tokenizer"

    tokenizer_type: str = "NullTokenizer"
    """NullTokenizer (the data holds ids; end of document = vocab_size - 1) or HuggingFaceTokenizer."""
    tokenizer_model: str | None = None
    """HuggingFaceTokenizer only: a local tokenizer.json or a folder holding one (never downloaded)."""
    vocab_size: int | None = None
    """NullTokenizer: the vocabulary size. HuggingFaceTokenizer: filled from the tokenizer by `pretrain`."""

    def validate(self) -> None:
        check_choice("tokenizer.tokenizer_type", self.tokenizer_type, TOKENIZER_TYPES)
        if self.tokenizer_type == "NullTokenizer":
            # The last id is the end-of-document token, so one id leaves no room for any data.
            if not is_int(self.vocab_size) or self.vocab_size < 2:
                raise config_error("tokenizer.vocab_size", self.vocab_size,
                                   "an integer >= 2 (NullTokenizer: the last id is the end-of-document token)")
            return
        check_positive("tokenizer.vocab_size", self.vocab_size)
        if not self.tokenizer_model:
            raise config_error("tokenizer.tokenizer_model", self.tokenizer_model,
                               "a local tokenizer.json or a folder holding one (HuggingFaceTokenizer needs it)")
        from megatron.bridge.data.tokenizer import resolve_tokenizer_file

        resolve_tokenizer_file(self.tokenizer_model)
