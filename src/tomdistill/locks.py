"""File locks, and the one-line error for a filesystem that refuses them (docs/cluster.md, "Shared filesystems
and locks").

A filesystem without working `flock` (NFS without lockd: ENOLCK; some Lustre mounts: ENOSYS) makes the lock
call raise OSError; `LockError` turns that into a user error naming the file and the setting that moves it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import UserError

DOC = 'docs/cluster.md, "Shared filesystems and locks"'


class LockError(OSError, UserError):
    """The filesystem refused a file lock; the message names the file and the setting to change."""


def lock_refused(path: str | Path, err: OSError, setting: str) -> LockError:
    reason = err.strerror or str(err)
    return LockError(f"cannot lock {path} ({reason}): its filesystem does not support flock; set {setting} to a "
                     f"directory on a node-local or lock-capable filesystem ({DOC})")


@contextlib.contextmanager
def file_lock(path: str | Path, setting: str):
    """`filelock.FileLock(path)` held for the block; a refused lock raises `LockError` naming `setting`."""
    from filelock import FileLock

    lock = FileLock(str(path))
    try:
        lock.acquire()
    except OSError as err:
        raise lock_refused(path, err, setting) from None
    try:
        yield lock
    finally:
        lock.release()
