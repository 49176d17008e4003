"""Parameter names, ours against Hugging Face's: the machinery each family's name table is built from.

Each family (see `models/registry.py`) owns its table of `NameMapping` rows, since the same Hugging
Face name can mean different tensors: `post_attention_layernorm` is Llama's pre-MLP norm but Gemma 3's
post-attention norm. Our decoder keeps q, k, v and gate, up as separate layers, so every Hugging Face
tensor maps onto exactly one of our parameters with the same shape and layout: conversion is
renaming, never splitting, fusing or permuting. `{layer}` stands for the layer index.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch

from megatron.bridge.models.conversion.errors import ConversionError
from megatron.bridge.models.conversion.safetensors_io import TensorSpec
from megatron.bridge.models.decoder import GPTModel
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.utils.errors import short_repr

__all__ = [
    "EMBEDDING_ROW",
    "FINAL_NORM_ROW",
    "IGNORED_HF_NAMES",
    "OUTPUT_ROW",
    "TIED_OUTPUT_NAME",
    "NameMapping",
    "TensorPlan",
    "attention_rows",
    "check_layer_count",
    "check_tensors",
    "hf_name_of",
    "layer_row",
    "megatron_name_of",
    "megatron_param_shapes",
    "mlp_rows",
]

_LAYER = "{layer}"


@dataclass(frozen=True)
class NameMapping:
    """One row of the table: our parameter name and the Hugging Face tensor name, with `{layer}` patterns."""

    megatron: str
    """Our name, e.g. `layers.{layer}.self_attention.linear_q.weight`."""
    hf: str
    """Hugging Face's name, e.g. `model.layers.{layer}.self_attn.q_proj.weight`."""

    @cached_property
    def _megatron_regex(self) -> re.Pattern[str]:
        return _compile(self.megatron)

    @cached_property
    def _hf_regex(self) -> re.Pattern[str]:
        return _compile(self.hf)

    def hf_name(self, megatron_name: str) -> str | None:
        """The Hugging Face name for `megatron_name`, or None when this row does not match it."""
        match = self._megatron_regex.fullmatch(megatron_name)
        return None if match is None else self.hf.replace(_LAYER, match.groupdict().get("layer", ""))

    def megatron_name(self, hf_name: str) -> str | None:
        """Our name for `hf_name`, or None when this row does not match it."""
        match = self._hf_regex.fullmatch(hf_name)
        return None if match is None else self.megatron.replace(_LAYER, match.groupdict().get("layer", ""))


class TensorPlan(NamedTuple):
    """One tensor to convert: our name, the Hugging Face name, and the shape and dtype to write it in."""

    megatron_name: str
    hf_name: str
    spec: TensorSpec


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(re.escape(_LAYER), r"(?P<layer>\d+)"))


def layer_row(ours: str, theirs: str) -> NameMapping:
    """A row for a tensor of every layer: `layers.{layer}.<ours>` <-> `model.layers.{layer}.<theirs>`."""
    return NameMapping(f"layers.{_LAYER}.{ours}", f"model.layers.{_LAYER}.{theirs}")


def attention_rows(*, qkv_bias: bool, proj_bias: bool) -> tuple[NameMapping, ...]:
    """q, k, v and the output projection (`o_proj`), with the biases the family has."""
    rows = []
    for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("proj", "o")):
        kinds = ("weight", "bias") if (proj_bias if ours == "proj" else qkv_bias) else ("weight",)
        rows += [layer_row(f"self_attention.linear_{ours}.{kind}", f"self_attn.{theirs}_proj.{kind}") for kind in kinds]
    return tuple(rows)


def mlp_rows(*, bias: bool) -> tuple[NameMapping, ...]:
    """The gated MLP's gate, up and down projections, with biases when the family has them."""
    kinds = ("weight", "bias") if bias else ("weight",)
    return tuple(layer_row(f"mlp.linear_{name}.{kind}", f"mlp.{name}_proj.{kind}")
                 for name in ("gate", "up", "down") for kind in kinds)


EMBEDDING_ROW = NameMapping("embedding.weight", "model.embed_tokens.weight")
FINAL_NORM_ROW = NameMapping("final_norm.weight", "model.norm.weight")
OUTPUT_ROW = NameMapping("output_layer.weight", "lm_head.weight")
"""The rows outside the layers, the same in every family (the output row only for untied models)."""

TIED_OUTPUT_NAME = "lm_head.weight"
"""Some checkpoints store the output layer even when it is tied to the embedding; it is then ignored."""

IGNORED_HF_NAMES = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
"""Buffers older checkpoints saved that hold no learned state (rotary frequencies are recomputed)."""

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")  # ours (`layers.3.`) and Hugging Face's (`model.layers.3.`)


def hf_name_of(rows: tuple[NameMapping, ...], megatron_name: str, *, owner: str) -> str:
    """The Hugging Face name `rows` give our parameter `megatron_name`; `ConversionError` if none does.

    `owner` names the table in the message (a family's architecture).
    """
    for mapping in rows:
        hf_name = mapping.hf_name(megatron_name)
        if hf_name is not None:
            return hf_name
    raise ConversionError(
        f"parameter {megatron_name!r} has no Hugging Face equivalent in {owner}; it converts "
        f"{', '.join(m.megatron for m in rows)}"
    )


def megatron_name_of(rows: tuple[NameMapping, ...], hf_name: str) -> str | None:
    """Our parameter name `rows` give the Hugging Face tensor `hf_name`, or None when no row matches it."""
    for mapping in rows:
        name = mapping.megatron_name(hf_name)
        if name is not None:
            return name
    return None


def megatron_param_shapes(provider: GPTModelProvider) -> dict[str, torch.Size]:
    """Our parameter names and shapes for `provider`, in module order, computed without allocating weights."""
    provider.validate()
    with torch.device("meta"):
        model = GPTModel(provider)
    return {name: param.shape for name, param in model.named_parameters()}


def check_layer_count(names: Iterable[str], num_layers: int, *, source: str, expected_from: str,
                      key: str = "num_hidden_layers") -> None:
    """Raise `ConversionError` unless the tensor `names` of `source` hold exactly layers 0..num_layers-1.

    Cheap, so it runs before anything is built for `num_layers` layers: a config claiming thousands of
    layers is refused at once, not after building them all only to find the tensors missing.
    """
    found = {int(match.group(1)) for name in names if (match := _LAYER_INDEX.search(name))}
    if len(found) == num_layers and (not found or (min(found) == 0 and max(found) == num_layers - 1)):
        return
    held = f"{len(found)} layers, numbered {min(found)} to {max(found)}" if found else "no layers"
    raise ConversionError(f"{expected_from}: {key}={num_layers} does not match {source}, which holds {held}")


def check_tensors(
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    *,
    source: str,
    expected_from: str,
    ignorable: Collection[str] = (),
    locations: dict[str, str] | None = None,
) -> None:
    """Raise `ConversionError` naming every missing, unexpected or mis-shaped tensor of `source`.

    `ignorable` names may be present or not; `locations` maps a tensor name to the file holding it.
    """
    where = locations or {}
    problems = []
    missing = [name for name in expected if name not in found]
    unexpected = sorted(
        name for name in found
        if name not in expected and name not in ignorable and not IGNORED_HF_NAMES.fullmatch(name)
    )
    for label, names in (("missing tensors", missing), ("unexpected tensors", unexpected)):
        if names:
            listed = ", ".join(_located(name, where) for name in names[:8])
            problems.append(f"{label}: {listed}{' ...' if len(names) > 8 else ''}")
    misshaped = [name for name, shape in expected.items() if name in found and tuple(found[name]) != tuple(shape)]
    for name in misshaped[:8]:
        problems.append(f"{_located(name, where)} has shape {short_repr(tuple(found[name]))}, {expected_from} "
                        f"expects {tuple(expected[name])}")
    if len(misshaped) > 8:
        problems.append(f"{len(misshaped) - 8} more tensors of another shape")
    if problems:
        raise ConversionError(f"{source} does not match {expected_from}: " + "; ".join(problems))


def _located(name: str, where: dict[str, str]) -> str:
    shown = name if len(name) <= 200 else f"{name[:200]}..."  # names come from files: any length
    return f"{shown} (in {where[name]})" if name in where else shown
