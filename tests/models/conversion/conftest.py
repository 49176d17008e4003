"""Session-wide tiny Hugging Face Qwen2 and Llama models and their saved folders."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hf_tiny import build_hf, llama_config, qwen2_config, save_hf  # noqa: E402


@pytest.fixture(scope="session")
def qwen2_model():
    return build_hf(qwen2_config())


@pytest.fixture(scope="session")
def llama_model():
    return build_hf(llama_config(), seed=1)


@pytest.fixture(scope="session")
def qwen2_folder(qwen2_model, tmp_path_factory) -> Path:
    """Tied embeddings, q/k/v biases, grouped queries; one model.safetensors."""
    return save_hf(qwen2_model, tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture(scope="session")
def llama_folder(llama_model, tmp_path_factory) -> Path:
    """Untied output layer, llama3 RoPE scaling; sharded with an index."""
    return save_hf(llama_model, tmp_path_factory.mktemp("hf") / "llama", max_shard_size="40KB")
