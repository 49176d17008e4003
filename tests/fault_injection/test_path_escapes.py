"""Paths read from a checkpoint's files stay inside the checkpoint (the tensor index, `.metadata`).

The index names, for every tensor, the data file and byte range to read. An entry pointing outside the
checkpoint (`../../outside/x`, an absolute path, a symbolic link leading out) or beyond its file is
refused naming the index and the entry, with or without a manifest, before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import pytest
from checkpoint_faults import expect_refused

from megatron.bridge.checkpoint import integrity as checkpoint_integrity
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.utils.errors import UserError
from megatron.bridge.utils.paths import resolve_inside

ITERATION = "iter_0000004"


def point_index_at(directory: Path, relative_path: str, *, offset_shift: int = 0) -> None:
    """Rewrite `.metadata` so that every tensor is read from `relative_path` (the same bytes, elsewhere)."""
    index = checkpoint_io.read_index(directory)
    for key, info in index.storage_data.items():
        index.storage_data[key] = dataclasses.replace(info, relative_path=relative_path,
                                                      offset=info.offset + offset_shift)
    (directory / ".metadata").write_bytes(pickle.dumps(index))


def outside_copy(root: Path) -> Path:
    """A faithful copy of the data file outside the checkpoint: reading it would load good tensors."""
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copyfile(root / ITERATION / "__0_0.distcp", outside / "x")
    return outside / "x"


# A sealed checkpoint cannot hold a symbolic link (sealing refuses one), so that case is unsealed only.
ESCAPES = [(where, sealed) for where in ("parent", "absolute", "beyond-the-file") for sealed in (True, False)]


@pytest.mark.parametrize(("where", "sealed"), [*ESCAPES, ("symlink", False)])
def test_an_index_entry_outside_the_checkpoint_is_refused(root, monkeypatch, where, sealed):
    directory = root / ITERATION
    target = outside_copy(root)
    if where == "parent":
        point_index_at(directory, "../../outside/x")
    elif where == "absolute":
        point_index_at(directory, str(target))
    elif where == "symlink":
        (directory / "__9_0.distcp").symlink_to(target)
        point_index_at(directory, "__9_0.distcp")
    else:
        point_index_at(directory, "__0_0.distcp", offset_shift=(directory / "__0_0.distcp").stat().st_size)
    if sealed:
        checkpoint_integrity.seal(directory, 4)  # the index passes its checksum: the path check must refuse it
    else:
        (directory / checkpoint_integrity.MANIFEST_FILE).unlink()  # as an old checkpoint: no checksums to help
    message = expect_refused(root, monkeypatch, str(directory / ".metadata"), "entry 'model.")
    assert ("outside" in message or "absolute" in message) if where != "beyond-the-file" else "not inside" in message
    # The reader the Hugging Face export uses refuses it too.
    with pytest.raises(UserError, match="entry 'model."):
        checkpoint_io.read_index(directory)


def test_resolve_inside_keeps_paths_in_their_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x")
    (tmp_path / "escape").symlink_to("/etc")
    found = resolve_inside(tmp_path, "sub/a.bin", what="index f.json")
    assert found.resolve() == (tmp_path / "sub" / "a.bin").resolve()
    for bad, reason in [("../x", "not inside"), ("sub/../sub/a.bin", "'..' are refused"), ("/etc/passwd", "absolute"),
                        ("escape/passwd", "leading out"),
                        ("", "not a file name"), ("a\x00b", "not a file name")]:
        with pytest.raises(UserError, match=reason) as caught:
            resolve_inside(tmp_path, bad, what="index f.json, entry w")
        assert str(caught.value).startswith("index f.json, entry w: ")
