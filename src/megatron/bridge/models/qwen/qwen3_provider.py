"""Model providers for the Qwen3 family (dense models; sizes from the published Hugging Face configs)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.bridge.models.gpt_provider import GPTModelProvider

__all__ = [
    "Qwen3ModelProvider",
    "Qwen3ModelProvider14B",
    "Qwen3ModelProvider1P7B",
    "Qwen3ModelProvider32B",
    "Qwen3ModelProvider4B",
    "Qwen3ModelProvider600M",
    "Qwen3ModelProvider8B",
]


@dataclass(kw_only=True)
class Qwen3ModelProvider(GPTModelProvider):
    """Qwen3 architecture: RMSNorm, SwiGLU, no biases, per-head RMSNorm of queries and keys before the
    rotary embedding, and a head dimension of 128 whatever the hidden size."""

    normalization: str = "RMSNorm"
    """Qwen3 uses RMSNorm."""
    layernorm_epsilon: float = 1e-6
    """Qwen3's `rms_norm_eps`."""
    gated_linear_unit: bool = True
    """SwiGLU MLP."""
    qk_layernorm: bool = True
    """Qwen3's `q_norm` / `k_norm`: each head's query and key normalised over the head dimension."""
    add_qkv_bias: bool = False
    """No bias on the query, key and value projections (`attention_bias=False`)."""
    add_bias_linear: bool = False
    """No bias on the attention output projection or the MLP."""
    kv_channels: int | None = 128
    """Qwen3's `head_dim`, independent of hidden_size / num_attention_heads."""
    rotary_base: int = 1_000_000
    """Qwen3's `rope_theta`."""
    seq_length: int = 40960
    """Qwen3's `max_position_embeddings` (the recipes train on 4096)."""
    vocab_size: int | None = 151936
    """Qwen3's embedding rows."""
    share_embeddings_and_output_weights: bool = False
    """The 8B model and up keep a separate output layer; the smaller ones reuse the embedding."""
    init_method_std: float = 0.02
    """Qwen3's `initializer_range`."""


@dataclass(kw_only=True)
class Qwen3ModelProvider600M(Qwen3ModelProvider):
    """Qwen3-0.6B: 28 layers, hidden 1024, 16 query heads of 128 over 8 key/value groups, tied embeddings."""

    num_layers: int = 28
    """Transformer blocks."""
    hidden_size: int = 1024
    """Residual stream width."""
    num_attention_heads: int = 16
    """Query heads."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 3072
    """MLP inner width."""
    share_embeddings_and_output_weights: bool = True
    """The output layer reuses the embedding."""


@dataclass(kw_only=True)
class Qwen3ModelProvider1P7B(Qwen3ModelProvider):
    """Qwen3-1.7B: 28 layers, hidden 2048, 16 query heads of 128 over 8 key/value groups, tied embeddings."""

    num_layers: int = 28
    """Transformer blocks."""
    hidden_size: int = 2048
    """Residual stream width."""
    num_attention_heads: int = 16
    """Query heads."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 6144
    """MLP inner width."""
    share_embeddings_and_output_weights: bool = True
    """The output layer reuses the embedding."""


@dataclass(kw_only=True)
class Qwen3ModelProvider4B(Qwen3ModelProvider):
    """Qwen3-4B: 36 layers, hidden 2560, 32 query heads of 128 over 8 key/value groups, tied embeddings."""

    num_layers: int = 36
    """Transformer blocks."""
    hidden_size: int = 2560
    """Residual stream width."""
    num_attention_heads: int = 32
    """Query heads."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 9728
    """MLP inner width."""
    share_embeddings_and_output_weights: bool = True
    """The output layer reuses the embedding."""


@dataclass(kw_only=True)
class Qwen3ModelProvider8B(Qwen3ModelProvider):
    """Qwen3-8B: 36 layers, hidden 4096, 32 query heads of 128 over 8 key/value groups, untied embeddings."""

    num_layers: int = 36
    """Transformer blocks."""
    hidden_size: int = 4096
    """Residual stream width."""
    num_attention_heads: int = 32
    """Query heads."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 12288
    """MLP inner width."""


@dataclass(kw_only=True)
class Qwen3ModelProvider14B(Qwen3ModelProvider):
    """Qwen3-14B: 40 layers, hidden 5120, 40 query heads of 128 over 8 key/value groups, untied embeddings."""

    num_layers: int = 40
    """Transformer blocks."""
    hidden_size: int = 5120
    """Residual stream width."""
    num_attention_heads: int = 40
    """Query heads."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 17408
    """MLP inner width."""


@dataclass(kw_only=True)
class Qwen3ModelProvider32B(Qwen3ModelProvider):
    """Qwen3-32B: 64 layers, hidden 5120, 64 query heads of 128 over 8 key/value groups, untied embeddings."""

    num_layers: int = 64
    """Transformer blocks."""
    hidden_size: int = 5120
    """Residual stream width."""
    num_attention_heads: int = 64
    """Query heads."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 25600
    """MLP inner width."""
