"""End to end on real text: preprocess a small corpus, train 20 steps, stop and resume, and the loss falls."""

from __future__ import annotations

import pytest

from megatron.bridge.data.preprocess import preprocess
from megatron.bridge.data.tokenizer import HuggingFaceTokenizer
from megatron.bridge.models.generate import generate
from megatron.bridge.training.callbacks import CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain


def train(config) -> tuple[list[float], CallbackManager]:
    manager = CallbackManager()
    losses: list[float] = []
    manager.register("on_train_step_end", lambda ctx: losses.append(float(ctx.loss_dict["lm loss"])))
    manager.register("on_train_end", lambda ctx: ctx.user_state.setdefault("model", ctx.model))
    pretrain(config, forward_step, callbacks=manager)
    return losses, manager


@pytest.mark.slow
def test_preprocess_train_resume_and_the_loss_falls(chdir, tiny_config, tokenizer_dir, corpus):
    stats = preprocess(corpus, tokenizer_model=tokenizer_dir, output_prefix="data/corpus", workers=2, progress=False)
    assert stats.documents == len(corpus)

    def config(**overrides):
        return tiny_config(
            train__train_iters=20, tokenizer__tokenizer_type="HuggingFaceTokenizer",
            tokenizer__tokenizer_model=tokenizer_dir, dataset__blend=["data/corpus"], dataset__split="90,5,5",
            validation__eval_iters=1, **overrides,
        )

    straight, manager = train(config())
    checkpointing = dict(checkpoint__save="ckpt", checkpoint__load="ckpt", checkpoint__save_interval=10)
    first, _ = train(config(train__exit_interval=10, **checkpointing))  # stops (and saves) after step 10
    resumed, _ = train(config(**checkpointing))
    assert len(straight) == 20 and len(first) == 10 and len(resumed) == 10
    # Same samples in the same order after the restart: the resumed losses are the uninterrupted ones.
    assert first + resumed == straight
    assert sum(straight[-5:]) / 5 < straight[0] - 0.5, straight

    text = generate(manager.user_state["model"], HuggingFaceTokenizer(tokenizer_dir), "def ", max_new_tokens=8,
                    temperature=0)
    assert isinstance(text, str)
