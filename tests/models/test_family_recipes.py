"""Every recipe: the published model's parameter count, and two training steps on the CPU once shrunk."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import shrink
from megatron.bridge.cli import available_recipes
from megatron.bridge.models import GPTModelProvider, MistralModelProvider7B
from megatron.bridge.models.registry import family_of_provider
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

transformers = pytest.importorskip("transformers")

PUBLISHED = {
    # Parameter counts of the Hugging Face checkpoints (tied embeddings counted once).
    "qwen25_500m": 494_032_768, "qwen25_1p5b": 1_543_714_304, "qwen25_7b": 7_615_616_512,
    "qwen25_tiny": None,  # no published model
    "qwen3_600m": 596_049_920, "qwen3_1p7b": 1_720_574_976, "qwen3_4b": 4_022_468_096,
    "qwen3_8b": 8_190_735_360, "qwen3_14b": 14_768_307_200, "qwen3_32b": 32_762_123_264,
    "llama32_1b": 1_235_814_400, "llama32_3b": 3_212_749_824, "llama3_8b": 8_030_261_248,
    "llama31_8b": 8_030_261_248,
    "gemma3_1b": 999_885_952,
}
RECIPES = available_recipes()


def _counts(provider: GPTModelProvider) -> tuple[int, int]:
    """Ours and transformers' parameter counts for `provider`'s shape, both built on the meta device."""
    config = family_of_provider(provider).hf_config_from_provider(provider, torch.bfloat16)
    with torch.device("meta"):
        ours = provider.provide().num_parameters()
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    return ours, sum(p.numel() for p in theirs.parameters())


def test_every_recipe_has_a_published_count():
    assert set(RECIPES) == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_recipe_parameter_count_is_the_published_models(name):
    provider = RECIPES[name]().model
    # The recipes' models follow the tokenizer's vocabulary; the published model has its provider's.
    provider.vocab_size = type(provider)().vocab_size
    ours, theirs = _counts(provider)
    assert ours == theirs
    if PUBLISHED[name] is not None:
        assert ours == PUBLISHED[name]


def test_mistral_7b_parameter_count_is_the_published_models():
    assert _counts(MistralModelProvider7B()) == (7_241_732_096, 7_241_732_096)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_recipe_trains_two_steps_on_the_cpu_once_shrunk(name, chdir):
    cfg = shrink(RECIPES[name]())
    cfg.train.train_iters = 2
    cfg.scheduler.lr_warmup_iters = 1
    cfg.validation.eval_interval, cfg.validation.eval_iters = None, 1
    losses = LossLog()
    pretrain(cfg, forward_step, [losses])
    assert len(losses.values) == 2 and all(map(math.isfinite, losses.values))


class LossLog(Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_step_end(self, context) -> None:
        self.values.append(context.loss_dict["lm loss"].item())
