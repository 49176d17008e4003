"""Finetune with LoRA, offline and end to end: a Hugging Face model in, an adapter out, loaded by `peft`.

    python examples/finetune_lora.py          # needs the dev extra (transformers, peft): pip install -e ".[dev]"

Everything is made on the spot under `runs/finetune_lora/`, so nothing is downloaded:

1. `base/`: a tiny Qwen2 model saved by `transformers` (random weights) with a byte-level BPE
   tokenizer and a ChatML chat template (`chat_template.jinja`, as transformers 5 saves it);
2. `data/`: a few chat conversations (`{"messages": [...]}`) as `training.jsonl` / `validation.jsonl`;
3. `checkpoints/`: the LoRA run (`qwen25_tiny_peft_config`), its base weights read straight from
   `base/`: its checkpoints hold the adapters only;
4. `adapter/`: the adapters as a Hugging Face PEFT folder, `merged/`: the model with them folded in.

At the end `transformers` and `peft` load both, and the adapted model answers a question from the data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron.bridge import AutoBridge
from megatron.bridge.recipes.qwen import qwen25_tiny_peft_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.finetune import finetune
from megatron.bridge.training.gpt_step import forward_step

RUN_DIR = Path(os.getcwd()) / "runs" / "finetune_lora"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FACTS = {
    "What is the capital of France?": "Paris is the capital of France.",
    "What colour is the sky?": "The sky is blue.",
    "How many legs does a spider have?": "A spider has eight legs.",
    "What do bees make?": "Bees make honey.",
    "What is frozen water called?": "Frozen water is called ice.",
    "Which planet do we live on?": "We live on the Earth.",
}


def make_base(folder: Path) -> None:
    """A tiny Qwen2 model and its tokenizer, as a Hugging Face folder."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"user\n{q}\nassistant\n{a}" for q, a in FACTS.items()]
    tokenizer.train_from_iterator(corpus * 20, trainer=trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (folder / "chat_template.jinja").write_text(CHATML)
    torch.manual_seed(0)
    vocab = -(-tokenizer.get_vocab_size() // 128) * 128  # the recipe pads the vocabulary to a multiple of 128
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def write_data(folder: Path) -> None:
    folder.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in FACTS.items()]
    for name, copies in (("training.jsonl", 8), ("validation.jsonl", 1)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows * copies))


class KeepModel(Callback):
    """Keeps the trained model, to export it when training is over."""

    def on_train_end(self, context):
        self.model = context.model[0]


def main() -> None:
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    base, data = RUN_DIR / "base", RUN_DIR / "data"
    make_base(base)
    write_data(data)

    bridge = AutoBridge.from_hf_pretrained(base)
    cfg = qwen25_tiny_peft_config(dir=str(RUN_DIR.parent), name=RUN_DIR.name)
    cfg.model = bridge.to_megatron_provider(load_weights=False)  # the shape; the weights come from base/
    cfg.model.seq_length = cfg.dataset.seq_length
    cfg.checkpoint.pretrained_checkpoint = str(base)  # a Hugging Face folder; its tokenizer is used too
    cfg.dataset.dataset_root = str(data)
    cfg.dataset.do_test = False
    cfg.train.train_iters = 60
    cfg.train.global_batch_size = 6
    cfg.train.micro_batch_size = 1
    cfg.peft.dim, cfg.peft.alpha = 16, 32
    cfg.optimizer.lr = 1e-2
    cfg.scheduler.lr_warmup_iters = 5
    cfg.checkpoint.save_interval = 30
    cfg.logger.log_interval = 10
    keep = KeepModel()
    finetune(cfg, forward_step, callbacks=[keep])

    adapter = bridge.save_hf_adapter(keep.model, RUN_DIR / "adapter", peft_config=cfg.peft)
    merged = bridge.save_hf_pretrained(keep.model, RUN_DIR / "merged")
    print(f"> adapter: {adapter}, merged model: {merged}")
    answer(base, adapter, merged)


def answer(base: Path, adapter: Path, merged: Path) -> None:
    """Load the adapter with `peft` and the merged model with `transformers`, and let both answer."""
    import transformers

    import peft

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    question = next(iter(FACTS))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    for label, model in (
        ("peft adapter", peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                        adapter)),
        ("merged model", transformers.AutoModelForCausalLM.from_pretrained(merged)),
    ):
        output = model.eval().generate(**prompt, max_new_tokens=16, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"> {label}: {question!r} -> {reply.strip()!r}")


if __name__ == "__main__":
    main()
