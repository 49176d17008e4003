"""Model FLOPs per token and the peak rates behind the log line's TFLOP/s and MFU."""

import pytest
import torch

from megatron.bridge.models.qwen import Qwen25ModelProvider500M
from megatron.bridge.training.metrics import model_flops_per_token, peak_tflops


def _flops(provider) -> float:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = provider.provide()
    return model_flops_per_token(model, num_layers=provider.num_layers, seq_length=provider.seq_length,
                                 attention_width=provider.num_attention_heads * provider.resolved_kv_channels)


def test_qwen25_500m_flops_count_the_tied_output_layer_once_plus_causal_attention():
    provider = Qwen25ModelProvider500M(seq_length=4096)
    provider.vocab_size = 151936
    # The published parameter count; tied, so the one matrix is counted as the output layer.
    expected = 6 * 494_032_768 + 6 * 24 * 4096 * (14 * 64)
    assert _flops(provider) == expected


def test_untied_output_layer_counts_but_the_input_embedding_does_not():
    tied = Qwen25ModelProvider500M(seq_length=1024)
    tied.vocab_size = 32000
    untied = Qwen25ModelProvider500M(seq_length=1024, share_embeddings_and_output_weights=False)
    untied.vocab_size = 32000
    # Untying adds an output matrix and stops counting the input lookup: the same multiplies per token.
    assert _flops(untied) == _flops(tied)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_rates_by_device_name(monkeypatch, name, peak):
    # The device name is the one input that needs a GPU; everything after it is plain lookup.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0)) == peak


def test_no_peak_rate_on_the_cpu():
    assert peak_tflops(torch.device("cpu")) is None
