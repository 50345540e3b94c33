"""A run directory is ours: nothing in it is followed through a symbolic link.

A link planted inside `runs/<run>/` (a record file, the lock's holder file, `checkpoints/`, a stage
folder, `book/`) would send a write, a truncation or a deletion to wherever it points. Whatever
selfalign writes or deletes in a run directory, or in an export's folder, is checked with
`refuse_links` first, and the files a stage appends to are opened with `open_no_link`, which
closes the gap between that check and the open. A link is refused (LinkError, one line naming it),
never removed: what it was for is the user's to decide.

The runs directory itself and the folders above it are the user's to place, through links or not.
This module imports nothing of ours.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class LinkError(ValueError):
    """A symbolic link where selfalign would write or delete; the message names it."""


def refuse_links(path: str | os.PathLike, start: str | os.PathLike | None = None, walk: bool = False) -> None:
    """LinkError naming the first link among `start` (default: `path`) and each folder and file on
    the way from it down to `path`; with `walk`, anywhere inside `path` too."""
    path = Path(path)
    start = Path(start) if start is not None else path
    step = start
    for part in ("", *path.relative_to(start).parts):
        step = step / part
        if step.is_symlink():
            raise LinkError(_message(step))
    if walk and path.is_dir():
        for folder, folders, files in os.walk(path):  # os.walk lists links to folders but never enters them
            for name in folders + files:
                if os.path.islink(os.path.join(folder, name)):
                    raise LinkError(_message(Path(folder) / name))


def open_no_link(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """`os.open` that refuses (LinkError) a link as the file itself."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)  # Windows has no O_NOFOLLOW
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise LinkError(_message(Path(path))) from None
        raise


def _message(path: Path) -> str:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return (f"{path} is a symbolic link{target}: selfalign follows no link where it writes or deletes, since one "
            "could lead outside its folder; remove the link (or put a real file or folder there) and rerun")
