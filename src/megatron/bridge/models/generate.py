"""Sampling text from a trained decoder, one token at a time.

Deliberately simple: every new token reruns the whole (cropped) context through the model, with
no key/value cache. That costs O(n^2) work per sample, which is nothing for the few dozen tokens a
demo prints and keeps the model free of inference-only code.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = ["Tokenizer", "generate"]


class Tokenizer(Protocol):
    """What sampling needs of a tokenizer (`megatron.bridge.data.tokenizer`'s have it): text to ids and back."""

    vocab_size: int
    eod: int

    def tokenize(self, text: str) -> list[int]:
        """The ids of `text`."""

    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids`."""


def _unwrap(model: nn.Module | list[nn.Module]) -> nn.Module:
    if isinstance(model, list):  # the trainer's list of model chunks
        model = model[0]
    # DistributedDataParallel keeps the model in `.module`; calling the wrapper could start collectives.
    return getattr(model, "module", model)


@torch.no_grad()
def generate(
    model: nn.Module | list[nn.Module],
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    *,
    seed: int | None = None,
    stop_at_eod: bool = True,
) -> str:
    """The text the model writes after `prompt` (the prompt itself not included).

    Args:
        model: a `GPTModel`, possibly wrapped in DDP, or the trainer's list of model chunks.
        tokenizer: turns the prompt into ids and the new ids back into text.
        prompt: the text to continue.
        max_new_tokens: the most tokens to add.
        temperature: softmax temperature; 0 picks the most likely token every time (greedy).
        top_k: sample only among the `top_k` most likely tokens (None: the whole vocabulary).
        seed: seed for a private random generator (None: torch's global one).
        stop_at_eod: stop at the end-of-document token (which is not returned).
    """
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 or None; got "
                         f"{max_new_tokens=}, {temperature=}, {top_k=}")
    module = _unwrap(model)
    device = next(module.parameters()).device
    context_length = module.config.seq_length
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    ids = tokenizer.tokenize(prompt) or [tokenizer.eod]  # an empty prompt starts a fresh document
    new_ids: list[int] = []
    was_training = module.training
    module.eval()
    try:
        for _ in range(max_new_tokens):
            context = torch.tensor([(ids + new_ids)[-context_length:]], device=device)
            logits = module(context)[0, -1].float()
            # Rows past the tokenizer's vocabulary are padding (make_vocab_size_divisible_by): never sample them.
            next_id = _sample(logits[: tokenizer.vocab_size], temperature, top_k, generator)
            if stop_at_eod and next_id == tokenizer.eod:
                break
            new_ids.append(next_id)
    finally:
        module.train(was_training)
    return tokenizer.detokenize(new_ids)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
