"""Data throughput: tokens per second of preprocessing and of the training data loader.

Corpus: the Python standard library's `.py` files (every package, sorted by path) up to
`--corpus-mb` megabytes, written as one JSON-lines file; a byte-level BPE tokenizer of
`--vocab-size` ids is trained on it first (timed, not part of the throughput numbers).

1. Preprocessing: `megatron.bridge.data.preprocess.preprocess` with 1 and `--workers` processes
   (no progress bar): documents read, tokenized, end-of-document appended, written to .bin/.idx.
   Tokens per second of output.
2. Loading: `build_data_iterators` on the result, with `num_workers` 0 and 2, reading
   `--batches` micro-batches of `--micro-batch-size` samples of `--seq-length` tokens: memory-mapped
   reads, packing across documents, masks and position ids, collation. Tokens per second of
   `tokens` delivered. The first build of the sample indices is timed separately (the cached
   build that follows is what every later run pays).
3. Sample indices at scale (no corpus needed): Megatron-LM's document, sample and shuffle indices
   for `--index-samples` samples of `--seq-length` tokens over synthetic documents, and the blend
   index of that many samples over 2 and 8 datasets: seconds to build and save, and to load and
   check the cache again (what every later run pays). 300k steps of 256 samples are 76.8M.

    .venv/bin/python bench/data_throughput.py            # about a minute on 2 idle cores
    .venv/bin/python bench/data_throughput.py --index-samples 76800000 --skip-corpus
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time

import numpy as np

from megatron.bridge.data.blended_dataset import blend_consistency, build_blend_indices
from megatron.bridge.data.gpt_dataset import build_indices, sample_index_dtype, shuffle_index_dtype
from megatron.bridge.data.index_cache import ArraySpec, load_or_build
from megatron.bridge.data.loaders import build_data_iterators
from megatron.bridge.data.preprocess import preprocess
from megatron.bridge.data.train_tokenizer import train_tokenizer
from megatron.bridge.training.config import GPTDatasetConfig


def write_corpus(path: str, megabytes: float) -> tuple[int, int]:
    """Standard-library source as JSON lines, up to `megabytes`; return (files, bytes)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files, written, budget = 0, 0, int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as out:
        for root, dirs, names in os.walk(stdlib):
            dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
            for name in sorted(names):
                if not name.endswith(".py") or written >= budget:
                    continue
                try:
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                out.write(json.dumps({"text": text}) + "\n")
                files += 1
                written += len(text.encode("utf-8"))
    return files, written


def bench_loader(prefix: str, args: argparse.Namespace, num_workers: int) -> tuple[float, float]:
    """(seconds to build the iterators, tokens per second over `args.batches` micro-batches)."""
    config = GPTDatasetConfig(seq_length=args.seq_length, random_seed=1234, blend=[prefix], split="98,1,1",
                              num_workers=num_workers)
    mbs = args.micro_batch_size
    start = time.perf_counter()
    iterators = build_data_iterators(
        config, vocab_size=args.vocab_size, micro_batch_size=mbs, global_batch_size=mbs,
        train_samples=args.batches * mbs, valid_samples=0, test_samples=0,
    )
    first = next(iterators.train)  # worker start-up belongs to the build, not the steady state
    built = time.perf_counter() - start
    start = time.perf_counter()
    tokens = first["tokens"].numel() * 0
    for batch in iterators.train:
        tokens += batch["tokens"].numel()
    return built, tokens / (time.perf_counter() - start)


def bench_indices(samples: int, seq_length: int, cache_dir: str) -> None:
    """Build, save, load and check the GPT and blend indices of `samples` samples; print the seconds of each."""
    rng = np.random.default_rng(0)
    # Documents of 1 to 4,000 tokens (mean ~2,000): enough of them for about 1.5 epochs.
    lengths = rng.integers(1, 4000, size=int(samples * seq_length / 2000 / 1.5) + 1).astype(np.int32)
    documents = (0, len(lengths))
    start = time.perf_counter()
    arrays = build_indices(lengths, documents, samples, seq_length, seed=1234)
    built = time.perf_counter() - start
    doc_entries, total = len(arrays["doc_idx"]), len(arrays["shuffle_idx"])
    specs = {
        "doc_idx": ArraySpec("int32", (doc_entries,), ((0, len(lengths) - 1),)),
        "sample_idx": ArraySpec(sample_index_dtype(doc_entries, int(lengths.max())).name, (total + 1, 2),
                                ((0, doc_entries - 1), (0, int(lengths.max()) - 1)), increasing_rows=True),
        "shuffle_idx": ArraySpec(shuffle_index_dtype(total).name, (total,), ((0, total - 1),)),
    }
    description = {"bench": "gpt", "samples": samples}
    start = time.perf_counter()
    load_or_build(cache_dir, description, specs, lambda: arrays)
    saved = time.perf_counter() - start
    start = time.perf_counter()
    assert load_or_build(cache_dir, description, specs, lambda: arrays).source == "loaded"
    loaded = time.perf_counter() - start
    print(f"{'GPT indices':<34} {samples:>12,}  samples: build {built:.1f} s, check + save {saved:.1f} s, "
          f"load + check {loaded:.1f} s ({total:,} indexed samples, {doc_entries:,} document entries)")
    for count in (2, 8):
        weights = (rng.dirichlet(np.ones(count))).tolist()
        start = time.perf_counter()
        dataset_index, sample_index = build_blend_indices(weights, samples)
        built = time.perf_counter() - start
        blend_specs = {"blend_dataset_idx": ArraySpec("int16", (samples,), ((0, count - 1),)),
                       "blend_sample_idx": ArraySpec("int64", (samples,), ((0, samples - 1),))}
        description = {"bench": "blend", "datasets": count, "samples": samples}
        named = {"blend_dataset_idx": dataset_index, "blend_sample_idx": sample_index}
        load_or_build(cache_dir, description, blend_specs, lambda named=named: named)
        start = time.perf_counter()
        cached = load_or_build(cache_dir, description, blend_specs, lambda named=named: named,
                               check=blend_consistency(count))
        loaded = time.perf_counter() - start
        assert cached.source == "loaded"
        print(f"{f'blend index, {count} datasets':<34} {samples:>12,}  samples: build {built:.1f} s, "
              f"load + check {loaded:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=8.0, help="megabytes of stdlib source (default: 8)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default: 8192)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes to compare with 1")
    parser.add_argument("--seq-length", type=int, default=2048, help="loader sample length (default: 2048)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="loader micro-batch size (default: 8)")
    parser.add_argument("--batches", type=int, default=200, help="loader micro-batches to time (default: 200)")
    parser.add_argument("--index-samples", type=int, default=20_000_000,
                        help="samples of the index build at scale (default: 20M; 0 skips it)")
    parser.add_argument("--skip-corpus", action="store_true", help="only the index build at scale")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.index_samples:
            print(f"sample indices at scale: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
            bench_indices(args.index_samples, args.seq_length, os.path.join(tmp, "index_cache"))
        if args.skip_corpus:
            return
        corpus = os.path.join(tmp, "stdlib.jsonl")
        files, size = write_corpus(corpus, args.corpus_mb)
        start = time.perf_counter()
        train_tokenizer([corpus], vocab_size=args.vocab_size, output_dir=os.path.join(tmp, "tok"))
        print(f"corpus: {files} files, {size / 1e6:.1f} MB; tokenizer ({args.vocab_size} ids) trained in "
              f"{time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"{'stage':<34} {'tokens/s':>12}  notes")
        prefix = ""
        for workers in sorted({1, args.workers}):
            prefix = os.path.join(tmp, f"corpus_w{workers}")
            stats = preprocess([corpus], tokenizer_model=os.path.join(tmp, "tok"), output_prefix=prefix,
                               workers=workers, progress=False)
            print(f"{f'preprocess, {workers} worker(s)':<34} {stats.tokens_per_second:>12,.0f}  "
                  f"{stats.tokens:,} tokens ({stats.dtype}), {stats.input_bytes / stats.seconds / 1e6:.2f} MB/s, "
                  f"{stats.seconds:.2f} s")
        for num_workers in (0, 2):
            built, rate = bench_loader(prefix, args, num_workers)
            print(f"{f'loader, num_workers={num_workers}':<34} {rate:>12,.0f}  "
                  f"seq {args.seq_length} x mbs {args.micro_batch_size}; build + first batch {built:.2f} s"
                  + (" (indices built)" if num_workers == 0 else " (indices cached)"))


if __name__ == "__main__":
    main()
