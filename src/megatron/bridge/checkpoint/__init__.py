"""The checkpoint format, below the training loop and the Hugging Face bridge alike.

`io` (Megatron's layout, atomic commit, safe reading), `integrity` (the manifest of checksums and
bounded reads), `schema` (checks of every JSON entry), `lock` (one run per save folder) and
`train_state` (the counters every checkpoint records). The training loop decides what to save and
when (`megatron.bridge.training.checkpointing`); the bridge writes and reads the same format to
convert Hugging Face models (`megatron.bridge.models.conversion.megatron_checkpoint`).
"""
