"""The adapter modules: one low-rank pair (A, B) per site, and the linear layers that use it.

Layout in a block (the base weights keep their names, so checkpoints and the bridge see them unchanged):

    self_attention.linear_qkv_adapter.linear_in.weight    A  [dim, hidden]              (trainable)
    self_attention.linear_qkv_adapter.linear_out.weight   B  [q + k + v rows, dim]      (trainable)
    self_attention.linear_qkv_adapter.weight_magnitude    m  [q + k + v rows]           (DoRA only)
    self_attention.linear_q.weight, .bias                 W_q, b_q                      (frozen)

`linear_q`, `linear_k` and `linear_v` become `LoRALinear` (or `DoRALinear`) layers holding the same
base parameters plus a plain reference to the adapter, which is registered once, on the parent. Each
member reads its own rows of B (and of m). Everything stays inside the transformer block, so
`torch.compile` of a block, DDP and FSDP2's per-block `fully_shard` see adapters like any other
parameter; FSDP2 keeps frozen and trainable parameters in one group and reduces gradients only for
the trainable ones.

Math, with `s = alpha / dim` and each member's rows `B_i`, `m_i`:

    LoRA   y = W x + b + s * B_i A drop(x)                       (dropout "pre"; "post" drops s * B_i A x)
    DoRA   y = (m_i / ||W + s B_i A||) * (W x + s * B_i A x) + b (row norms, treated as constants)

Without dropout the members of a site share one `A x` (q, k and v read the same input; so do gate and
up): the first member computes it, the others reuse it, and the last one lets it go. With dropout
"pre" each member draws its own mask and so computes its own `A drop(x)`, as peft's separate
projections do. A compiled block computes each member's product and leaves the sharing to the
compiler. The scale and the sum go into the second product (`out += s * h B_i^T`, one GEMM), so the
adapter adds no pass over the layer's output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdaptedLinear",
    "DoRALinear",
    "INIT_METHODS",
    "LoRALinear",
    "LowRankAdapter",
    "dora_row_norms",
    "init_weight_",
]

INIT_METHODS = ("xavier", "kaiming", "normal", "zero")
"""How A and B may be initialised (upstream's names)."""


def init_weight_(weight: torch.Tensor, method: str) -> None:
    """Fill `weight` in place as upstream does: Xavier normal, Kaiming uniform, N(0, 0.2) or zeros."""
    assert method in INIT_METHODS, method
    with torch.no_grad():
        if method == "xavier":
            nn.init.xavier_normal_(weight)
        elif method == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        elif method == "normal":
            nn.init.normal_(weight, mean=0.0, std=0.2)
        else:
            nn.init.zeros_(weight)


class LowRankAdapter(nn.Module):
    """A (`linear_in`, `[dim, in]`) and B (`linear_out`, `[sum(rows), dim]`) of one site, plus DoRA's magnitudes.

    The adapter computes nothing itself: the members (`LoRALinear`, `DoRALinear`) read their rows.
    """

    def __init__(self, in_features: int, rows: tuple[int, ...], *, dim: int, alpha: float, dropout: float,
                 dropout_position: str, a_init: str, b_init: str, magnitude: bool) -> None:
        super().__init__()
        self.linear_in = nn.Linear(in_features, dim, bias=False)
        self.linear_out = nn.Linear(dim, sum(rows), bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = dropout
        self.dropout_position = dropout_position
        self.scale = alpha / dim
        self.weight_magnitude = nn.Parameter(torch.ones(sum(rows))) if magnitude else None
        init_weight_(self.linear_in.weight, a_init)
        init_weight_(self.linear_out.weight, b_init)
        self._members = len(rows)
        self._shared: tuple[torch.Tensor, torch.Tensor, int] | None = None
        """The last input, its `A x`, and how many members have yet to read it."""

    def down_project(self, x: torch.Tensor) -> torch.Tensor:
        """`A drop(x)` ("pre" dropout) or `A x`, computed once for all members when no dropout mask is drawn."""
        if self.dropout_position == "pre" and self.dropout_p > 0:
            return self.linear_in(self.dropout(x))  # every member its own mask
        if self._members == 1 or torch.compiler.is_compiling():
            return self.linear_in(x)
        shared = self._shared
        if shared is not None and shared[0] is x:
            hidden, remaining = shared[1], shared[2] - 1
        else:
            hidden, remaining = self.linear_in(x), self._members - 1
        # Held only until the last member has read it: an activation kept past its step would cost memory.
        self._shared = (x, hidden, remaining) if remaining > 0 else None
        return hidden

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, dropout={self.dropout_p:g} ({self.dropout_position})"


class AdaptedLinear(nn.Linear):
    """An `nn.Linear` whose base weight and bias are frozen and whose output gets an adapter's contribution.

    It takes over the replaced layer's own `weight` and `bias` parameters (same tensors, same names) and
    refers to the adapter, registered on the parent module, without registering it again.
    """

    def __init__(self, base: nn.Linear, adapter: LowRankAdapter, rows: tuple[int, int]) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        # A plain attribute, not a submodule: the parent owns the adapter (one A shared by q, k and v).
        self.__dict__["adapter"] = adapter
        self.rows = rows
        """`(start, stop)` of this layer's rows in the adapter's B."""

    def extra_repr(self) -> str:
        start, stop = self.rows
        return f"{super().extra_repr()}, adapter rows {start}:{stop}"

    def to_linear(self, weight: torch.Tensor) -> nn.Linear:
        """A plain `nn.Linear` with `weight` (the merged one) and this layer's bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(self.weight.requires_grad)
        return linear

    def merged_weight(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      magnitude: torch.Tensor | None) -> torch.Tensor:
        """This layer's weight with the adapter folded in (float32), from full (unsharded) tensors."""
        raise NotImplementedError


class LoRALinear(AdaptedLinear):
    """`W x + b + s * B_i A drop(x)`; dropout "post" applies to `s * B_i A x` instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter, (start, stop) = self.adapter, self.rows
        hidden = adapter.down_project(x)
        b_rows = adapter.linear_out.weight[start:stop]
        if adapter.dropout_position == "post" and adapter.dropout_p > 0:
            return F.linear(x, self.weight, self.bias) + adapter.dropout(F.linear(hidden, b_rows) * adapter.scale)
        # In place on the 2-D product itself (in place on a view would make autograd copy the gradient):
        # the base product's output is not saved for its backward. Autocast does not cast in-place
        # products, so the operands take the output's dtype, as autocast would give them.
        out = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        out.addmm_(hidden.reshape(-1, hidden.shape[-1]).to(out.dtype), b_rows.to(out.dtype).t(), alpha=adapter.scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    def merged_weight(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      magnitude: torch.Tensor | None) -> torch.Tensor:
        start, stop = self.rows
        return weight.float() + self.adapter.scale * (b[start:stop].float() @ a.float())


def dora_row_norms(weight: torch.Tensor, a: torch.Tensor, b_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """`||W + s * B_i A||` per output row, in float32 whatever the autocast, without gradient."""
    with torch.no_grad(), torch.autocast(device_type=weight.device.type, enabled=False):
        return torch.linalg.vector_norm(weight.float() + scale * (b_rows.float() @ a.float()), dim=1)


class DoRALinear(AdaptedLinear):
    """`(m_i / ||W + s B_i A||) * (W x + s B_i A drop(x)) + b`, with upstream's (and peft's) dropout correction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter, (start, stop) = self.adapter, self.rows
        b_rows = adapter.linear_out.weight[start:stop]
        dropped = adapter.dropout(x)
        lora = F.linear(adapter.linear_in(dropped), b_rows) * adapter.scale
        base = F.linear(x, self.weight)
        norms = dora_row_norms(self.weight, adapter.linear_in.weight, b_rows, adapter.scale)
        factor = (adapter.weight_magnitude[start:stop] / norms).to(base.dtype)
        if self.training and adapter.dropout_p > 0:
            # The base path sees the undropped input: y = W x + (factor - 1) W drop(x) + factor * lora.
            out = base + (factor - 1) * F.linear(dropped, self.weight) + factor * lora
        else:
            out = factor * (base + lora)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def merged_weight(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      magnitude: torch.Tensor | None) -> torch.Tensor:
        assert magnitude is not None, "a DoRA adapter always has weight_magnitude"
        start, stop = self.rows
        direction = weight.float() + self.adapter.scale * (b[start:stop].float() @ a.float())
        return (magnitude[start:stop].float() / direction.norm(dim=1))[:, None] * direction
