"""Training checkpoints (checkpoint_io's format) <-> Hugging Face folders, without building a model.

Import reads the Hugging Face tensors one at a time into a single state dict (one copy of the
weights) and saves it as `iter_0000000` through `checkpoint_io`. Export reads a checkpoint's model
tensors a few at a time (`torch.distributed.checkpoint` loads only what is asked for) and streams
them into safetensors shards, so it never holds more than a small group of tensors. Both run in a
single process: the checkpoint calls would otherwise wait for the other ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.bridge.checkpoint import integrity, io
from megatron.bridge.checkpoint.train_state import TrainState
from megatron.bridge.data.tokenizer import TOKENIZER_CONFIG_FILE, HuggingFaceTokenizer
from megatron.bridge.models import registry
from megatron.bridge.models.conversion import peft_adapter
from megatron.bridge.models.conversion.errors import ConversionError
from megatron.bridge.models.conversion.family import ModelFamily
from megatron.bridge.models.conversion.hf_config import config_dtype, dtype_key, dtype_name
from megatron.bridge.models.conversion.hf_folder import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    HFWeights,
    auxiliary_files,
    copy_files,
    read_config,
    staged_output,
    write_json_file,
)
from megatron.bridge.models.conversion.param_mapping import (
    TensorPlan,
    check_layer_count,
    check_tensors,
    megatron_param_shapes,
)
from megatron.bridge.models.conversion.safetensors_io import TensorSpec, write_safetensors_shards
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.peft.base import peft_from_dict
from megatron.bridge.peft.state import is_adapter_param
from megatron.bridge.utils.config_fields import to_plain
from megatron.bridge.utils.errors import UserError, short_repr
from megatron.bridge.utils.parallel import current_layout
from megatron.bridge.utils.safe_yaml import load_yaml_file

__all__ = [
    "HF_SUBDIR",
    "MODEL_PREFIX",
    "export_adapters",
    "export_weights",
    "find_hf_source",
    "import_weights",
    "provider_from_run_config",
]

MODEL_PREFIX = "model."
"""Key prefix of model tensors in a checkpoint."""
HF_SUBDIR = "hf"
"""Folder inside an imported `iter_*` checkpoint holding the source's config and tokenizer files."""
_READ_GROUP_BYTES = 128 * 2**20  # tensors read per checkpoint call on export: fewer calls, bounded memory
_MAX_ANCESTORS = 16


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    if current_layout().world_size > 1:
        raise ConversionError("checkpoint conversion runs in a single process: call it outside torchrun (or on a "
                         "world of one); several ranks would each wait for the others")
    with warnings.catch_warnings():
        # Without a process group torch.distributed.checkpoint warns that it assumes one process: it should.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _run_config_dict(provider: GPTModelProvider, tokenizer_folder: Path | None) -> dict[str, Any]:
    # The sections that describe the imported model, consistent with each other, so that the file loads
    # back as `--config-file` on top of any recipe: the architecture, its sequence length, and the
    # tokenizer kept beside the weights (or a NullTokenizer of the model's vocabulary when there is none).
    if tokenizer_folder is not None:
        tokenizer = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tokenizer_folder)}
    else:
        tokenizer = {"tokenizer_type": "NullTokenizer", "vocab_size": provider.vocab_size}
    return {"model": to_plain(provider), "dataset": {"seq_length": provider.seq_length}, "tokenizer": tokenizer}


def import_weights(weights: HFWeights, provider: GPTModelProvider, megatron_path: str | Path, *,
                   family: ModelFamily, hf_config: dict[str, Any], hf_files: list[Path], dtype: torch.dtype | None,
                   overwrite: bool) -> Path:
    """Write `weights` (already checked against `provider`) as the step-0 checkpoint `megatron_path`.

    `family` names the tensors; `hf_config` and `hf_files` (generation config, tokenizer) are kept in
    `iter_0000000/hf/`.
    """
    if dtype is not None:  # the way back should produce the dtype stored here
        hf_config = {**hf_config, dtype_key(hf_config): dtype_name(dtype)}
    shapes = megatron_param_shapes(provider)
    with _single_process(), staged_output(megatron_path, overwrite) as root:
        staging = io.prepare_temporary_dir(root, 0)
        tensors = {}
        for name in shapes:
            tensor = weights.read(family.to_hf_name(name))
            tensors[MODEL_PREFIX + name] = tensor if dtype is None else tensor.to(dtype)
        io.save_tensors(tensors, staging)
        del tensors
        io.write_json(staging / io.COMMON_FILE,
                      {"format_version": io.FORMAT_VERSION, "train_state": TrainState().state_dict()})
        has_tokenizer = any(path.name == "tokenizer.json" for path in hf_files)
        final_hf = io.iteration_dir(Path(megatron_path).absolute(), 0) / HF_SUBDIR
        run_config = yaml.safe_dump(_run_config_dict(provider, final_hf if has_tokenizer else None), sort_keys=False)
        io.write_file_durably(staging / io.CONFIG_FILE, run_config.encode())
        (staging / HF_SUBDIR).mkdir()
        write_json_file(staging / HF_SUBDIR / CONFIG_FILE, hf_config)
        copy_files(hf_files, staging / HF_SUBDIR)
        io.commit(root, 0)
    return Path(megatron_path)


# ------------------------------------------------------------------------------------------- export


def _iteration_directory(root: Path, iteration: int | None) -> Path:
    if iteration is None:
        directory = io.find_latest(root)
        if directory is None:
            raise ConversionError(f"{root} holds no checkpoint (expected iter_* folders, or an iter_* folder)")
        return directory
    directory = io.iteration_dir(root, iteration)
    if not directory.is_dir():
        available = io.list_iterations(root)
        raise ConversionError(f"{root} has no checkpoint of iteration {iteration}; available: {available or 'none'}")
    return directory


def _read_run_config(directory: Path) -> dict[str, Any]:
    # Through safe_yaml: a checkpoint may come from anyone, and its YAML must not expand without bound.
    path = directory / io.CONFIG_FILE
    if not path.is_file():
        return {}
    loaded = load_yaml_file(path)
    return loaded if isinstance(loaded, dict) else {}


def find_hf_source(directory: Path) -> Path | None:
    """The `hf/` folder of `directory` or, following run_config.yaml's pretrained_checkpoint and load,
    of the checkpoint it was trained from (the finetuned-from chain back to the imported one)."""
    pending, seen = [directory], set()
    while pending and len(seen) < _MAX_ANCESTORS:
        current = pending.pop(0).absolute()
        if current in seen:
            continue
        seen.add(current)
        if (current / HF_SUBDIR / CONFIG_FILE).is_file():
            return current / HF_SUBDIR
        checkpoint_cfg = _read_run_config(current).get("checkpoint")
        if not isinstance(checkpoint_cfg, dict):
            continue
        for key in ("pretrained_checkpoint", "load"):
            origin = checkpoint_cfg.get(key)
            latest = io.find_latest(origin) if isinstance(origin, str) else None
            if latest is not None:
                pending.append(latest)
    return None


def _provider_class(target: Any, config_file: Path) -> type[GPTModelProvider]:
    # Only the registry's provider classes are built from a YAML `_target_`: nothing named there is imported.
    # Without a `_target_` the section is read as a plain GPTModelProvider (which no family exports).
    if target is None:
        return GPTModelProvider
    classes = registry.provider_classes()
    if not isinstance(target, str) or target not in classes:
        known = ", ".join(sorted({cls.__name__ for cls in classes.values()}))
        raise ConversionError(f"{config_file}: model._target_={short_repr(target)} is not a provider of a family the "
                              f"bridge converts; known: {known}")
    return classes[target]


def provider_from_run_config(directory: Path) -> GPTModelProvider:
    """The provider run_config.yaml's model section describes (only the registry's provider classes are built)."""
    model = _read_run_config(directory).get("model")
    if not isinstance(model, dict):
        raise ConversionError(
            f"{directory} has no {HF_SUBDIR}/{CONFIG_FILE} and no model section in {io.CONFIG_FILE}, and no "
            "checkpoint it was trained from has one: pass source= (--source) naming the original Hugging Face folder"
        )
    cls = _provider_class(model.get("_target_"), directory / io.CONFIG_FILE)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    provider = cls(**{key: value for key, value in model.items() if key in names})
    try:
        provider.validate()
    except (ValueError, TypeError) as err:  # TypeError: a value of another type, e.g. a string to compare
        raise ConversionError(f"{directory / io.CONFIG_FILE}: its model section is invalid: {err}") from err
    return provider


def _stored_model_tensors(directory: Path) -> dict[str, TensorStorageMetadata]:
    index = io.read_index(directory)
    return {
        key[len(MODEL_PREFIX):]: meta for key, meta in index.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }


def _read_groups(directory: Path, stored: dict[str, TensorStorageMetadata],
                 plan: list[TensorPlan]) -> Iterator[tuple[str, torch.Tensor]]:
    group: list[TensorPlan] = []
    group_bytes = 0
    for index, item in enumerate(plan):
        meta = stored[item.megatron_name]
        group.append(item)
        group_bytes += meta.size.numel() * meta.properties.dtype.itemsize
        if group_bytes < _READ_GROUP_BYTES and index + 1 < len(plan):
            continue
        buffers = {MODEL_PREFIX + name: torch.empty(stored[name].size, dtype=stored[name].properties.dtype)
                   for name, _, _ in group}
        io.load_tensors(buffers, directory)
        for name, hf_name, spec in group:
            yield hf_name, buffers.pop(MODEL_PREFIX + name).to(spec.dtype)
        group, group_bytes = [], 0


def _export_config(directory: Path, source: Path | None, dtype: torch.dtype | None,
                   stored: dict[str, TensorStorageMetadata]) -> tuple[dict[str, Any], list[Path], Path, dict[str, Any]]:
    """config.json to write, the files to copy beside it, where the config came from, and JSON files to add."""
    hf_folder = source if source is not None else find_hf_source(directory)
    if hf_folder is not None:
        return read_config(hf_folder), auxiliary_files(hf_folder), hf_folder / CONFIG_FILE, {}
    stored_dtype = next(iter(stored.values())).properties.dtype if stored else torch.float32
    config = registry.hf_config_from_provider(provider_from_run_config(directory), dtype or stored_dtype)
    files, written = _run_tokenizer(directory, config)
    return config, files, directory / io.CONFIG_FILE, written


def _run_tokenizer(directory: Path, config: dict[str, Any]) -> tuple[list[Path], dict[str, Any]]:
    """The tokenizer a run trained with (run_config.yaml's), for a folder rebuilt without its source.

    Its files are copied; config.json gets its `bos_token_id` / `eos_token_id`, and the folder a
    generation_config.json and a tokenizer_config.json where the tokenizer's folder has none, so that
    `AutoTokenizer` and `generate` find the ids the run used.
    """
    section = _read_run_config(directory).get("tokenizer") or {}
    if section.get("tokenizer_type") != "HuggingFaceTokenizer" or not section.get("tokenizer_model"):
        return [], {}
    try:
        tokenizer = HuggingFaceTokenizer(section["tokenizer_model"])
    except UserError as err:
        raise ConversionError(f"{directory / io.CONFIG_FILE}: the run's tokenizer cannot be exported: {err}") from err
    folder = Path(tokenizer.path).parent
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eod}
    config.update({key: value for key, value in ids.items() if value is not None})
    files = [path for path in auxiliary_files(folder) if path.name != GENERATION_CONFIG_FILE]
    written: dict[str, Any] = {GENERATION_CONFIG_FILE: {key: value for key, value in ids.items() if value is not None}}
    if not (folder / TOKENIZER_CONFIG_FILE).is_file():
        written[TOKENIZER_CONFIG_FILE] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                          "eos_token": tokenizer.eod_token}
    return files, written


def export_weights(megatron_path: str | Path, hf_path: str | Path, *, iteration: int | None, source: Path | None,
                   dtype: torch.dtype | None, max_shard_size: int, overwrite: bool) -> Path:
    """Write the model tensors of a checkpoint as the Hugging Face folder `hf_path` (see AutoBridge.export_ckpt)."""
    directory = _verified_directory(Path(megatron_path), iteration)
    stored = _stored_model_tensors(directory)
    if stored and all(is_adapter_param(name) for name in stored):
        raise ConversionError(
            f"checkpoint {directory} holds the adapters of a LoRA / DoRA run, not a whole model: export them with "
            "AutoBridge.export_adapter_ckpt (python -m megatron.bridge.convert export-adapter), or load the run's "
            "model and write it merged with AutoBridge.save_hf_pretrained"
        )
    config, extra_files, config_source, written = _export_config(directory, source, dtype, stored)
    family = registry.family_of_config(config, str(config_source))
    provider = family.provider_from_hf_config(config, str(config_source))
    check_layer_count(stored, provider.num_layers, source=f"checkpoint {directory}", expected_from=str(config_source))
    shapes = megatron_param_shapes(provider)
    check_tensors({n: tuple(m.size) for n, m in stored.items()}, shapes, source=f"checkpoint {directory}",
                  expected_from=str(config_source))
    if dtype is not None:
        config[dtype_key(config)] = dtype_name(dtype)
    target = dtype or config_dtype(config)
    plan = [TensorPlan(name, family.to_hf_name(name), TensorSpec(tuple(shape), target or stored[name].properties.dtype))
            for name, shape in shapes.items()]
    with _single_process(), staged_output(hf_path, overwrite) as staging:
        write_json_file(staging / CONFIG_FILE, config)
        copy_files(extra_files, staging)
        for name, content in written.items():
            write_json_file(staging / name, content)
        write_safetensors_shards(staging, [(item.hf_name, item.spec) for item in plan],
                                 _read_groups(directory, stored, plan), max_shard_size)
    return Path(hf_path)


def _verified_directory(root: Path, iteration: int | None) -> Path:
    # The iteration to read, its files checked against the manifest and its common.json's format.
    directory = _iteration_directory(root, iteration)
    manifest = integrity.read_manifest(directory, io.step_of(directory))
    if manifest is not None:
        problems = integrity.verify(directory, manifest, integrity.share(manifest, 0, 1))
        if problems:
            shown = "; ".join(problems[:4])
            raise ConversionError(f"checkpoint {directory} is damaged, nothing was converted: {shown}")
    common = io.read_json(directory / io.COMMON_FILE)
    if not isinstance(common, dict) or common.get("format_version") != io.FORMAT_VERSION:
        raise ConversionError(f"{directory / io.COMMON_FILE}: unknown checkpoint format (expected format_version "
                              f"{io.FORMAT_VERSION})")
    return directory


def export_adapters(megatron_path: str | Path, output_path: str | Path, *, iteration: int | None,
                    base_model_name_or_path: str | None, dtype: torch.dtype | None, overwrite: bool) -> Path:
    """Write a LoRA / DoRA run's checkpoint adapters as a PEFT folder (see AutoBridge.export_adapter_ckpt)."""
    directory = _verified_directory(Path(megatron_path), iteration)
    run_config = _read_run_config(directory)
    section = run_config.get("peft")
    if not isinstance(section, dict):
        raise ConversionError(f"{directory / io.CONFIG_FILE} has no peft section: {directory} is not a checkpoint "
                              "of a LoRA or DoRA run (export a whole model with AutoBridge.export_ckpt)")
    peft_config = peft_from_dict(section)
    provider = provider_from_run_config(directory)
    stored = {name: meta for name, meta in _stored_model_tensors(directory).items() if is_adapter_param(name)}
    if not stored:
        raise ConversionError(f"checkpoint {directory} holds no adapter tensors")
    buffers = {MODEL_PREFIX + name: torch.empty(meta.size, dtype=meta.properties.dtype)
               for name, meta in stored.items()}
    with _single_process():
        io.load_tensors(buffers, directory)
    state = {name[len(MODEL_PREFIX):]: tensor for name, tensor in buffers.items()}
    if base_model_name_or_path is None:
        # The Hugging Face folder the run took its base weights from, when run_config.yaml names one.
        origin = (run_config.get("checkpoint") or {}).get("pretrained_checkpoint")
        base_model_name_or_path = origin if isinstance(origin, str) and (Path(origin) / CONFIG_FILE).is_file() else None
    return peft_adapter.save_hf_adapter_state_dict(
        state, output_path, provider=provider, peft_config=peft_config, base_model_name_or_path=base_model_name_or_path,
        dtype=dtype, overwrite=overwrite, source=f"checkpoint {directory}",
    )

