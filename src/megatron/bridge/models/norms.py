"""The decoder's norms: RMSNorm and LayerNorm, computed in float32, optionally with Gemma's zero-centred gain.

With `zero_centered_gamma` (the provider's `layernorm_zero_centered_gamma`) the stored weight `w` is an
offset from one: the gain is `1 + w`, and the weight starts at zero. Hugging Face's Gemma norms store
their weights this way, so they load verbatim. The gain is applied in float32 before the result is cast
back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORMALIZATIONS", "LayerNorm", "RMSNorm", "build_norm", "reset_norm"]

NORMALIZATIONS = ("RMSNorm", "LayerNorm")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, zero_centered_gamma: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = nn.Parameter(torch.zeros(hidden_size) if zero_centered_gamma else torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 loses too much precision in the mean of squares, so reduce in float32.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        gain = self.weight.float()
        if self.zero_centered_gamma:
            gain = 1.0 + gain
        return (x32 * gain).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` that always normalises in float32 and returns the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, zero_centered_gamma: bool = False) -> None:
        super().__init__(hidden_size, eps=eps)
        self.zero_centered_gamma = zero_centered_gamma
        if zero_centered_gamma:
            with torch.no_grad():
                self.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        if weight is not None and self.zero_centered_gamma:
            weight = 1.0 + weight
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def build_norm(kind: str, hidden_size: int, eps: float, zero_centered_gamma: bool = False) -> nn.Module:
    """The norm named by `normalization` (`RMSNorm` or `LayerNorm`) over the last `hidden_size` features."""
    if kind == "RMSNorm":
        return RMSNorm(hidden_size, eps, zero_centered_gamma=zero_centered_gamma)
    if kind == "LayerNorm":
        return LayerNorm(hidden_size, eps=eps, zero_centered_gamma=zero_centered_gamma)
    raise ValueError(f"unknown normalization {kind!r}: choose one of {', '.join(NORMALIZATIONS)}")


@torch.no_grad()
def reset_norm(norm: RMSNorm | LayerNorm) -> None:
    """Identity gain (weight 1, or 0 when zero-centred) and zero bias."""
    if norm.zero_centered_gamma:
        nn.init.zeros_(norm.weight)
    else:
        nn.init.ones_(norm.weight)
    if getattr(norm, "bias", None) is not None:
        nn.init.zeros_(norm.bias)
