"""One writer per stage: an OS lock (`flock`) on the stage's folder, held until released or until
the process ends, however it ends, so a kill -9 leaves no stale lock.

The lock is on the folder that holds the stage's records, not on a file of its own: a lock file
can be deleted while its holder runs, and the next process would create a fresh one, lock it and
write the same records a second time. Removing the folder removes what the lock guards. The holder
writes its pid and host into a small file beside the folder (`holder`), only so that a refusal can
name it; deleting that file costs the message its pid, not the lock.

`take_lock` refuses (LockError, naming the holder) while another process holds the lock; the same
process taking it again is not refused, so a notebook cell run twice does not lock itself out. A
folder renamed away (a restart sets it aside) no longer counts as held: taking the lock again
locks the new folder at that path. Where there are no file locks (Windows, a network filesystem
without flock) it warns and goes on unlocked rather than refusing to run. A forked child closes
its copies of the parent's locks, so a DataLoader worker that outlives a killed parent does not
keep the stage locked.

This module knows nothing of run directories: `records.Stage` chooses the folder and the holder
file, decides when to take and release the lock, and reports a refusal as a `RunError`.
"""

from __future__ import annotations

import datetime as _dt
import errno
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
    """A stage lock that cannot be taken: another process holds it, or its folder cannot be opened."""


def _now() -> str:
    # The holder's "since", in the same form as the manifests' timestamps.
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# The stage locks this process holds: folder -> (its descriptor, the holder file's descriptor). A
# second `start` of a stage in the same process (a notebook cell run again, a test) reuses the lock
# instead of refusing itself, since flock refuses a second descriptor even within one process.
_HELD: dict[str, tuple[int, int]] = {}


def _names(path: str, fd: int) -> bool:
    """Whether `path` still names the folder open as `fd` (not renamed away or replaced since)."""
    try:
        current = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


def take_lock(folder: Path, holder: Path, run: str, stage: str) -> bool:
    """Lock a stage's `folder` for this process and write who holds it into `holder`; True when
    taken now, False when already held (or unlockable)."""
    key = os.path.abspath(folder)
    if key in _HELD:
        if _names(key, _HELD[key][0]):
            return False
        release_lock(folder)  # the folder this process locked was set aside: lock the one there now
    if fcntl is None:
        warnings.warn(f"no file locks on this system: nothing stops a second process writing stage {stage!r}")
        return False
    while True:
        try:
            # O_NOFOLLOW: a link planted in place of the folder would lock, and lead writes, elsewhere.
            fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as error:
            raise LockError(f"run {run!r}: cannot open the folder of stage {stage!r} ({key}) to lock it: "
                            f"{_reason(error)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            found = _read_holder(holder)
            who = (f"pid {found.get('pid', '?')} on {found.get('host', '?')}, since {found.get('since', '?')}"
                   if found else "pid unknown")
            kill = f" (kill {found['pid']})" if found and found.get("host") == socket.gethostname() else ""
            raise LockError(
                f"run {run!r}: stage {stage!r} is being run by another process ({who}); two processes on one "
                f"stage would write every record twice. Wait for it to end, or stop it{kill}, then rerun.") from None
        except OSError as error:
            # Some network filesystems (Lustre without -o flock) have no flock: run, but say so.
            os.close(fd)
            warnings.warn(f"cannot lock {key} ({error.strerror}): nothing stops a second process writing "
                          f"stage {stage!r} of run {run!r}")
            return False
        # A folder renamed (a restart by another process) between open and flock: lock what the path names now.
        if _names(key, fd):
            break
        os.close(fd)
    try:
        info = os.open(holder, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        os.close(fd)
        raise LockError(f"run {run!r}: cannot write who holds stage {stage!r} into {holder}: {_reason(error)}") from None
    os.ftruncate(info, 0)
    os.pwrite(info, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}) + "\n").encode(), 0)
    _HELD[key] = (fd, info)
    return True


def _reason(error: OSError) -> str:
    # O_NOFOLLOW on a link fails as ELOOP ("too many levels of symbolic links"), which misleads.
    return "it is a symbolic link, which selfalign does not follow" if error.errno == errno.ELOOP else error.strerror


def _read_holder(holder: Path) -> dict | None:
    # The holder writes its pid just after it takes the lock: give it a moment.
    for _ in range(20):
        try:
            fd = os.open(holder, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                found = json_loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            finally:
                os.close(fd)
            if isinstance(found, dict):
                return found
        except (OSError, ValueError):
            pass
        time.sleep(0.025)
    return None


def release_lock(folder: Path) -> None:
    fds = _HELD.pop(os.path.abspath(folder), None)
    if fds is not None:
        fd, info = fds
        os.ftruncate(info, 0)
        os.close(info)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _forget_locks_in_child() -> None:
    # A forked child (a DataLoader worker, a multiprocessing pool) shares the parent's lock; closing
    # its copy keeps it from holding the lock after a killed parent. Never LOCK_UN here: that would
    # release the parent's lock too.
    for fds in _HELD.values():
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)
