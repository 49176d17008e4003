"""Model providers for the Gemma 3 text family (sizes from the published Hugging Face configs)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.bridge.models.gpt_provider import GPTModelProvider

__all__ = ["Gemma3ModelProvider", "Gemma3ModelProvider1B"]


@dataclass(kw_only=True)
class Gemma3ModelProvider(GPTModelProvider):
    """Gemma 3 (text) architecture: zero-centred RMSNorm everywhere, per-head q/k norms, a norm after the
    attention and after the MLP as well as before, GeGLU, embeddings scaled by sqrt(hidden), and five
    sliding-window layers (RoPE base 10000) to each global layer (RoPE base 1e6)."""

    normalization: str = "RMSNorm"
    """Gemma uses RMSNorm..."""
    layernorm_zero_centered_gamma: bool = True
    """...with its gain stored as an offset from one (`1 + w`)."""
    layernorm_epsilon: float = 1e-6
    """Gemma 3's `rms_norm_eps`."""
    qk_layernorm: bool = True
    """Gemma 3's `q_norm` / `k_norm`."""
    post_self_attn_layernorm: bool = True
    """Gemma's `post_attention_layernorm`: the attention output is normalised before the residual add."""
    post_mlp_layernorm: bool = True
    """Gemma's `post_feedforward_layernorm`."""
    gated_linear_unit: bool = True
    """Gated MLP..."""
    activation_func: str | None = "gelu_tanh"
    """...with tanh-approximated GELU (`gelu_pytorch_tanh`): GeGLU."""
    scale_embeddings_by_hidden_size: bool = True
    """Embeddings are multiplied by sqrt(hidden_size)."""
    add_qkv_bias: bool = False
    """No bias on the query, key and value projections."""
    add_bias_linear: bool = False
    """No bias on the attention output projection or the MLP."""
    kv_channels: int | None = 256
    """Gemma 3's `head_dim`."""
    softmax_scale: float | None = 256**-0.5
    """`query_pre_attn_scalar ** -0.5` with Gemma 3's `query_pre_attn_scalar=256`."""
    rotary_base: int = 1_000_000
    """RoPE base of the global layers."""
    rotary_base_local: float | None = 10_000
    """RoPE base of the sliding-window layers."""
    window_size: tuple[int, int] | None = (4095, 0)
    """transformers' default `sliding_window=4096` (the 1B model uses 512)."""
    window_attn_skip_freq: int | list[int] | None = 6
    """Every sixth layer is global, the others windowed (`sliding_window_pattern=6`)."""
    seq_length: int = 131072
    """Gemma 3's default `max_position_embeddings`."""
    vocab_size: int | None = 262208
    """The multimodal models' embedding rows (the 1B text model has 262144)."""
    share_embeddings_and_output_weights: bool = True
    """The output layer reuses the (unscaled) embedding."""
    init_method_std: float = 0.02
    """Gemma's `initializer_range`."""


@dataclass(kw_only=True)
class Gemma3ModelProvider1B(Gemma3ModelProvider):
    """Gemma-3-1B (text only): 26 layers, hidden 1152, 4 query heads of 256 over one key/value head, a
    512-token window on five layers out of six."""

    num_layers: int = 26
    """Transformer blocks (global ones: 5, 11, 17 and 23, counted from 0)."""
    hidden_size: int = 1152
    """Residual stream width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = 1
    """One key/value head (multi-query attention)."""
    ffn_hidden_size: int | None = 6912
    """MLP inner width."""
    window_size: tuple[int, int] | None = (511, 0)
    """`sliding_window=512`: each query of a windowed layer sees itself and the 511 tokens before it."""
    seq_length: int = 32768
    """The 1B model's `max_position_embeddings`."""
    vocab_size: int | None = 262144
    """The 1B model's embedding rows."""
