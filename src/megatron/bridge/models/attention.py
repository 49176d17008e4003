"""Self-attention for the decoder: rotary embeddings, which keys a query may see, and the kernel that runs it.

Masks are described once per forward pass by an `AttentionMask` (sequence length, optional sliding
window, optional explicit mask from the data, optional document ids of packed sequences) and turned,
once per distinct window, into what the attention kernel takes (a `LayerMask`):

| layer                                  | `LayerMask`        | kernel                                        |
| -------------------------------------- | ------------------ | --------------------------------------------- |
| full causal, or a window >= the sequence | `None`           | SDPA `is_causal=True` (flash on GPUs)         |
| windowed and/or packed, on CUDA        | `BlockMask`        | `torch.compile(flex_attention)`, block-sparse |
| packed, not windowed, elsewhere         | `DocumentSpans`   | SDPA `is_causal=True` once per example        |
| windowed elsewhere, or any explicit mask | boolean `Tensor`  | SDPA with the mask (True = may attend)        |

FlexAttention is the GPU kernel because SDPA has no window or document argument: its flash backend takes
no mask at all, so a windowed or packed SDPA call on a GPU would need a dense `[seq, seq]` mask.
FlexAttention has no backward on the CPU, so CPU training runs packed examples one by one (each a
causal SDPA call over its own tokens: a pack of two 256-token examples costs a quarter of one masked
512-token call) and windowed layers with a boolean mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron.bridge.models.norms import build_norm

__all__ = [
    "Attention",
    "AttentionMask",
    "DocumentSpans",
    "LayerMask",
    "apply_rotary",
    "attend",
    "causal_band",
    "document_block_mask",
    "llama3_scaled_frequencies",
    "rotary_cos_sin",
    "same_document_causal",
    "sliding_window_block_mask",
]

if TYPE_CHECKING:
    from megatron.bridge.models.gpt_provider import GPTModelProvider

# Flash attention handles grouped k/v natively from torch 2.5 on; older versions need k/v repeated.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

class DocumentSpans(NamedTuple):
    """The examples of a packed batch as the lengths of its segments, row by row (each row's sum to `seq`)."""

    lengths: tuple[tuple[int, ...], ...]

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: list[int], batch: int, seq: int) -> DocumentSpans:
        """Cut `batch` rows of `seq` tokens at the example offsets `cu_seqlens` (into the flattened batch)."""
        rows = []
        for row in range(batch):
            first, last = row * seq, (row + 1) * seq
            cuts = sorted({first, last, *(c for c in cu_seqlens if first < c < last)})
            rows.append(tuple(b - a for a, b in zip(cuts, cuts[1:], strict=False)))
        return cls(tuple(rows))


LayerMask = torch.Tensor | BlockMask | DocumentSpans | None
"""What one layer's attention kernel is given: None (plain causal), a boolean `Tensor` broadcastable to
`[batch, heads, seq, seq]` with True where a query may attend (SDPA), a FlexAttention `BlockMask`, or
the `DocumentSpans` of a packed batch (causal attention inside each)."""


# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings


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

    `scaling` is the provider's `rope_scaling` (None: plain RoPE; `llama3`; or `linear`, which divides
    every frequency by `factor`). Frequencies are recomputed each call rather than cached in a buffer:
    it costs `head_dim / 2` values and keeps the model free of buffers that meta-device construction
    or checkpoint loading must fill.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is not None and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling is not None:
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


# ---------------------------------------------------------------------------------------------------
# Which keys a query may see


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see in one forward pass; `GPTModel.forward` builds one and asks it per window.

    A query at position `i` sees key `j` when `j <= i`, and, in a layer with window `left`, `i - j <= left`
    (Megatron's inclusive `(left, 0)`: `left + 1` keys, the query's own included), and the explicit mask,
    if any, does not hide it, and, for packed sequences, `document_ids[j] == document_ids[i]` (a FlexAttention
    document mask on GPUs, a block-diagonal mask elsewhere). Layers only ever see the `LayerMask` this
    object hands out.
    """

    seq_length: int
    """Tokens per sequence (queries and keys alike)."""
    device: torch.device
    """Device of the activations (and so of every mask handed out)."""
    hidden: torch.Tensor | None = None
    """The data's explicit mask (`reset_attention_mask`): boolean `[batch, 1, seq, seq]`, True = must not
    attend (Megatron's convention). It already holds causality; None: plain causal."""
    block_sparse: bool = False
    """Hand windowed and packed layers a FlexAttention `BlockMask` instead of a dense one (on by default on CUDA)."""
    document_ids: torch.Tensor | None = None
    """Packed sequences: `[batch, seq]` integer id of the example each token belongs to (None: one per row)."""
    document_spans: DocumentSpans | None = None
    """Packed sequences off CUDA: the same examples as token ranges, run one by one where no window applies."""

    def for_window(self, window_left: int | None) -> LayerMask:
        """The mask for layers with window `(window_left, 0)` (None: full causal); see the module table."""
        windowed = window_left is not None and self.seq_length > window_left + 1
        window = window_left if windowed else None
        packed = self.document_ids is not None
        if self.hidden is None and not windowed and not packed:
            return None
        if self.hidden is None and not windowed and self.document_spans is not None:
            return self.document_spans
        if self.hidden is None and self.block_sparse:
            if packed:
                return document_block_mask(self.document_ids, window)
            return sliding_window_block_mask(self.seq_length, window_left, self.device)
        # SDPA's boolean mask marks positions that take part, the opposite of Megatron's.
        allowed = None if self.hidden is None else ~self.hidden
        if windowed:
            band = causal_band(self.seq_length, window_left, self.device)
            allowed = band if allowed is None else allowed & band
        if packed:
            same = same_document_causal(self.document_ids)
            allowed = same if allowed is None else allowed & same
        return allowed


def causal_band(seq_length: int, window_left: int, device: torch.device) -> torch.Tensor:
    """Boolean `[seq, seq]`: True where key `j` is within `window_left` positions before query `i` (or is `i`)."""
    positions = torch.arange(seq_length, device=device)
    behind = positions[:, None] - positions[None, :]  # i - j
    return (behind >= 0) & (behind <= window_left)


def same_document_causal(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean `[batch, 1, seq, seq]`: True where key `j <= i` belongs to query `i`'s document (block-diagonal)."""
    seq = document_ids.shape[1]
    same = document_ids[:, None, :, None] == document_ids[:, None, None, :]
    return same & torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()


@functools.lru_cache(maxsize=16)
def sliding_window_block_mask(seq_length: int, window_left: int, device: torch.device) -> BlockMask:
    """FlexAttention's block-sparse form of `causal_band`, cached per (seq, window, device).

    Made once and reused by every layer and step; the kernel computes only the blocks that touch the
    band.
    """

    def within_window(batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (k <= q) & (q - k <= window_left)

    return _block_mask(within_window, None, seq_length, device)


def document_block_mask(document_ids: torch.Tensor, window_left: int | None) -> BlockMask:
    """FlexAttention's block-sparse form of `same_document_causal`, within `window_left` when given.

    Made once per forward pass (the documents change with every batch) and shared by the layers with
    that window; blocks that lie wholly between two documents are skipped by the kernel.
    """
    batch, seq = document_ids.shape

    def same_document(b: torch.Tensor, head: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (k <= q) & (document_ids[b, q] == document_ids[b, k])

    def same_document_in_window(b: torch.Tensor, head: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return same_document(b, head, q, k) & (q - k <= window_left)

    mask_mod = same_document if window_left is None else same_document_in_window
    return _block_mask(mask_mod, batch, seq, document_ids.device)


def _block_mask(mask_mod: Callable[..., torch.Tensor], batch: int | None, seq_length: int,
                device: torch.device) -> BlockMask:
    # On CUDA the builder is compiled too: eager, it would materialise the [seq, seq] mask (and int64
    # index grids of that size) on the way.
    build = _compiled_flex().create_block_mask if device.type == "cuda" else create_block_mask
    return build(mask_mod, batch, None, seq_length, seq_length, device=device)


# ---------------------------------------------------------------------------------------------------
# Kernels

class _CompiledFlex(NamedTuple):
    flex_attention: Callable[..., torch.Tensor]
    create_block_mask: Callable[..., BlockMask]


_compiled: _CompiledFlex | None = None
"""`torch.compile` of both FlexAttention functions (eager, on a GPU they materialise the full scores or
mask). Made by the first CUDA block mask, in eager code, rather than at import: creating them loads the
compiler (seconds). A compiled block that calls the kernel traces through it."""


def _compiled_flex() -> _CompiledFlex:
    global _compiled
    if _compiled is None:
        _compiled = _CompiledFlex(torch.compile(flex_attention), torch.compile(create_block_mask))
    return _compiled


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float | None):
    if q.is_cuda:
        assert _compiled is not None, "CUDA block masks come from _block_mask, which compiles"
        kernel = _compiled.flex_attention
    else:
        kernel = flex_attention  # only forward-mode tests get here (FlexAttention has no CPU backward)
    return kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LayerMask, *, scale: float | None, dropout: float
) -> torch.Tensor:
    """Softmax attention `[batch, heads, seq, head_dim]` over grouped `k`/`v`, masked as `mask` says."""
    if isinstance(mask, BlockMask):
        assert dropout == 0.0, "validated: windowed and packed attention on CUDA have no dropout"
        return _flex(q, k, v, mask, scale)
    if isinstance(mask, DocumentSpans):
        return _attend_per_document(q, k, v, mask, scale=scale, dropout=dropout)
    heads, groups = q.shape[1], k.shape[1]
    # Fused kernels other than flash may not take grouped k/v; with an explicit mask flash is out
    # anyway, so only the causal path relies on native GQA.
    native_gqa = groups != heads and _SDPA_HAS_GQA and mask is None
    if groups != heads and not native_gqa:
        # Query head i reads group i // (heads / groups), the layout HF's repeat_kv uses.
        k, v = k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=mask is None,
        scale=scale,
        **({"enable_gqa": True} if native_gqa else {}),
    )


def _attend_per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: DocumentSpans, *,
                         scale: float | None, dropout: float) -> torch.Tensor:
    # Split, not sliced: the backward of a split is one concatenation, that of each slice a zero-filled
    # tensor of the whole row.
    rows = []
    for q_row, k_row, v_row, lengths in zip(q.split(1), k.split(1), v.split(1), documents.lengths, strict=True):
        pieces = zip(q_row.split(lengths, dim=2), k_row.split(lengths, dim=2), v_row.split(lengths, dim=2),
                     strict=True)
        rows.append(torch.cat([attend(*qkv, None, scale=scale, dropout=dropout) for qkv in pieces], dim=2))
    return torch.cat(rows)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings and optional per-head q/k norms.

    With `qk_layernorm`, `q_layernorm` and `k_layernorm` (one weight of `kv_channels` shared by all heads)
    normalise each head's query and key over the head dimension, before the rotation (Qwen3, Gemma 3).
    """

    def __init__(self, config: GPTModelProvider) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_groups = config.resolved_num_query_groups
        self.head_dim = config.resolved_kv_channels
        self.dropout = config.attention_dropout
        self.softmax_scale = config.softmax_scale
        hidden = config.hidden_size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        self.linear_q = nn.Linear(hidden, q_size, bias=config.add_qkv_bias)
        self.linear_k = nn.Linear(hidden, kv_size, bias=config.add_qkv_bias)
        self.linear_v = nn.Linear(hidden, kv_size, bias=config.add_qkv_bias)
        self.linear_proj = nn.Linear(q_size, hidden, bias=config.add_bias_linear)
        self.q_layernorm: nn.Module | None = None
        self.k_layernorm: nn.Module | None = None
        if config.qk_layernorm:
            norm = functools.partial(
                build_norm, config.normalization, self.head_dim, config.layernorm_epsilon,
                zero_centered_gamma=config.layernorm_zero_centered_gamma,
            )
            self.q_layernorm, self.k_layernorm = norm(), norm()

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: LayerMask = None) -> torch.Tensor:
        """`x` `[batch, seq, hidden]`; `rope` this layer's (cos, sin); `mask` from `AttentionMask.for_window`."""
        b, s, _ = x.shape
        q = self._split_heads(self.linear_q(x), self.num_heads)
        k = self._split_heads(self.linear_k(x), self.num_groups)
        v = self._split_heads(self.linear_v(x), self.num_groups)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = attend(q, k, v, mask, scale=self.softmax_scale, dropout=self.dropout if self.training else 0.0)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))
