"""Text files to a Megatron indexed dataset (`<prefix>.bin` + `<prefix>.idx`).

    python -m megatron.bridge.data.preprocess --input a.jsonl b.txt --json-key text \\
        --tokenizer-model runs/tok --output-prefix out/corpus --workers 4

Each document (see `documents.py`: a JSON line's `--json-key`, a whole text file, or with
`--text-documents paragraph` each blank-line-separated paragraph) is tokenized, followed by the
tokenizer's end-of-document token, and written as one sequence. Tokens are stored as uint16 when
the vocabulary has fewer than 65,500 ids, else int32. Worker processes tokenize chunks of
documents in parallel (`multiprocessing.Pool.imap`, which keeps input order, so the output is the
same for any number of workers); a progress bar counts input bytes.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron.bridge.data.documents import (
    TEXT_DOCUMENT_MODES,
    Document,
    check_inputs,
    iter_documents,
    total_bytes,
)
from megatron.bridge.data.indexed_dataset import IndexedDatasetWriter, optimal_dtype
from megatron.bridge.data.tokenizer import HuggingFaceTokenizer
from megatron.bridge.utils.errors import INTERRUPTED_STATUS, ConfigError, UserError, one_line

__all__ = [
    "CHUNKS_IN_FLIGHT_PER_WORKER",
    "DEFAULT_CHUNK_DOCUMENTS",
    "PreprocessStats",
    "build_parser",
    "encode_documents",
    "main",
    "preprocess",
]

DEFAULT_CHUNK_DOCUMENTS = 64
CHUNKS_IN_FLIGHT_PER_WORKER = 16


@dataclass(frozen=True)
class PreprocessStats:
    """What a preprocessing run wrote and how long it took."""

    documents: int
    tokens: int
    input_bytes: int
    seconds: float
    dtype: str

    @property
    def tokens_per_second(self) -> float:
        """Throughput in tokens per second."""
        return self.tokens / max(self.seconds, 1e-9)


# Each worker process loads the tokenizer once, in `_init_worker`, rather than per chunk.
_worker_tokenizer: HuggingFaceTokenizer | None = None
_worker_dtype: type[np.generic] | None = None


def _init_worker(tokenizer_model: str, dtype_name: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # Several processes each spawning Rust threads would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches every process of the group: the parent reports it once and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = HuggingFaceTokenizer(tokenizer_model)
    _worker_dtype = np.dtype(dtype_name).type


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None and _worker_dtype is not None, "worker not initialised"
    return encode_documents(_worker_tokenizer, texts, _worker_dtype)


def encode_documents(tokenizer: HuggingFaceTokenizer, texts: list[str], dtype: type[np.generic]) -> list[np.ndarray]:
    """Each text's token ids followed by the end-of-document id, as arrays of `dtype`."""
    return [np.asarray([*ids, tokenizer.eod], dtype=dtype) for ids in tokenizer.tokenize_batch(texts)]


def _chunks(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(documents)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def preprocess(
    inputs: Sequence[str],
    *,
    tokenizer_model: str,
    output_prefix: str,
    json_key: str = "text",
    text_documents: str = "file",
    workers: int = 1,
    chunk_documents: int = DEFAULT_CHUNK_DOCUMENTS,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize `inputs` into `<output_prefix>.bin` / `.idx`; return counts and timing."""
    if workers < 1 or chunk_documents < 1:
        raise ConfigError(f"workers={workers} and chunk_documents={chunk_documents} must be at least 1")
    check_inputs(inputs, text_documents)
    tokenizer = HuggingFaceTokenizer(tokenizer_model)
    dtype = optimal_dtype(tokenizer.vocab_size)
    documents = iter_documents(inputs, json_key=json_key, text_documents=text_documents)
    size = total_bytes(inputs)
    start = time.perf_counter()
    with _progress_bar(size, progress) as bar, IndexedDatasetWriter(output_prefix, dtype) as writer:
        for chunk, encoded in _encode_all(documents, tokenizer, dtype, tokenizer_model, workers, chunk_documents):
            for tokens in encoded:
                writer.add_document(tokens)
            bar.update(sum(doc.num_bytes for doc in chunk))
        bar.update(max(size - bar.n, 0))
    return PreprocessStats(documents=writer.num_documents, tokens=writer.num_tokens, input_bytes=size,
                           seconds=time.perf_counter() - start, dtype=np.dtype(dtype).name)


def _encode_all(
    documents: Iterable[Document], tokenizer: HuggingFaceTokenizer, dtype: type[np.generic], tokenizer_model: str,
    workers: int, chunk_documents: int,
) -> Iterator[tuple[list[Document], list[np.ndarray]]]:
    chunks = _chunks(documents, chunk_documents)
    if workers == 1:
        for chunk in chunks:
            yield chunk, encode_documents(tokenizer, [doc.text for doc in chunk], dtype)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker,
                              initargs=(tokenizer_model, np.dtype(dtype).name)) as pool:
        # Pool.imap reads its whole input up front; feeding it bounded windows of chunks keeps memory
        # flat on large corpora, and reading stays in this process, so input errors surface here.
        while window := list(itertools.islice(chunks, workers * CHUNKS_IN_FLIGHT_PER_WORKER)):
            texts = ([doc.text for doc in chunk] for chunk in window)
            yield from zip(window, pool.imap(_encode_chunk, texts), strict=True)


class _NoBar:
    n = 0

    def update(self, count: int) -> None:
        self.n += count

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    # A tqdm bar, or a stand-in with the same `n`, `update` and context-manager interface.
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m megatron.bridge.data.preprocess`."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron.bridge.data.preprocess",
        description="Tokenize JSON-lines or plain-text files into a Megatron indexed dataset (.bin + .idx).",
    )
    parser.add_argument("--input", nargs="+", required=True, help="input files: .jsonl/.json/.ndjson, or plain text")
    parser.add_argument("--json-key", default="text", help="key holding the text in each JSON line (default: text)")
    parser.add_argument("--text-documents", choices=TEXT_DOCUMENT_MODES, default="file",
                        help="plain text: one document per file (default) or per blank-line-separated paragraph")
    parser.add_argument("--tokenizer-model", required=True, help="a local tokenizer.json or a folder holding one")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--chunk-documents", type=int, default=DEFAULT_CHUNK_DOCUMENTS,
                        help=f"documents per task sent to a worker (default: {DEFAULT_CHUNK_DOCUMENTS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> PreprocessStats:
    """Run the command line; errors in the inputs exit with status 2 and a one-line message, Ctrl-C with 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        stats = preprocess(
            args.input, tokenizer_model=args.tokenizer_model, output_prefix=args.output_prefix,
            json_key=args.json_key, text_documents=args.text_documents, workers=args.workers,
            chunk_documents=args.chunk_documents, progress=not args.quiet,
        )
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {one_line(err)}\n")
    except KeyboardInterrupt:
        parser.exit(INTERRUPTED_STATUS, f"{parser.prog}: interrupted\n")
    print(f"wrote {args.output_prefix}.bin and .idx: {stats.documents} documents, {stats.tokens} tokens "
          f"({stats.dtype}) from {stats.input_bytes / 1e6:.1f} MB in {stats.seconds:.1f} s "
          f"({stats.tokens_per_second / 1e6:.2f} M tokens/s)")
    return stats


if __name__ == "__main__":
    main()
