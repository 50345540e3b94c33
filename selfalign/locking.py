"""One writer per stage: an OS lock (`flock`) on a stage's lock file, held until released or until
the process ends, however it ends, so a kill -9 leaves no stale lock.

`take_lock` refuses (LockError, naming the holder's pid and host, which it writes into the lock file)
while another process holds the lock; the same process taking it again is not refused, so a
notebook cell run twice does not lock itself out. Where there are no file locks (Windows, a network
filesystem without flock) it warns and goes on unlocked rather than refusing to run. A forked child
closes its copies of the parent's locks, so a DataLoader worker that outlives a killed parent does
not keep the stage locked.

This module knows nothing of run directories: `records.Stage` chooses the lock file, decides when to
take and release the lock, and reports a refusal as a `RunError`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import warnings
from pathlib import Path

from .untrusted import json_loads

try:
    import fcntl
except ImportError:  # Windows: stages run unlocked (see take_lock)
    fcntl = None


class LockError(RuntimeError):
    """A stage lock that cannot be taken: another process holds it, or its file cannot be opened."""


def _now() -> str:
    # The holder's "since", in the same form as the manifests' timestamps.
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# The stage locks this process holds: lock file -> descriptor. A second `start` of a stage in the
# same process (a notebook cell run again, a test) reuses the lock instead of refusing itself,
# since flock refuses a second descriptor even within one process.
_HELD: dict[str, int] = {}


def take_lock(path: Path, run: str, stage: str) -> bool:
    """Lock a stage for this process; True when taken now, False when already held (or unlockable)."""
    key = os.path.abspath(path)
    if key in _HELD:
        return False
    if fcntl is None:
        warnings.warn(f"no file locks on this system: nothing stops a second process writing stage {stage!r}")
        return False
    while True:
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise LockError(f"run {run!r}: cannot open the lock file of stage {stage!r} ({key}): "
                            f"{error.strerror}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
                   if holder else "pid unknown")
            kill = f" (kill {holder['pid']})" if holder and holder.get("host") == socket.gethostname() else ""
            raise LockError(
                f"run {run!r}: stage {stage!r} is being run by another process ({who}); two processes on one "
                f"stage would write every record twice. Wait for it to end, or stop it{kill}, then rerun.")
        except OSError as error:
            # Some network filesystems (Lustre without -o flock) have no flock: run, but say so.
            os.close(fd)
            warnings.warn(f"cannot lock {key} ({error.strerror}): nothing stops a second process writing "
                          f"stage {stage!r} of run {run!r}")
            return False
        # A lock file deleted by hand between open and flock would make this lock guard nothing.
        try:
            current = os.stat(key)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            break
        os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _HELD[key] = fd
    return True


def _read_holder(fd: int) -> dict | None:
    # The holder writes its pid just after it takes the lock: give it a moment.
    for _ in range(20):
        try:
            holder = json_loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.025)
    return None


def release_lock(path: Path) -> None:
    fd = _HELD.pop(os.path.abspath(path), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _forget_locks_in_child() -> None:
    # A forked child (a DataLoader worker, a multiprocessing pool) shares the parent's lock; closing
    # its copy keeps it from holding the lock after a killed parent. Never LOCK_UN here: that would
    # release the parent's lock too.
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)
