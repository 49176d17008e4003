"""Model providers for the Llama family (Llama 3 defaults; sizes from the published Hugging Face configs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron.bridge.models.gpt_provider import GPTModelProvider

__all__ = [
    "Llama31ModelProvider8B",
    "Llama32ModelProvider1B",
    "Llama32ModelProvider3B",
    "Llama3ModelProvider8B",
    "LlamaModelProvider",
    "llama3_rope_scaling",
]


def llama3_rope_scaling(factor: float, original_max_position_embeddings: int = 8192) -> dict[str, Any]:
    """Llama 3.1 / 3.2's `rope_scaling`: frequency bands split at 1x and 4x the original context."""
    return {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_position_embeddings,
    }


@dataclass(kw_only=True)
class LlamaModelProvider(GPTModelProvider):
    """Llama architecture: RMSNorm, SwiGLU, no biases anywhere, untied output layer, Llama 3's RoPE base."""

    normalization: str = "RMSNorm"
    """Llama uses RMSNorm."""
    layernorm_epsilon: float = 1e-5
    """Llama 3's `rms_norm_eps`."""
    gated_linear_unit: bool = True
    """SwiGLU MLP."""
    add_qkv_bias: bool = False
    """No bias on the query, key and value projections (`attention_bias=False`)."""
    add_bias_linear: bool = False
    """No bias on the attention output projection or the MLP (`mlp_bias=False`)."""
    rotary_base: int = 500_000
    """Llama 3's `rope_theta` (Llama 2 used 10000)."""
    seq_length: int = 8192
    """Tokens per training sample (Llama 3's pretraining context)."""
    vocab_size: int | None = 128256
    """Llama 3's embedding rows."""
    share_embeddings_and_output_weights: bool = False
    """Llama keeps a separate output layer unless its config says `tie_word_embeddings`."""
    init_method_std: float = 0.02
    """Llama's `initializer_range`."""


@dataclass(kw_only=True)
class Llama32ModelProvider1B(LlamaModelProvider):
    """Llama-3.2-1B: 16 layers, hidden 2048, 32 query heads over 8 key/value groups, tied embeddings."""

    num_layers: int = 16
    """Transformer blocks."""
    hidden_size: int = 2048
    """Residual stream width."""
    num_attention_heads: int = 32
    """Query heads (head dim 64)."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 8192
    """MLP inner width."""
    share_embeddings_and_output_weights: bool = True
    """The 1B model reuses the embedding as output layer."""
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: llama3_rope_scaling(32.0))
    """Llama 3.2's long-context frequency scaling (factor 32)."""


@dataclass(kw_only=True)
class Llama32ModelProvider3B(LlamaModelProvider):
    """Llama-3.2-3B: 28 layers, hidden 3072, 24 query heads over 8 key/value groups, tied embeddings."""

    num_layers: int = 28
    """Transformer blocks."""
    hidden_size: int = 3072
    """Residual stream width."""
    num_attention_heads: int = 24
    """Query heads (head dim 128)."""
    num_query_groups: int | None = 8
    """Key/value heads."""
    ffn_hidden_size: int | None = 8192
    """MLP inner width."""
    share_embeddings_and_output_weights: bool = True
    """The 3B model reuses the embedding as output layer."""
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: llama3_rope_scaling(32.0))
    """Llama 3.2's long-context frequency scaling (factor 32)."""


@dataclass(kw_only=True)
class Llama3ModelProvider8B(LlamaModelProvider):
    """Meta-Llama-3-8B: 32 layers, hidden 4096, 32 query heads over 8 key/value groups, untied embeddings,
    plain RoPE over its 8192-token context."""

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


@dataclass(kw_only=True)
class Llama31ModelProvider8B(Llama3ModelProvider8B):
    """Llama-3.1-8B: Llama 3 8B's shape with Llama 3.1's long-context RoPE scaling."""

    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: llama3_rope_scaling(8.0))
    """Llama 3.1's long-context frequency scaling (factor 8)."""
