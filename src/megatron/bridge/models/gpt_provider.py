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

from megatron.bridge.models.decoder import GPTModel
from megatron.bridge.utils.config_fields import KnownFieldsOnly
from megatron.bridge.utils.errors import config_error

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDING_TYPES = ("rope",)
RECOMPUTE_GRANULARITIES = (None, "full")
ROPE_SCALING_TYPES = ("llama3",)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

PreWrapHook = Callable[[GPTModel], "GPTModel | None"]
"""Called with the freshly built model at the end of `provide()`; may return a replacement model."""


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


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
    """Per-head dimension (None: hidden_size // num_attention_heads)."""
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
    gated_linear_unit: bool = True
    """SwiGLU MLP (gate, up, down) if True, else a GELU MLP (fc1, fc2)."""
    add_bias_linear: bool = False
    """Give the attention output projection and the MLP layers a bias."""
    add_qkv_bias: bool = False
    """Give the query, key and value projections a bias (Qwen2 does)."""
    position_embedding_type: str = "rope"
    """How positions enter the model; only `rope` (rotary embeddings) is implemented."""
    rotary_base: int = 10000
    """Base of the rotary embedding frequencies."""
    rope_scaling: dict[str, Any] | None = None
    """Long-context rotary frequency scaling, as Hugging Face's `rope_scaling` (None: plain RoPE). Only
    Llama 3.1's is implemented: `{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}`."""
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
            if not (_is_finite_number(value) and value > 0):
                raise config_error(f"model.{name}", value, "a finite positive number")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        expected = f"None or a dict with rope_type in {ROPE_SCALING_TYPES} and {', '.join(LLAMA3_ROPE_KEYS)}"
        if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_SCALING_TYPES:
            raise config_error("model.rope_scaling", scaling, expected)
        for key in LLAMA3_ROPE_KEYS:
            value = scaling.get(key)
            if not (_is_finite_number(value) and value > 0):
                raise config_error(f"model.rope_scaling[{key!r}]", value, "a finite positive number")
        if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise config_error(
                "model.rope_scaling['high_freq_factor']", scaling["high_freq_factor"],
                f"greater than low_freq_factor={scaling['low_freq_factor']}",
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
