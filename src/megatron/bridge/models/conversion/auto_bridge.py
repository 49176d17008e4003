"""`AutoBridge`: Hugging Face checkpoints in and out of our GPT model.

    bridge = AutoBridge.from_hf_pretrained("./Qwen2.5-0.5B")      # a local folder
    cfg.model = bridge.to_megatron_provider()                      # provide() loads the HF weights
    ...                                                            # train
    bridge.save_hf_pretrained(model, "./Qwen2.5-0.5B-tuned")       # transformers loads this unchanged

The architecture named in config.json picks the model family (`models/registry.py`), which owns the
config mapping and the tensor names. Conversion is renaming only (see `param_mapping`), so values
round-trip bit for bit. Reading needs nothing beyond torch: safetensors files are parsed here, and
`transformers` is never imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from megatron.bridge.models import registry
from megatron.bridge.models.conversion import megatron_checkpoint, peft_adapter
from megatron.bridge.models.conversion.errors import ConversionError
from megatron.bridge.models.conversion.family import ModelFamily
from megatron.bridge.models.conversion.hf_config import config_dtype, dtype_key, dtype_name
from megatron.bridge.models.conversion.hf_folder import (
    CONFIG_FILE,
    HFWeights,
    auxiliary_files,
    copy_files,
    read_config,
    staged_output,
    write_json_file,
)
from megatron.bridge.models.conversion.param_mapping import (
    TIED_OUTPUT_NAME,
    TensorPlan,
    check_layer_count,
    check_tensors,
    megatron_param_shapes,
)
from megatron.bridge.models.conversion.safetensors_io import TensorSpec, parse_size, write_safetensors_shards
from megatron.bridge.models.decoder import GPTModel
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.peft.base import PEFT
from megatron.bridge.peft.state import base_parameters, has_adapters, merged_tensor
from megatron.bridge.utils.parallel import current_layout

__all__ = ["AutoBridge", "HFWeightLoader", "ModelLike", "check_weights"]

ModelLike = nn.Module | Sequence[nn.Module]
"""A model chunk, a list of chunks, or a chunk wrapped by DDP / FSDP2 / torch.compile."""


def check_weights(weights: HFWeights, expected: dict[str, torch.Size], expected_from: str, *, tied: bool) -> None:
    """Check `weights` against the Hugging Face tensor names and shapes in `expected`."""
    check_tensors(
        {name: spec.shape for name, spec in weights.specs.items()}, expected, source=f"weights in {weights.folder}",
        expected_from=expected_from, ignorable={TIED_OUTPUT_NAME} if tied else (), locations=weights.location,
    )


@dataclass(frozen=True)
class HFWeightLoader:
    """A provider pre-wrap hook that copies a Hugging Face folder's weights into the freshly built model.

    A small picklable object rather than a closure, so providers carrying it can still be deep-copied.
    """

    folder: Path
    """The Hugging Face model folder to read."""
    architecture: str
    """The folder's architecture (its family names the tensors)."""
    loads_weights: ClassVar[bool] = True
    """Tells `finetune` that a provider carrying this hook brings its own weights."""

    def __call__(self, model: GPTModel) -> None:
        """Check every name and shape first, then copy tensor by tensor (converting to the model's dtype)."""
        family = registry.family_of_config({"architectures": [self.architecture]})
        params = dict(model.named_parameters())
        expected = {family.to_hf_name(name): param.shape for name, param in params.items()}
        # The model may differ from the folder's config.json when the provider was edited after conversion.
        weights = HFWeights(self.folder)
        check_weights(weights, expected, "the model built from the provider", tied=model.output_layer is None)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights.read(family.to_hf_name(name)))


class AutoBridge:
    """Converts between a local Hugging Face folder (any family of `models/registry.py`: Qwen2, Qwen3, Llama,
    Mistral, Gemma 3) and our providers, models and checkpoints."""

    def __init__(self, folder: Path, config: dict[str, Any], family: ModelFamily, weights: HFWeights | None) -> None:
        self.folder = folder
        self.family = family
        """The model family config.json's `architectures` names."""
        self._config = config
        self._weights = weights

    # ------------------------------------------------------------------------------------- opening

    @classmethod
    def from_hf_pretrained(cls, path: str | os.PathLike) -> AutoBridge:
        """Open the Hugging Face model folder `path` (config.json plus, optionally, its weights).

        The config (every key's type and range) and the weight files' headers (names, shapes, missing
        shards, the layer count) are checked now, before anything is built; no tensor data is read. A
        folder without weights still gives a provider with `load_weights=False`.
        """
        folder = Path(path)
        config = read_config(folder)
        source = str(folder / CONFIG_FILE)
        family = registry.family_of_config(config, source)
        provider = family.provider_from_hf_config(config, source)
        weights = None
        if HFWeights.present(folder):
            weights = HFWeights(folder)
            check_layer_count(weights.specs, provider.num_layers, source=f"weights in {folder}", expected_from=source)
            tied = provider.share_embeddings_and_output_weights
            check_weights(weights, family.hf_tensor_shapes(provider), source, tied=tied)
        return cls(folder, config, family, weights)

    @staticmethod
    def list_supported_models() -> list[str]:
        """The Hugging Face architectures the bridge converts: those of the registry's families, in order."""
        return registry.supported_architectures()

    @classmethod
    def can_handle(cls, path: str | os.PathLike) -> bool:
        """True when `path` is a local folder whose config.json describes a model of a supported family."""
        try:
            config = read_config(Path(path))
            registry.provider_from_hf_config(config, str(Path(path) / CONFIG_FILE))
        except ValueError:
            return False
        return True

    @property
    def hf_config(self) -> dict[str, Any]:
        """A copy of the source's config.json."""
        return dict(self._config)

    def _require_weights(self) -> HFWeights:
        if self._weights is None:
            raise ConversionError(f"{self.folder} holds no weights (only {CONFIG_FILE}); use load_weights=False")
        return self._weights

    # ----------------------------------------------------------------------------------- importing

    def to_megatron_provider(self, load_weights: bool = True) -> GPTModelProvider:
        """A provider of the family's class (e.g. `Qwen3ModelProvider`) for the model config.json describes.

        With `load_weights` its `provide()` returns the model with the Hugging Face weights loaded. Assign it
        to `cfg.model` after building a recipe, and set `cfg.model.seq_length = cfg.dataset.seq_length`:
        `seq_length` starts at the model's `max_position_embeddings`, usually far longer than training needs.
        """
        provider = self.family.provider_from_hf_config(self._config, str(self.folder / CONFIG_FILE))
        if load_weights:
            self._require_weights()
            provider.register_pre_wrap_hook(HFWeightLoader(self.folder.absolute(), self.family.architecture))
        return provider

    def to_megatron_model(self, load_weights: bool = True, device: str | torch.device | None = None) -> list[GPTModel]:
        """The model as a list of chunks (one: no pipeline parallelism), float32, on `device` (default CPU)."""
        model = self.to_megatron_provider(load_weights).provide()
        return [model.to(device) if device is not None else model]

    def load_hf_weights(self, model: ModelLike) -> None:
        """Copy the Hugging Face weights into an existing (unsharded) model of this architecture."""
        self._require_weights()
        for chunk in _chunks(model):
            HFWeightLoader(self.folder, self.family.architecture)(chunk)

    # ----------------------------------------------------------------------------------- exporting

    def _target_dtype(self, hf_name: str, dtype: torch.dtype | None, fallback: torch.dtype) -> torch.dtype:
        if dtype is not None:
            return dtype
        if self._weights is not None and hf_name in self._weights.specs:
            return self._weights.specs[hf_name].dtype
        return config_dtype(self._config) or fallback

    def _export_plan(
        self, model: ModelLike, dtype: torch.dtype | None
    ) -> tuple[dict[str, nn.Parameter], list[TensorPlan]]:
        params = _named_parameters(model)  # the base's: an adapted model's adapters are folded in or left out
        provider = self.family.provider_from_hf_config(self._config)
        check_layer_count(params, provider.num_layers, source="the model", expected_from=str(self.folder / CONFIG_FILE))
        expected = megatron_param_shapes(provider)
        check_tensors({n: p.shape for n, p in params.items()}, expected, source="the model",
                      expected_from=f"{self.folder / CONFIG_FILE}")
        plan = []
        for name, shape in expected.items():
            hf_name = self.family.to_hf_name(name)
            target = self._target_dtype(hf_name, dtype, params[name].dtype)
            plan.append(TensorPlan(name, hf_name, TensorSpec(tuple(shape), target)))
        return params, plan

    def export_hf_weights(
        self, model: ModelLike, dtype: torch.dtype | None = None, *, merge_adapter_weights: bool = True,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, tensor)` one at a time: CPU copies in the source's dtype (or `dtype`).

        Accepts a chunk, a list of chunks, or a DDP / FSDP2 / compiled chunk. FSDP2 shards are gathered
        (`full_tensor()`, a collective: every rank must iterate). A model with LoRA / DoRA adapters
        yields its weights with the adapters merged in (`W + alpha/dim * B @ A`), or with
        `merge_adapter_weights=False` the base weights it was adapted from.
        """
        params, plan = self._export_plan(model, dtype)  # checked now, not at the first next()
        return _stream(model, params, plan, merge=merge_adapter_weights)

    def save_hf_pretrained(self, model: ModelLike, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                           max_shard_size: int | str = "5GB", overwrite: bool = False,
                           merge_adapter_weights: bool = True) -> Path:
        """Write `model` as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads unchanged.

        The folder gets the source's config.json (its dtype updated when `dtype` is given), its
        generation_config.json and tokenizer files, and safetensors shards of at most `max_shard_size`
        (with an index when there is more than one). Written atomically; on several ranks rank 0 writes.
        Adapters are merged into the weights unless `merge_adapter_weights=False` (see `export_hf_weights`;
        `save_hf_adapter` writes the adapters alone).
        """
        params, plan = self._export_plan(model, dtype)
        tensors = _stream(model, params, plan, merge=merge_adapter_weights)
        if not current_layout().is_rank_zero:
            for _ in tensors:  # take part in the FSDP2 gathers, write nothing
                pass
            return Path(path)
        config = self.hf_config
        if dtype is not None:
            config[dtype_key(config)] = dtype_name(dtype)
        files = auxiliary_files(self.folder)
        with staged_output(path, overwrite) as staging:
            write_json_file(staging / CONFIG_FILE, config)
            copy_files(files, staging)
            write_safetensors_shards(staging, [(item.hf_name, item.spec) for item in plan], tensors,
                                     parse_size(max_shard_size))
        return Path(path)

    def save_hf_adapter(self, model: ModelLike, path: str | os.PathLike, *, peft_config: PEFT,
                        base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                        overwrite: bool = False) -> Path:
        """Write `model`'s LoRA / DoRA adapters as a Hugging Face PEFT folder (`peft.PeftModel.from_pretrained`).

        The folder holds `adapter_config.json` and `adapter_model.safetensors`; `base_model_name_or_path`
        (default: this bridge's folder) is what peft loads the base from. Collective under FSDP2.
        """
        (chunk,) = _chunks(model)
        return peft_adapter.save_hf_adapter(
            chunk, path, peft_config=peft_config, dtype=dtype, overwrite=overwrite,
            base_model_name_or_path=str(self.folder) if base_model_name_or_path is None else base_model_name_or_path,
        )

    # ------------------------------------------------------------------------- checkpoint conversion

    @classmethod
    def import_ckpt(cls, hf_path: str | os.PathLike, megatron_path: str | os.PathLike, *,
                    dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Convert a Hugging Face folder into a training checkpoint (`<megatron_path>/iter_0000000`, step 0).

        `cfg.checkpoint.pretrained_checkpoint = megatron_path` then starts training from these weights.
        Tensors keep the source's dtype (or `dtype`); config.json, generation_config.json and the
        tokenizer files are kept in `iter_0000000/hf/` for the way back. Peak memory: about one copy.
        """
        bridge = cls.from_hf_pretrained(hf_path)
        weights = bridge._require_weights()
        provider = bridge.to_megatron_provider(load_weights=False)
        return megatron_checkpoint.import_weights(
            weights, provider, megatron_path, family=bridge.family, hf_config=bridge.hf_config,
            hf_files=auxiliary_files(bridge.folder), dtype=dtype, overwrite=overwrite,
        )

    @classmethod
    def export_ckpt(cls, megatron_path: str | os.PathLike, hf_path: str | os.PathLike, *,
                    iteration: int | None = None, source: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
                    overwrite: bool = False) -> Path:
        """Convert a training checkpoint (the latest, or `iteration`) into a Hugging Face folder.

        config.json and the tokenizer files come from `source` (a Hugging Face folder) when given, else
        from the `hf/` folder `import_ckpt` stored, found in the checkpoint or in the checkpoint it was
        finetuned from; failing that, config.json is rebuilt from run_config.yaml's model section.
        Tensors are streamed one at a time, in config.json's dtype (or `dtype`).
        """
        return megatron_checkpoint.export_weights(
            megatron_path, hf_path, iteration=iteration, source=None if source is None else Path(source),
            dtype=dtype, max_shard_size=parse_size(max_shard_size), overwrite=overwrite,
        )


    @classmethod
    def export_adapter_ckpt(cls, peft_checkpoint: str | os.PathLike, output_path: str | os.PathLike, *,
                            iteration: int | None = None, base_model_name_or_path: str | None = None,
                            dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the adapters of a LoRA / DoRA run's checkpoint (the latest, or `iteration`) as a PEFT folder.

        No model is built: the adapter tensors are read from the checkpoint, the LoRA / DoRA settings and the
        architecture from its run_config.yaml. `base_model_name_or_path` (default: the Hugging Face folder the
        run started from, when the checkpoint knows it) goes into adapter_config.json.
        """
        return megatron_checkpoint.export_adapters(
            peft_checkpoint, output_path, iteration=iteration, base_model_name_or_path=base_model_name_or_path,
            dtype=dtype, overwrite=overwrite,
        )


# -------------------------------------------------------------------------------- model handling


def _chunks(model: ModelLike) -> list[nn.Module]:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    unwrapped = []
    for chunk in chunks:
        chunk = getattr(chunk, "_orig_mod", chunk)  # torch.compile
        chunk = chunk.module if isinstance(chunk, nn.parallel.DistributedDataParallel) else chunk
        unwrapped.append(getattr(chunk, "_orig_mod", chunk))
    return unwrapped


def _named_parameters(model: ModelLike) -> dict[str, nn.Parameter]:
    params: dict[str, nn.Parameter] = {}
    for chunk in _chunks(model):
        for name, param in base_parameters(chunk).items():
            if name in params:
                raise ConversionError(f"parameter {name!r} appears in more than one model chunk")
            params[name] = param
    return params


def _stream(model: ModelLike, params: dict[str, nn.Parameter], plan: list[TensorPlan], *,
            merge: bool) -> Iterator[tuple[str, torch.Tensor]]:
    (chunk,) = _chunks(model)
    fold = merge and has_adapters(chunk)
    for name, hf_name, spec in plan:
        if fold:
            tensor = merged_tensor(chunk, name)  # gathers FSDP2 shards itself
        else:
            tensor = params[name].detach()
            if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor)
                tensor = tensor.full_tensor()
        yield hf_name, tensor.to(device="cpu", dtype=spec.dtype, copy=True)
