"""Every kind of checkpoint file, damaged every way, is refused naming the file, with nothing loaded.

The kinds: the tensor index `.metadata`, each `.distcp` data file, `common.json`, each `rank_*.json`,
`run_config.yaml`, `manifest.json` and the tracker. The damages: truncated, a 64-byte bit flip,
swapped in from another checkpoint (another run's iteration 2), replaced by a symbolic link (to an
identical copy outside the checkpoint), and grown huge (a sparse 64 GiB file: reading it would not end).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checkpoint_faults import expect_refused, train

from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.checkpoint.integrity import MANIFEST_FILE

ITERATION = "iter_0000004"
TRACKER = checkpoint_io.TRACKER_FILE
DAMAGES = ["truncated", "bit-flipped", "swapped", "symlink", "huge"]
HUGE = 64 << 30


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """(a run saved at 2 and 4, another run with another seed saved at 2 and 4)."""
    base = tmp_path_factory.mktemp("tampering")
    train(base / "run")
    train(base / "other", rng__seed=7)
    return base / "run", base / "other"


def file_kinds() -> list[str]:
    """Every file of a single-rank checkpoint (its data files included), and the tracker."""
    return [".metadata", "__0_0.distcp", "common.json", "rank_00000.json", "run_config.yaml", MANIFEST_FILE, TRACKER]


@pytest.fixture
def root(tmp_path, checkpoints) -> Path:
    """A private copy of the first run's save folder."""
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints[0], copy)
    return copy


def test_the_table_covers_every_file_of_the_checkpoint(checkpoints):
    on_disk = {p.name for p in (checkpoints[0] / ITERATION).iterdir()} | {TRACKER}
    assert on_disk == set(file_kinds())


def damage(path: Path, how: str, *, other: Path, outside: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "bit-flipped":
        start = max(0, len(data) // 2 - 32)
        path.write_bytes(data[:start] + bytes(b ^ 0xFF for b in data[start:start + 64]) + data[start + 64:])
    elif how == "swapped" and path.name == TRACKER:
        path.write_text("6\n")  # the tracker of a run that got further
    elif how == "swapped":
        shutil.copyfile(other / "iter_0000002" / path.name, path)
    elif how == "symlink":
        outside.mkdir(exist_ok=True)
        (outside / path.name).write_bytes(data)
        path.unlink()
        path.symlink_to(outside / path.name)
    else:
        with open(path, "r+b") as f:
            f.truncate(len(data) + HUGE)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", file_kinds())
def test_a_damaged_file_is_refused_naming_it(root, checkpoints, tmp_path, monkeypatch, kind, how):
    path = root / TRACKER if kind == TRACKER else root / ITERATION / kind
    damage(path, how, other=checkpoints[1], outside=tmp_path / "outside")
    expect_refused(root, monkeypatch, str(path))


LINKED = ["common.json", ".metadata", "rank_00000.json", TRACKER]


@pytest.mark.parametrize(("kind", "sealed"), [(kind, True) for kind in [*LINKED, MANIFEST_FILE]]
                         + [(kind, False) for kind in LINKED])
def test_a_file_linked_to_dev_zero_is_refused_unread(root, monkeypatch, kind, sealed):
    if not sealed:  # a checkpoint without a manifest is read with the same bounds
        (root / ITERATION / MANIFEST_FILE).unlink()
    path = root / TRACKER if kind == TRACKER else root / ITERATION / kind
    path.unlink()
    path.symlink_to("/dev/zero")
    message = expect_refused(root, monkeypatch, str(path))
    assert "symbolic link" in message or "(to /dev/zero)" in message


def test_a_checkpoint_without_a_manifest_loads_with_a_warning(root, capsys):
    # Written before checksums existed: still loadable, and the log says it was not verified.
    (root / ITERATION / MANIFEST_FILE).unlink()
    train(root, train__train_iters=5)
    out = capsys.readouterr().out
    assert f"{root / ITERATION} has no {MANIFEST_FILE}" in out and "unverified" in out
    assert "loaded model, optimizer and training state" in out
    assert checkpoint_io.list_iterations(root) == [2, 4, 5]
    # What it writes carries a manifest again.
    assert (root / "iter_0000005" / MANIFEST_FILE).is_file()


def test_a_file_the_manifest_does_not_list_is_refused(root, monkeypatch):
    # Left out of the manifest, the rank file would silently not be restored: it is refused instead.
    manifest_path = root / ITERATION / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]["rank_00000.json"]
    manifest_path.write_text(json.dumps(manifest))
    expect_refused(root, monkeypatch, str(root / ITERATION / "rank_00000.json"), "does not list it")


def test_a_tracker_naming_an_older_complete_checkpoint_resumes_from_the_newest(root, capsys):
    # What a kill between the rename of a new checkpoint and the tracker's update leaves.
    (root / TRACKER).write_text("2\n")
    train(root, train__train_iters=5)
    assert f"from {root / ITERATION} (iteration 4" in capsys.readouterr().out
