"""Answer tokens/s and peak memory of LoRA finetuning: ours packed, TRL's SFTTrainer, and ours padded.

One Hugging Face Qwen2 model (random weights, saved by `transformers` with a word-level tokenizer in a
temporary folder) and one set of prompt/completion rows (a seeded mix of 32-512 tokens each, the
end-of-sequence token included; the answer takes 20-80% of an example), trained with LoRA (rank 32,
alpha 32, every projection of attention and MLP: q, k, v, o, gate, up, down), fp32, on the CPU, by

  (a) ours, packed: `finetune()` with the Hugging Face folder as `checkpoint.pretrained_checkpoint`,
      offline packing into packs of 512 positions (`first_fit_shuffle`, the default; or
      `--packing-algorithm first_fit_decreasing`), one pack per micro-batch;
  (b) TRL: `SFTTrainer` with `peft.LoraConfig`, `packing=True` (bfd, padding-free),
      `completion_only_loss=True`, `max_length=512`, one pack per micro-batch, SDPA attention;
  (c) ours, padded: the same as (a) without packing, each global batch padded to its longest example
      (rounded up to 16), micro-batches of `--padded-mbs` examples.

The effective batch is the same amount of data per optimizer step: (a) and (b) take `--packs` packs of
at most 512 tokens per step; (c) takes as many examples as `--packs` packs hold on average (from
first-fit packing of these examples). The answer tokens of each step are counted from the batches
(ours: the `loss_mask` of each micro-batch; TRL: its `labels != -100`), so the table's answer tokens
per step shows how close the batches are. Both losses cover the answer and the end-of-sequence token.

Timing: the first micro-batch of each step stamps the clock (ours: a wrapper around the forward step;
TRL: `compute_loss`), so a step runs from one stamp to the next and includes data loading, the
optimizer and the loop's own work. After `--warmup` steps, answer tokens/s is the answer tokens of the
next `--steps` steps over their time; answer tokens per CPU-second divides by the process's CPU time
over the same steps instead. Each variant runs in a process of its own, with `--threads` threads and
`OMP_WAIT_POLICY=PASSIVE` (unless set: with OpenMP's default spinning, 2-thread steps on a loaded
2-core machine ran up to 10x slower, for every variant alike). The three processes run in lockstep:
at every step boundary a process hands a token to the driver and waits (uncounted) until its turn
comes again, so only one steps at a time and step k of each variant runs within seconds of the
others' (each goes first in turn). Bursts of load from other processes, which on the shared 2-core
machine moved a variant run on its own by 2x from one run to the next, then hit all three alike.
`--sequential` runs them one after another instead. The ratios to TRL are the median of each round's
ratio. Peak memory is the process's RSS high-water mark
(`ru_maxrss`) at the end, model and data building included. The table shows the median over
`--rounds` (each starting with another variant).
Needs the bench extra (trl, peft, datasets): `.venv/bin/pip install -e ".[bench]"`.

    .venv/bin/python bench/sft_throughput.py [--steps 10 --warmup 3 --rounds 1 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = {"ours_packed": "(a) ours, LoRA, packed", "trl": "(b) TRL SFTTrainer + peft", "ours_padded":
            "(c) ours, LoRA, padded"}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUR_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]  # the same seven projections
EOS = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------------
# The base model and the data, shared by every variant


def make_base(folder: Path, args: argparse.Namespace) -> None:
    """A Qwen2 model with random weights and a word-level tokenizer (one token per word), as a Hugging Face folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, args.vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS}))
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=True, max_position_embeddings=args.seq, eos_token_id=0, pad_token_id=0,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def make_rows(args: argparse.Namespace) -> list[dict[str, str]]:
    """Prompt/completion rows: examples of 32-512 tokens (EOS included), the completion 20-80% of the words.

    The completion starts with a space, so that TRL's `prompt + completion` splits into the same words.
    """
    rng = np.random.default_rng(args.seed)
    rows = []
    for _ in range(args.examples):
        words = int(rng.integers(32, args.seq + 1)) - 1  # the end-of-sequence token is the last token
        answer = max(1, round(words * rng.uniform(0.2, 0.8)))
        ids = rng.integers(1, args.vocab_size, size=words)
        rows.append({"prompt": " ".join(f"w{i}" for i in ids[: words - answer]),
                     "completion": "".join(f" w{i}" for i in ids[words - answer:])})
    return rows


def first_fit_packs(rows: list[dict[str, str]], args: argparse.Namespace) -> int:
    """How many packs (a) makes of `rows`: the same first-fit packing, with the same seed, as `finetune()`."""
    from megatron.bridge.data.sft.packing import pack_examples

    positions = [len(r["prompt"].split()) + len(r["completion"].split()) for r in rows]  # tokens less one
    return len(pack_examples(positions, args.seq, algorithm=args.packing_algorithm, seed=args.seed))


# ---------------------------------------------------------------------------------------------------
# Measurement, the same for every variant


class Meter:
    """Times every step from its first micro-batch to the next step's, and adds up each step's answer tokens.

    With `sync` (two pipe descriptors: read "go", write "done") it hands the machine back to the driver at
    every step boundary and waits for its turn; the wait is not counted.
    """

    def __init__(self, micro_batches_per_step: int, sync: tuple[int, int] | None = None) -> None:
        self.per_step = micro_batches_per_step
        self.sync = sync
        self.micro_batches = 0
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.tokens: list[int] = []
        self._started: tuple[float, float] | None = None

    def micro_batch(self, answer_tokens: int) -> None:
        if self.micro_batches % self.per_step == 0:
            if self._started is not None:
                self.seconds.append(time.perf_counter() - self._started[0])
                self.cpu_seconds.append(time.process_time() - self._started[1])
            if self.sync is not None:
                go, done = self.sync
                os.write(done, b"d")
                if not os.read(go, 1):
                    raise SystemExit("the driver is gone")
            self._started = (time.perf_counter(), time.process_time())
            self.tokens.append(0)
        self.micro_batches += 1
        self.tokens[-1] += answer_tokens


# ---------------------------------------------------------------------------------------------------
# The variants (each runs in a worker process of its own)


def run_ours(args: argparse.Namespace, work: Path, *, packed: bool) -> tuple[Meter, dict]:
    """(a) or (c): `finetune()` from the Hugging Face folder, LoRA on every projection."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.data import GPTSFTDatasetConfig, PackedSequenceSpecs, PromptCompletionSFTPreprocessingConfig
    from megatron.bridge.peft.lora import LoRA
    from megatron.bridge.recipes.qwen import qwen25_tiny_peft_config
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.gpt_step import forward_step

    base = work / "base"
    cfg = qwen25_tiny_peft_config(dir=str(work), name="ours_packed" if packed else "ours_padded")
    cfg.model = AutoBridge.from_hf_pretrained(base).to_megatron_provider(load_weights=False)
    cfg.model.seq_length = args.seq
    cfg.checkpoint.pretrained_checkpoint = str(base)
    cfg.checkpoint.save = cfg.checkpoint.load = cfg.checkpoint.save_interval = None
    cfg.dataset = GPTSFTDatasetConfig(
        seq_length=args.seq, dataset_root=str(work / "data"), seed=args.seed, do_validation=False, do_test=False,
        preprocessing=PromptCompletionSFTPreprocessingConfig(separator="", add_eos=True),
        enable_offline_packing=packed,
        offline_packing_specs=PackedSequenceSpecs(packed_sequence_size=args.seq,
                                                  packing_algorithm=args.packing_algorithm) if packed else None,
        pad_to_multiple_of=16,
    )
    cfg.peft = LoRA(target_modules=OUR_TARGETS, dim=32, alpha=32)
    mbs = 1 if packed else args.padded_mbs
    cfg.train.micro_batch_size = mbs
    cfg.train.global_batch_size = args.packs if packed else args.padded_gbs
    cfg.train.train_iters = args.warmup + args.steps + 1  # the last step only stamps the end of the one before
    cfg.validation.eval_interval = None
    cfg.optimizer.lr, cfg.scheduler.lr_decay_style, cfg.scheduler.lr_warmup_iters = 1e-4, "constant", 0
    cfg.logger.log_interval, cfg.logger.tensorboard_dir = 10**6, None
    meter = Meter(cfg.train.global_batch_size // mbs, sync=args.sync)

    class Counted:
        """The data iterator, adding each micro-batch's answer tokens to the meter."""

        def __init__(self, iterator):
            self.iterator = iterator

        def __next__(self):
            batch = next(self.iterator)
            meter.micro_batch(int(batch["loss_mask"].sum()))
            return batch

    def metered_step(state, data_iterator, model, return_schedule_plan=False):
        return forward_step(state, Counted(data_iterator), model, return_schedule_plan)

    finetune(cfg, metered_step)
    return meter, {"micro_batch_size": mbs, "global_batch_size": cfg.train.global_batch_size}


def run_trl(args: argparse.Namespace, work: Path) -> tuple[Meter, dict]:
    """(b): TRL's SFTTrainer on the same folder and rows, peft LoRA, bfd packing (padding-free)."""
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    from peft import LoraConfig

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    base = work / "base"
    rows = [json.loads(line) for line in (work / "data" / "training.jsonl").read_text().splitlines()]
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    # Not AutoTokenizer: for a qwen2 config, transformers 5 rebuilds the tokenizer as Qwen2's byte-level BPE.
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(base)
    meter = Meter(args.packs, sync=args.sync)

    class MeteredSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            meter.micro_batch(int((inputs["labels"] != -100).sum()))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    config = SFTConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=1, gradient_accumulation_steps=args.packs,
        max_steps=args.warmup + args.steps + 1, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=10**6, save_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
        seed=args.seed, max_length=args.seq, packing=True, packing_strategy="bfd", completion_only_loss=True,
    )
    lora = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    trainer = MeteredSFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tokenizer, peft_config=lora)
    packs = len(trainer.train_dataset)
    trainer.train()
    return meter, {"micro_batch_size": 1, "global_batch_size": args.packs, "packs": packs}


def worker(args: argparse.Namespace) -> None:
    """Run one variant and print its measurements as one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    args.sync = tuple(int(fd) for fd in args.sync.split(","))
    if args.worker == "trl":
        meter, info = run_trl(args, work)
    else:
        meter, info = run_ours(args, work, packed=args.worker == "ours_packed")
    info.update(seconds=meter.seconds, cpu_seconds=meter.cpu_seconds, tokens=meter.tokens,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(info), flush=True)


# ---------------------------------------------------------------------------------------------------
# The driver


class Worker:
    """One variant's process, started at once and run step by step through two pipes."""

    def __init__(self, name: str, args: argparse.Namespace, work: Path) -> None:
        forwarded = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                     if key not in ("worker", "work", "variants", "sync", "sequential") and value is not None]
        go_read, self.go = os.pipe()
        self.done, done_write = os.pipe()
        # Passive waiting: with OpenMP's default spinning, threads that spin at every barrier while another
        # process holds a core made steps up to 10x slower, by an amount that followed the load, not the code.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(args.threads),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"}
        self.name, self.log = name, work / f"{name}.log"
        with open(self.log, "w") as log:  # a file, not a pipe: a full pipe would block the worker mid-step
            self.process = subprocess.Popen(
                [sys.executable, __file__, f"--worker={name}", f"--work={work}", f"--sync={go_read},{done_write}",
                 *forwarded], env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(go_read, done_write))
        os.close(go_read)
        os.close(done_write)

    def wait_for_boundary(self) -> None:
        """Block until the worker reaches its next step boundary (or fail with its log if it died)."""
        if not os.read(self.done, 1):
            self.process.wait()
            sys.exit(f"variant {self.name} failed (exit {self.process.returncode}):\n{self.log.read_text()[-6000:]}")

    def run_step(self) -> None:
        os.write(self.go, b"g")
        self.wait_for_boundary()

    def finish(self) -> dict:
        os.write(self.go, b"g")
        self.process.wait()
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("RESULT ")]
        if self.process.returncode != 0 or not lines:
            sys.exit(f"variant {self.name} failed (exit {self.process.returncode}):\n{self.log.read_text()[-6000:]}")
        return json.loads(lines[-1].removeprefix("RESULT "))


def run_round(names: list[str], args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Every variant's measurements over the timed steps, the variants run in lockstep (or one by one)."""
    groups = [[name] for name in names] if args.sequential else [names]
    raw: dict[str, dict] = {}
    load = [os.getloadavg()[0]]
    for group in groups:
        workers = [Worker(name, args, work) for name in group]
        for worker in workers:  # model and data building: concurrent, not timed
            worker.wait_for_boundary()
        for step in range(args.warmup + args.steps):
            shift = step % len(workers)  # each variant goes first, second, ... in turn
            for worker in workers[shift:] + workers[:shift]:
                worker.run_step()
        raw.update({worker.name: worker.finish() for worker in workers})
        load.append(os.getloadavg()[0])
    timed = slice(args.warmup, args.warmup + args.steps)
    results = {}
    for name, result in raw.items():
        seconds, cpu_seconds = sum(result["seconds"][timed]), sum(result["cpu_seconds"][timed])
        answer = sum(result["tokens"][timed])
        results[name] = {**result, "tokens_per_s": answer / seconds, "tokens_per_cpu_s": answer / cpu_seconds,
                         "answer_per_step": answer / args.steps, "ms_per_step": 1000 * seconds / args.steps,
                         "load": (min(load), max(load))}
    return results


def print_table(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    def vs_trl(name: str, key: str) -> str:
        # The median of each round's ratio: the variants of one round ran side by side, under one load.
        if "trl" not in results:
            return "-"
        return f"{statistics.median(r[key] / t[key] for r, t in zip(results[name], results['trl'], strict=True)):.2f}x"

    print("| variant | steps | mbs x micro-batches | answer tokens/step | ms/step | answer tokens/s | peak RSS MB "
          "| vs TRL | answer tokens/CPU-s | vs TRL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label in ((n, label) for n, label in VARIANTS.items() if n in results):
        last = results[name][-1]
        batches = f"{last['micro_batch_size']} x {last['global_batch_size'] // last['micro_batch_size']}"
        rate, cpu_rate = median(name, "tokens_per_s"), median(name, "tokens_per_cpu_s")
        print(f"| {label} | {args.steps} | {batches} | {median(name, 'answer_per_step'):,.0f} | "
              f"{median(name, 'ms_per_step'):,.0f} | {rate:,.0f} | {median(name, 'peak_rss_mb'):,.0f} | "
              f"{vs_trl(name, 'tokens_per_s')} | {cpu_rate:,.0f} | {vs_trl(name, 'tokens_per_cpu_s')} |")
    if args.rounds > 1:
        for name in results:
            rates = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in results[name])
            cpu_rates = ", ".join(f"{r['tokens_per_cpu_s']:,.0f}" for r in results[name])
            print(f"{name}: answer tokens/s per round: {rates}; per CPU-second: {cpu_rates}")
    loads = [value for rs in results.values() for r in rs for value in r["load"]]
    print(f"1-minute load average during the runs: {min(loads):.2f}-{max(loads):.2f} (on {os.cpu_count()} cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--packs", type=int, default=4, help="packs of --seq tokens per step for (a) and (b)")
    parser.add_argument("--packing-algorithm", default="first_fit_shuffle",
                        choices=["first_fit_shuffle", "first_fit_decreasing"], help="offline packing of (a)")
    parser.add_argument("--padded-mbs", type=int, default=2, help="examples per micro-batch for (c)")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--seq", type=int, default=512, help="most tokens per example, and the pack size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--padded-gbs", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--sequential", action="store_true",
                        help="run the variants one after another instead of in lockstep")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--sync", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        args.variants = None
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="sft_throughput_") as tmp:
        work = Path(tmp)
        make_base(work / "base", args)
        rows = make_rows(args)
        (work / "data").mkdir()
        (work / "data" / "training.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        our_packs = first_fit_packs(rows, args)
        # (c) takes as many examples per step as `--packs` packs of (a) hold on average.
        args.padded_gbs = max(1, round(args.packs * len(rows) / our_packs / args.padded_mbs)) * args.padded_mbs
        names = [n for n in VARIANTS if n in args.variants]
        results: dict[str, list[dict]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name, result in run_round(names[shift:] + names[:shift], args, work).items():
                results[name].append(result)
                print(f"round {round_index + 1}: {name}: {result['tokens_per_s']:,.0f} answer tokens/s", flush=True)
    print(f"\nLoRA finetuning on the CPU ({args.threads} threads): Qwen2 {args.layers} layers, hidden {args.hidden}, "
          f"ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab_size}; {args.examples} examples of "
          f"32-{args.seq} tokens; {args.steps} steps after {args.warmup}, median of {args.rounds} round(s)\n")
    print_table(results, args)
    if "trl" in results:
        print(f"packs of {args.seq}: ours {our_packs} ({args.packing_algorithm}), "
              f"TRL {results['trl'][-1]['packs']} (bfd); padded global batch: {args.padded_gbs} examples")


if __name__ == "__main__":
    main()
