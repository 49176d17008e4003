"""A checkpoint file is used only if it is the file that was written: checksums and bounded reads.

`seal` runs last before a checkpoint is committed: it hashes every file (xxh3-128 over 64 MiB
blocks, the blocks hashed in parallel) into `manifest.json`. `verify` runs before anything of a
checkpoint is used: every file must be a regular file (no symlink, no device), exactly the size the
manifest records (checked before a byte is read) and hash to the recorded blocks. Every read of a
checkpoint file goes through `read_regular_file`, which never reads more than a given bound.
"""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from megatron.bridge.checkpoint import schema
from megatron.bridge.utils.errors import UserError
from megatron.bridge.utils.paths import resolve_inside

__all__ = [
    "ALGORITHM",
    "BLOCK_BYTES",
    "CheckpointError",
    "FileEntry",
    "MANIFEST_FILE",
    "MANIFEST_LIMIT",
    "MANIFEST_VERSION",
    "Manifest",
    "hash_files",
    "read_manifest",
    "read_regular_file",
    "regular_file_size",
    "seal",
    "share",
    "verify",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
ALGORITHM = "xxh3_128"
BLOCK_BYTES = 64 << 20
MANIFEST_LIMIT = 64 << 20
_CHUNK_BYTES = 1 << 20
# Plain names, or names in sub-folders (the Hugging Face import keeps `hf/config.json`); never `..`.
_NAME = r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\.metadata)"


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded: missing, corrupt, tampered with or incompatible."""


@dataclass(frozen=True)
class FileEntry:
    """What the manifest records of one file: its size and the hash of each block."""

    size: int
    blocks: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """The checksums of a committed checkpoint, keyed by the file's path relative to the checkpoint."""

    step: int
    block_bytes: int
    files: dict[str, FileEntry]


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def regular_file_size(path: Path, *, limit: int | None = None, expected: int | None = None) -> int:
    """The size of `path`, refusing a symlink, a non-regular file, or a size above `limit` or not `expected`."""
    try:
        info = os.lstat(path)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    if stat.S_ISLNK(info.st_mode):
        raise CheckpointError(f"{path} is a symbolic link; a checkpoint holds regular files only")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file; a checkpoint holds regular files only")
    if expected is not None and info.st_size != expected:
        raise CheckpointError(f"{path} is {info.st_size} bytes, but {MANIFEST_FILE} records {expected}: "
                              "the file was changed after the checkpoint was written")
    if limit is not None and info.st_size > limit:
        raise CheckpointError(f"{path} is {info.st_size} bytes, more than the {limit} a file of its kind may hold")
    return info.st_size


def read_regular_file(path: Path, *, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes (never reading more)."""
    regular_file_size(path, limit=limit)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path} grew beyond {limit} bytes while it was read")
    return data


def _hash_block(path: Path, offset: int, end: int) -> str:
    # Reads bytes [offset, end) and no more, whatever the file's size has become, into one small
    # buffer reused for the whole block (a cache-sized buffer hashes faster than fresh large reads).
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        f.seek(offset)
        while offset < end:
            count = f.readinto(view[:min(_CHUNK_BYTES, end - offset)])
            if not count:
                break
            digest.update(view[:count])
            offset += count
    return digest.hexdigest()


def _block_count(size: int, block_bytes: int) -> int:
    return max(1, -(-size // block_bytes))


def hash_files(directory: Path, sizes: dict[str, int], *, block_bytes: int = BLOCK_BYTES) -> dict[str, FileEntry]:
    """Hash the files `sizes` names (relative to `directory`) block by block, in parallel."""
    tasks = [(name, index) for name, size in sizes.items() for index in range(_block_count(size, block_bytes))]
    with ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="checkpoint-hash") as pool:
        digests = list(pool.map(lambda task: _hash_block(
            directory / task[0], task[1] * block_bytes, min((task[1] + 1) * block_bytes, sizes[task[0]])), tasks))
    blocks: dict[str, list[str]] = {name: [] for name in sizes}
    for (name, _), digest in zip(tasks, digests, strict=True):
        blocks[name].append(digest)
    return {name: FileEntry(size=sizes[name], blocks=tuple(blocks[name])) for name in sizes}


def seal(directory: Path, step: int) -> None:
    """Write `manifest.json` with the size and block hashes of every file under `directory`."""
    sizes = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise CheckpointError(f"{path}: a checkpoint may hold regular files only")
        if path.is_file() and name != MANIFEST_FILE:
            sizes[name] = path.stat().st_size
    entries = hash_files(directory, sizes)
    manifest = {
        "version": MANIFEST_VERSION, "step": step, "algorithm": ALGORITHM, "block_bytes": BLOCK_BYTES,
        "files": {name: {"size": entry.size, "blocks": list(entry.blocks)} for name, entry in entries.items()},
    }
    with open(directory / MANIFEST_FILE, "wb") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())


_MANIFEST_SCHEMA = schema.record({
    "version": schema.integer(MANIFEST_VERSION, MANIFEST_VERSION),
    "step": schema.integer(),
    "algorithm": schema.string(choices=[ALGORITHM]),
    "block_bytes": schema.integer(1 << 16, 1 << 34),
    "files": schema.mapping(schema.string(pattern=_NAME), schema.record({
        "size": schema.integer(),
        "blocks": schema.array(schema.string(pattern="[0-9a-f]{32}")),
    })),
})


def read_manifest(directory: Path, step: int) -> Manifest | None:
    """The validated manifest of the checkpoint of `step` in `directory`; None when it has none."""
    path = directory / MANIFEST_FILE
    if not os.path.lexists(path):
        return None
    try:
        raw = json.loads(read_regular_file(path, limit=MANIFEST_LIMIT))
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    data = schema.validate(_MANIFEST_SCHEMA, raw, file=path, error=CheckpointError)
    if data["step"] != step:
        raise CheckpointError(f"{path}: step={data['step']}, but the checkpoint is that of step {step}: "
                              "the manifest was copied in from another checkpoint")
    files = {}
    for name, entry in data["files"].items():
        resolve_inside(directory, name, what=f"{path}, files entry {name!r}")
        if len(entry["blocks"]) != _block_count(entry["size"], data["block_bytes"]):
            raise CheckpointError(f"{path}: files.{name}.blocks has {len(entry['blocks'])} hashes, but a file of "
                                  f"{entry['size']} bytes has {_block_count(entry['size'], data['block_bytes'])}")
        files[name] = FileEntry(size=entry["size"], blocks=tuple(entry["blocks"]))
    return Manifest(step=step, block_bytes=data["block_bytes"], files=files)


def verify(directory: Path, manifest: Manifest, names: list[str]) -> list[str]:
    """Check the files `names` of `directory` against `manifest`; return one problem per bad file."""
    problems, sizes = [], {}
    for name in names:  # sizes and kinds first: nothing is read from a file that is too large or not a file
        try:
            sizes[name] = regular_file_size(directory / name, expected=manifest.files[name].size)
        except CheckpointError as err:
            problems.append(str(err))
    try:
        actual = hash_files(directory, sizes, block_bytes=manifest.block_bytes)
    except OSError as err:
        return [*problems, f"cannot read {directory}: {err}"]
    for name, entry in actual.items():
        if entry.blocks != manifest.files[name].blocks:
            first = next(i for i, (a, b) in enumerate(zip(entry.blocks, manifest.files[name].blocks, strict=True))
                         if a != b)
            problems.append(f"{directory / name}: checksum mismatch in bytes [{first * manifest.block_bytes}, "
                            f"{min((first + 1) * manifest.block_bytes, entry.size)}): the file was changed after "
                            "the checkpoint was written, or belongs to another checkpoint")
    return problems


def share(manifest: Manifest, rank: int, world_size: int) -> list[str]:
    """The files rank `rank` of `world_size` verifies: the largest first, dealt out in turn."""
    ordered = sorted(manifest.files, key=lambda name: (-manifest.files[name].size, name))
    return ordered[rank::world_size]
