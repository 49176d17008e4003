"""Supervised finetuning data: instruction rows in JSONL, answer-only loss masks, padded or packed batches.

Modules, in the order data flows through them:

- `config`: `GPTSFTDatasetConfig` (alias `FinetuningDatasetConfig`), the preprocessing configs,
  `PackedSequenceSpecs`;
- `formats`: JSONL lines, the four row formats and their checks (`SFTDataError` names file and line);
- `chat_template`: chat templates rendered as transformers renders them, and the assistant spans;
- `tokenization`: rows to token ids and loss masks, with truncation;
- `packing`: first-fit packing and the on-disk cache of packs;
- `collate`: rows, the global-batch sampler and micro-batch collation;
- `builder`: `build_sft_data_iterators`, tying them together, with the counts for the log.

The public names are exported from `megatron.bridge.data`.
"""

from megatron.bridge.utils.lazy import lazy_attributes

# Its modules, each imported on first access: `import` of the package is enough to reach them.
__all__ = [
    "builder",
    "chat_template",
    "collate",
    "config",
    "formats",
    "packing",
    "tokenization",
]

__getattr__, __dir__ = lazy_attributes(__name__, globals(), dict.fromkeys(__all__))
del lazy_attributes
