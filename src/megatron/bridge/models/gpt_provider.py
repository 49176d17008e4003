"""`GPTModelProvider`: the model's configuration, which also builds the model.

As in Megatron Bridge the provider is the `model` section of a `ConfigContainer`: its fields (Megatron
names) describe the architecture and `provide()` returns a `GPTModel`. Fields left `None` are derived
from others when read through the `resolved_*` properties, so shrinking a recipe's model by assigning
`hidden_size` keeps the derived sizes consistent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron.bridge.models.decoder import ACTIVATIONS, GPTModel
from megatron.bridge.models.norms import NORMALIZATIONS
from megatron.bridge.utils.config_fields import KnownFieldsOnly
from megatron.bridge.utils.errors import config_error

__all__ = [
    "ACTIVATION_FUNCS",
    "LLAMA3_ROPE_KEYS",
    "POSITION_EMBEDDING_TYPES",
    "RECOMPUTE_GRANULARITIES",
    "ROPE_SCALING_TYPES",
    "GPTModelProvider",
    "PreWrapHook",
]

POSITION_EMBEDDING_TYPES = ("rope",)
RECOMPUTE_GRANULARITIES = (None, "full")
ROPE_SCALING_TYPES = ("llama3", "linear")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
ACTIVATION_FUNCS = tuple(ACTIVATIONS)

PreWrapHook = Callable[[GPTModel], "GPTModel | None"]
"""Called with the freshly built model at the end of `provide()`; may return a replacement model."""


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _is_positive_number(value: Any) -> bool:
    return _is_finite_number(value) and value > 0


@dataclass(kw_only=True)
class GPTModelProvider(KnownFieldsOnly):
    """Architecture of a GPT-style decoder; defaults describe a GPT-2-small-sized model.

    Assigning a name that is not a field (a misspelling) raises `UnknownFieldError`.
    """

    _section = "model"

    num_layers: int = 12
    """Number of transformer blocks."""
    hidden_size: int = 768
    """Width of the residual stream."""
    ffn_hidden_size: int | None = None
    """Width of the MLP's inner layer (None: 4 * hidden_size)."""
    num_attention_heads: int = 12
    """Number of query heads."""
    num_query_groups: int | None = None
    """Number of key/value heads for grouped-query attention (None: num_attention_heads, i.e. MHA)."""
    kv_channels: int | None = None
    """Per-head dimension (None: hidden_size // num_attention_heads). Independent of the two when set:
    Qwen3-0.6B has hidden 1024 and 16 heads of 128 (Hugging Face's `head_dim`)."""
    seq_length: int = 4096
    """Tokens per training sample."""
    vocab_size: int | None = None
    """Vocabulary size (None: taken from the tokenizer before the model is built)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding and output layer to a multiple of this many rows."""
    normalization: str = "RMSNorm"
    """`RMSNorm` or `LayerNorm`."""
    layernorm_epsilon: float = 1e-5
    """Epsilon added inside the norms."""
    layernorm_zero_centered_gamma: bool = False
    """Every norm (the block's, the q/k and post norms, the final one) stores its gain as an offset from
    one: it applies `1 + w` in float32, and `w` starts at zero (Gemma's RMSNorm; HF weights map verbatim)."""
    qk_layernorm: bool = False
    """Normalise each head's query and key over the head dimension before the rotary embedding (Qwen3,
    Gemma 3): a `normalization`-type norm with `layernorm_epsilon` and one weight of `kv_channels` shared
    by all heads (`self_attention.q_layernorm`, `self_attention.k_layernorm`)."""
    post_self_attn_layernorm: bool = False
    """Normalise the attention output before it joins the residual stream: `x + norm(attn(norm(x)))`
    (Gemma's `post_attention_layernorm`, not to be confused with Llama's pre-MLP norm of that name)."""
    post_mlp_layernorm: bool = False
    """Normalise the MLP output before it joins the residual stream (Gemma's `post_feedforward_layernorm`)."""
    gated_linear_unit: bool = True
    """Gated MLP (gate, up, down: SwiGLU or GeGLU) if True, else a plain two-layer MLP (fc1, fc2)."""
    activation_func: str | None = None
    """The MLP's activation: `silu` (SwiGLU when gated), `gelu_tanh` (tanh-approximated GELU, Hugging
    Face's `gelu_pytorch_tanh`: GeGLU when gated, as Gemma) or `gelu` (exact GELU). None picks the
    activation each MLP form always had: `silu` when gated, `gelu` otherwise; see `resolved_activation_func`."""
    add_bias_linear: bool = False
    """Give the attention output projection and the MLP layers a bias."""
    add_qkv_bias: bool = False
    """Give the query, key and value projections a bias (Qwen2 does)."""
    position_embedding_type: str = "rope"
    """How positions enter the model; only `rope` (rotary embeddings) is implemented."""
    rotary_base: int = 10000
    """Base of the rotary embedding frequencies (of the global layers when `rotary_base_local` is set)."""
    rotary_base_local: float | None = None
    """Rotary base of the sliding-window layers (None: they use `rotary_base` and `rope_scaling` like the
    others). Gemma 3: 10000 locally, `rotary_base` 1e6 globally. Needs `window_size`."""
    rope_scaling: dict[str, Any] | None = None
    """Long-context rotary frequency scaling, as Hugging Face's `rope_scaling` (None: plain RoPE), for the
    global layers (and windowed ones without `rotary_base_local`). Llama 3.1's `{"rope_type": "llama3",
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings":
    8192}`, or `{"rope_type": "linear", "factor": F}` (every frequency divided by F: Gemma 3 4B and up)."""
    window_size: tuple[int, int] | None = None
    """Sliding-window attention as Megatron's inclusive `(left, right)`: a query at `i` sees keys
    `i - left .. i` (`left + 1` keys, itself included); `right` must be 0 (causal). Hugging Face's
    `sliding_window=W` (keys `i-W+1 .. i`) is `(W - 1, 0)`. None: full causal attention everywhere.
    Which layers use it: `window_attn_skip_freq`."""
    window_attn_skip_freq: int | list[int] | None = None
    """Which layers `window_size` applies to (Megatron Core's field). An int N: 1-based layer n is windowed
    unless `n % N == 0` (Gemma 3: N=6, so 0-based layers 5, 11, 17, ... are global); a list: 1 (windowed)
    or 0 (global) per layer; None: every layer (Mistral). See `window_attention_layers`."""
    softmax_scale: float | None = None
    """Factor on the attention scores before the softmax (None: 1 / sqrt(kv_channels)). Gemma 3 sets
    `query_pre_attn_scalar ** -0.5`."""
    scale_embeddings_by_hidden_size: bool = False
    """Multiply the embedding output by sqrt(hidden_size), rounded to the embedding's dtype as Hugging Face
    does (Gemma). A tied output layer still uses the unscaled matrix."""
    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the input embedding."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (residual outputs use std / sqrt(2 * num_layers))."""
    hidden_dropout: float = 0.0
    """Dropout on the embedding output and on each block's attention and MLP outputs."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (training only)."""
    tensor_model_parallel_size: int = 1
    """Tensor parallelism; only 1 is supported."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallelism; only 1 is supported."""
    context_parallel_size: int = 1
    """Context parallelism; only 1 is supported."""
    recompute_granularity: str | None = None
    """Activation recomputation: None, or `full` to recompute each whole block during backward."""

    def __post_init__(self) -> None:
        # Hooks are behaviour, not configuration: kept off the dataclass fields so that equality,
        # `ConfigContainer.to_dict()` and run_config.yaml describe the architecture only.
        self._pre_wrap_hooks: list[PreWrapHook] = []

    def register_pre_wrap_hook(self, hook: PreWrapHook) -> None:
        """Run `hook(model)` at the end of `provide()`, before the trainer wraps the model for data parallelism.

        Hooks run in registration order on the float32 model; one that returns a model replaces it. The
        bridge uses this to load Hugging Face weights (`AutoBridge.to_megatron_provider(load_weights=True)`).
        """
        self._pre_wrap_hooks.append(hook)

    @property
    def pre_wrap_hooks(self) -> tuple[PreWrapHook, ...]:
        """The hooks `provide()` runs, in order."""
        return tuple(self._pre_wrap_hooks)

    @property
    def resolved_ffn_hidden_size(self) -> int:
        """`ffn_hidden_size`, or 4 * hidden_size when it is None."""
        return 4 * self.hidden_size if self.ffn_hidden_size is None else self.ffn_hidden_size

    @property
    def resolved_num_query_groups(self) -> int:
        """`num_query_groups`, or num_attention_heads when it is None."""
        return self.num_attention_heads if self.num_query_groups is None else self.num_query_groups

    @property
    def resolved_kv_channels(self) -> int:
        """`kv_channels`, or hidden_size // num_attention_heads when it is None."""
        return self.hidden_size // self.num_attention_heads if self.kv_channels is None else self.kv_channels

    @property
    def resolved_activation_func(self) -> str:
        """`activation_func`, or `silu` for a gated MLP and `gelu` for a plain one when it is None."""
        if self.activation_func is not None:
            return self.activation_func
        return "silu" if self.gated_linear_unit else "gelu"

    @property
    def window_attention_layers(self) -> tuple[bool, ...]:
        """For each layer (0-based), whether it uses `window_size` (all False without a window)."""
        freq = self.window_attn_skip_freq
        if self.window_size is None:
            return (False,) * self.num_layers
        if freq is None:
            return (True,) * self.num_layers
        if isinstance(freq, int):
            return tuple((n + 1) % freq != 0 for n in range(self.num_layers))
        return tuple(bool(flag) for flag in freq)

    @property
    def padded_vocab_size(self) -> int:
        """`vocab_size` rounded up to a multiple of `make_vocab_size_divisible_by`."""
        if self.vocab_size is None:
            raise config_error(
                "model.vocab_size", None,
                "a positive integer; None is only allowed until the trainer fills it from the tokenizer",
            )
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field."""
        self._validate_sizes()
        self._validate_choices()
        self._validate_numbers()
        self._validate_window()

    def _validate_sizes(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "make_vocab_size_divisible_by"):
            if not _is_positive_int(getattr(self, name)):
                raise config_error(f"model.{name}", getattr(self, name), "a positive integer")
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels", "vocab_size"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise config_error(f"model.{name}", value, "a positive integer or None")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise config_error(
                "model.hidden_size", self.hidden_size,
                f"a multiple of model.num_attention_heads={self.num_attention_heads} "
                "(or set model.kv_channels)",
            )
        if self.num_attention_heads % self.resolved_num_query_groups != 0:
            raise config_error(
                "model.num_query_groups", self.num_query_groups,
                f"a divisor of model.num_attention_heads={self.num_attention_heads}",
            )
        if self.position_embedding_type == "rope" and self.resolved_kv_channels % 2 != 0:
            raise config_error(
                "model.kv_channels", self.resolved_kv_channels, "an even head dimension (rotary embeddings)"
            )

    def _validate_choices(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            allowed = f"choose one of {', '.join(NORMALIZATIONS)}"
            raise config_error("model.normalization", self.normalization, allowed)
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise config_error("model.position_embedding_type", self.position_embedding_type, "only rope")
        if self.activation_func is not None and self.activation_func not in ACTIVATION_FUNCS:
            allowed = f"None or one of {', '.join(ACTIVATION_FUNCS)}"
            raise config_error("model.activation_func", self.activation_func, allowed)
        for name in ("qk_layernorm", "layernorm_zero_centered_gamma", "post_self_attn_layernorm",
                     "post_mlp_layernorm", "scale_embeddings_by_hidden_size"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(f"model.{name}", getattr(self, name), "True or False")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise config_error("model.recompute_granularity", self.recompute_granularity, "None or 'full'")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) != 1:
                raise config_error(
                    f"model.{name}", getattr(self, name),
                    "only 1 is supported; scale out with data parallelism (torchrun) instead",
                )

    def _validate_numbers(self) -> None:
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not (_is_finite_number(value) and 0.0 <= value < 1.0):
                raise config_error(f"model.{name}", value, "a probability in [0, 1)")
        for name in ("init_method_std", "rotary_base", "layernorm_epsilon"):
            value = getattr(self, name)
            if not _is_positive_number(value):
                raise config_error(f"model.{name}", value, "a finite positive number")
        for name in ("softmax_scale", "rotary_base_local"):
            value = getattr(self, name)
            if value is not None and not _is_positive_number(value):
                raise config_error(f"model.{name}", value, "a finite positive number or None")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        expected = (
            f"None or a dict with rope_type in {ROPE_SCALING_TYPES}: llama3 with {', '.join(LLAMA3_ROPE_KEYS)}, "
            "linear with factor"
        )
        if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_SCALING_TYPES:
            raise config_error("model.rope_scaling", scaling, expected)
        keys = LLAMA3_ROPE_KEYS if scaling["rope_type"] == "llama3" else ("factor",)
        for key in keys:
            if not _is_positive_number(scaling.get(key)):
                raise config_error(f"model.rope_scaling[{key!r}]", scaling.get(key), "a finite positive number")
        if scaling["rope_type"] == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise config_error(
                "model.rope_scaling['high_freq_factor']", scaling["high_freq_factor"],
                f"greater than low_freq_factor={scaling['low_freq_factor']}",
            )

    def _validate_window(self) -> None:
        window = self.window_size
        if window is not None:
            pair = isinstance(window, (tuple, list)) and len(window) == 2
            if not pair or not all(isinstance(v, int) and not isinstance(v, bool) for v in window):
                raise config_error("model.window_size", window, "None or a (left, right) pair of integers")
            if window[0] < 0 or window[1] != 0:
                raise config_error(
                    "model.window_size", window,
                    "left >= 0 and right == 0 (causal); Hugging Face's sliding_window=W is (W - 1, 0)",
                )
        for name in ("window_attn_skip_freq", "rotary_base_local"):
            if window is None and getattr(self, name) is not None:
                raise config_error(f"model.{name}", getattr(self, name), "None unless model.window_size is set")
        freq = self.window_attn_skip_freq
        if isinstance(freq, list):
            if len(freq) != self.num_layers or any(flag not in (0, 1) or isinstance(flag, float) for flag in freq):
                raise config_error(
                    "model.window_attn_skip_freq", freq,
                    f"a list of model.num_layers={self.num_layers} entries, each 1 (windowed) or 0 (global)",
                )
        elif freq is not None and not _is_positive_int(freq):
            raise config_error("model.window_attn_skip_freq", freq, "None, a positive integer or a list of 0/1")
        if window is not None and self.attention_dropout != 0.0:
            raise config_error(
                "model.attention_dropout", self.attention_dropout,
                "0.0 with model.window_size set (FlexAttention, the GPU kernel for windows, has no dropout)",
            )

    def provide(self, pre_process: bool = True, post_process: bool = True) -> GPTModel:
        """Build the model in float32 on the current default device (CPU unless changed), then run the hooks.

        Initialisation draws from torch's global RNG, so a fixed seed gives identical weights.
        `pre_process`/`post_process` exist for Megatron compatibility; without pipeline parallelism the
        model always owns both the embedding and the output layer, so both must be True.
        """
        if not (pre_process and post_process):
            raise config_error(
                "model.pipeline_model_parallel_size", self.pipeline_model_parallel_size,
                "1: pre_process and post_process must both be True without pipeline parallelism",
            )
        self.validate()
        _ = self.padded_vocab_size  # a still-missing vocab_size fails here with a clear message
        model = GPTModel(self).float()
        for hook in self._pre_wrap_hooks:
            model = hook(model) or model
        return model
