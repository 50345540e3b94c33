"""Run directories, stage manifests and append-only JSONL records.

Layout: `runs/<run>/run.json` (format version), and per stage `runs/<run>/<stage>/manifest.json`
plus JSONL files. A record is one JSON object on one line, written in one flushed `write`, so a
process killed at any moment leaves at most a partial last line, which the next writer cuts off
before skipping every key already present. Each record names its schema (`schemas`) and carries
provenance; reading checks records and manifests again, since either may have been edited by hand.

`Stage.start` takes an OS lock on the stage's folder (`locking`) until the stage ends or its
process does. A stage that kept too little for the next one is marked `failed` with a one-line
`failure` (`Stage.fail`, `shortfall`, `drop_reasons`), as are the stages a command stopped by an
error had started (`abandon`); the next stage refuses it, a rerun resumes it. A restart sets a
stage's files aside in `<stage>.previous/`. A run name is one plain folder (`Run`), and nothing in
a run directory is followed through a symbolic link (`links`), so nothing outside the runs
directory is written or deleted. This module does not know what stages compute.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import sys
from pathlib import Path
from collections import Counter
from typing import Iterable, Iterator

from . import __version__
from .links import open_no_link, refuse_links
from .locking import LockError, release_lock, take_lock
from .schemas import SCHEMAS, Schema, check_type, provenance  # noqa: F401  (Schema, provenance: read from here)
from .untrusted import json_loads, quote

FORMAT_VERSION = 1  # the layout of run directories; runs made under another one are refused


class RunError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


class StageFailed(RunError):
    """A stage that ran but kept too little for the next stage (`Stage.fail`); its manifest says
    `failed`, with the counts and the one-line reason this message carries."""

    def __init__(self, stage: str, reason: str, manifest: Path | None = None):
        self.stage, self.reason = stage, reason
        super().__init__(f"stage {stage!r} failed: {reason}" + (f" (see {manifest})" if manifest else ""))


def drop_reasons(rows: Iterable[dict]) -> dict[str, int]:
    """How many drops of each kind (a reason's text before any parenthesised detail)."""
    return dict(Counter(row["reason"].split(" (")[0] for row in rows))


def shortfall(kept: str, reasons: dict[str, int]) -> str:
    """The one-line reason of a stage that kept too little: what it kept (`kept`, e.g. "kept 0 of
    8 prompts, fewer than min_responses=5"), then its drops by reason (as `drop_reasons` counts them)."""
    drops = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items(), key=lambda item: -item[1]))
    return f"{kept}; drops: {drops or 'none'}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: dict) -> None:
    # Write then rename, so a reader never sees half a manifest. The name is per process: processes
    # under `accelerate launch` create the same run directory at the same moment.
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    except OSError as error:  # a full disk fails the write, whose error names no file
        raise named(error, partial) from None
    os.replace(partial, path)


def named(error: OSError, path) -> OSError:
    """The OSError naming `path` where it names no file (a write on a full disk), for one line
    that says which file; as it was where it names one."""
    return error if error.filename else OSError(error.errno, error.strerror or str(error), str(path))


# No '/' and no leading '.', so a name can be neither '..', a path nor absolute: a run is always
# one folder directly inside the runs directory. Matched whole (fullmatch): `$` alone lets a final
# newline through.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PREVIOUS = ".previous"  # suffix of the folder a restart moves a stage's files into


class Run:
    """One run directory, `runs_dir/name`, created on first use (`create=False`: only where it is,
    for commands that must write nothing yet, such as a dry run).

    Every command that takes a run name builds the run's paths from `Run(...).root`, so one check
    refuses a name that would lead outside `runs_dir`."""

    def __init__(self, name: str, runs_dir: str | os.PathLike = "runs", create: bool = True):
        if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
            raise RunError(f"run name {name!r} must be letters, digits, '.', '_' or '-' (at most 100), starting "
                           "with a letter or digit: a run is one folder inside the runs directory")
        self.name = name
        self.root = Path(runs_dir) / name
        if not create:
            if (self.root / "run.json").exists():
                _check_format(self.root / "run.json")
            return
        refuse_links(self.root, walk=True)  # every command that writes into a run opens it here, before it writes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunError(f"cannot create run directory {self.root}: {error.strerror}") from error
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise RunError(f"run directory {self.root} is not writable")
        marker = self.root / "run.json"
        if marker.exists():
            _check_format(marker)
        else:
            write_json_atomic(marker, {"format_version": FORMAT_VERSION, "selfalign_version": __version__,
                                        "created_at": _now()})

    def stage(self, name: str) -> "Stage":
        return Stage(self.root / name, name, run=self.name)

    def stages(self) -> dict[str, dict]:
        """Manifests of the stages this run has, by stage name (not the files a restart set aside)."""
        found = {}
        for manifest in sorted(self.root.glob("*/manifest.json")):
            if not manifest.parent.name.endswith(PREVIOUS):
                found[manifest.parent.name] = _read_manifest(manifest)
        return found


def _json_object(path: Path, what: str, hint: str) -> dict:
    try:
        data = json_loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is unreadable ({error}); {hint}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object, {what}; {hint}")
    return data


def _read_manifest(path: Path) -> dict:
    data = _json_object(path, "a stage manifest", "rerun the stage with --restart")
    # A manifest edited by hand: every reader relies on these two.
    if data.get("status") not in ("running", "finished", "failed") or not isinstance(data.get("params"), dict):
        found = f"status {quote(data.get('status'))}, params {quote(data.get('params'))}"
        raise RunError(f"{path}: a stage manifest needs a 'status' (running, finished or failed) and 'params' (an "
                       f"object), found {found}; rerun the stage with --restart")
    return data


def _check_format(path: Path) -> None:
    data = _json_object(path, "holding 'format_version'", "is this a selfalign run directory?")
    found = data.get("format_version")
    if found != FORMAT_VERSION:
        raise RunError(
            f"{path.parent} was made by selfalign {data.get('selfalign_version', '?')} (run format {found}); "
            f"this selfalign {__version__} reads run format {FORMAT_VERSION}. Start a new run name, or "
            "use the selfalign version that made it."
        )


def adapter_path(stage_dir: str | os.PathLike) -> Path:
    """Where a training stage (engrave, verbose) keeps its LoRA adapter: the one place it is named."""
    return Path(stage_dir) / "adapter"


class Stage:
    """A stage's directory: its manifest and its JSONL files."""

    def __init__(self, path: Path, name: str, run: str | None = None):
        self.path = path
        self.name = name
        self.run = run or path.parent.name
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def lock_path(self) -> Path:
        """The file naming the process that holds the stage's lock (the lock is on the folder, see
        `locking`). Beside the folder, not in it: a restart renames the folder."""
        return self.path.with_name(f".{self.path.name}.lock")

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def adapter(self) -> Path:
        return adapter_path(self.path)

    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        data = _read_manifest(self.manifest_path)
        if data.get("format_version") != FORMAT_VERSION:
            _check_format(self.manifest_path)
        return data

    @property
    def finished(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and manifest["status"] == "finished")

    def start(self, params: dict, restart: bool = False) -> None:
        """Take the stage's lock and mark it running with these params. Another process holding the
        lock is refused (RunError, naming its pid); so is a rerun with other params, since its
        records would mix two settings. `restart` moves the stage's files to `<stage>.previous/`
        (replacing an older one) and starts afresh.

        The lock is held until `finish` or the end of the process. Under `accelerate launch` only
        the main process calls this; the others write through it."""
        # Before anything is locked or written: a stage of a long-lived Run (a notebook, `run --direct`)
        # may have been given a link since the Run checked its directory.
        refuse_links(self.path, start=self.path.parent, walk=True)
        refuse_links(self.lock_path, start=self.path.parent)
        taken = self._lock()
        try:
            if restart:
                self._set_aside()
                taken = self._lock()  # the lock went with the folder set aside; lock the new one
            manifest = self.manifest()
            if manifest is not None and manifest["params"] != params and self._holds_records():
                changed = sorted(k for k in set(params) | set(manifest["params"])
                                 if params.get(k) != manifest["params"].get(k))
                raise RunError(
                    f"stage {self.name!r} in {self.path} was started with other settings ({', '.join(changed)}); "
                    "resume it with those settings, rerun with --restart (restart=True in a notebook or from "
                    "Python) to set its results aside and start again with these, or use a new run name"
                )
        except BaseException:
            if taken:  # a stage that never started must not stay locked for the life of a notebook kernel
                release_lock(self.path)
            raise
        write_json_atomic(self.manifest_path, {
            "stage": self.name, "format_version": FORMAT_VERSION, "selfalign_version": __version__,
            "status": "running", "params": params,
            "started_at": manifest.get("started_at", _now()) if manifest else _now(), "finished_at": None,
            "counts": {},
        })
        _STARTED[self.manifest_path] = self

    def _lock(self) -> bool:
        try:
            return take_lock(self.path, self.lock_path, self.run, self.name)
        except LockError as error:  # to a caller, a stage locked by another process is a run not usable now
            raise RunError(str(error)) from None

    def finish(self, counts: dict) -> None:
        self._end("finished", counts)

    def fail(self, reason: str, counts: dict) -> StageFailed:
        """Mark the started stage `failed` with its counts and a one-line `reason`, release its lock,
        and return the exception for the caller to raise (`raise stage.fail(...)`)."""
        self._end("failed", counts, failure=reason)
        return StageFailed(self.name, reason, self.manifest_path)

    def _end(self, status: str, counts: dict, **extra) -> None:
        manifest = self.manifest()
        if manifest is None:
            raise RunError(f"stage {self.name!r} was never started")
        manifest.update(status=status, finished_at=_now(), counts=counts, **extra)
        _STARTED.pop(self.manifest_path, None)
        write_json_atomic(self.manifest_path, manifest)
        # `selfalign run --direct` runs the next stage in this process; a later rerun of this one
        # by another process needs the lock too.
        release_lock(self.path)

    def _holds_records(self) -> bool:
        """Whether anything was produced under the recorded settings: a start that failed before its
        first record (a model that would not load, say) must not lock the run to its settings."""
        return any(p.suffix == ".jsonl" and p.stat().st_size > 0 for p in self.path.iterdir() if p.is_file()) or \
            any(p.is_dir() for p in self.path.iterdir())

    def _set_aside(self) -> None:
        contents = sorted(self.path.iterdir())
        if not contents:
            return
        previous = self.path.with_name(self.path.name + PREVIOUS)
        records = {p.name: _count_lines(p) for p in contents if p.suffix == ".jsonl" and p.is_file()}
        folders = [f"{p.name}/" for p in contents if p.is_dir()]
        if previous.is_dir() and not previous.is_symlink():
            shutil.rmtree(previous)
        elif previous.exists() or previous.is_symlink():
            previous.unlink()
        # One rename, so a kill midway leaves the files either all here or all there.
        os.rename(self.path, previous)
        self.path.mkdir(exist_ok=True)  # another process's Stage may create it first; then the lock refuses one of us
        detail = ", ".join(f"{name} {n}" for name, n in records.items())
        print(f"restart: moved {sum(records.values())} records of {self.name}" + (f" ({detail})" if detail else "")
              + (f" and {', '.join(folders)}" if folders else "") + f" to {previous}/", file=sys.stderr, flush=True)

    def writer(self, filename: str, schema: str, key: str = "id") -> "JsonlWriter":
        return JsonlWriter(self.path / filename, SCHEMAS[schema], key)

    def read(self, filename: str, **checks) -> list[dict]:
        """The file's records; `checks` as for `read_jsonl` (fields, unique)."""
        return list(read_jsonl(self.path / filename, **checks))


_STARTED: dict[Path, Stage] = {}  # stages this process started and has not finished or failed


def abandon(reason: str) -> None:
    """Mark each stage this process started and has not ended `failed`, with `reason` (one line),
    and release its lock: a command stopped by an error (a full disk, weights that will not load)
    must not leave a manifest that says `running`. Best effort: where the manifest cannot be written
    either (the disk is full) it stays as it was; a rerun resumes a running or a failed stage alike."""
    for stage in list(_STARTED.values()):
        try:
            stage.fail(reason, (stage.manifest() or {}).get("counts") or {})
        except (OSError, RunError):
            release_lock(stage.lock_path)
    _STARTED.clear()


def _count_lines(path: Path) -> int:
    # Raw complete lines, not parsed records: a restart is when a file may be damaged.
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.endswith(b"\n") and line.strip())


def read_jsonl(path: str | os.PathLike, fields: dict | None = None, unique: str | None = None) -> Iterator[dict]:
    """Records of a JSONL file; a partial last line (from a killed writer) is ignored. Each line
    must be a JSON object, one that names its schema must fit it, and each must hold `fields`
    ({name: type}) and no `unique` value twice, for a caller that relies on them (a file may have
    been edited by hand): RunError naming the file and line otherwise."""
    seen: dict = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith("\n"):
                return  # the record in flight when a writer was killed
            if line.strip():
                try:
                    record = json_loads(line)
                except json.JSONDecodeError as error:
                    raise RunError(f"{path}:{number} is not valid JSON: {error}") from None
                if not isinstance(record, dict):
                    raise RunError(f"{path}:{number}: expected a JSON object, a record; got {quote(record)}")
                schema = SCHEMAS.get(record.get("schema")) if isinstance(record.get("schema"), str) else None
                try:
                    if schema is not None:
                        schema.validate(record)
                    for key, kind in (fields or {}).items():
                        if key not in record:
                            raise ValueError(f"the record has no {key!r}")
                        check_type(f"its {key!r}", record[key], kind)
                except ValueError as error:
                    raise RunError(f"{path}:{number}: {error}") from None
                if unique is not None:
                    if record.get(unique) in seen:
                        raise RunError(f"{path}:{number}: {unique} {quote(record[unique])} is used twice (line "
                                       f"{seen[record[unique]]} too): the file is damaged (two processes writing "
                                       "one stage, or an edit); rerun the stage that wrote it with --restart")
                    seen[record[unique]] = number
                yield record


class JsonlWriter:
    """Appends records to a JSONL file, one flushed line each, skipping keys already written."""

    def __init__(self, path: Path, schema: Schema, key: str = "id"):
        self.path = path
        self.schema = schema
        self.key = key
        fd = open_no_link(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)  # a linked record file is refused
        try:
            _cut_partial_line(fd)
            self.keys = {record[key] for record in read_jsonl(path)}
        except BaseException:
            os.close(fd)
            raise
        self._handle = os.fdopen(fd, "a", encoding="utf-8")

    def __contains__(self, key) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def write(self, record: dict) -> bool:
        """Append one record; return False (and write nothing) when its key is already there."""
        record = {"schema": self.schema.tag, **record}
        self.schema.validate(record)
        if record[self.key] in self.keys:
            return False
        try:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._handle.flush()
        except OSError as error:  # a full disk: the write's error names no file
            raise named(error, self.path) from None
        self.keys.add(record[self.key])
        return True

    def write_all(self, records: Iterable[dict]) -> int:
        return sum(self.write(r) for r in records)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_partial_line(fd: int) -> None:
    if os.fstat(fd).st_size == 0:
        return
    with open(fd, "rb", closefd=False) as handle:  # the writer's own descriptor: no second open by name
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        os.ftruncate(fd, handle.read().rfind(b"\n") + 1)
