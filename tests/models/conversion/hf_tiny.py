"""Helpers for the conversion tests: tiny models built with `transformers` itself, and folder comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

SEQ = 24
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}\n', "tokenizer_config.json": '{"model_max_length": 128}\n'}
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    # With head_dim 16 and base 10000 the wavelengths span 6 to 6000 positions: this puts some in each of
    # the three bands (kept, smoothed, divided by factor).
    "original_max_position_embeddings": 64,
}


def qwen2_config(**overrides):
    fields = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    fields.update(overrides)
    return transformers.Qwen2Config(**fields)


def llama_config(**overrides):
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=256,
                  rope_scaling=dict(LLAMA3_SCALING))
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def build_hf(config, seed: int = 0, *, norm_mean: float = 1.0, std: float = 0.08):
    """A transformers model with every tensor random (HF zero-inits biases and sets norms to one, or to
    zero for Gemma's `1 + w` norms: pass `norm_mean=0.0` there, so that a `w` vs `1 + w` slip shows)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(norm_mean, 0.1 if norm_mean else 0.3)
            else:
                param.normal_(0.0, std)
    return model.eval()


def save_hf(model, path: Path, *, tokenizer: bool = True, **save_kwargs) -> Path:
    """`save_pretrained` plus two stand-in tokenizer files (their content is copied, never parsed)."""
    model.save_pretrained(path, **save_kwargs)
    if tokenizer:
        for name, text in TOKENIZER_FILES.items():
            (path / name).write_text(text)
    return path


def token_ids(vocab: int, batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def folder_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (to show that a failed call wrote nothing)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder, read with the safetensors library (independent of our reader)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(source: Path, result: Path) -> None:
    """Both folders hold the same tensor names, shapes, dtypes and bytes."""
    expected, actual = hf_tensors(source), hf_tensors(result)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name].view(torch.uint8), tensor.view(torch.uint8)), name  # bit for bit


def hf_logits(folder: Path, vocab: int) -> torch.Tensor:
    """`transformers`' float32 logits for `token_ids(vocab)`, loading `folder` the standard way."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(token_ids(vocab)).logits


def assert_same_extras(source: Path, result: Path) -> None:
    """`result` holds the source's config.json, generation config and tokenizer files, unchanged."""
    assert json.loads((result / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    for name in ("generation_config.json", *TOKENIZER_FILES):
        assert (result / name).read_bytes() == (source / name).read_bytes(), name
