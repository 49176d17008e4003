"""Configuration of finetuning data: where the JSONL files are, how rows become tokens, and packing.

`GPTSFTDatasetConfig` keeps Megatron Bridge's field names; `FinetuningDatasetConfig` is the same class
under its older name. Each config checks itself in `validate()`, naming the field as
`dataset.<field>` (or `dataset.preprocessing.<field>`, `dataset.offline_packing_specs.<field>`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.bridge.utils.config_fields import KnownFieldsOnly
from megatron.bridge.utils.errors import config_error

__all__ = [
    "CHAT_LOSS_MODES",
    "ChatSFTPreprocessingConfig",
    "FinetuningDatasetConfig",
    "GPTSFTDatasetConfig",
    "PACKING_ALGORITHMS",
    "PROMPT_LOSS_MODES",
    "PackedSequenceSpecs",
    "PromptCompletionSFTPreprocessingConfig",
    "SFTPreprocessingConfig",
    "SFT_DATALOADER_TYPES",
    "SPLIT_FILES",
    "TRUNCATION_METHODS",
]

SPLIT_FILES = {"train": "training.jsonl", "valid": "validation.jsonl", "test": "test.jsonl"}
"""The file each split is read from, inside `dataset_root`."""
PROMPT_LOSS_MODES = ("completion", "full")
CHAT_LOSS_MODES = ("assistant", "last_turn", "full")
TRUNCATION_METHODS = ("left", "right")
PACKING_ALGORITHMS = ("first_fit_shuffle", "first_fit_decreasing")
SFT_DATALOADER_TYPES = ("batch",)


def _check_bool(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise config_error(field_name, value, "True or False")


def _check_int(field_name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise config_error(field_name, value, allowed)


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise config_error(field_name, value, f"choose one of {', '.join(choices)}")


@dataclass(kw_only=True)
class PromptCompletionSFTPreprocessingConfig(KnownFieldsOnly):
    """Rows with a prompt and an answer: `{"input", "output"}` (SQuAD-style) or `{"prompt", "completion"}`.

    An example is `[bos] prompt_template(prompt) | separator + completion [eos]`: the prompt side and the
    answer side are tokenized separately, so the boundary between them is exact. The loss covers the
    answer and the end-of-sequence token (`loss_mode="completion"`) or every token (`"full"`).
    """

    _section = "dataset.preprocessing"

    prompt_template: str = "{prompt}"
    """How the prompt is written before the answer; `{prompt}` is the row's prompt (exactly once; write
    literal braces as `{{` and `}}`), e.g. `"Question: {prompt}\\nAnswer:"`."""
    separator: str = ""
    """Text put before the answer, tokenized with it (with `preprocessing=None`: one space, as upstream)."""
    loss_mode: str = "completion"
    """`completion`: loss on the answer and the end-of-sequence token only; `full`: on every token."""
    add_bos: bool = False
    """Start each example with the tokenizer's beginning-of-sequence token (an error if it has none)."""
    add_eos: bool = True
    """End each example with the tokenizer's end-of-sequence token, which the loss covers."""
    truncation_method: str = "right"
    """Which end of the prompt an over-long example loses: `right` (its end) or `left` (its beginning).
    The prompt is cut first; only an answer that alone exceeds the budget is cut, at its end."""

    def validate(self, prefix: str = "dataset.preprocessing") -> None:
        """Raise a `ConfigError` naming the first invalid field."""
        template = self.prompt_template
        if not isinstance(template, str) or _template_fields(template) != ["prompt"]:
            raise config_error(f"{prefix}.prompt_template", template,
                               "a string holding the placeholder {prompt} exactly once and no other placeholder "
                               "(write literal braces as {{ and }})")
        if not isinstance(self.separator, str):
            raise config_error(f"{prefix}.separator", self.separator, "a string")
        _check_choice(f"{prefix}.loss_mode", self.loss_mode, PROMPT_LOSS_MODES)
        _check_bool(f"{prefix}.add_bos", self.add_bos)
        _check_bool(f"{prefix}.add_eos", self.add_eos)
        _check_choice(f"{prefix}.truncation_method", self.truncation_method, TRUNCATION_METHODS)


def _template_fields(template: str) -> list[str] | None:
    """The placeholder names of a `str.format` template (None when it does not parse)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:
        return None


@dataclass(kw_only=True)
class ChatSFTPreprocessingConfig(KnownFieldsOnly):
    """Conversations (`{"messages"}` or ShareGPT `{"conversations"}`), rendered with the tokenizer's chat template.

    Prompt/completion rows are read as a user turn and an assistant turn. Over-long conversations are
    cut at their end; one left with no supervised token is dropped (and counted).
    """

    _section = "dataset.preprocessing"

    loss_mode: str = "assistant"
    """`assistant`: loss on every assistant turn (its text and end-of-turn token); `last_turn`: on the last
    assistant turn only; `full`: on every token."""

    def validate(self, prefix: str = "dataset.preprocessing") -> None:
        """Raise a `ConfigError` naming the first invalid field."""
        _check_choice(f"{prefix}.loss_mode", self.loss_mode, CHAT_LOSS_MODES)


@dataclass
class PackedSequenceSpecs(KnownFieldsOnly):
    """Offline packing: examples are concatenated into rows of `packed_sequence_size` tokens.

    Attention stays inside each example and position ids restart per example. Packs are cached next to
    the data (`<dataset_root>/packed/`, or `cache_dir`) under a key of everything they depend on.
    """

    _section = "dataset.offline_packing_specs"

    packed_sequence_size: int
    """Tokens per pack; at most `dataset.seq_length` (usually equal). Longer examples are truncated to it."""
    packing_algorithm: str = "first_fit_shuffle"
    """`first_fit_shuffle` (examples in a seeded random order, each into the first pack with room) or
    `first_fit_decreasing` (longest first: fewer, fuller packs)."""
    cache_dir: str | Path | None = None
    """Folder for the cached packs (None: `<dataset_root>/packed`)."""

    def validate(self, prefix: str = "dataset.offline_packing_specs") -> None:
        """Raise a `ConfigError` naming the first invalid field."""
        _check_int(f"{prefix}.packed_sequence_size", self.packed_sequence_size, minimum=1)
        _check_choice(f"{prefix}.packing_algorithm", self.packing_algorithm, PACKING_ALGORITHMS)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, Path)):
            raise config_error(f"{prefix}.cache_dir", self.cache_dir, "a folder path or None")


SFTPreprocessingConfig = PromptCompletionSFTPreprocessingConfig | ChatSFTPreprocessingConfig


@dataclass(kw_only=True)
class GPTSFTDatasetConfig(KnownFieldsOnly):
    """Finetuning data from `dataset_root/{training,validation,test}.jsonl` (Megatron Bridge's field names).

    With `preprocessing=None` each file's format is recognised from the keys of its first line, and every
    line must then have that format. Batches are padded only to the longest example of their global batch
    (`dataloader_type="batch"`), or hold offline packs (`enable_offline_packing`).
    """

    _section = "dataset"

    seq_length: int
    """Most tokens an example gives the model (its inputs; the example itself has one more, the last label).
    Longer examples are truncated."""
    dataset_root: str | Path | None = None
    """Folder holding `training.jsonl`, and `validation.jsonl` / `test.jsonl` when they are used."""
    seed: int = 1234
    """Seed of the per-epoch shuffle and of `first_fit_shuffle` packing."""
    max_train_samples: int | None = None
    """Use only the first this-many training examples (None: all); later lines are not read."""
    preprocessing: SFTPreprocessingConfig | None = None
    """How rows become tokens and loss masks (None: recognised from the data, with defaults)."""
    enable_offline_packing: bool = False
    """Pack training and validation examples into rows (needs `offline_packing_specs`); test stays unpacked."""
    offline_packing_specs: PackedSequenceSpecs | None = None
    """Pack size and algorithm; set exactly when `enable_offline_packing` is True."""
    do_validation: bool = True
    """Read `validation.jsonl` for validation passes."""
    do_test: bool = True
    """Read `test.jsonl` for the test pass."""
    dataloader_type: str = "batch"
    """`batch`: each global batch is padded only to its longest example (the only choice for finetuning)."""
    pad_to_multiple_of: int = 16
    """Batch lengths are rounded up to a multiple of this (capped at `seq_length` or the pack size)."""
    num_workers: int = 0
    """DataLoader worker processes (examples are tokenized up front, so 0 is usually enough)."""
    def split_path(self, split: str) -> Path:
        """The JSONL file of `split` (`train`, `valid` or `test`)."""
        assert self.dataset_root is not None, "validate() first"
        return Path(self.dataset_root) / SPLIT_FILES[split]

    @property
    def max_positions(self) -> int:
        """Most model positions an example may take: the pack size when packing, else `seq_length`."""
        if self.enable_offline_packing and self.offline_packing_specs is not None:
            return min(self.seq_length, self.offline_packing_specs.packed_sequence_size)
        return self.seq_length

    def validate(self) -> None:
        """Raise a `ConfigError` naming the first invalid field, or a split file that is missing."""
        _check_int("dataset.seq_length", self.seq_length, minimum=1)
        _check_int("dataset.seed", self.seed, minimum=0)
        _check_int("dataset.max_train_samples", self.max_train_samples, minimum=1, optional=True)
        _check_int("dataset.pad_to_multiple_of", self.pad_to_multiple_of, minimum=1)
        _check_int("dataset.num_workers", self.num_workers, minimum=0)
        _check_choice("dataset.dataloader_type", self.dataloader_type, SFT_DATALOADER_TYPES)
        for name in ("enable_offline_packing", "do_validation", "do_test"):
            _check_bool(f"dataset.{name}", getattr(self, name))
        self._validate_preprocessing()
        self._validate_packing()
        self._validate_files()

    def _validate_preprocessing(self) -> None:
        if self.preprocessing is None:
            return
        if not isinstance(self.preprocessing, (PromptCompletionSFTPreprocessingConfig, ChatSFTPreprocessingConfig)):
            raise config_error("dataset.preprocessing", self.preprocessing,
                               "None, a PromptCompletionSFTPreprocessingConfig or a ChatSFTPreprocessingConfig")
        self.preprocessing.validate()

    def _validate_packing(self) -> None:
        specs = self.offline_packing_specs
        if self.enable_offline_packing and specs is None:
            raise config_error("dataset.offline_packing_specs", specs,
                               "a PackedSequenceSpecs when dataset.enable_offline_packing=True")
        if specs is None:
            return
        if not self.enable_offline_packing:
            raise config_error("dataset.offline_packing_specs", specs,
                               "None unless dataset.enable_offline_packing=True (set that to pack)")
        if not isinstance(specs, PackedSequenceSpecs):
            raise config_error("dataset.offline_packing_specs", specs, "a PackedSequenceSpecs")
        specs.validate()
        if specs.packed_sequence_size > self.seq_length:
            raise config_error("dataset.offline_packing_specs.packed_sequence_size", specs.packed_sequence_size,
                               f"at most dataset.seq_length={self.seq_length} (a pack is one model sequence)")

    def _validate_files(self) -> None:
        root = self.dataset_root
        if root is None or not isinstance(root, (str, Path)) or not Path(root).is_dir():
            raise config_error("dataset.dataset_root", root,
                               "a folder holding training.jsonl (and validation.jsonl, test.jsonl when used)")
        wanted = [("train", "dataset.dataset_root")]
        wanted += [("valid", "dataset.do_validation")] if self.do_validation else []
        wanted += [("test", "dataset.do_test")] if self.do_test else []
        for split, field_name in wanted:
            path = self.split_path(split)
            if not path.is_file():
                hint = "" if split == "train" else f" (or set {field_name}=False)"
                raise config_error("dataset.dataset_root", str(root), f"a folder holding {path.name}{hint}")


FinetuningDatasetConfig = GPTSFTDatasetConfig
"""The older name of `GPTSFTDatasetConfig` (the same class)."""
