"""Qwen3, Llama 3.2, Mistral and Gemma 3 through the bridge, one table over the families.

For each, a tiny random model built and saved by `transformers` here: our logits equal theirs in
float32; Hugging Face -> ours -> Hugging Face is bit for bit; config.json round-trips through the
provider; and import -> finetune 3 steps -> export gives a folder `transformers` loads with our logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hf_tiny import SEQ, assert_same_extras, assert_same_tensors, build_hf, hf_logits, save_hf, token_ids
from safetensors.torch import load_file

from helpers import make_tiny_config
from megatron.bridge import AutoBridge
from megatron.bridge.models import (
    Gemma3ModelProvider,
    GPTModel,
    GPTModelProvider,
    LlamaModelProvider,
    MistralModelProvider,
    Qwen3ModelProvider,
    Qwen25ModelProvider500M,
)
from megatron.bridge.models.registry import FAMILIES, family_of_provider, provider_from_hf_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.finetune import finetune
from megatron.bridge.training.gpt_step import forward_step

transformers = pytest.importorskip("transformers")

VOCAB = 128  # the tiny training config's tokenizer size
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
LLAMA32_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
GEMMA_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}


def _no_windows(model: GPTModel) -> None:
    model.windowed_layers = (False,) * len(model.layers)


def _no_rope_scaling(model: GPTModel) -> None:
    model.config.rope_scaling = None


@dataclass(frozen=True)
class Case:
    """One family under test: its tiny transformers config and what the bridge must make of it."""

    config: Callable[[], Any]
    provider_class: type[GPTModelProvider]
    expected: dict[str, Any]
    """Provider fields config.json must give."""
    windowed: tuple[bool, ...]
    """Which layers use the sliding window."""
    ablate: Callable[[GPTModel], None] | None = None
    """Switches off the family's feature that random weights alone may not exercise (the logits must move)."""
    norm_mean: float = 1.0
    hf_options: dict[str, Any] = field(default_factory=dict)


CASES = {
    # head_dim 32 with hidden 64 / 4 heads = 16: the head dimension is Qwen3's own.
    "qwen3": Case(
        lambda: transformers.Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        Qwen3ModelProvider, dict(kv_channels=32, qk_layernorm=True, share_embeddings_and_output_weights=True,
                                 rotary_base=1_000_000, window_size=None), (False, False)),
    "llama32": Case(
        lambda: transformers.LlamaConfig(**COMMON, num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                         rope_parameters={**LLAMA32_SCALING, "rope_theta": 500_000.0}),
        LlamaModelProvider, dict(rope_scaling=LLAMA32_SCALING, rotary_base=500_000, layernorm_epsilon=1e-5,
                                 share_embeddings_and_output_weights=True), (False, False), ablate=_no_rope_scaling),
    # A window of 8 tokens, the query included, on every layer of a 24-token sequence.
    "mistral": Case(
        lambda: transformers.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=8),
        MistralModelProvider, dict(window_size=(7, 0), window_attn_skip_freq=None,
                                   share_embeddings_and_output_weights=False), (True, True), ablate=_no_windows),
    # Layers 0, 1 and 3 local (window 8, RoPE base 1e4), layer 2 global (base 1e6, linear scaling);
    # query_pre_attn_scalar 24 differs from head_dim 32.
    "gemma3": Case(
        lambda: transformers.Gemma3TextConfig(**COMMON, num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24,
                                              sliding_window=8, sliding_window_pattern=3, rope_parameters=GEMMA_ROPE),
        Gemma3ModelProvider, dict(window_size=(7, 0), window_attn_skip_freq=3, rotary_base=1_000_000,
                                  rotary_base_local=10_000, rope_scaling={"rope_type": "linear", "factor": 4.0},
                                  softmax_scale=24**-0.5, kv_channels=32), (True, True, False, True),
        ablate=_no_windows, norm_mean=0.0),
}


@dataclass(frozen=True)
class Built:
    name: str
    case: Case
    hf_model: Any
    folder: Path


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory) -> Built:
    """A family's tiny random transformers model and the folder `save_pretrained` wrote (read-only)."""
    case = CASES[request.param]
    model = build_hf(case.config(), seed=3, norm_mean=case.norm_mean)
    return Built(request.param, case, model, save_hf(model, tmp_path_factory.mktemp("hf") / request.param))


def test_our_logits_equal_transformers(family):
    bridge = AutoBridge.from_hf_pretrained(family.folder)
    provider = bridge.to_megatron_provider(load_weights=False)
    assert type(provider) is family.case.provider_class
    assert {key: getattr(provider, key) for key in family.case.expected} == family.case.expected
    model = bridge.to_megatron_model()[0].eval()
    assert model.windowed_layers == family.case.windowed
    ids = token_ids(VOCAB)
    assert ids.shape[1] == SEQ > 8  # longer than the windows
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(ours, family.hf_model(ids).logits, atol=1e-5, rtol=0)
        if family.case.ablate is not None:  # the comparison could have caught a wrong window or scaling
            family.case.ablate(model)
            assert (model(ids) - ours).abs().max() > 1e-3


def test_hf_to_ours_to_hf_is_bit_identical(family, tmp_path):
    bridge = AutoBridge.from_hf_pretrained(family.folder)
    out = bridge.save_hf_pretrained(bridge.to_megatron_model(), tmp_path / "out")
    assert_same_tensors(family.folder, out)
    assert_same_extras(family.folder, out)


def test_config_json_round_trips_through_the_provider(family, tmp_path):
    """With no config.json at hand, the family writes one that transformers reads as the original."""
    bridge = AutoBridge.from_hf_pretrained(family.folder)
    provider = bridge.to_megatron_provider(load_weights=False)
    written = bridge.family.hf_config_from_provider(provider, torch.float32)
    assert "rope_parameters" in written and written["dtype"] == "float32"  # transformers 5's spelling
    assert provider_from_hf_config(written) == provider
    (tmp_path / "config.json").write_text(json.dumps(written))
    theirs, ours = (transformers.AutoConfig.from_pretrained(folder).to_dict() for folder in (family.folder, tmp_path))
    for where_from in ("_name_or_path", "transformers_version"):  # not the model's: where and by which version
        theirs.pop(where_from, None), ours.pop(where_from, None)
    assert ours == theirs


class FinalModel(Callback):
    """Keeps the trained model and the losses."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.losses: list[float] = []

    def on_train_step_end(self, context) -> None:
        self.losses.append(context.loss_dict["lm loss"].item())

    def on_train_end(self, context) -> None:
        self.model = context.model[0]


def test_import_finetune_export_and_transformers_loads_our_model(family, tmp_path):
    checkpoint = AutoBridge.import_ckpt(family.folder, tmp_path / "imported")
    run_config = yaml.safe_load((checkpoint / "iter_0000000" / "run_config.yaml").read_text())
    assert run_config["model"]["_target_"].endswith(family.case.provider_class.__name__)
    cfg = make_tiny_config(train__train_iters=3)
    cfg.model = AutoBridge.from_hf_pretrained(family.folder).to_megatron_provider(load_weights=False)
    cfg.model.seq_length = cfg.dataset.seq_length  # 32 tokens: longer than the windows
    cfg.checkpoint.pretrained_checkpoint = str(checkpoint)
    cfg.checkpoint.save = str(tmp_path / "run")
    keeper = FinalModel()
    finetune(cfg, forward_step, [keeper])
    assert len(keeper.losses) == 3 and all(map(torch.isfinite, torch.tensor(keeper.losses)))

    out = AutoBridge.export_ckpt(tmp_path / "run", tmp_path / "hf")
    assert_same_extras(family.folder, out)  # config.json and tokenizer found through pretrained_checkpoint
    ours = keeper.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, VOCAB), ours(token_ids(VOCAB)), atol=1e-5, rtol=0)
    source = load_file(family.folder / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(ours.embedding.weight.detach(), source)  # the three steps changed the weights


# ------------------------------------------------------------------------------ what each family refuses


def _saved_config(name: str, tmp_path: Path) -> dict[str, Any]:
    CASES[name].config().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    architecture = {"qwen3": "Qwen3ForCausalLM", "llama32": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "gemma3": "Gemma3ForCausalLM"}[name]
    return {**config, "architectures": [architecture]}


@pytest.mark.parametrize(("name", "changes", "match"), [
    ("qwen3", {"use_sliding_window": True}, r"use_sliding_window=true is not supported \(full attention only\)"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, r"layer_types=.* is not supported"),
    ("qwen3", {"attention_bias": True}, r"attention_bias=true is not supported \(it biases o_proj too"),
    ("qwen3", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported \(silu only\)"),
    ("mistral", {"sliding_window": 0}, r"sliding_window=0 is invalid: a positive integer"),
    ("gemma3", {"final_logit_softcapping": 30.0}, r"final_logit_softcapping=30\.0 is not supported"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, r"attn_logit_softcapping=50\.0 is not supported"),
    ("gemma3", {"use_bidirectional_attention": True}, r"use_bidirectional_attention=true is not supported"),
    ("gemma3", {"model_type": "gemma3"}, r"model_type='gemma3' is not supported \(.*gemma3_text"),
    ("gemma3", {"hidden_activation": "silu"}, r"hidden_activation='silu' is not supported \(gelu_pytorch_tanh"),
    ("gemma3", {"layer_types": ["sliding_attention"]}, r"layer_types=.* is invalid: a list of num_hidden_layers=4"),
    ("gemma3", {"rope_parameters": {**GEMMA_ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     r"rope type 'linear' is not supported; supported: default$"),
    ("gemma3", {"rope_parameters": {"rope_theta": 1e6}}, r"rope_parameters=.* is invalid: an object with a "
                                                         r"full_attention and a sliding_attention entry"),
])
def test_each_family_refuses_what_it_cannot_reproduce(name, changes, match, tmp_path):
    config = {**_saved_config(name, tmp_path), **changes}
    with pytest.raises(ValueError, match=r"config\.json: " + match):
        provider_from_hf_config(config)


def test_mistral_without_a_window_attends_to_everything(tmp_path):
    provider = provider_from_hf_config({**_saved_config("mistral", tmp_path), "sliding_window": None})
    assert provider.window_size is None and not any(provider.window_attention_layers)


def test_gemma3_reads_the_transformers_4_keys_as_transformers_does(tmp_path):
    """The published 1B config.json spells RoPE as rope_theta / rope_local_base_freq / rope_scaling and gives
    sliding_window_pattern instead of layer_types: read as transformers 5 reads it."""
    legacy = {key: value for key, value in _saved_config("gemma3", tmp_path).items()
              if key not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
    legacy.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                  rope_scaling={"rope_type": "linear", "factor": 4.0}, sliding_window_pattern=3,
                  torch_dtype="float32")
    converted = transformers.Gemma3TextConfig.from_dict(legacy)
    assert converted.rope_parameters == GEMMA_ROPE
    expected = provider_from_hf_config({**converted.to_dict(), "architectures": ["Gemma3ForCausalLM"]})
    assert provider_from_hf_config(legacy) == expected
    assert expected.window_attn_skip_freq == 3 and expected.rotary_base_local == 10_000


def test_irregular_layer_types_become_a_per_layer_list(tmp_path):
    config = {**_saved_config("gemma3", tmp_path), "sliding_window_pattern": None, "_sliding_window_pattern": None,
              "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]}
    provider = provider_from_hf_config(config)
    assert provider.window_attn_skip_freq == [0, 1, 1, 0]
    assert provider.window_attention_layers == (False, True, True, False)
    written = family_of_provider(provider).hf_config_from_provider(provider, torch.bfloat16)
    assert written["layer_types"] == config["layer_types"] and "sliding_window_pattern" not in written


# ------------------------------------------------------------------------------ the registry by class


def test_a_provider_finds_its_family_by_class():
    class Tuned(Qwen25ModelProvider500M):
        """A user's subclass of a published size."""

    assert family_of_provider(Tuned()).architecture == "Qwen2ForCausalLM"
    for family in FAMILIES:
        assert all(family_of_provider(cls()) is family for cls in family.providers)
    with pytest.raises(ValueError, match=r"GPTModelProvider belongs to no model family the bridge converts.*"
                                         r"qwen2 \(Qwen2ForCausalLM, Qwen2ModelProvider\); qwen3 .*gemma3 "
                                         r"\(Gemma3ForCausalLM, Gemma3ModelProvider\)"):
        family_of_provider(GPTModelProvider())


def test_a_family_refuses_to_write_a_provider_it_cannot_express():
    llama = family_of_provider(LlamaModelProvider())
    with pytest.raises(ValueError, match=r"model\.qk_layernorm=True is invalid: False in a LlamaForCausalLM model"):
        llama.hf_config_from_provider(LlamaModelProvider(qk_layernorm=True), torch.bfloat16)
    with pytest.raises(ValueError, match=r"model\.add_qkv_bias=True is invalid: equal to model\.add_bias_linear"):
        llama.hf_config_from_provider(LlamaModelProvider(add_qkv_bias=True), torch.bfloat16)
    with pytest.raises(ValueError, match=r"model\.activation_func='gelu_tanh' is invalid: 'silu'"):
        llama.hf_config_from_provider(LlamaModelProvider(activation_func="gelu_tanh"), torch.bfloat16)


def _checkpoint_with_model_section(source: Path, tmp_path: Path, model: dict[str, Any]) -> Path:
    checkpoint = AutoBridge.import_ckpt(source, tmp_path / "ckpt")
    iteration = checkpoint / "iter_0000000"
    for file in (iteration / "hf").iterdir():  # export must now rebuild config.json from run_config.yaml
        file.unlink()
    (iteration / "hf").rmdir()
    run_config = yaml.safe_load((iteration / "run_config.yaml").read_text())
    run_config["model"] = model | {k: v for k, v in run_config["model"].items() if k != "_target_"}
    run_config["tokenizer"] = {"tokenizer_type": "NullTokenizer", "vocab_size": 128}  # its folder went with hf/
    (iteration / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    (iteration / "manifest.json").unlink()  # edited by hand: read it as a checkpoint written before checksums
    return checkpoint


def test_export_builds_only_registry_providers_from_run_config(qwen2_folder, tmp_path):
    target = {"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider"}
    checkpoint = _checkpoint_with_model_section(qwen2_folder, tmp_path / "a", target)
    with pytest.raises(ValueError, match=r"run_config\.yaml: model\._target_='megatron\.bridge\.models\.gpt_provider"
                                         r"\.GPTModelProvider' is not a provider of a family the bridge converts; "
                                         r"known: .*Qwen2ModelProvider"):
        AutoBridge.export_ckpt(checkpoint, tmp_path / "out")
    checkpoint = _checkpoint_with_model_section(qwen2_folder, tmp_path / "b", {})
    with pytest.raises(ValueError, match="GPTModelProvider belongs to no model family"):
        AutoBridge.export_ckpt(checkpoint, tmp_path / "out")
    # The path checkpoints written before the family packages still name works.
    old = {"_target_": "megatron.bridge.models.qwen.Qwen2ModelProvider"}
    out = AutoBridge.export_ckpt(_checkpoint_with_model_section(qwen2_folder, tmp_path / "c", old), tmp_path / "out")
    assert_same_tensors(qwen2_folder, out)
