"""Hugging Face PEFT adapter folders: our LoRA / DoRA adapters out to `peft`'s format and back.

A folder holds `adapter_config.json` (a peft `LoraConfig`) and `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(base_model, folder)` loads. peft adapts each projection on its own,
so an adapter of ours on a fused kind is written per member, as upstream exports it:

    base_model.model.model.layers.N.self_attn.{q,k,v}_proj.lora_A.weight   A (the same one, copied)  [dim, hidden]
    base_model.model.model.layers.N.self_attn.{q,k,v}_proj.lora_B.weight   the member's rows of B    [rows, dim]
    base_model.model.model.layers.N.self_attn.{q,k,v}_proj.lora_magnitude_vector   rows of m (DoRA)  [rows]

and likewise `o_proj` (linear_proj), `gate_proj` / `up_proj` (linear_fc1), `down_proj` (linear_fc2).
peft's scaling `lora_alpha / r` is ours (`alpha / dim`), and its DoRA uses the same magnitude and row
norms. Reading a folder back requires the copies of A to be identical (as upstream does), since our
adapter shares one A across its members.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megatron.bridge.models import registry
from megatron.bridge.models.conversion.family import ModelFamily
from megatron.bridge.models.conversion.hf_folder import staged_output, write_json_file
from megatron.bridge.peft.base import PEFT
from megatron.bridge.peft.dora import DoRA
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.peft.state import adapter_state_dict, unwrap
from megatron.bridge.peft.targets import TARGET_KINDS, Site, model_sites
from megatron.bridge.utils.errors import UserError
from megatron.bridge.utils.parallel import current_layout

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "PEFT_PREFIX",
    "adapter_config_dict",
    "hf_adapter_tensors",
    "load_hf_adapter",
    "read_adapter_config",
    "save_hf_adapter",
    "save_hf_adapter_state_dict",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""peft's prefix: `PeftModelForCausalLM.base_model` (the tuner) `.model` (the transformers model)."""

_LINEAR_IN, _LINEAR_OUT, _MAGNITUDE = "linear_in.weight", "linear_out.weight", "weight_magnitude"
# Settings of a peft LoraConfig that our adapters cannot express, with the value we can.
_REQUIRED_SETTINGS = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
                      "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}


def _hf_module(family: ModelFamily, site: Site, index: int) -> str:
    """The Hugging Face module name of a member in `family`'s names, e.g. `model.layers.0.self_attn.q_proj`."""
    return family.to_hf_name(site.member_name(index) + ".weight").removesuffix(".weight")


def _present_sites(state: Mapping[str, torch.Tensor], sites: list[Site], *, source: str) -> list[Site]:
    """The sites `state` holds adapters for; every key must belong to one of them."""
    present = [site for site in sites if f"{site.adapter_name}.{_LINEAR_IN}" in state]
    known = {f"{site.adapter_name}.{leaf}" for site in present for leaf in (_LINEAR_IN, _LINEAR_OUT, _MAGNITUDE)}
    unexpected = sorted(set(state) - known)
    if unexpected:
        raise UserError(f"{source} holds tensors that are no adapter of this model: {', '.join(unexpected[:6])}")
    if not present:
        raise UserError(f"{source} holds no adapters")
    return present


def hf_adapter_tensors(
    state: Mapping[str, torch.Tensor], provider: Any, *, peft_config: PEFT, dtype: torch.dtype | None = None,
    source: str = "the adapter state dict",
) -> dict[str, torch.Tensor]:
    """Our adapter tensors (`adapter_state_dict` names) as peft's `adapter_model.safetensors` tensors.

    `provider` describes the model (its sizes split B's rows, its class picks the model family whose
    Hugging Face module names the tensors get); `peft_config` is the config the adapters were trained
    with (its `dim` and its kind, LoRA or DoRA, are checked against the tensors).

    Raises:
        UserError: the tensors do not fit `provider` or `peft_config` (naming the first that does not), or
            `provider` belongs to no model family.
    """
    return _export(state, provider, peft_config, dtype, source)[0]


def _export(state: Mapping[str, torch.Tensor], provider: Any, peft_config: PEFT, dtype: torch.dtype | None,
            source: str) -> tuple[dict[str, torch.Tensor], list[str] | str]:
    present = _present_sites(state, model_sites(provider), source=source)
    family = registry.family_of_provider(provider)
    tensors: dict[str, torch.Tensor] = {}
    for site in present:
        a, b = state[f"{site.adapter_name}.{_LINEAR_IN}"], state.get(f"{site.adapter_name}.{_LINEAR_OUT}")
        magnitude = state.get(f"{site.adapter_name}.{_MAGNITUDE}")
        expected_b = (sum(site.rows), peft_config.dim)
        if tuple(a.shape) != (peft_config.dim, site.in_features) or b is None or tuple(b.shape) != expected_b:
            raise UserError(f"{source}: the adapter {site.adapter_name} does not have peft.dim={peft_config.dim} "
                            f"and this model's sizes (A {tuple(a.shape)}, B {None if b is None else tuple(b.shape)})")
        if (magnitude is not None) != peft_config.has_magnitude:
            raise UserError(f"{source}: the adapter {site.adapter_name} is "
                            f"{'DoRA' if magnitude is not None else 'LoRA'} but peft_config is "
                            f"{type(peft_config).__name__}")
        for index, (start, stop) in enumerate(site.row_ranges()):
            prefix = PEFT_PREFIX + _hf_module(family, site, index)
            tensors[f"{prefix}.lora_A.weight"] = a.clone()
            tensors[f"{prefix}.lora_B.weight"] = b[start:stop].clone()
            if magnitude is not None:
                tensors[f"{prefix}.lora_magnitude_vector"] = magnitude[start:stop].clone()
    tensors = {name: t.to(dtype=dtype or t.dtype).contiguous() for name, t in tensors.items()}
    return tensors, _hf_target_modules(family, present, provider.num_layers)


def _hf_target_modules(family: ModelFamily, present: list[Site], num_layers: int) -> list[str] | str:
    """peft's `target_modules`: short names when every layer has the same adapters, else an exact regex."""
    modules = [_hf_module(family, site, index) for site in present for index in range(len(site.members))]
    per_layer: dict[int, set[str]] = {}
    for site in present:
        per_layer.setdefault(site.layer, set()).add(site.kind)
    kinds = next(iter(per_layer.values()))
    if len(per_layer) == num_layers and all(layer_kinds == kinds for layer_kinds in per_layer.values()):
        return sorted({module.rsplit(".", 1)[-1] for module in modules})
    # peft matches a string with re.fullmatch against each module's full name: exactly these modules.
    return "|".join(re.escape(module) for module in modules)


def adapter_config_dict(peft_config: PEFT, *, target_modules: list[str] | str,
                        base_model_name_or_path: str | None) -> dict[str, Any]:
    """peft's `adapter_config.json` for our adapters (a `LoraConfig`, peft 0.21's keys)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": peft_config.dim, "lora_alpha": peft_config.alpha, "lora_dropout": peft_config.dropout,
        "target_modules": target_modules, "exclude_modules": None, "init_lora_weights": True,
        "use_dora": peft_config.has_magnitude, "layers_pattern": None, **_REQUIRED_SETTINGS,
    }


def save_hf_adapter_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike, *, provider: Any,
                               peft_config: PEFT, base_model_name_or_path: str | None = None,
                               dtype: torch.dtype | None = None, overwrite: bool = False,
                               source: str = "the adapter state dict") -> Path:
    """Write a peft adapter folder from our adapter tensors (e.g. a LoRA run's checkpoint entries).

    Everything is checked before anything is written; the folder is staged and renamed into place, so
    `path` is either untouched or complete. An existing non-empty `path` is refused unless `overwrite`.
    """
    tensors, target_modules = _export(state, provider, peft_config, dtype, source)
    config = adapter_config_dict(peft_config, target_modules=target_modules,
                                 base_model_name_or_path=base_model_name_or_path)
    with staged_output(path, overwrite) as staging:
        write_json_file(staging / ADAPTER_CONFIG_FILE, config)
        save_file(tensors, str(staging / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(path)


def save_hf_adapter(model: nn.Module, path: str | os.PathLike, *, peft_config: PEFT,
                    base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                    overwrite: bool = False) -> Path:
    """Write `model`'s adapters as a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`).

    `model` is the adapted model, bare or wrapped (DDP, FSDP2, compiled); `peft_config` the config that
    adapted it; `base_model_name_or_path` goes into the config (peft loads the base from it when asked to).
    Tensors keep the adapters' dtype unless `dtype` is given. Collective under FSDP2 (every rank calls;
    rank 0 writes).
    """
    state = adapter_state_dict(model)  # gathers FSDP2 shards: every rank takes part
    if not current_layout().is_rank_zero:
        return Path(path)
    return save_hf_adapter_state_dict(state, path, provider=unwrap(model).config, peft_config=peft_config,
                                      base_model_name_or_path=base_model_name_or_path, dtype=dtype,
                                      overwrite=overwrite, source="the model")


def read_adapter_config(folder: Path) -> PEFT:
    """Our `LoRA` / `DoRA` for a peft folder's `adapter_config.json` (targets filled in by `load_hf_adapter`)."""
    file = folder / ADAPTER_CONFIG_FILE
    if not file.is_file():
        raise UserError(f"{folder} is not a peft adapter folder: {ADAPTER_CONFIG_FILE} is missing")
    config = json.loads(file.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{file}: peft_type={config.get('peft_type')!r} is not supported; only LORA (with use_dora)")
    for key, allowed in _REQUIRED_SETTINGS.items():
        value = config.get(key, allowed)
        if value != allowed and value not in (None, [], {}):
            raise UserError(f"{file}: {key}={value!r} cannot be expressed by our adapters (needs {allowed!r})")
    cls = DoRA if config.get("use_dora", False) else LoRA
    return cls(dim=config.get("r", 8), alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0))


def load_hf_adapter(path: str | os.PathLike, provider: Any) -> tuple[PEFT, dict[str, torch.Tensor]]:
    """Read a peft adapter folder into our config and adapter tensors (`load_adapter_state_dict` names).

    The returned config targets exactly the sites the folder adapts, so
    `load_adapter_state_dict(config(model), tensors)` rebuilds the adapted model.

    Raises:
        UserError: the folder is not a LoRA/DoRA adapter for `provider`'s architecture, an adapted module
            lacks a member (q without k, gate without up), or the members' A matrices differ.
    """
    folder = Path(path)
    peft_config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{folder}: {ADAPTER_WEIGHTS_FILE} is missing")
    tensors = load_file(str(weights))
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    targets = []
    family = registry.family_of_provider(provider)
    for site in model_sites(provider):
        prefixes = [PEFT_PREFIX + _hf_module(family, site, index) for index in range(len(site.members))]
        present = [f"{prefix}.lora_A.weight" in tensors for prefix in prefixes]
        if not any(present):
            continue
        if not all(present):
            missing = [p for p, here in zip(prefixes, present, strict=True) if not here]
            raise UserError(f"{weights}: {', '.join(missing)} has no adapter while the other members of "
                            f"{site.kind} do; our {site.kind} adapter covers them together (as upstream)")
        state.update(_site_state(site, prefixes, tensors, peft_config, source=weights))
        used.update(name for name in tensors if any(name.startswith(prefix + ".") for prefix in prefixes))
        targets.append(site.upstream_name)
    unexpected = sorted(set(tensors) - used)
    if unexpected or not targets:
        what = f"tensors this model has no place for: {', '.join(unexpected[:6])}" if unexpected else "no adapters"
        raise UserError(f"{weights} holds {what}")
    peft_config.target_modules = _our_targets(targets, provider)
    peft_config.validate()
    return peft_config, state


def _site_state(site: Site, prefixes: list[str], tensors: Mapping[str, torch.Tensor], peft_config: PEFT, *,
                source: Path) -> dict[str, torch.Tensor]:
    a = tensors[f"{prefixes[0]}.lora_A.weight"]
    for prefix in prefixes[1:]:
        if not torch.equal(tensors[f"{prefix}.lora_A.weight"], a):
            raise UserError(f"{source}: {prefix}.lora_A.weight differs from {prefixes[0]}.lora_A.weight; our "
                            f"{site.kind} adapter shares one A across its members (as upstream), so it cannot hold "
                            "independent adapters")
    parts = {"linear_in.weight": a}
    b_names = [f"{prefix}.lora_B.weight" for prefix in prefixes]
    magnitude_names = [f"{prefix}.lora_magnitude_vector" for prefix in prefixes]
    for name in b_names + (magnitude_names if peft_config.has_magnitude else []):
        if name not in tensors:
            raise UserError(f"{source}: {name} is missing")
    parts["linear_out.weight"] = torch.cat([tensors[name] for name in b_names])
    if peft_config.has_magnitude:
        parts["weight_magnitude"] = torch.cat([tensors[name] for name in magnitude_names])
    return {f"{site.adapter_name}.{leaf}": tensor for leaf, tensor in parts.items()}


def _our_targets(upstream_names: list[str], provider: Any) -> list[str]:
    """The kinds when every layer has the same ones, else the sites' full (upstream) names."""
    sites = {site.upstream_name: site for site in model_sites(provider)}
    per_layer: dict[int, set[str]] = {}
    for name in upstream_names:
        per_layer.setdefault(sites[name].layer, set()).add(sites[name].kind)
    kinds = next(iter(per_layer.values()))
    if len(per_layer) == provider.num_layers and all(layer_kinds == kinds for layer_kinds in per_layer.values()):
        return [kind for kind in TARGET_KINDS if kind in kinds]
    return upstream_names
