"""A GPT-style decoder-only transformer in plain PyTorch (the Qwen2 / Llama family).

One file, no parallelism: each rank holds the whole model and data parallelism wraps it from outside.
Parameter names follow Megatron Core where it has one (`embedding`, `layers.N.self_attention.linear_proj`,
`final_norm`, `output_layer`) and keep q, k and v (and gate and up) as separate `nn.Linear` layers so that
Hugging Face checkpoints map onto them one tensor to one tensor.

Module tree (`N` = layer index):

    embedding                          nn.Embedding [vocab, hidden]
    layers.N.input_layernorm           RMSNorm or LayerNorm
    layers.N.self_attention.linear_q   nn.Linear hidden -> heads * kv_channels      (bias: add_qkv_bias)
    layers.N.self_attention.linear_k   nn.Linear hidden -> groups * kv_channels     (bias: add_qkv_bias)
    layers.N.self_attention.linear_v   nn.Linear hidden -> groups * kv_channels     (bias: add_qkv_bias)
    layers.N.self_attention.linear_proj nn.Linear heads * kv_channels -> hidden     (bias: add_bias_linear)
    layers.N.pre_mlp_layernorm         RMSNorm or LayerNorm
    layers.N.mlp.linear_gate/linear_up/linear_down   SwiGLU (gated_linear_unit=True)
    layers.N.mlp.linear_fc1/linear_fc2               GELU   (gated_linear_unit=False)
    final_norm                         RMSNorm or LayerNorm
    output_layer                       nn.Linear hidden -> vocab, absent with tied embeddings
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.bridge.models.losses import chunked_cross_entropy

if TYPE_CHECKING:
    from megatron.bridge.models.gpt_provider import GPTModelProvider

# Flash attention handles grouped k/v natively from torch 2.5 on; older versions need k/v repeated.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

# Linear layers that write into the residual stream get Megatron's depth-scaled init.
_OUTPUT_PROJECTIONS = ("linear_proj", "linear_down", "linear_fc2")
# Logit entries computed at once by the loss path: 2^27 is 512 MiB in fp32.
_LOGITS_PER_CHUNK = 2**27


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 loses too much precision in the mean of squares, so reduce in float32.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` that always normalises in float32 and returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def build_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    """The norm named by `normalization` (`RMSNorm` or `LayerNorm`)."""
    if kind == "RMSNorm":
        return RMSNorm(hidden_size, eps)
    if kind == "LayerNorm":
        return LayerNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}: choose RMSNorm or LayerNorm")


def llama3_scaled_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's long-context rotary frequencies (`rope_scaling` with `rope_type="llama3"`).

    With `L = original_max_position_embeddings`, a frequency whose wavelength is shorter than
    `L / high_freq_factor` is kept, one longer than `L / low_freq_factor` is divided by `factor`, and
    the ones in between move linearly (in `L / wavelength`) from divided to kept.
    """
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    periods_in_context = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
    # 0 for long wavelengths (fully scaled), 1 for short ones (unchanged), linear in between.
    keep = ((periods_in_context - low) / (high - low)).clamp(0.0, 1.0)
    return inv_freq * ((1.0 - keep) / factor + keep)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, base: float, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables `[batch, 1, seq, head_dim]` (float32) for the given position ids.

    `scaling` is the provider's `rope_scaling` (None: plain RoPE). Frequencies are recomputed each call
    rather than cached in a buffer: it costs `head_dim / 2` values and keeps the model free of buffers
    that meta-device construction or checkpoint loading must fill.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # [b, s, head_dim / 2]
    # Rotate-half layout (as in HF Llama/Qwen2): both halves of the head share one frequency table.
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[batch, heads, seq, head_dim]` by the angles behind `cos`/`sin`."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, config: GPTModelProvider) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_groups = config.resolved_num_query_groups
        self.head_dim = config.resolved_kv_channels
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        self.linear_q = nn.Linear(hidden, q_size, bias=config.add_qkv_bias)
        self.linear_k = nn.Linear(hidden, kv_size, bias=config.add_qkv_bias)
        self.linear_v = nn.Linear(hidden, kv_size, bias=config.add_qkv_bias)
        self.linear_proj = nn.Linear(q_size, hidden, bias=config.add_bias_linear)

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x` `[batch, seq, hidden]`; `attention_mask`: boolean, True = masked out (None: causal)."""
        b, s, _ = x.shape
        q = apply_rotary(self._split_heads(self.linear_q(x), self.num_heads), *rope)
        k = apply_rotary(self._split_heads(self.linear_k(x), self.num_groups), *rope)
        v = self._split_heads(self.linear_v(x), self.num_groups)
        grouped = self.num_groups != self.num_heads
        # Fused kernels other than flash may not take grouped k/v; with an explicit mask flash is out
        # anyway, so only the causal path relies on native GQA.
        native_gqa = grouped and _SDPA_HAS_GQA and attention_mask is None
        if grouped and not native_gqa:
            # Query head i reads group i // (heads / groups), the layout HF's repeat_kv uses.
            repeats = self.num_heads // self.num_groups
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v,
            # SDPA's boolean mask marks positions that take part, the opposite of Megatron's.
            attn_mask=None if attention_mask is None else ~attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attention_mask is None,
            **({"enable_gqa": True} if native_gqa else {}),
        )
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """Feed-forward block: SwiGLU (`linear_gate`, `linear_up`, `linear_down`) or GELU (`linear_fc1/2`)."""

    def __init__(self, config: GPTModelProvider) -> None:
        super().__init__()
        hidden, ffn, bias = config.hidden_size, config.resolved_ffn_hidden_size, config.add_bias_linear
        self.gated = config.gated_linear_unit
        if self.gated:
            self.linear_gate = nn.Linear(hidden, ffn, bias=bias)
            self.linear_up = nn.Linear(hidden, ffn, bias=bias)
            self.linear_down = nn.Linear(ffn, hidden, bias=bias)
        else:
            self.linear_fc1 = nn.Linear(hidden, ffn, bias=bias)
            self.linear_fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.linear_down(F.silu(self.linear_gate(x)) * self.linear_up(x))
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer: `x + drop(attn(norm(x)))`, then `x + drop(mlp(norm(x)))`."""

    def __init__(self, config: GPTModelProvider) -> None:
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = build_norm(config.normalization, config.hidden_size, eps)
        self.self_attention = Attention(config)
        self.pre_mlp_layernorm = build_norm(config.normalization, config.hidden_size, eps)
        self.mlp = MLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x), rope, attention_mask))
        return x + self.hidden_dropout(self.mlp(self.pre_mlp_layernorm(x)))


class GPTModel(nn.Module):
    """Decoder-only language model built from a `GPTModelProvider`; use `provider.provide()` to build one.

    Weight decay: every parameter with `ndim < 2` is a bias or a norm weight and should be excluded from
    weight decay; every 2-D parameter (Linear weights and the embedding) should get it. No helper is
    needed: `[p for p in model.parameters() if p.ndim < 2]` is the no-decay group.

    With `share_embeddings_and_output_weights` there is no `output_layer`: logits reuse `embedding.weight`.
    """

    def __init__(self, config: GPTModelProvider) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.padded_vocab_size
        self.embedding = nn.Embedding(self.vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.final_norm = build_norm(config.normalization, config.hidden_size, config.layernorm_epsilon)
        self.output_layer: nn.Linear | None = None
        if not config.share_embeddings_and_output_weights:
            self.output_layer = nn.Linear(config.hidden_size, self.vocab_size, bias=False)
        self.compile_loss = False
        """Run the loss through `torch.compile` (set by the trainer when it compiles the blocks)."""
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron's init: N(0, std) weights, std / sqrt(2 * layers) for residual outputs, zero biases."""
        std = self.config.init_method_std
        scaled_std = std / math.sqrt(2.0 * self.config.num_layers)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                module_std = scaled_std if name.endswith(_OUTPUT_PROJECTIONS) else std
                nn.init.normal_(module.weight, mean=0.0, std=module_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameter count; `exclude_embeddings` drops the embedding and an untied output layer."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embedding.weight.numel()
            if self.output_layer is not None:
                total -= self.output_layer.weight.numel()
        return total

    def _run_layers(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        recompute = (
            self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        )
        for layer in self.layers:
            if recompute:
                # Keep only each block's input; its activations are rebuilt during backward.
                x = checkpoint(layer, x, rope, attention_mask, use_reentrant=False)
            else:
                x = layer(x, rope, attention_mask)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[batch, seq, vocab]`, or with `labels` the float32 per-token loss `[batch, seq]`.

        `position_ids` `[batch, seq]` default to `0..seq-1`. `attention_mask` is None (causal) or a boolean
        `[batch, 1, seq, seq]` tensor where True marks a position that must not be attended to.
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        rope = rotary_cos_sin(
            position_ids, self.config.resolved_kv_channels, self.config.rotary_base, self.config.rope_scaling
        )
        x = self.embedding_dropout(self.embedding(input_ids))
        x = self.final_norm(self._run_layers(x, rope, attention_mask))
        weight = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        if labels is None:
            return F.linear(x, weight)
        # The full fp32 logits of a 150k vocabulary would be the largest tensor of the step.
        chunk_tokens = max(128, _LOGITS_PER_CHUNK // weight.shape[0])
        return chunked_cross_entropy(x, weight, labels, chunk_tokens=chunk_tokens, compiled=self.compile_loss)
