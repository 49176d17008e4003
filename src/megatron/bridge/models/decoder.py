"""A GPT-style decoder-only transformer in plain PyTorch (Qwen2/3, Llama 3, Mistral and Gemma 3 shapes).

One file, no parallelism: each rank holds the whole model and data parallelism wraps it from outside.
Attention (rotary embeddings, masks, kernels) lives in `attention.py` and the norms in `norms.py`; both
are re-exported here. Parameter names borrow Megatron Core's words (`embedding`, `self_attention`,
`linear_proj`, `final_norm`, `output_layer`) but are not its names: q, k and v (and gate and up) stay
separate `nn.Linear` layers, where Megatron Core fuses them, so that Hugging Face checkpoints map onto
them one tensor to one tensor (see docs/differences.md).

Module tree (`N` = layer index; bracketed modules exist only when the provider field named is set):

    embedding                          nn.Embedding [vocab, hidden]    (x sqrt(hidden): scale_embeddings_by_hidden_size)
    layers.N.input_layernorm           RMSNorm or LayerNorm
    layers.N.self_attention.linear_q   nn.Linear hidden -> heads * kv_channels      (bias: add_qkv_bias)
    layers.N.self_attention.linear_k   nn.Linear hidden -> groups * kv_channels     (bias: add_qkv_bias)
    layers.N.self_attention.linear_v   nn.Linear hidden -> groups * kv_channels     (bias: add_qkv_bias)
    layers.N.self_attention.linear_proj nn.Linear heads * kv_channels -> hidden     (bias: add_bias_linear)
    [layers.N.self_attention.q_layernorm, k_layernorm]   norm over kv_channels      (qk_layernorm)
    [layers.N.post_self_attn_layernorm]  norm of the attention output              (post_self_attn_layernorm)
    layers.N.pre_mlp_layernorm         RMSNorm or LayerNorm
    layers.N.mlp.linear_gate/linear_up/linear_down   gated MLP: SwiGLU or GeGLU (gated_linear_unit=True)
    layers.N.mlp.linear_fc1/linear_fc2               plain MLP, GELU by default (gated_linear_unit=False)
    [layers.N.post_mlp_layernorm]      norm of the MLP output                       (post_mlp_layernorm)
    final_norm                         RMSNorm or LayerNorm
    output_layer                       nn.Linear hidden -> vocab, absent with tied embeddings

Every norm is zero-centred (gain `1 + w`, Gemma) with `layernorm_zero_centered_gamma`. Which layers use
sliding-window attention, and with which rotary base, is `GPTModelProvider.window_attention_layers` /
`rotary_base_local`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.bridge.models.attention import (
    Attention,
    AttentionMask,
    DocumentSpans,
    LayerMask,
    apply_rotary,
    llama3_scaled_frequencies,
    rotary_cos_sin,
)
from megatron.bridge.models.losses import chunked_cross_entropy
from megatron.bridge.models.norms import LayerNorm, RMSNorm, build_norm, reset_norm
from megatron.bridge.models.packed_seq import PackedSeqParams

if TYPE_CHECKING:
    from megatron.bridge.models.gpt_provider import GPTModelProvider

__all__ = [
    "MLP",
    "Attention",
    "AttentionMask",
    "GPTModel",
    "LayerNorm",
    "RMSNorm",
    "TransformerBlock",
    "apply_rotary",
    "build_norm",
    "llama3_scaled_frequencies",
    "rotary_cos_sin",
]

# Linear layers that write into the residual stream get Megatron's depth-scaled init.
_OUTPUT_PROJECTIONS = ("linear_proj", "linear_down", "linear_fc2")
# Logit entries computed at once by the loss path: 2^27 is 512 MiB in fp32.
_LOGITS_PER_CHUNK = 2**27

LayerInputs = tuple[tuple[torch.Tensor, torch.Tensor], LayerMask]
"""What a block needs besides its input: the rotary (cos, sin) tables and the attention mask."""


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Hugging Face's `gelu_pytorch_tanh`, Gemma's activation)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh}
"""The MLP activations `activation_func` may name."""


@functools.lru_cache(maxsize=8)
def _rounded_to(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to float32, then to `dtype`: how Hugging Face rounds Gemma's embedding scale."""
    return torch.tensor(value, dtype=torch.float32, device="cpu").to(dtype).item()


class MLP(nn.Module):
    """Feed-forward block: gated (`linear_gate`, `linear_up`, `linear_down`) or plain (`linear_fc1/2`).

    The gated form is `down(act(gate(x)) * up(x))`: SwiGLU with `silu`, GeGLU with `gelu_tanh`.
    """

    def __init__(self, config: GPTModelProvider) -> None:
        super().__init__()
        hidden, ffn, bias = config.hidden_size, config.resolved_ffn_hidden_size, config.add_bias_linear
        self.gated = config.gated_linear_unit
        self.activation = ACTIVATIONS[config.resolved_activation_func]
        if self.gated:
            self.linear_gate = nn.Linear(hidden, ffn, bias=bias)
            self.linear_up = nn.Linear(hidden, ffn, bias=bias)
            self.linear_down = nn.Linear(ffn, hidden, bias=bias)
        else:
            self.linear_fc1 = nn.Linear(hidden, ffn, bias=bias)
            self.linear_fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.linear_down(self.activation(self.linear_gate(x)) * self.linear_up(x))
        return self.linear_fc2(self.activation(self.linear_fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer: `h = x + drop(attn(norm(x)))`, then `h + drop(mlp(norm(h)))`.

    With `post_self_attn_layernorm` / `post_mlp_layernorm` (Gemma) the attention and MLP outputs are
    normalised once more before they join the residual stream.
    """

    def __init__(self, config: GPTModelProvider) -> None:
        super().__init__()
        norm = functools.partial(
            build_norm, config.normalization, config.hidden_size, config.layernorm_epsilon,
            zero_centered_gamma=config.layernorm_zero_centered_gamma,
        )
        self.input_layernorm = norm()
        self.self_attention = Attention(config)
        self.post_self_attn_layernorm = norm() if config.post_self_attn_layernorm else None
        self.pre_mlp_layernorm = norm()
        self.mlp = MLP(config)
        self.post_mlp_layernorm = norm() if config.post_mlp_layernorm else None
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attention_mask: LayerMask = None
    ) -> torch.Tensor:
        """`x` `[batch, seq, hidden]`; `rope` and `attention_mask` as `GPTModel` prepares them for this layer."""
        attn = self.self_attention(self.input_layernorm(x), rope, attention_mask)
        if self.post_self_attn_layernorm is not None:
            attn = self.post_self_attn_layernorm(attn)
        x = x + self.hidden_dropout(attn)
        mlp = self.mlp(self.pre_mlp_layernorm(x))
        if self.post_mlp_layernorm is not None:
            mlp = self.post_mlp_layernorm(mlp)
        return x + self.hidden_dropout(mlp)


class GPTModel(nn.Module):
    """Decoder-only language model built from a `GPTModelProvider`; use `provider.provide()` to build one.

    Weight decay: every parameter with `ndim < 2` is a bias or a norm weight and should be excluded from
    weight decay; every 2-D parameter (Linear weights and the embedding) should get it. No helper is
    needed: `[p for p in model.parameters() if p.ndim < 2]` is the no-decay group.

    With `share_embeddings_and_output_weights` there is no `output_layer`: logits reuse `embedding.weight`
    (unscaled, also with `scale_embeddings_by_hidden_size`).
    """

    def __init__(self, config: GPTModelProvider) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.padded_vocab_size
        self.embedding = nn.Embedding(self.vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.windowed_layers: tuple[bool, ...] = config.window_attention_layers
        """For each layer, whether it uses sliding-window attention (`window_size`)."""
        self.final_norm = build_norm(
            config.normalization, config.hidden_size, config.layernorm_epsilon,
            zero_centered_gamma=config.layernorm_zero_centered_gamma,
        )
        self.output_layer: nn.Linear | None = None
        if not config.share_embeddings_and_output_weights:
            self.output_layer = nn.Linear(config.hidden_size, self.vocab_size, bias=False)
        self.compile_loss = False
        """Run the loss through `torch.compile` (set by the trainer when it compiles the blocks)."""
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron's init: N(0, std) weights, std / sqrt(2 * layers) for residual outputs, zero biases,
        identity norms (weight 1, or 0 when zero-centred)."""
        std = self.config.init_method_std
        scaled_std = std / math.sqrt(2.0 * self.config.num_layers)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                module_std = scaled_std if name.endswith(_OUTPUT_PROJECTIONS) else std
                nn.init.normal_(module.weight, mean=0.0, std=module_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, LayerNorm)):
                reset_norm(module)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameter count; `exclude_embeddings` drops the embedding and an untied output layer."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embedding.weight.numel()
            if self.output_layer is not None:
                total -= self.output_layer.weight.numel()
        return total

    def _layer_inputs(self, position_ids: torch.Tensor, masks: AttentionMask) -> list[LayerInputs]:
        """Each layer's (rope, mask): one table per rotary base and one mask per window, shared by the layers."""
        config = self.config
        window_left = None if config.window_size is None else config.window_size[0]
        ropes: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        layer_masks: dict[bool, LayerMask] = {}
        inputs = []
        for windowed in self.windowed_layers:
            local_rope = windowed and config.rotary_base_local is not None
            if local_rope not in ropes:
                # rope_scaling belongs to the global layers; windowed ones with their own base go without.
                base, scaling = (
                    (config.rotary_base_local, None) if local_rope else (config.rotary_base, config.rope_scaling)
                )
                ropes[local_rope] = rotary_cos_sin(position_ids, config.resolved_kv_channels, base, scaling)
            if windowed not in layer_masks:
                layer_masks[windowed] = masks.for_window(window_left if windowed else None)
            inputs.append((ropes[local_rope], layer_masks[windowed]))
        return inputs

    def _run_layers(self, x: torch.Tensor, layer_inputs: list[LayerInputs]) -> torch.Tensor:
        recompute = (
            self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        )
        for layer, (rope, mask) in zip(self.layers, layer_inputs, strict=True):
            if recompute:
                # Keep only each block's input; its activations are rebuilt during backward.
                x = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask)
        return x

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        if self.config.scale_embeddings_by_hidden_size:
            # A Python float, rounded as Hugging Face rounds its scale tensor: no device copy per step.
            x = x * _rounded_to(math.sqrt(self.config.hidden_size), self.embedding.weight.dtype)
        return self.embedding_dropout(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[batch, seq, vocab]`, or with `labels` the float32 per-token loss `[batch, seq]`.

        `position_ids` `[batch, seq]` default to `0..seq-1` (restarting per example when packed).
        `attention_mask` is None (causal) or a boolean `[batch, 1, seq, seq]` tensor where True marks a
        position that must not be attended to; windowed layers also keep to their window. With
        `packed_seq_params` (`qkv_format="thd"`), each row holds several examples and no token attends
        across an example boundary. With `labels` and a `loss_mask` `[batch, seq]`, the logits are
        computed only where the mask is non-zero and every other loss is 0.0 (a copy of the mask's
        selection costs a device sync on GPUs).
        """
        b, s = input_ids.shape
        document_ids = None
        if packed_seq_params is not None:
            if input_ids.is_cuda and self.training and self.config.attention_dropout > 0:
                raise ValueError(
                    f"model.attention_dropout={self.config.attention_dropout} is invalid with packed sequences on "
                    "CUDA: their kernel (FlexAttention) has no dropout; set it to 0.0"
                )
            document_ids = packed_seq_params.document_ids(b, s)
            if position_ids is None:
                position_ids = packed_seq_params.position_ids(b, s)
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        spans = None
        # Off CUDA the offsets are on the host (free to read); compiled blocks would recompile for every new set.
        if packed_seq_params is not None and not input_ids.is_cuda and not self.compile_loss:
            spans = DocumentSpans.from_cu_seqlens(packed_seq_params.cu_seqlens_q.tolist(), b, s)
        masks = AttentionMask(
            seq_length=s, device=input_ids.device, hidden=attention_mask, block_sparse=input_ids.is_cuda,
            document_ids=document_ids, document_spans=spans,
        )
        x = self._embed(input_ids)
        x = self.final_norm(self._run_layers(x, self._layer_inputs(position_ids, masks)))
        weight = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        if labels is None:
            return F.linear(x, weight)
        # The full fp32 logits of a 150k vocabulary would be the largest tensor of the step.
        chunk_tokens = max(128, _LOGITS_PER_CHUNK // weight.shape[0])
        if loss_mask is None:
            return chunked_cross_entropy(x, weight, labels, chunk_tokens=chunk_tokens, compiled=self.compile_loss)
        # Logits only where a loss is counted: in finetuning the prompts and the padding are most tokens.
        counted = loss_mask.reshape(-1) != 0
        losses = torch.zeros(b * s, dtype=torch.float32, device=x.device)
        losses[counted] = chunked_cross_entropy(x.reshape(b * s, -1)[counted], weight, labels.reshape(-1)[counted],
                                                chunk_tokens=chunk_tokens, compiled=self.compile_loss)
        return losses.view(b, s)
