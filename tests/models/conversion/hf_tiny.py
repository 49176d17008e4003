"""Helpers for the conversion tests: tiny Qwen2 / Llama models built with `transformers` itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


def build_hf(config, seed: int = 0):
    """A transformers model with every tensor random (HF zero-inits biases and sets norms to one)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.08)
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
