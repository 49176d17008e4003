"""Which linear layers an adapter config targets, named as upstream (Megatron Core) names them.

Upstream's LoRA targets Megatron Core's fused modules; our decoder keeps q, k, v (and gate, up) as
separate `nn.Linear` layers. A target kind therefore covers one or more of our layers ("members"), and
its adapter follows upstream's semantics: one A shared by every member and one B whose rows are split
among them in order (equivalent to one B on the fused output).

| kind          | upstream full name                            | our members: gated MLP / plain MLP          |
| ------------- | --------------------------------------------- | ------------------------------------------- |
| `linear_qkv`  | `decoder.layers.N.self_attention.linear_qkv`  | `self_attention.linear_q`, `_k`, `_v`       |
| `linear_proj` | `decoder.layers.N.self_attention.linear_proj` | `self_attention.linear_proj`                |
| `linear_fc1`  | `decoder.layers.N.mlp.linear_fc1`             | `mlp.linear_gate`, `_up` / `mlp.linear_fc1` |
| `linear_fc2`  | `decoder.layers.N.mlp.linear_fc2`             | `mlp.linear_down` / `mlp.linear_fc2`        |

Matching (upstream's rules): an entry of `target_modules` matches a site when it equals the kind (so a
bare kind matches it in every layer) or when, read as a pattern in which `*` stands for any run of
characters, it matches the site's whole upstream name (`*.layers.0.*.linear_qkv`) or our own name
(`layers.0.self_attention.linear_qkv`). Every entry must match at least one site.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron.bridge.utils.errors import config_error

if TYPE_CHECKING:
    from megatron.bridge.models.gpt_provider import GPTModelProvider

__all__ = ["ADAPTER_SUFFIX", "Site", "TARGET_KINDS", "UPSTREAM_PREFIX", "model_sites", "select_sites", "wildcard_match"]

TARGET_KINDS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""The module kinds LoRA and DoRA may target, in the order they run inside a block."""

ADAPTER_SUFFIX = "_adapter"
"""An adapter is the module `<kind>_adapter` beside its members, e.g. `self_attention.linear_qkv_adapter`."""

UPSTREAM_PREFIX = "decoder."
"""Megatron Core nests the layers under `decoder`; upstream patterns are written against that name."""


@dataclass(frozen=True)
class Site:
    """One place an adapter can go: a target kind in one layer, and the layers of ours it covers."""

    layer: int
    """0-based layer index."""
    kind: str
    """One of `TARGET_KINDS`."""
    parent: str
    """Our module holding the members and the adapter, e.g. `layers.0.self_attention`."""
    members: tuple[str, ...]
    """Attribute names of the covered `nn.Linear` layers in `parent`, e.g. `("linear_q", "linear_k", "linear_v")`."""
    rows: tuple[int, ...]
    """Output features of each member: B's rows are split in this order."""
    in_features: int
    """Input features shared by every member (the width of A)."""

    @property
    def name(self) -> str:
        """Our name of the (possibly fused) module, e.g. `layers.0.self_attention.linear_qkv`."""
        return f"{self.parent}.{self.kind}"

    @property
    def upstream_name(self) -> str:
        """Upstream's full name, e.g. `decoder.layers.0.self_attention.linear_qkv`."""
        return UPSTREAM_PREFIX + self.name

    @property
    def adapter_name(self) -> str:
        """The adapter module's name in our model, e.g. `layers.0.self_attention.linear_qkv_adapter`."""
        return f"{self.parent}.{self.kind}{ADAPTER_SUFFIX}"

    def member_name(self, index: int) -> str:
        """Our full name of member `index`, e.g. `layers.0.self_attention.linear_k`."""
        return f"{self.parent}.{self.members[index]}"

    def row_ranges(self) -> list[tuple[int, int]]:
        """`(start, stop)` of each member's rows in B (and in DoRA's magnitude vector)."""
        ranges, start = [], 0
        for rows in self.rows:
            ranges.append((start, start + rows))
            start += rows
        return ranges


def model_sites(provider: GPTModelProvider) -> list[Site]:
    """Every site of a model built from `provider`, layer by layer, in `TARGET_KINDS` order."""
    hidden, kv = provider.hidden_size, provider.resolved_kv_channels
    q_rows, kv_rows = provider.num_attention_heads * kv, provider.resolved_num_query_groups * kv
    ffn = provider.resolved_ffn_hidden_size
    fc1 = ("linear_gate", "linear_up") if provider.gated_linear_unit else ("linear_fc1",)
    fc2 = "linear_down" if provider.gated_linear_unit else "linear_fc2"
    sites = []
    for layer in range(provider.num_layers):
        attention, mlp = f"layers.{layer}.self_attention", f"layers.{layer}.mlp"
        sites += [
            Site(layer, "linear_qkv", attention, ("linear_q", "linear_k", "linear_v"), (q_rows, kv_rows, kv_rows),
                 hidden),
            Site(layer, "linear_proj", attention, ("linear_proj",), (hidden,), q_rows),
            Site(layer, "linear_fc1", mlp, fc1, (ffn,) * len(fc1), hidden),
            Site(layer, "linear_fc2", mlp, (fc2,), (hidden,), ffn),
        ]
    return sites


@functools.lru_cache(maxsize=256)
def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def wildcard_match(pattern: str, name: str) -> bool:
    """True when `name` is `pattern` with each `*` standing for any run of characters (dots included)."""
    return _wildcard(pattern).fullmatch(name) is not None


def _matches(pattern: str, site: Site) -> bool:
    return pattern == site.kind or wildcard_match(pattern, site.upstream_name) or wildcard_match(pattern, site.name)


def select_sites(sites: Sequence[Site], target_modules: Sequence[str], exclude_modules: Sequence[str]) -> list[Site]:
    """The sites `target_modules` picks (or, when it is empty, every site `exclude_modules` does not name).

    Raises:
        ConfigError: naming `peft.target_modules` when an entry matches no site, with the names that exist.
    """
    if not target_modules:
        return [site for site in sites if not any(_matches(pattern, site) for pattern in exclude_modules)]
    unmatched = [pattern for pattern in target_modules if not any(_matches(pattern, site) for site in sites)]
    if unmatched:
        raise config_error(
            "peft.target_modules", list(target_modules),
            f"no module matched {', '.join(map(repr, unmatched))}; entries are the kinds {', '.join(TARGET_KINDS)} "
            "(q/k/v are adapted together as linear_qkv and gate/up as linear_fc1, as upstream's fused modules) "
            "or patterns over full names such as 'decoder.layers.0.self_attention.linear_qkv' "
            f"(* matches anything; this model has layers 0..{max(site.layer for site in sites)})",
        )
    return [site for site in sites if any(_matches(pattern, site) for pattern in target_modules)]
