"""File locks, and the one-line error for a filesystem that refuses them (docs/cluster.md, "Shared filesystems
and locks").

A filesystem without working `flock` (NFS without lockd: ENOLCK; some Lustre mounts: ENOSYS) makes the lock
call raise OSError; `LockError` turns that into a user error naming the file and the setting that moves it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from .errors import UserError

DOC = 'docs/cluster.md, "Shared filesystems and locks"'
log = logging.getLogger(__name__)


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


class HeldElsewhere(UserError):
    """Another process holds the lock; the message names it (pid, host, start) and what to do."""


@contextlib.contextmanager
def held_by_this_process(path: str | Path, what: str):
    """An exclusive lock on `path` for the block, refused at once (`HeldElsewhere`, naming the holder) while another
    process holds it: two pipelines on one study would train the same stages into the same directories.

    The lock is flock's, so it goes when its holder exits however it exits (a kill, a SLURM requeue): nothing stale is
    left to clear. A filesystem without flock gets a warning and no lock, as before there was one."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "a process that did not say which"
            raise HeldElsewhere(f"{what} is being run by another process ({holder}; lock {path}): a second would run "
                                "the same stages into the same directories; wait for it to end or stop it, then run "
                                "this command again (it resumes)") from None
        except OSError as err:  # no flock on this filesystem (NFS without lockd, some Lustre mounts)
            log.warning("%s: not locked (%s); a second process on it would not be refused (%s)",
                        path, err.strerror or err, DOC)
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
