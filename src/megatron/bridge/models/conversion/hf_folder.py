"""Local Hugging Face model folders: reading config and weights lazily, and writing new folders atomically.

A folder holds `config.json` and its weights in one of four layouts, tried in this order:
`model.safetensors`; `model.safetensors.index.json` with the shards it names; `pytorch_model.bin`;
`pytorch_model.bin.index.json` with its shards. Pickle (`*.bin`) files are opened only with
`torch.load(weights_only=True)`, which rebuilds tensors and refuses to call anything else.

Every file is opened through `resolve`: a name read from an index (or a symlink in the folder) that
leads out of the folder is refused, except for the Hugging Face hub cache's own layout, where a
snapshot's files are symlinks into the repository's `blobs/` folder. JSON files are read only up to
`MAX_JSON_BYTES`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron.bridge.models.conversion.errors import ConversionError
from megatron.bridge.models.conversion.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsReader, TensorSpec
from megatron.bridge.utils.errors import short_repr
from megatron.bridge.utils.paths import resolve_inside

__all__ = [
    "CONFIG_FILE",
    "GENERATION_CONFIG_FILE",
    "MAX_JSON_BYTES",
    "PICKLE_FILE",
    "PICKLE_INDEX_FILE",
    "TOKENIZER_FILE_PATTERNS",
    "HFWeights",
    "auxiliary_files",
    "check_output_folder",
    "copy_files",
    "read_config",
    "read_json_file",
    "resolve",
    "staged_output",
    "write_json_file",
]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
TOKENIZER_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template*",
)
"""Tokenizer files copied along with the weights (`tokenizer.json`, `tokenizer_config.json`, ...)."""
_LAYOUTS = f"{SINGLE_FILE}, {INDEX_FILE} with its shards, {PICKLE_FILE} or {PICKLE_INDEX_FILE} with its shards"
MAX_JSON_BYTES = 64 * 2**20
"""Largest config or index file read; the index of a model of a trillion parameters is a few megabytes."""


def resolve(folder: Path, name: object, *, what: str) -> Path:
    """`folder / name` once checked to stay inside `folder` (see `utils.paths.resolve_inside`).

    `what` says where `name` came from. In the hub cache (`<repo>/snapshots/<hash>/`) symlinks may lead
    anywhere inside the repository folder, which holds the `blobs/` they point to.
    """
    snapshot = folder.resolve()
    repository = snapshot.parent.parent
    if snapshot.parent.name != "snapshots" or not (repository / "blobs").is_dir():
        return resolve_inside(folder, name, what=what)
    # `snapshots/<hash>/<name>`: the name itself is checked as usual, its symlinks against the repository.
    relative = str(snapshot.relative_to(repository) / name) if isinstance(name, str) and name else name
    resolve_inside(repository, relative, what=what)
    return folder / name


def read_json_file(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from `path` (at most `MAX_JSON_BYTES`); `ConversionError` naming the file otherwise."""
    if not path.exists():
        raise ConversionError(f"{path} not found: a Hugging Face model folder needs its {what}")
    if not path.is_file():  # a folder, or a pipe that would block the read
        raise ConversionError(f"cannot read {path}: not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err}") from err
    if len(data) > MAX_JSON_BYTES:
        raise ConversionError(f"cannot read {path}: larger than {MAX_JSON_BYTES // 2**20} MiB (for its {what})")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from err
    except (ValueError, RecursionError) as err:  # a number of thousands of digits, nesting too deep
        raise ConversionError(f"cannot read {path}: an unreadable value ({short_repr(str(err))})") from err
    if not isinstance(value, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return value


def read_config(folder: Path) -> dict[str, Any]:
    """The model's `config.json`."""
    if not folder.is_dir():
        raise ConversionError(
            f"{folder} is not a folder: pass a local Hugging Face model folder (download it first)"
        )
    path = resolve(folder, CONFIG_FILE, what=str(folder))
    return read_json_file(path, f"{CONFIG_FILE} (the model's architecture)")


def auxiliary_files(folder: Path) -> list[Path]:
    """`generation_config.json` and the tokenizer files of `folder`, copied verbatim into converted folders.

    A symlink among them that leads out of the folder is refused: its target would be copied out.
    """
    found = {p for pattern in (GENERATION_CONFIG_FILE, *TOKENIZER_FILE_PATTERNS) for p in folder.glob(pattern)}
    return sorted(resolve(folder, p.name, what=str(folder)) for p in found if p.is_file())


class _PickleFile:
    """A `*.bin` weights file, loaded (memory-mapped where possible) only with `weights_only=True`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = _load_pickle_weights(self.path)
        return self._tensors

    def release(self) -> None:
        self._tensors = None


def _load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ValueError) as err:
        raise ConversionError(
            f"refusing to load {path}: not a plain tensor file under torch.load(weights_only=True) ({err}). "
            "Convert it to safetensors with a tool you trust"
        ) from err
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConversionError(f"{path} does not hold a dict of tensors")
    return loaded


class HFWeights:
    """The weights of a local Hugging Face folder: names, shapes and dtypes up front, data on request."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._safetensors: dict[str, SafetensorsReader] = {}
        self._pickles: dict[str, _PickleFile] = {}
        self.location: dict[str, str] = {}
        """Tensor name -> file name."""
        self.specs: dict[str, TensorSpec] = {}
        """Tensor name -> shape and dtype, as stored."""
        self._open_layout()

    @staticmethod
    def present(folder: Path) -> bool:
        """True when `folder` holds weights in one of the supported layouts."""
        return any((folder / name).is_file() for name in (SINGLE_FILE, INDEX_FILE, PICKLE_FILE, PICKLE_INDEX_FILE))

    def _open_layout(self) -> None:
        folder = self.folder
        if (folder / SINGLE_FILE).is_file():
            self._add_safetensors(SINGLE_FILE, None)
        elif (folder / INDEX_FILE).is_file():
            self._add_sharded(INDEX_FILE, self._add_safetensors)
        elif (folder / PICKLE_FILE).is_file():
            self._add_pickle(PICKLE_FILE, None)
        elif (folder / PICKLE_INDEX_FILE).is_file():
            self._add_sharded(PICKLE_INDEX_FILE, self._add_pickle)
        else:
            raise ConversionError(f"{folder} holds no weights: expected {_LAYOUTS}")

    def _add_sharded(self, index_name: str, add: Any) -> None:
        index_path = resolve(self.folder, index_name, what=str(self.folder))
        index = read_json_file(index_path, "weight index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_path} has no weight_map (an object of tensor name -> shard file)")
        for name, shard in weight_map.items():  # every name is checked before any shard is opened
            resolve(self.folder, shard, what=f"{index_path} weight_map[{short_repr(name)}]")
        for shard in sorted(set(weight_map.values())):
            if not (self.folder / shard).is_file():
                raise ConversionError(f"shard {shard} listed in {index_path} is missing from {self.folder}")
        for shard in sorted(set(weight_map.values())):
            add(shard, {name for name, file in weight_map.items() if file == shard})

    def _add_safetensors(self, file_name: str, listed: set[str] | None) -> None:
        reader = SafetensorsReader(resolve(self.folder, file_name, what=str(self.folder)))
        self._register(file_name, reader.specs, listed)
        self._safetensors[file_name] = reader

    def _add_pickle(self, file_name: str, listed: set[str] | None) -> None:
        handle = _PickleFile(resolve(self.folder, file_name, what=str(self.folder)))
        specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in handle.tensors().items()}
        handle.release()
        self._register(file_name, specs, listed)
        self._pickles[file_name] = handle

    def _register(self, file_name: str, specs: dict[str, TensorSpec], listed: set[str] | None) -> None:
        if listed is not None and not listed <= set(specs):
            absent = sorted(listed - set(specs))[:8]
            raise ConversionError(
                f"{self.folder / file_name} lacks tensors its index places there: {short_repr(absent)}"
            )
        for name, spec in specs.items():
            if listed is None or name in listed:
                self.specs[name], self.location[name] = spec, file_name

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (a new CPU tensor for safetensors files)."""
        if name not in self.location:
            raise ConversionError(f"{self.folder} has no tensor {short_repr(name)}")
        file_name = self.location[name]
        if file_name in self._safetensors:
            return self._safetensors[file_name].read(name)
        for other, handle in self._pickles.items():  # keep one pickle file loaded at a time
            if other != file_name:
                handle.release()
        return self._pickles[file_name].tensors()[name]


# -------------------------------------------------------------------------------------- writing


def check_output_folder(path: Path, overwrite: bool) -> None:
    """Refuse to write into an existing non-empty folder (or over a file) unless `overwrite`."""
    if path.exists() and not path.is_dir():
        raise ConversionError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConversionError(
            f"output folder {path} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling folder to write into; rename it to `path` on success, delete it on failure.

    A failure (or a kill) at any point leaves `path` as it was: the old folder is replaced only after
    the new one is complete.
    """
    path = Path(path).absolute()
    check_output_folder(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".tmp_{path.name}_{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(staging, path)


def write_json_file(path: Path, obj: dict[str, Any]) -> None:
    """Write `obj` as indented JSON, the way Hugging Face writes config files."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_files(files: list[Path], directory: Path) -> None:
    """Copy `files` into `directory`, keeping their names."""
    for file in files:
        shutil.copy2(file, directory / file.name)
