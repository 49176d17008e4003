"""Adapter tensors in and out of a model, and merging them into the base weights.

- `is_adapter_param(name)`: the filter a checkpoint of a LoRA run keeps (adapters only).
- `adapter_state_dict(model)` / `load_adapter_state_dict(model, state)`: the adapters alone, by our names
  (`layers.0.self_attention.linear_qkv_adapter.linear_in.weight`, ...).
- `merged_weights(model)` / `merged_tensor(model, name)`: the base parameters, by our names, with the
  adapters folded in: what a merged Hugging Face export writes. `merge(model)` does it in place,
  leaving a plain model.

Every function accepts the bare model or one wrapped by DDP or `torch.compile`, and FSDP2-sharded
parameters (gathered with `full_tensor()`, a collective: every rank must make the same calls).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from megatron.bridge.peft.base import full_tensor
from megatron.bridge.peft.layers import AdaptedLinear, LowRankAdapter
from megatron.bridge.peft.targets import ADAPTER_SUFFIX, TARGET_KINDS
from megatron.bridge.utils.errors import UserError

__all__ = [
    "adapter_state_dict",
    "base_parameters",
    "has_adapters",
    "is_adapter_param",
    "load_adapter_state_dict",
    "merge",
    "merged_state_dict",
    "merged_tensor",
    "merged_weights",
    "unwrap",
]

_ADAPTER_MODULES = frozenset(kind + ADAPTER_SUFFIX for kind in TARGET_KINDS)


def is_adapter_param(name: str) -> bool:
    """True for a parameter (or state-dict key) of an adapter, whatever prefix it carries (`module.`, `model.`)."""
    return any(part in _ADAPTER_MODULES for part in name.split(".")[:-1])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP and `torch.compile` wrappers (FSDP2 shards in place and needs none)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def has_adapters(model: nn.Module) -> bool:
    """True when the model carries at least one adapter."""
    return any(isinstance(module, LowRankAdapter) for module in unwrap(model).modules())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by our names: CPU copies, full (FSDP2 shards gathered), in the parameters' dtype.

    Raises:
        UserError: the model has no adapters.
    """
    named = [(name, p) for name, p in unwrap(model).named_parameters() if is_adapter_param(name)]
    if not named:
        raise UserError("the model has no adapters: apply a LoRA or DoRA config first")
    return {name: full_tensor(param).to("cpu", copy=True) for name, param in named}


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters without the adapters: the names and tensors of the base model."""
    return {name: p for name, p in unwrap(model).named_parameters() if not is_adapter_param(name)}


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *,
                            source: str = "the adapter state dict") -> None:
    """Copy adapter tensors into the model's adapters; every adapter must be given, with its shape.

    Raises:
        UserError: naming every missing, unexpected or mis-shaped tensor of `source`; nothing is copied then.
    """
    params = {name: p for name, p in unwrap(model).named_parameters() if is_adapter_param(name)}
    if not params:
        raise UserError("the model has no adapters: apply the LoRA or DoRA config the adapters were trained with")
    problems = []
    missing = [name for name in params if name not in state]
    unexpected = [name for name in state if name not in params]
    for label, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            problems.append(f"{label}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
    for name, param in params.items():
        if name in state and tuple(state[name].shape) != tuple(param.shape):
            problems.append(f"{name} has shape {tuple(state[name].shape)}, the model's is {tuple(param.shape)}")
    if problems:
        raise UserError(f"{source} does not fit the model's adapters: " + "; ".join(problems))
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if hasattr(param, "device_mesh"):  # FSDP2: keep this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(value)


def _adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaptedLinear)}


def _merged(layer: AdaptedLinear) -> torch.Tensor:
    adapter = layer.adapter
    magnitude = None if adapter.weight_magnitude is None else full_tensor(adapter.weight_magnitude)
    merged = layer.merged_weight(full_tensor(layer.weight), full_tensor(adapter.linear_in.weight),
                                 full_tensor(adapter.linear_out.weight), magnitude)
    return merged.to(layer.weight.dtype)


def merged_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """Base parameter `name` (our name) with its adapter folded in, as a CPU copy in the parameter's dtype.

    A merged weight is computed in float32: `W + s * B_i @ A` for LoRA, `m_i / ||W + s B_i A|| * (W + s B_i A)`
    for DoRA. Biases and unadapted parameters are copied as they are. For exporters that stream tensors
    one by one (under FSDP2 every rank must ask for the same names in the same order).
    """
    model = unwrap(model)
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf == "weight" and isinstance(module, AdaptedLinear):
        return _merged(module).to("cpu", copy=True)
    if is_adapter_param(name):
        raise UserError(f"{name} is an adapter tensor, not a base parameter")
    return full_tensor(getattr(module, leaf)).to("cpu", copy=True)


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, merged_tensor(model, name))` for every base parameter, in module order."""
    for name in base_parameters(model):
        yield name, merged_tensor(model, name)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`merged_weights` as a dict: the base model's state with the adapters folded in."""
    return dict(merged_weights(model))


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights in place and remove them: a plain model again.

    Every adapted layer becomes an `nn.Linear` with the merged weight (its `requires_grad` kept) and the
    adapter modules are deleted. Only for an unsharded model (merge FSDP2 models with `merged_weights`).
    """
    model = unwrap(model)
    if any(hasattr(p, "device_mesh") for p in model.parameters()):
        raise UserError("merge() needs unsharded parameters; use merged_weights() for an FSDP2 model")
    layers = _adapted_layers(model)
    merged = {name: _merged(layer) for name, layer in layers.items()}  # all from the unmerged model
    for name, layer in layers.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer.to_linear(merged[name]))
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankAdapter):
            parent, _, attr = name.rpartition(".")
            delattr(model.get_submodule(parent), attr)
    return model
