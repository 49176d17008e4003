"""Training data: tokenizers, Megatron indexed datasets, GPT sample packing, blends and the loaders;
finetuning data (instruction rows, answer-only masks, padded or packed batches) in `sft/`.

Commands: `python -m megatron.bridge.data.train_tokenizer` (a BPE tokenizer from local text) and
`python -m megatron.bridge.data.preprocess` (text to a `.bin`/`.idx` indexed dataset).

Names are imported on first use (PEP 562), so the commands and their worker processes start
without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlendedDataset": "blended_dataset",
    "ChatSFTPreprocessingConfig": "sft.config",
    "DataIterators": "loaders",
    "DatasetError": "indexed_dataset",
    "FinetuningDatasetConfig": "sft.config",
    "GPTSFTDatasetConfig": "sft.config",
    "GPTDataset": "gpt_dataset",
    "HuggingFaceTokenizer": "tokenizer",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetWriter": "indexed_dataset",
    "MicroBatchSampler": "loaders",
    "MockGPTDataset": "mock",
    "NullTokenizer": "tokenizer",
    "PackedSequenceSpecs": "sft.config",
    "PromptCompletionSFTPreprocessingConfig": "sft.config",
    "SFTDataError": "sft.formats",
    "SFTDataStats": "sft.builder",
    "build_data_iterators": "loaders",
    "build_gpt_datasets": "builder",
    "build_sft_data_iterators": "sft.builder",
    "build_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
