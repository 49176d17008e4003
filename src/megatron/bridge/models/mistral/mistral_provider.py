"""Model providers for the Mistral family (sizes from the published Hugging Face configs)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.bridge.models.gpt_provider import GPTModelProvider

__all__ = ["MistralModelProvider", "MistralModelProvider7B"]


@dataclass(kw_only=True)
class MistralModelProvider(GPTModelProvider):
    """Mistral architecture: Llama's (RMSNorm, SwiGLU, no biases, untied output layer) with an optional
    sliding window on every layer. Defaults follow Mistral 7B v0.3 (no window, RoPE base 1e6)."""

    normalization: str = "RMSNorm"
    """Mistral uses RMSNorm."""
    layernorm_epsilon: float = 1e-5
    """Mistral's `rms_norm_eps`."""
    gated_linear_unit: bool = True
    """SwiGLU MLP."""
    add_qkv_bias: bool = False
    """No bias on the query, key and value projections."""
    add_bias_linear: bool = False
    """No bias on the attention output projection or the MLP."""
    rotary_base: int = 1_000_000
    """Mistral 7B v0.3's `rope_theta`."""
    seq_length: int = 32768
    """Mistral 7B's `max_position_embeddings`."""
    vocab_size: int | None = 32768
    """Mistral 7B v0.3's embedding rows."""
    share_embeddings_and_output_weights: bool = False
    """Mistral keeps a separate output layer."""
    init_method_std: float = 0.02
    """Mistral's `initializer_range`."""


@dataclass(kw_only=True)
class MistralModelProvider7B(MistralModelProvider):
    """Mistral-7B-v0.1: 32 layers, hidden 4096, 32 query heads over 8 key/value groups, a 32000-token
    vocabulary, RoPE base 10000 and a 4096-token sliding window on every layer."""

    num_layers: int = 32
    """Transformer blocks."""
    hidden_size: int = 4096
    """Residual stream width."""
    num_attention_heads: int = 32
    """Query heads (head dim 128)."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 14336
    """MLP inner width."""
    vocab_size: int | None = 32000
    """v0.1's embedding rows."""
    rotary_base: int = 10000
    """v0.1's `rope_theta`."""
    window_size: tuple[int, int] | None = (4095, 0)
    """v0.1's `sliding_window=4096`: each query sees itself and the 4095 tokens before it."""
