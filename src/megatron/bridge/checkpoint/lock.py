"""One run per save folder, and a save folder that works, both known before the first step.

`claim_save_folder` creates `checkpoint.save` and takes the folder's lock; `check_room`, once the
model and optimizer are built, checks that one more checkpoint fits. The lock is an OS lock
(`fcntl.flock`) on `<save>/.lock`: the kernel releases it when its holder exits in any way, SIGKILL
included, so the file a dead run leaves behind never blocks the next one. The file records the
holder (host, pid, start time) for the message that refuses a second run; it is removed when the
lock is released and is no part of any checkpoint.

Where the filesystem cannot lock (`flock` unsupported), the file alone is the lock: a holder on
this host whose pid is gone is stale and taken over; one on another host cannot be checked, and
the message says to delete the file once that run is gone.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from megatron.bridge.checkpoint.integrity import CheckpointError

__all__ = [
    "CheckpointSaveError",
    "LOCK_FILE",
    "SaveFolderInUseError",
    "SaveFolderLock",
    "claim_save_folder",
    "format_bytes",
]

LOCK_FILE = ".lock"
_HOLDER_LIMIT = 4096
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class CheckpointSaveError(CheckpointError):
    """`checkpoint.save` cannot be used or written: not a folder, read-only, full, or a write failed."""


class SaveFolderInUseError(CheckpointSaveError):
    """Another run holds the lock of `checkpoint.save`."""


def format_bytes(count: int) -> str:
    """`count` bytes in the largest unit that keeps a number >= 1 (`1.5 GiB`)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class SaveFolderLock:
    """The lock of one save folder; `release` is safe to call more than once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._fd: int | None = None
        self._flock = True

    @property
    def held(self) -> bool:
        """True between a successful `acquire` and `release`."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise `SaveFolderInUseError` naming the holder."""
        assert self._fd is None, "the lock is already held"
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._in_use(holder, stale_hint=False) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in _NO_FLOCK:
                    raise
                self._acquire_without_flock()
                return
            # The holder before us may have removed the file between our open and our lock:
            # then we locked a file no one else will see, and must start again.
            if _same_file(fd, self.path):
                self._fd = fd
            else:
                os.close(fd)
        self._write_holder()

    def _write_holder(self) -> None:
        assert self._fd is not None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(holder).encode(), 0)
            os.fsync(self._fd)
        except OSError:
            self.release()
            raise

    def _acquire_without_flock(self) -> None:
        self._flock = False
        while True:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                holder = _read_holder(fd)
                os.close(fd)
                if not _is_dead_here(holder):
                    raise self._in_use(holder, stale_hint=True) from None
                os.unlink(self.path)  # its holder died on this host: the lock is stale
        self._write_holder()

    def _in_use(self, holder: dict | None, *, stale_hint: bool) -> SaveFolderInUseError:
        if holder is None:
            who = "another run (it is starting: its details are not written yet)"
        else:
            who = f"the run of pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
        hint = (f"; if that run is gone, delete {self.path}" if stale_hint
                else "; wait for it to end, or save elsewhere")
        return SaveFolderInUseError(
            f"checkpoint.save={str(self.folder)!r} is in use by {who}: two runs saving into one folder would "
            f"overwrite each other's checkpoints{hint}")

    def release(self) -> None:
        """Remove the lock file and release the lock (removing first: see `acquire`)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass  # the folder went away or became read-only: closing still releases the lock
        finally:
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, _HOLDER_LIMIT, 0)
        holder = json.loads(data)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_dead_here(holder: dict | None) -> bool:
    if holder is None or holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def claim_save_folder(folder: Path) -> SaveFolderLock:
    """Create `folder` and take its lock (which also proves it writable).

    Raises `CheckpointSaveError` naming `checkpoint.save`, the folder and the reason.
    """
    prefix = _unusable(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointSaveError(f"{prefix}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointSaveError(f"{prefix}: cannot create the folder ({err.strerror or err})") from err
    lock = SaveFolderLock(folder)
    try:
        lock.acquire()  # creates and writes a file in the folder: the write probe
    except OSError as err:
        raise CheckpointSaveError(f"{prefix}: cannot write into the folder ({err.strerror or err})") from err
    return lock


def check_room(folder: Path, needed_bytes: int) -> None:
    """Raise `CheckpointSaveError` when `needed_bytes` (one checkpoint) do not fit into `folder`'s free space."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the room cannot be known here: the first save will tell
    if needed_bytes > free:
        raise CheckpointSaveError(
            f"{_unusable(folder)}: one checkpoint needs about {format_bytes(needed_bytes)} ({needed_bytes} bytes), "
            f"but only {format_bytes(free)} ({free} bytes) are free there")


def _unusable(folder: Path) -> str:
    return f"checkpoint.save={str(folder)!r} cannot be used"
