"""`PEFT`: the fields LoRA and DoRA share, their validation, and the transform that adds adapters to a model.

`peft(model)` (or `peft.apply(model)`) freezes every parameter of the model, then puts an adapter on
each targeted site (see `targets`), and returns the same model. Apply it to the bare model after its
base weights are loaded and before DDP / FSDP2 wrapping or `torch.compile`; as a provider pre-wrap hook
register it after the hook that loads the weights:

    provider = bridge.to_megatron_provider(load_weights=True)
    provider.register_pre_wrap_hook(LoRA(dim=16))     # runs after the weight loader

An optimizer built over `requires_grad` parameters then holds the adapters only.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from megatron.bridge.models.decoder import GPTModel
from megatron.bridge.peft.layers import INIT_METHODS, AdaptedLinear, LowRankAdapter, dora_row_norms
from megatron.bridge.peft.targets import ADAPTER_SUFFIX, TARGET_KINDS, Site, model_sites, select_sites
from megatron.bridge.utils.config_fields import KnownFieldsOnly
from megatron.bridge.utils.errors import ConfigError, UserError, config_error

__all__ = ["DROPOUT_POSITIONS", "PEFT", "freeze_summary", "full_tensor", "peft_from_dict"]

DROPOUT_POSITIONS = ("pre", "post")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_names(name: str, value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise config_error(f"peft.{name}", value, "a list of module names or patterns, e.g. ['linear_qkv']")


@dataclass
class PEFT(KnownFieldsOnly):
    """Fields shared by `LoRA` and `DoRA` (upstream's names and meaning); subclasses set the defaults."""

    target_modules: list[str] = field(default_factory=lambda: list(TARGET_KINDS))
    """Kinds or wildcard patterns to adapt (see `megatron.bridge.peft.targets`); empty: every site not in
    `exclude_modules`."""
    exclude_modules: list[str] = field(default_factory=list)
    """Kinds or patterns to leave alone; only with an empty `target_modules` (as upstream)."""
    dim: int = 32
    """Rank of the adapters (the inner width of B @ A)."""
    alpha: float = 32
    """Scale numerator: adapters contribute `alpha / dim * B @ A`."""
    dropout: float = 0.0
    """Dropout probability on the adapter path (training only)."""
    dropout_position: str = "pre"
    """`pre`: dropout on the adapter's input; `post`: on its output."""
    lora_A_init_method: str = "xavier"
    """Initialisation of A: `xavier`, `kaiming`, `normal` or `zero`."""
    lora_B_init_method: str = "zero"
    """Initialisation of B (the default zero makes the adapted model start equal to the base)."""

    _section = "peft"
    layer_class: ClassVar[type[AdaptedLinear]]
    """The linear layer that replaces each targeted member."""
    has_magnitude: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field (the model-dependent checks run in `sites`)."""
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        if self.target_modules and self.exclude_modules:
            raise config_error("peft.exclude_modules", self.exclude_modules,
                               "empty unless peft.target_modules is empty (as upstream)")
        if not (isinstance(self.dim, int) and not isinstance(self.dim, bool) and self.dim > 0):
            raise config_error("peft.dim", self.dim, "a positive integer")
        if not (_is_number(self.alpha) and self.alpha > 0):
            raise config_error("peft.alpha", self.alpha, "a positive number")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise config_error("peft.dropout", self.dropout, "a probability in [0, 1)")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise config_error("peft.dropout_position", self.dropout_position, "one of 'pre', 'post'")
        for name in ("lora_A_init_method", "lora_B_init_method"):
            if getattr(self, name) not in INIT_METHODS:
                raise config_error(f"peft.{name}", getattr(self, name), f"one of {', '.join(INIT_METHODS)}")

    def sites(self, provider: Any) -> list[Site]:
        """The sites of `provider`'s model this config adapts; raises `ConfigError` if an entry matches none.

        Needs only the provider (no model is built), so it can run while the config is validated.
        """
        self.validate()
        return select_sites(model_sites(provider), self.target_modules, self.exclude_modules)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus `_target_` (the class), as run_config.yaml stores a config section."""
        cls = type(self)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **dataclasses.asdict(self)}

    def __call__(self, model: nn.Module) -> nn.Module:
        """Same as `apply`, so a config is itself a provider pre-wrap hook."""
        return self.apply(model)

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze `model` and add this config's adapters to it in place; returns `model`.

        Raises:
            ConfigError: a target entry matches nothing in this model.
            UserError: the model is already wrapped (DDP, FSDP2, compiled) or already has adapters.
        """
        _check_bare(model)
        sites = self.sites(model.config)
        model.requires_grad_(False)
        for site in sites:
            self._adapt(model.get_submodule(site.parent), site)
        return model

    def _adapt(self, parent: nn.Module, site: Site) -> None:
        members = [getattr(parent, name) for name in site.members]
        for member, rows in zip(members, site.rows, strict=True):
            assert isinstance(member, nn.Linear) and member.weight.shape == (rows, site.in_features), (
                f"{site.name}: the model does not match its provider"
            )
        weight = members[0].weight
        adapter = LowRankAdapter(
            site.in_features, site.rows, dim=self.dim, alpha=self.alpha, dropout=self.dropout,
            dropout_position=self.dropout_position, a_init=self.lora_A_init_method, b_init=self.lora_B_init_method,
            magnitude=self.has_magnitude,
        ).to(device=weight.device, dtype=weight.dtype)
        parent.register_module(site.kind + ADAPTER_SUFFIX, adapter)
        for name, member, rows in zip(site.members, members, site.row_ranges(), strict=True):
            layer = self.layer_class(member, adapter, rows)
            setattr(parent, name, layer)
            if adapter.weight_magnitude is not None:
                # DoRA starts from m = ||W + s B A|| per row (= ||W|| with B = 0): the model is unchanged.
                start, stop = rows
                adapter.weight_magnitude.data[start:stop] = dora_row_norms(
                    member.weight, adapter.linear_in.weight, adapter.linear_out.weight[start:stop], adapter.scale
                )


def _check_bare(model: nn.Module) -> None:
    if not isinstance(model, GPTModel):
        raise UserError(
            f"PEFT applies to a bare GPTModel, got {type(model).__name__}: add adapters before DDP / FSDP2 "
            "wrapping and before torch.compile (e.g. as a provider pre-wrap hook)"
        )
    if any(isinstance(module, LowRankAdapter) for module in model.modules()):
        raise UserError("the model already has adapters; apply a PEFT config once")
    if any(hasattr(param, "device_mesh") for param in model.parameters()):
        raise UserError("the model's parameters are already sharded (FSDP2): add adapters before wrapping")


def peft_from_dict(section: dict[str, Any]) -> PEFT:
    """Rebuild a `LoRA` or `DoRA` from its `to_dict()` form (a run_config.yaml `peft` section).

    Raises:
        ConfigError: naming `peft._target_` when it is not one of the package's configs, or `peft.<key>`
            for a key the class has no field for.
    """
    section = dict(section)
    target = section.pop("_target_", None)
    known = {"megatron.bridge.peft.lora.LoRA": ("megatron.bridge.peft.lora", "LoRA"),
             "megatron.bridge.peft.dora.DoRA": ("megatron.bridge.peft.dora", "DoRA")}
    if target not in known:
        raise config_error("peft._target_", target, f"one of {', '.join(known)}")
    module, name = known[target]
    cls = getattr(importlib.import_module(module), name)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in section:
        if key not in fields:
            raise ConfigError(f"unknown field peft.{key}; valid fields of peft: {', '.join(sorted(fields))}")
    return cls(**section)


def freeze_summary(model: nn.Module) -> str:
    """One line for the log: trainable and total parameters and the trainable share."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    share = 100.0 * trainable / max(total, 1)
    return f"> PEFT: {trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters ({share:.2f}%)"


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` detached and, if it is an FSDP2 shard, gathered (a collective: every rank must call)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
