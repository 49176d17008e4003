"""Training data: seeded mock datasets and the data-parallel micro-batch loaders."""

from megatron.bridge.data.loaders import DataIterators, MicroBatchSampler, build_data_iterators
from megatron.bridge.data.mock import MockGPTDataset

__all__ = ["DataIterators", "MicroBatchSampler", "MockGPTDataset", "build_data_iterators"]
