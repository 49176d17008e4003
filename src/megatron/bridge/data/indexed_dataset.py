"""Megatron's indexed dataset format (`MMIDIDX`): a `.bin` of tokens and an `.idx` describing them.

`<prefix>.bin` holds the token ids of every sequence back to back, in one dtype, with no header.
`<prefix>.idx` is little-endian:

    offset  size      field
    0       9         magic b"MMIDIDX\\x00\\x00"
    9       8         version, uint64, always 1
    17      1         dtype code, uint8 (see DTYPE_CODES)
    18      8         sequence count S, uint64
    26      8         document count D, uint64 (entries of the document index, i.e. documents + 1)
    34      4*S       sequence lengths in tokens, int32
    34+4S   8*S       sequence pointers: byte offset of each sequence in the .bin, int64
    34+12S  8*D       document index: the first sequence of each document, then S, int64

Files written here load in Megatron-LM and the other way round. A preprocessed document is one
sequence, so the GPT dataset treats sequences as documents, as Megatron's GPT dataset does.
Opening a dataset checks the header and that the index agrees with the `.bin` size, so truncated
or mismatched pairs fail before training with a message that names the file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections.abc import Iterable
from types import TracebackType

import numpy as np

from megatron.bridge.utils.errors import UserError

__all__ = [
    "DTYPE_CODES",
    "DatasetError",
    "HEADER_SIZE",
    "INDEX_MAGIC",
    "INDEX_VERSION",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "SCAN_CHUNK_TOKENS",
    "UINT16_VOCAB_LIMIT",
    "data_file_paths",
    "dtype_code",
    "encode_index",
    "optimal_dtype",
]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
# Megatron's dtype codes; the code is the only place the .bin's dtype is recorded.
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
# Megatron picks uint16 below this vocabulary size (a little under 2**16, as it does).
UINT16_VOCAB_LIMIT = 65500
# Tokens read per chunk by the vectorised token-range scan: bounded memory whatever the .bin size.
SCAN_CHUNK_TOKENS = 1 << 24


class DatasetError(UserError):
    """A data file is missing, corrupt, inconsistent or too small for the request."""


def data_file_paths(prefix: str | os.PathLike[str]) -> tuple[str, str]:
    """The `.bin` and `.idx` paths of a dataset prefix."""
    prefix = os.fspath(prefix)
    return prefix + ".bin", prefix + ".idx"


def dtype_code(dtype: np.dtype | type[np.generic]) -> int:
    """Megatron's code for `dtype`; ValueError naming the valid dtypes otherwise."""
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {np.dtype(dtype)} has no Megatron code; use one of {_dtype_choices()}")


def optimal_dtype(vocab_size: int) -> type[np.generic]:
    """uint16 when every id fits comfortably (vocab_size < 65500), else int32."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def _dtype_choices() -> str:
    return ", ".join(f"{code} {np.dtype(dt).name}" for code, dt in DTYPE_CODES.items())


def encode_index(dtype: type[np.generic], sequence_lengths: np.ndarray, document_indices: np.ndarray) -> bytes:
    """The bytes of an `.idx` file for contiguous sequences of `sequence_lengths` tokens."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    documents = np.asarray(document_indices, dtype=np.int64)
    header = INDEX_MAGIC + struct.pack("<QBQQ", INDEX_VERSION, dtype_code(dtype), len(lengths), len(documents))
    arrays = lengths.astype("<i4").tobytes() + pointers.astype("<i8").tobytes() + documents.astype("<i8").tobytes()
    return header + arrays


class IndexedDatasetWriter:
    """Writes `<prefix>.bin` and `<prefix>.idx`, one document (one sequence) per `add_document`.

    Both files are written under temporary names and moved into place by `finalize()`, so a
    crash never leaves a half-written dataset under the real name. Use as a context manager:
    leaving the block normally finalizes, an exception discards the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: type[np.generic] = np.int32) -> None:
        self.bin_path, self.idx_path = data_file_paths(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # fail now on a dtype Megatron cannot name
        os.makedirs(os.path.dirname(os.path.abspath(self.bin_path)), exist_ok=True)
        self._tmp_bin = f"{self.bin_path}.tmp-{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")  # closed by finalize() or discard()
        self._lengths: list[int] = []
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self.num_tokens = 0

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document's token ids as one sequence."""
        array = np.asarray(tokens)
        limits = self._limits
        if limits is not None and array.size and (array.min() < limits.min or array.max() > limits.max):
            raise ValueError(
                f"token ids in [{array.min()}, {array.max()}] do not fit {self.dtype.name}; "
                "write with a wider dtype (int32)"
            )
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(array.size))
        self.num_tokens += int(array.size)

    @property
    def num_documents(self) -> int:
        """Documents added so far."""
        return len(self._lengths)

    def finalize(self) -> None:
        """Write the index and move both files into place."""
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2**31 - 1 tokens cannot be indexed (int32 lengths)")
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        tmp_idx = f"{self.idx_path}.tmp-{os.getpid()}"
        with open(tmp_idx, "wb") as f:
            f.write(encode_index(self.dtype.type, lengths, document_indices))
        # .bin first: an .idx under the final name always has its complete .bin beside it.
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, self.idx_path)

    def discard(self) -> None:
        """Close and delete the temporary files without publishing anything."""
        self._bin.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.discard()


class IndexedDataset:
    """Read-only access to a Megatron `.bin`/`.idx` pair through memory maps.

    Opening reads and checks the whole index (header, sizes, agreement with the `.bin` size) and
    raises `DatasetError` naming the file on any inconsistency. The `.bin` is mapped lazily in
    each process, so a dataset pickled into DataLoader workers carries no token data.
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        self.bin_path, self.idx_path = data_file_paths(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DatasetError(f"dataset file {path} does not exist (run megatron.bridge.data.preprocess first)")
        self._read_index()
        self._check_bin_size()
        self._bin: np.memmap | None = None

    def _read_index(self) -> None:
        path, size = self.idx_path, os.path.getsize(self.idx_path)
        if size < HEADER_SIZE:
            raise DatasetError(f"corrupt index {path}: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        magic = header[: len(INDEX_MAGIC)]
        if magic != INDEX_MAGIC:
            raise DatasetError(f"corrupt index {path}: starts with {magic!r}, not Megatron's magic {INDEX_MAGIC!r}")
        version, code, num_sequences, num_documents = struct.unpack("<QBQQ", header[len(INDEX_MAGIC):])
        if version != INDEX_VERSION:
            raise DatasetError(f"unsupported index {path}: version {version}, only version {INDEX_VERSION} is known")
        if code not in DTYPE_CODES:
            raise DatasetError(f"corrupt index {path}: dtype code {code} is not one of {_dtype_choices()}")
        expected = HEADER_SIZE + 12 * num_sequences + 8 * num_documents
        # Megatron's multimodal indices append one mode byte per sequence; those are allowed and ignored.
        if size not in (expected, expected + num_sequences):
            raise DatasetError(
                f"corrupt index {path}: {size} bytes, but {num_sequences} sequences and {num_documents} document "
                f"entries need {expected} (truncated or overwritten)"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        buffer = np.memmap(path, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(buffer, dtype="<i4", count=num_sequences, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(
            buffer, dtype="<i8", count=num_sequences, offset=HEADER_SIZE + 4 * num_sequences
        )
        self.document_indices = np.frombuffer(
            buffer, dtype="<i8", count=num_documents, offset=HEADER_SIZE + 12 * num_sequences
        )
        self._check_index_arrays()

    def _check_index_arrays(self) -> None:
        path, lengths, docs = self.idx_path, self.sequence_lengths, self.document_indices
        if lengths.size and lengths.min() < 0:
            raise DatasetError(f"corrupt index {path}: negative sequence length {int(lengths.min())}")
        if docs.size == 0 or docs[0] != 0 or np.any(np.diff(docs) < 0) or docs[-1] > lengths.size:
            raise DatasetError(
                f"corrupt index {path}: the document index must start at 0 and rise to at most "
                f"{lengths.size} (the sequence count)"
            )
        pointers = self.sequence_pointers
        end = pointers.astype(np.int64) + lengths.astype(np.int64) * self.dtype.itemsize
        if pointers.size and (pointers.min() < 0 or np.any(pointers % self.dtype.itemsize)):
            raise DatasetError(f"corrupt index {path}: sequence pointers must be non-negative multiples of "
                               f"{self.dtype.itemsize} bytes ({self.dtype.name})")
        self._bin_bytes_needed = int(end.max()) if end.size else 0

    def _check_bin_size(self) -> None:
        size = os.path.getsize(self.bin_path)
        total = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if size != total or self._bin_bytes_needed > size:
            raise DatasetError(
                f"{self.bin_path} holds {size} bytes but {self.idx_path} describes {total} bytes "
                f"({total // self.dtype.itemsize} tokens of {self.dtype.name}): the pair is truncated or "
                "mismatched; run preprocessing again"
            )

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole `.bin`."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        """Documents as the document index counts them."""
        return int(self.document_indices.size) - 1

    @functools.cached_property
    def lengths_digest(self) -> str:
        """A hash of every sequence length: what cached sample indices must match, whatever the file times."""
        return hashlib.sha256(np.ascontiguousarray(self.sequence_lengths).tobytes()).hexdigest()[:20]

    @property
    def tokens(self) -> np.memmap:
        """The whole `.bin` as a flat read-only array (mapped on first use in each process)."""
        if self._bin is None:
            if os.path.getsize(self.bin_path) == 0:
                self._bin = np.zeros(0, dtype=self.dtype)  # type: ignore[assignment] - mmap cannot map 0 bytes
            else:
                self._bin = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        return self._bin

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `index` (to its end when `length` is None)."""
        size = int(self.sequence_lengths[index])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {index} of {size} tokens")
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    def token_range(self) -> tuple[int, int]:
        """The smallest and largest token id in the `.bin`, scanned in bounded chunks; (0, -1) when empty."""
        tokens, low, high = self.tokens, None, None
        for start in range(0, tokens.size, SCAN_CHUNK_TOKENS):
            chunk = tokens[start : start + SCAN_CHUNK_TOKENS]
            chunk_low, chunk_high = int(chunk.min()), int(chunk.max())
            low = chunk_low if low is None else min(low, chunk_low)
            high = chunk_high if high is None else max(high, chunk_high)
        return (0, -1) if low is None or high is None else (low, high)

    def __getstate__(self) -> dict[str, object]:
        # Workers re-map the files themselves; pickling a memmap would copy the token data.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["prefix"])  # type: ignore[misc]
