"""The main job: pretrain the tiny Qwen2.5-shaped recipe on real text, with the callback guide's examples.

    python examples/demo.py             # or: make demo
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/demo.py

The text is Python's own standard library, read from this interpreter's installation, so it is
on every machine and needs no download. Everything the demo makes goes under `runs/demo/`:

1. `corpus/stdlib.jsonl`: the standard library's public top-level modules (`abc.py`, `argparse.py`,
   ...), sorted by name, up to `--corpus-mb` megabytes, one JSON line per file;
2. `tokenizer/`: a byte-level BPE tokenizer trained on that corpus
   (`python -m megatron.bridge.data.train_tokenizer`);
3. `data/stdlib.bin` + `.idx`: the corpus tokenized into a Megatron indexed dataset
   (`python -m megatron.bridge.data.preprocess`), with its cached sample indices in `data/stdlib_cache/`;
4. `tb_logs/`: TensorBoard logs of the run.

Training attaches the guide's class-based callback, its user_state example and functional
callbacks through one `CallbackManager`, validates during and after training, runs the test
pass, and finally prints code sampled from the trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time

import torch
import torch.distributed as dist

from megatron.bridge.data import preprocess, train_tokenizer
from megatron.bridge.data.tokenizer import HuggingFaceTokenizer
from megatron.bridge.models.generate import generate
from megatron.bridge.recipes.qwen import qwen25_tiny_pretrain_config
from megatron.bridge.training.callbacks import Callback, CallbackManager
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

RUN_DIR = os.path.join(os.getcwd(), "runs", "demo")
PROMPTS = ("def ", "    def __init__(self", "        if ")


def print_once(message: str) -> None:
    """Print on rank 0 only: every event fires on every rank (docs/callbacks.md, "Distributed training")."""
    if dist.get_rank() == 0:
        print(message)


class MyCallback(Callback):
    """The guide's class-based example, printing on rank 0 only."""

    def on_train_start(self, context):
        context.user_state["start_time"] = time.time()
        print_once(f"Training started at step {context.state.train_state.step}")

    def on_train_step_end(self, context):
        if context.loss_dict and context.state.train_state.step % 100 == 99:
            print_once(f"Step {context.state.train_state.step}: loss={context.loss_dict}")

    def on_train_end(self, context):
        elapsed = time.time() - context.user_state["start_time"]
        print_once(f"Training completed in {elapsed:.2f}s")


class StepCounterCallback(Callback):
    """The guide's user_state example, printing on rank 0 only."""

    def on_train_start(self, context):
        context.user_state["callback_step_count"] = 0

    def on_train_step_end(self, context):
        context.user_state["callback_step_count"] += 1

    def on_train_end(self, context):
        print_once(f"Callback saw {context.user_state['callback_step_count']} steps")


def record_loss(context):
    """A functional callback: keep every step's training loss."""
    context.user_state.setdefault("train_losses", []).append(float(context.loss_dict["lm loss"]))


def report_eval(context):
    """A functional callback: remember the validation losses."""
    context.user_state.setdefault("validation_losses", []).append(float(context.total_loss_dict["lm loss"]))


def keep_model(context):
    """A functional callback: hold on to the trained model so the demo can sample from it afterwards."""
    context.user_state["model"] = context.model


def write_corpus(path: str, megabytes: float) -> int:
    """The stdlib's public top-level modules, sorted by name, as JSON lines, up to `megabytes`; return the bytes."""
    stdlib = sysconfig.get_paths()["stdlib"]
    budget, written = int(megabytes * 1e6), 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for name in sorted(os.listdir(stdlib)):
            # Public modules only: private ones include generated tables (_sysconfigdata_*) that read like noise.
            if not name.endswith(".py") or name.startswith("_") or written >= budget:
                continue
            try:
                with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue  # a few modules are not UTF-8; the corpus does without them
            out.write(json.dumps({"path": name, "text": text}) + "\n")
            written += len(text.encode("utf-8"))
    return written


def prepare_data(args: argparse.Namespace) -> tuple[str, str]:
    """Corpus, tokenizer and indexed dataset under runs/demo; return (tokenizer dir, data prefix)."""
    corpus = os.path.join(RUN_DIR, "corpus", "stdlib.jsonl")
    tokenizer_dir = os.path.join(RUN_DIR, "tokenizer")
    prefix = os.path.join(RUN_DIR, "data", "stdlib")
    size = write_corpus(corpus, args.corpus_mb)
    print(f"> corpus: {size / 1e6:.1f} MB of standard-library source from {sysconfig.get_paths()['stdlib']}")
    commands = (
        (train_tokenizer, ["--input", corpus, "--vocab-size", str(args.vocab_size), "--output", tokenizer_dir]),
        (preprocess, ["--input", corpus, "--json-key", "text", "--tokenizer-model", tokenizer_dir,
                      "--output-prefix", prefix, "--workers", str(args.workers)]),
    )
    for module, argv in commands:
        print(f"$ python -m {module.__name__} {' '.join(os.path.relpath(a) if os.sep in a else a for a in argv)}")
        module.main(argv)
    return tokenizer_dir, prefix


def build_config(args: argparse.Namespace, tokenizer_dir: str, prefix: str):
    """The tiny recipe, pointed at the stdlib dataset and its tokenizer."""
    config = qwen25_tiny_pretrain_config()
    config.tokenizer.tokenizer_type = "HuggingFaceTokenizer"
    config.tokenizer.tokenizer_model = tokenizer_dir
    config.dataset.blend = ([prefix], None)
    config.dataset.split = "90,5,5"
    config.train.train_iters = args.train_iters
    config.validation.eval_interval = max(args.train_iters // 2, 1)
    config.logger.tensorboard_dir = os.path.join(RUN_DIR, "tb_logs")
    config.logger.log_interval = 50
    return config


def print_samples(model, tokenizer_dir: str) -> None:
    """A few lines of code written by the trained model, one sample per prompt."""
    tokenizer = HuggingFaceTokenizer(tokenizer_dir)
    print("\nText sampled from the trained model (temperature 0.6, top-k 20):")
    for i, prompt in enumerate(PROMPTS):
        text = prompt + generate(model, tokenizer, prompt, max_new_tokens=48, temperature=0.6, top_k=20, seed=i)
        print("-" * 60)
        print("\n".join(text.splitlines()[:6]))
    print("-" * 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-iters", type=int, default=500, help="training steps (default: 500)")
    parser.add_argument("--corpus-mb", type=float, default=2.0, help="megabytes of stdlib source (default: 2)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary (default: 1024)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default: 1)")
    args = parser.parse_args()
    # A model this small gains little from a second intra-op thread and loses many times over when the
    # cores are shared: two spinning OpenMP threads per busy core made training 10x slower in our runs.
    torch.set_num_threads(args.threads)

    # Under torchrun only rank 0 prepares the data; the others wait for it at a barrier.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    tokenizer_dir = os.path.join(RUN_DIR, "tokenizer")
    prefix = os.path.join(RUN_DIR, "data", "stdlib")
    if rank == 0:
        tokenizer_dir, prefix = prepare_data(args)
    if distributed:
        dist.barrier()

    config = build_config(args, tokenizer_dir, prefix)
    manager = CallbackManager()
    manager.add([MyCallback(), StepCounterCallback()])
    manager.register("on_train_step_end", record_loss)
    manager.register("on_train_end", keep_model)
    manager.register("on_eval_end", report_eval)
    manager.register("on_test_end", lambda ctx: print_once(f"Test loss: {float(ctx.total_loss_dict['lm loss']):.3f}"))

    pretrain(config, forward_step, callbacks=manager)

    if rank == 0:
        losses = manager.user_state["train_losses"]
        print(f"Training loss fell from {losses[0]:.2f} (step 1) to {losses[-1]:.2f} (step {len(losses)})")
        validation = [round(x, 3) for x in manager.user_state["validation_losses"]]
        print(f"Validation losses seen by the callback: {validation}")
        log_dir = config.logger.tensorboard_dir
        print(f"TensorBoard logs: {log_dir}  (view them with: tensorboard --logdir {log_dir})")
        print_samples(manager.user_state["model"], tokenizer_dir)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
