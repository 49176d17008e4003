"""The checkpoint format, below the training loop and the Hugging Face bridge alike.

`io` (Megatron's layout, atomic commit, safe reading), `integrity` (the manifest of checksums and
bounded reads), `schema` (checks of every JSON entry), `lock` (one run per save folder) and
`train_state` (the counters every checkpoint records). The training loop decides what to save and
when (`megatron.bridge.training.checkpointing`); the bridge writes and reads the same format to
convert Hugging Face models (`megatron.bridge.models.conversion.megatron_checkpoint`).
"""

from megatron.bridge.utils.lazy import lazy_attributes

# Its modules, each imported on first access: `import` of the package is enough to reach them.
__all__ = [
    "integrity",
    "io",
    "lock",
    "schema",
    "train_state",
]

__getattr__, __dir__ = lazy_attributes(__name__, globals(), dict.fromkeys(__all__))
del lazy_attributes
