"""An export's folder (`selfalign export --out DIR`): the files an export writes, listed in the
folder, and on `--overwrite` only those replaced.

A user may keep their own files below DIR (notes, a git checkout of the dataset repository); an
earlier export's list says what selfalign wrote there, so a new export removes those and nothing
else, and a hand-edited list that points outside DIR is refused. This module knows nothing of
datasets: `export` builds the files in a temporary folder and hands them over.
"""

from __future__ import annotations

import os
from pathlib import Path

from .links import refuse_links
from .records import RunError, write_json_atomic
from .untrusted import json_loads

# In --out, the list of the files an export wrote: what the next --overwrite removes, and nothing else.
WRITTEN = ".selfalign-export.json"


def earlier_export(out: Path, overwrite: bool) -> list[str]:
    """The files an earlier export wrote into `out` (as its WRITTEN list names them), which this one
    removes; [] for a folder that is not there, or holds no such list (then only the files this
    export writes are replaced). RunError for an --out that is no folder, or exists without overwrite."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return []
    if not overwrite:
        raise RunError(f"--out {out} exists; pass --overwrite to replace it")
    listed = out / WRITTEN
    if not listed.is_file():
        return []
    try:
        files = json_loads(listed.read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise RunError(f"{listed} is unreadable ({type(error).__name__}); remove it to export into {out}") from None
    for name in files:  # a hand-edited list must not lead a deletion outside `out`
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or not name.strip("/."):
            raise RunError(f"{listed} lists {name!r}, which is no file inside {out}; remove {listed} to export there")
    return files


def replace_export(building: Path, out: Path, earlier: list[str]) -> None:
    """Move the files built in `building` into `out`, after removing the `earlier` export's files.

    Only those files go, and the folders they leave empty: anything else a user keeps below `out`
    stays. `out` and its new folders get the usual permissions (not mkdtemp's 0700)."""
    written = sorted(str(Path(folder, name).relative_to(building)) for folder, _, names in os.walk(building)
                     for name in names)
    for name in {*earlier, *written, WRITTEN}:
        refuse_links(out / name, start=out)  # a link inside `out` would send a write or a deletion elsewhere
    for name in earlier:
        (out / name).unlink(missing_ok=True)
    for folder in sorted({p for name in earlier for p in Path(name).parents if p != Path(".")},
                         key=lambda p: -len(p.parts)):
        try:
            (out / folder).rmdir()
        except OSError:  # not empty (a user's file) or already gone: kept
            pass
    for name in written:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(building / name, out / name)
    write_json_atomic(out / WRITTEN, {"files": written})
