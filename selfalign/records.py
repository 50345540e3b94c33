"""Run directories, stage manifests and append-only JSONL records.

Layout: `runs/<run>/run.json` (format version), and per stage `runs/<run>/<stage>/manifest.json`
plus JSONL files of records. A record is one JSON object on one line, written with a single
`write` and flushed, so a process killed at any moment (even SIGKILL) leaves at most one partial
last line; the next writer cuts that line off and skips every key already present, so a rerun
resumes without duplicates.

Each record names its schema (`"schema": "generation/1"`) and carries provenance (model,
generation parameters, principle-set hash, seed). This module does not know what stages compute.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import __version__

FORMAT_VERSION = 1  # the layout of run directories; runs made under another one are refused


class RunError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Schema:
    name: str
    version: int
    fields: dict  # required field -> type or tuple of types

    @property
    def tag(self) -> str:
        return f"{self.name}/{self.version}"

    def validate(self, record: dict) -> None:
        for key, kind in self.fields.items():
            if key not in record:
                raise ValueError(f"{self.tag} record lacks field {key!r}: {_short(record)}")
            if not isinstance(record[key], kind):
                raise ValueError(f"{self.tag} record field {key!r} should be {kind}, got "
                                 f"{type(record[key]).__name__}: {_short(record)}")


PROVENANCE = {"model": str, "generation": dict, "principles_hash": (str, type(None)), "seed": int}

SCHEMAS = {
    s.tag: s
    for s in [
        Schema("generation", 1, {"id": str, "prompt": str, "completion": str, "finish_reason": str,
                                 "prompt_tokens": int, "completion_tokens": int, "provenance": dict}),
        Schema("drop", 1, {"id": str, "reason": str}),
        Schema("prompt", 1, {"id": str, "prompt": str, "source": str, "seeds": list, "provenance": dict}),
        Schema("topic", 1, {"id": str, "type": str, "topic": str}),
        Schema("response", 1, {"id": str, "prompt": str, "thoughts": str, "answer": str, "triggers": list,
                               "provenance": dict}),
        Schema("train_step", 1, {"step": int, "loss": float, "learning_rate": float, "tokens": int}),
        Schema("sft_example", 1, {"id": str, "prompt": str, "answer": str, "split": str}),
        Schema("comparison", 1, {"id": str, "base_logprob": float, "adapted_logprob": float}),
        Schema("eval_item", 1, {"id": str, "benchmark": str, "model": str, "scores": dict}),
        Schema("eval_summary", 1, {"id": str, "benchmark": str, "metric": str, "model": str, "value": (float, int),
                                   "n": int}),
        Schema("answer", 1, {"id": str, "prompt": str, "answer": str, "provenance": dict}),
    ]
}


def provenance(model: str, generation: dict, seed: int, principles_hash: str | None = None) -> dict:
    return {"model": model, "generation": generation, "principles_hash": principles_hash, "seed": seed}


def _short(record: dict) -> str:
    text = json.dumps(record, ensure_ascii=False)
    return text if len(text) < 200 else text[:200] + "..."


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, data: dict) -> None:
    # Write then rename, so a reader never sees half a manifest. The name is per process: processes
    # under `accelerate launch` create the same run directory at the same moment.
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(partial, path)


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Run:
    """One run directory, `runs_dir/name`, created on first use."""

    def __init__(self, name: str, runs_dir: str | os.PathLike = "runs"):
        if not _RUN_NAME.match(name):
            raise RunError(f"run name {name!r} must be letters, digits, '.', '_' or '-' (at most 100)")
        self.name = name
        self.root = Path(runs_dir) / name
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
            _write_json_atomic(marker, {"format_version": FORMAT_VERSION, "selfalign_version": __version__,
                                        "created_at": _now()})

    def stage(self, name: str) -> "Stage":
        return Stage(self.root / name, name)

    def stages(self) -> dict[str, dict]:
        """Manifests of the stages this run has, by stage name."""
        found = {}
        for manifest in sorted(self.root.glob("*/manifest.json")):
            found[manifest.parent.name] = json.loads(manifest.read_text())
        return found


def _check_format(path: Path) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is unreadable ({error}); is this a selfalign run directory?") from error
    found = data.get("format_version")
    if found != FORMAT_VERSION:
        raise RunError(
            f"{path.parent} was made by selfalign {data.get('selfalign_version', '?')} (run format {found}); "
            f"this selfalign {__version__} reads run format {FORMAT_VERSION}. Start a new run name, or "
            "use the selfalign version that made it."
        )


class Stage:
    """A stage's directory: its manifest and its JSONL files."""

    def __init__(self, path: Path, name: str):
        self.path = path
        self.name = name
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        data = json.loads(self.manifest_path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            _check_format(self.manifest_path)
        return data

    @property
    def finished(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and manifest["status"] == "finished")

    def start(self, params: dict, restart: bool = False) -> None:
        """Mark the stage running with these params. A rerun with other params is refused, since
        its records would mix two settings; `restart` discards the stage's files instead."""
        manifest = self.manifest()
        if manifest is not None and restart:
            for child in self.path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)  # checkpoints, adapters
                else:
                    child.unlink()
            manifest = None
        if manifest is not None and manifest["params"] != params:
            changed = sorted(k for k in set(params) | set(manifest["params"])
                             if params.get(k) != manifest["params"].get(k))
            raise RunError(
                f"stage {self.name!r} in {self.path} was started with other settings ({', '.join(changed)}); "
                "resume it with the same settings, use a new run name, or restart the stage"
            )
        _write_json_atomic(self.manifest_path, {
            "stage": self.name, "format_version": FORMAT_VERSION, "selfalign_version": __version__,
            "status": "running", "params": params,
            "started_at": manifest["started_at"] if manifest else _now(), "finished_at": None, "counts": {},
        })

    def finish(self, counts: dict) -> None:
        manifest = self.manifest()
        if manifest is None:
            raise RunError(f"stage {self.name!r} was never started")
        manifest.update(status="finished", finished_at=_now(), counts=counts)
        _write_json_atomic(self.manifest_path, manifest)

    def writer(self, filename: str, schema: str, key: str = "id") -> "JsonlWriter":
        return JsonlWriter(self.path / filename, SCHEMAS[schema], key)

    def read(self, filename: str) -> list[dict]:
        return list(read_jsonl(self.path / filename))


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Records of a JSONL file; a partial last line (from a killed writer) is ignored."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith("\n"):
                return  # the record in flight when a writer was killed
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise RunError(f"{path}:{number} is not valid JSON: {error}") from error


class JsonlWriter:
    """Appends records to a JSONL file, one flushed line each, skipping keys already written."""

    def __init__(self, path: Path, schema: Schema, key: str = "id"):
        self.path = path
        self.schema = schema
        self.key = key
        _cut_partial_line(path)
        self.keys = {record[key] for record in read_jsonl(path)} if path.exists() else set()
        self._handle = open(path, "a", encoding="utf-8")

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
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
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


def _cut_partial_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        handle.truncate(handle.read().rfind(b"\n") + 1)
