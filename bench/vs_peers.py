"""Tokens/s of `pretrain` against Hugging Face's Trainer and a hand-written PyTorch loop.

The same Qwen2-shaped tiny model (the tiny recipe: 2 layers, hidden 128, GQA 4/2, SwiGLU, tied
embeddings, seq 128, vocab 1024), the same mock data, steps and global batch, trained by

  (a) our `pretrain(cfg, forward_step)`;
  (b) `transformers.Trainer` on `Qwen2ForCausalLM` built with the same shape (SDPA attention);
  (c) a minimal hand-written loop (the one in `callback_overhead.py`).

Each step is stamped at its first micro-batch by a wrapper around the model's forward (identical
for all three). The table shows the median step time over `--steps` steps after `--warmup`, as
tokens/s, over `--rounds` rounds (median of rounds), and the ratios a/b and a/c measured in the same
run. Goals: a/b >= 1.3, a/c >= 0.97. transformers and accelerate are bench-only dependencies
(`.venv/bin/pip install -e ".[bench]"`).

    .venv/bin/python bench/vs_peers.py [--steps 30 --warmup 5 --rounds 3 --threads 2]

On a GPU (when one is present) the same script runs all three there, each eagerly (`train.compile`
off: the comparison is of the loops, not the compiler), with a device synchronisation at each stamp.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from callback_overhead import StepClock, make_config, num_microbatches, run_hand_loop, run_pretrain
from megatron.bridge.data.mock import MockGPTDataset
from megatron.bridge.training.config import ConfigContainer


def run_hf_trainer(cfg: ConfigContainer, clock: StepClock) -> None:
    """Variant (b): Hugging Face's Trainer on Qwen2ForCausalLM of the same shape."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    m = cfg.model
    m.vocab_size = cfg.tokenizer.vocab_size
    hf_config = Qwen2Config(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, intermediate_size=m.resolved_ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.resolved_num_query_groups, max_position_embeddings=m.seq_length,
        rope_theta=m.rotary_base, rms_norm_eps=m.layernorm_epsilon,
        tie_word_embeddings=m.share_embeddings_and_output_weights, attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.rng.seed)
    model = Qwen2ForCausalLM(hf_config)
    forward = model.forward

    def timed_forward(*args, **kwargs):
        clock.tick()
        return forward(*args, **kwargs)

    model.forward = timed_forward
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    mock = MockGPTDataset(num_samples=cfg.train.train_iters * gbs, seq_length=m.seq_length,
                          vocab_size=cfg.tokenizer.vocab_size, seed=cfg.dataset.random_seed, split="train")

    class Samples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(mock)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            tokens = mock[index]["tokens"]
            return {"input_ids": tokens, "labels": tokens}  # the model shifts labels itself

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=mbs, gradient_accumulation_steps=gbs // mbs,
            max_steps=cfg.train.train_iters, learning_rate=cfg.optimizer.lr, adam_beta1=cfg.optimizer.adam_beta1,
            adam_beta2=cfg.optimizer.adam_beta2, adam_epsilon=cfg.optimizer.adam_eps,
            weight_decay=cfg.optimizer.weight_decay, max_grad_norm=cfg.optimizer.clip_grad,
            lr_scheduler_type="cosine", warmup_steps=cfg.scheduler.lr_warmup_iters, logging_steps=10**9,
            save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            disable_tqdm=True, seed=cfg.rng.seed, remove_unused_columns=False,  # the timing wrapper hides the signature
        )
        Trainer(model=model, args=args, train_dataset=Samples()).train()


VARIANTS = {"a": "pretrain", "b": "transformers.Trainer", "c": "hand-written loop"}


def run(name: str, train_iters: int) -> StepClock:
    cfg = make_config(train_iters)
    clock = StepClock(num_microbatches(cfg))
    if name == "a":
        run_pretrain(cfg, clock, with_callbacks=False)
    elif name == "b":
        run_hf_trainer(cfg, clock)
    else:
        run_hand_loop(cfg, clock)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = make_config(1)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    medians: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        order = list(VARIANTS)[round_index % 3:] + list(VARIANTS)[:round_index % 3]
        for name in order:
            clock = run(name, args.warmup + args.steps + 1)
            medians[name].append(statistics.median(clock.step_times(args.warmup, args.steps)))
    step = {name: statistics.median(values) for name, values in medians.items()}
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    print(f"\nvs peers ({device}, Qwen2-shaped tiny model, {tokens_per_step} tokens/step, median of "
          f"{args.steps} steps after {args.warmup}, {args.rounds} rounds)")
    print(f"{'variant':28s} {'ms/step':>9s} {'tokens/s':>10s}")
    for name, label in VARIANTS.items():
        print(f"({name}) {label:24s} {1000 * step[name]:9.2f} {tokens_per_step / step[name]:10.0f}")
    print(f"a/b = {step['b'] / step['a']:.2f}  (goal >= 1.3)    a/c = {step['c'] / step['a']:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
