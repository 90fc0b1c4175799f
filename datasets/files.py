"""The one place for writing files: atomic writes, image encoding, folder locks.

Every file the project writes goes through `atomic_write_bytes` / `atomic_save` (temporary file in the
destination folder + fsync + rename + fsync of the folder), so a run killed at any moment leaves either
the old file or the new one, never half of one. Lives in `datasets` (not `models`) because data
preparation writes files too and must not import the models for it.
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Read once: os.umask can only be read by setting it, which is not thread-safe (writer threads).
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename in `path` (a folder) on filesystems that need it; best effort elsewhere."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write_fn) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file lives in the destination folder so that os.replace is a same-filesystem rename.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp creates 0600 files; give the result a plain open()'s mode
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez `arrays` to `path` atomically, streamed into the file (no in-memory copy of the archive)."""
    _atomic_write(path, lambda f: np.savez(f, **arrays))


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (for saving / plotting)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] (or uint16 [H, W]) -> PNG file contents."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_png(array: np.ndarray, path: str | os.PathLike) -> None:
    atomic_write_bytes(png_bytes(array), path)


# ----------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------
class FolderLockedError(RuntimeError):
    """Another live process holds the lock on a folder."""


class FolderLock:
    """An exclusive advisory lock (flock) on `<folder>/<name>`, held for the life of a run.

    The kernel releases it when the process dies (SIGKILL included), so a stale lock never blocks a
    rerun. `wait=None` fails at once; a number waits up to that many seconds. The lock file records
    the holder's pid and host for the error message.
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".lock", wait: float | None = None):
        self.path = Path(folder) / name
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if deadline is None or time.monotonic() >= deadline:
                    holder = Path(self.path).read_text(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise FolderLockedError(
                        f"{self.path.parent} is in use by {holder} (lock {self.path}); wait for it to finish"
                        + ("" if self.wait else ", or pass a wait time")) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self._fd = fd
        return self

    def fileno(self) -> int | None:
        """The lock file's descriptor. A forked child (e.g. a DataLoader worker) holds the lock with its
        copy of it, even after this process dies, until the child closes that copy."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
