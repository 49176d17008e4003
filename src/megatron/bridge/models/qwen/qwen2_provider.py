"""Model providers for the Qwen2 / Qwen2.5 family (sizes from the published Hugging Face configs)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.bridge.models.gpt_provider import GPTModelProvider

__all__ = ["Qwen25ModelProvider1P5B", "Qwen25ModelProvider500M", "Qwen25ModelProvider7B", "Qwen2ModelProvider"]


@dataclass(kw_only=True)
class Qwen2ModelProvider(GPTModelProvider):
    """Qwen2 architecture: RMSNorm, SwiGLU, biased q/k/v projections and long-base rotary embeddings."""

    normalization: str = "RMSNorm"
    """Qwen2 uses RMSNorm."""
    layernorm_epsilon: float = 1e-6
    """Qwen2's `rms_norm_eps`."""
    gated_linear_unit: bool = True
    """SwiGLU MLP."""
    add_qkv_bias: bool = True
    """Qwen2 keeps biases on the query, key and value projections only."""
    add_bias_linear: bool = False
    """No bias on the attention output projection or the MLP."""
    rotary_base: int = 1_000_000
    """Qwen2's `rope_theta`."""
    seq_length: int = 4096
    """Tokens per training sample."""
    vocab_size: int | None = 151936
    """Qwen2's embedding rows (already a multiple of 128)."""
    hidden_dropout: float = 0.0
    """No dropout on hidden states."""
    attention_dropout: float = 0.0
    """No dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Qwen2's `initializer_range`."""


@dataclass(kw_only=True)
class Qwen25ModelProvider500M(Qwen2ModelProvider):
    """Qwen2.5-0.5B: 24 layers, hidden 896, 14 query heads over 2 key/value groups, tied embeddings."""

    num_layers: int = 24
    """Transformer blocks."""
    hidden_size: int = 896
    """Residual stream width."""
    num_attention_heads: int = 14
    """Query heads (head dim 64)."""
    num_query_groups: int | None = 2
    """Key/value heads."""
    ffn_hidden_size: int | None = 4864
    """MLP inner width."""
    share_embeddings_and_output_weights: bool = True
    """The output layer reuses the embedding."""


@dataclass(kw_only=True)
class Qwen25ModelProvider1P5B(Qwen2ModelProvider):
    """Qwen2.5-1.5B: 28 layers, hidden 1536, 12 query heads over 2 key/value groups, tied embeddings."""

    num_layers: int = 28
    """Transformer blocks."""
    hidden_size: int = 1536
    """Residual stream width."""
    num_attention_heads: int = 12
    """Query heads (head dim 128)."""
    num_query_groups: int | None = 2
    """Key/value heads."""
    ffn_hidden_size: int | None = 8960
    """MLP inner width."""
    share_embeddings_and_output_weights: bool = True
    """The output layer reuses the embedding."""


@dataclass(kw_only=True)
class Qwen25ModelProvider7B(Qwen2ModelProvider):
    """Qwen2.5-7B: 28 layers, hidden 3584, 28 query heads over 4 key/value groups, untied embeddings."""

    num_layers: int = 28
    """Transformer blocks."""
    hidden_size: int = 3584
    """Residual stream width."""
    num_attention_heads: int = 28
    """Query heads (head dim 128)."""
    num_query_groups: int | None = 4
    """Key/value heads."""
    ffn_hidden_size: int | None = 18944
    """MLP inner width."""
    share_embeddings_and_output_weights: bool = False
    """The 7B model has a separate output layer."""
    vocab_size: int | None = 152064
    """The 7B checkpoint pads its embedding to 152064 rows (the smaller models use 151936)."""
