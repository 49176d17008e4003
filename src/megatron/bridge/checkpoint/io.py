"""The on-disk checkpoint format: Megatron's layout, written atomically, read without unpickling.

    <save>/latest_checkpointed_iteration.txt     newest complete step, plain text
    <save>/iter_0000010/                          one complete checkpoint
        .metadata, __*_*.distcp                   tensors (model, optimizer) via torch.distributed.checkpoint
        common.json                               train state, scheduler, optimizer hyper-parameters, ...
        rank_00000.json                           each rank's RNG states (Python, NumPy, torch, CUDA)
                                                  and callback state
        run_config.yaml                           the run's configuration
        manifest.json                             size and checksums of every other file, written last
    <save>/.lock                                  held by the run saving here (see checkpoint_lock)

A checkpoint is written into `.tmp_iter_0000010/`, every file is flushed to disk, the manifest is
written, and only then is the directory renamed into place and the tracker replaced; so an `iter_*`
directory is always complete, and a kill at any instant leaves the previous checkpoint loadable.

Nothing is ever unpickled freely: tensors are read with `torch.load(weights_only=True)`, the
`.metadata` index with an unpickler that accepts only the checkpoint index's own classes, and
everything else is JSON or YAML read with safe loaders. No read is unbounded, and every path read
from a file must stay inside the checkpoint.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from megatron.bridge.checkpoint import integrity, schema
from megatron.bridge.checkpoint.integrity import CheckpointError as CheckpointError
from megatron.bridge.utils.errors import UserError
from megatron.bridge.utils.paths import resolve_inside

__all__ = [
    "COMMON_FILE",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "INDEX_LIMIT",
    "ITER_DIR",
    "JSON_LIMIT",
    "SafeFileSystemReader",
    "TRACKER_FILE",
    "check_compatible",
    "check_tracker",
    "commit",
    "decode_value",
    "delete_old",
    "encode_value",
    "find_latest",
    "iteration_dir",
    "list_iterations",
    "load_tensors",
    "prepare_temporary_dir",
    "read_index",
    "read_json",
    "read_tracker",
    "save_tensors",
    "step_of",
    "temporary_dir",
    "write_file_durably",
    "write_json",
]

FORMAT_VERSION = 1
"""The layout's version. `manifest.json` is an addition readers of version 1 ignore, so it kept the
number: a checkpoint without one (written before checksums) is loaded unverified, with a warning."""
TRACKER_FILE = "latest_checkpointed_iteration.txt"
COMMON_FILE = "common.json"
CONFIG_FILE = "run_config.yaml"
ITER_DIR = re.compile(r"^iter_(\d{7,})$")
"""The name of a complete checkpoint's folder: `iter_` and the step, seven digits or more."""
_TMP_PREFIX, _TRASH_PREFIX = ".tmp_", ".trash_"
# Bounds for the files of a checkpoint without a manifest (one written before checksums existed).
JSON_LIMIT = 1 << 30
INDEX_LIMIT = 1 << 30
_TRACKER_LIMIT = 64


def iteration_dir(root: str | os.PathLike, step: int) -> Path:
    """`<root>/iter_0000007` for step 7."""
    return Path(root) / f"iter_{step:07d}"


def temporary_dir(root: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place."""
    return Path(root) / f"{_TMP_PREFIX}iter_{step:07d}"


def step_of(directory: Path) -> int:
    """The step an `iter_0000007` directory holds."""
    match = ITER_DIR.match(directory.name)
    if match is None:
        raise CheckpointError(f"{directory} is not a checkpoint directory (expected a name like iter_0000010)")
    return int(match.group(1))


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, `root` itself if it is one, else None."""
    root = Path(root)
    if ITER_DIR.match(root.name) and root.is_dir():
        return root
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for p in root.iterdir() if (m := ITER_DIR.match(p.name)) and p.is_dir()]
    return iteration_dir(root, max(steps)) if steps else None


def list_iterations(root: str | os.PathLike) -> list[int]:
    """Steps of all complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := ITER_DIR.match(p.name)) and p.is_dir())


def write_file_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` and flush it to the disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Durably write `obj` as JSON; a 0-dim tensor (a `TrainState.state_dict()` entry) is written as its value."""
    write_file_durably(path, json.dumps(obj, indent=1, sort_keys=True, default=_scalar_value).encode())


def _scalar_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_json(path: Path, *, limit: int = JSON_LIMIT) -> Any:
    """Read a JSON file of a checkpoint (a regular file of at most `limit` bytes), naming it on failure."""
    try:
        return json.loads(integrity.read_regular_file(path, limit=limit))
    except (ValueError, RecursionError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"cannot read {path}: {err}") from err


def read_tracker(root: Path) -> int | None:
    """The step `latest_checkpointed_iteration.txt` names; None when there is none."""
    path = root / TRACKER_FILE
    if not os.path.lexists(path):
        return None
    text = integrity.read_regular_file(path, limit=_TRACKER_LIMIT)
    if not re.fullmatch(rb"\d{1,12}\n?", text):
        raise CheckpointError(f"{path}: {text[:_TRACKER_LIMIT]!r} is not an iteration number")
    return int(text)


def check_tracker(root: Path) -> None:
    """Refuse a tracker that is unreadable or names a step no complete checkpoint has.

    A tracker naming an older complete checkpoint is the state a kill between the rename of a new
    checkpoint and the tracker's update leaves; the newest complete checkpoint is loaded then.
    """
    tracked, steps = read_tracker(root), list_iterations(root)
    if tracked is not None and tracked not in steps and (not steps or tracked > steps[-1]):
        raise CheckpointError(f"{root / TRACKER_FILE} names iteration {tracked}, but {root} holds no such "
                              f"checkpoint (it holds {steps or 'none'})")


def prepare_temporary_dir(root: Path, step: int) -> Path:
    """Remove leftovers of interrupted saves and deletions, then create a fresh temporary directory."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.iterdir():
        if leftover.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = temporary_dir(root, step)
    tmp.mkdir()
    return tmp


def commit(root: Path, step: int) -> Path:
    """Seal the finished temporary directory with its manifest, rename it into place, update the tracker."""
    tmp, final = temporary_dir(root, step), iteration_dir(root, step)
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    integrity.seal(tmp, step)
    _fsync_dir(tmp)
    trash = None
    if final.exists():  # an older run's checkpoint of the same step: moved aside, deleted once replaced
        trash = final.with_name(f"{_TRASH_PREFIX}{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_dir(root)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    tracker_tmp = root / f"{_TMP_PREFIX}{TRACKER_FILE}"
    write_file_durably(tracker_tmp, f"{step}\n".encode())
    os.replace(tracker_tmp, root / TRACKER_FILE)
    _fsync_dir(root)
    return final


def _retire(path: Path) -> None:
    # Renaming first makes the deletion atomic: a kill mid-way leaves a `.trash_` directory
    # that no loader looks at, never a half-deleted `iter_*` one.
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def delete_old(root: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` checkpoints; return the deleted steps."""
    steps = list_iterations(root)
    doomed = steps[:-keep] if keep > 0 else []
    for step in doomed:
        _retire(iteration_dir(root, step))
    return doomed


# ---------------------------------------------------------------------------- safe tensor reading

_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                 "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch._utils", "_get_layout"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint index: its own classes and dtypes only, never a callable of a payload."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """A `FileSystemReader` whose index is read by `_IndexUnpickler` instead of `pickle.load`, and checked.

    Every storage entry of the index must name a regular file inside the checkpoint and a byte range
    within it, with no transforms: the reader then opens nothing else and reads nothing beyond.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        data = integrity.read_regular_file(path, limit=INDEX_LIMIT)
        try:
            metadata = _IndexUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError,
                KeyError, RecursionError) as err:
            raise CheckpointError(f"cannot read checkpoint index {path}: {err}") from err
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} is not a torch.distributed.checkpoint index")
        _check_storage_entries(Path(self.path), path, metadata)
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_storage_entries(directory: Path, index_path: Path, metadata: Metadata) -> None:
    if not isinstance(metadata.storage_data, dict) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{index_path}: the index has no storage table")
    sizes: dict[str, int] = {}
    for key, info in metadata.storage_data.items():
        entry = f"{index_path}, entry {getattr(key, 'fqn', key)!r}"
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise CheckpointError(f"{entry}: not a storage record")
        try:
            file = resolve_inside(directory, info.relative_path, what=entry)
        except UserError as err:
            raise CheckpointError(str(err)) from None
        if info.transform_descriptors:
            raise CheckpointError(f"{entry}: transforms {info.transform_descriptors!r} are not used by this format")
        if info.relative_path not in sizes:
            sizes[info.relative_path] = integrity.regular_file_size(file)
        offset, length = info.offset, info.length
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)) or (
                offset + length > sizes[info.relative_path]):
            raise CheckpointError(f"{entry}: bytes [{offset}, {offset}+{length}) are not inside {file} "
                                  f"({sizes[info.relative_path]} bytes)")


class _TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """Loads tensors only: a non-tensor entry would be read with `torch.load(weights_only=False)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is not a tensor; refusing to load it")


def save_tensors(state_dict: dict[str, Any], directory: Path, process_group: Any = None) -> None:
    """Write a (nested) dict of tensors with torch.distributed.checkpoint; every rank calls this."""
    dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(directory, sync_files=True),
             process_group=process_group)


def read_index(directory: Path) -> Metadata:
    """The tensor index of a checkpoint, read safely."""
    return SafeFileSystemReader(directory).read_metadata()


def check_compatible(directory: Path, shapes: dict[str, torch.Size], index: Metadata, *, strict_prefix: str) -> None:
    """Raise `CheckpointError` naming the checkpoint and every missing, unexpected or mis-shaped tensor.

    Tensors the checkpoint holds under `strict_prefix` that `shapes` lacks count as unexpected.
    """
    stored = {k: v for k, v in index.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    problems = []
    missing = sorted(set(shapes) - set(stored))
    unexpected = sorted(k for k in set(stored) - set(shapes) if k.startswith(strict_prefix))
    for label, keys in (("missing tensors", missing), ("unexpected tensors", unexpected)):
        if keys:
            problems.append(f"{label} {keys[:8]}{' ...' if len(keys) > 8 else ''}")
    for key in sorted(set(shapes) & set(stored)):
        if tuple(stored[key].size) != tuple(shapes[key]):
            problems.append(f"{key}: checkpoint has shape {tuple(stored[key].size)}, this run has {tuple(shapes[key])}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not fit this run: " + "; ".join(problems))


def load_tensors(state_dict: dict[str, Any], directory: Path, process_group: Any = None) -> None:
    """Fill the tensors of `state_dict` in place from a checkpoint, reading nothing but tensors."""
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(directory), planner=_TensorsOnlyLoadPlanner(),
                 process_group=process_group)
    except (CheckpointException, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        # CheckpointException derives from BaseException and names neither the checkpoint nor its files.
        files = ", ".join(sorted(p.name for p in directory.glob("*.distcp")))
        raise CheckpointError(f"cannot read the tensors of checkpoint {directory} ({files}): {err}") from err


# ----------------------------------------------------------------------- JSON for Python values

_UNSUPPORTED = object()


def encode_value(value: Any, path: str, unsupported: list[str]) -> Any:
    """`value` as JSON-ready data; tensors and tuples become tagged objects.

    A value JSON cannot hold (a set, an arbitrary object, a dict with non-string keys) is left out
    of its dict (or stored as None in its list), and its path is appended to `unsupported`.
    """
    encoded = _encode(value, path, unsupported)
    return None if encoded is _UNSUPPORTED else encoded


def _encode(value: Any, path: str, unsupported: list[str]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return {"__tensor__": base64.b64encode(raw).decode(), "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape)}
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:  # NumPy scalars
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [encode_value(v, f"{path}[{i}]", unsupported) for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        encoded = {key: _encode(item, f"{path}.{key}" if path else key, unsupported) for key, item in value.items()}
        return {key: item for key, item in encoded.items() if item is not _UNSUPPORTED}
    unsupported.append(f"{path} ({type(value).__name__})")
    return _UNSUPPORTED


def decode_value(value: Any) -> Any:
    """The inverse of `encode_value`; raises `CheckpointError` naming the key of a malformed entry."""
    try:
        return schema.encoded()(value, "")
    except schema.SchemaError as err:
        raise CheckpointError(f"invalid checkpoint state: {err}") from None
