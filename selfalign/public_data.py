"""The public data the book and the `full` profile read, fetched pinned and checked, into the cache.

TruthfulQA's CSV, BIG-bench HHH's four task files, the 80 Vicuna questions and Self-Instruct's 175
seed tasks are other people's data (all Apache-2.0): the project ships none of them. Each file is
pinned by its upstream repository, commit and path, and by the sha256 of its bytes. `prepare()`
fetches them from GitHub's raw files (`SELFALIGN_DATA_URL` names a mirror in the same layout) into
`$SELFALIGN_CACHE/data/`, laid out as the evaluation reads them; `prepare(source=DIR)` takes an
offline copy laid out the same way. A file is written beside its place and moved there only once
its checksum is right, so an interrupted download or a changed upstream file is never taken for
the data. `selfalign data prepare` and `selfalign data list` are the commands.

It reads and writes files only; the benchmarks' loaders are in `selfalign.evals`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .models import cache_dir

BASE_URL = "https://raw.githubusercontent.com"
TIMEOUT_S = 10.0  # per connection and read: a network that does not answer is an error in seconds


class DataError(RuntimeError):
    """Public data that could not be fetched, copied or checked; the message names the file and says what to do."""


@dataclass(frozen=True)
class DataFile:
    name: str  # where it goes in the data folder, as the evaluation reads it
    dataset: str
    repo: str  # owner/name on GitHub
    commit: str
    path: str  # in the repository
    sha256: str  # of upstream's bytes at that commit
    same_data: tuple[str, ...] = ()  # checksums of the same data saved otherwise, taken from an offline copy too

    def accepts(self, digest: str) -> bool:
        return digest == self.sha256 or digest in self.same_data

    def url(self, base: str = BASE_URL) -> str:
        return f"{base.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


_HHH = "bigbench/benchmark_tasks/hhh_alignment"
# Each commit was read in the repository's history, and its bytes compared with this project's
# offline copy (benchmarks/RESULTS.md, stop 21), but for BIG-bench, of which no copy could be read
# here: its files are fetched from `main` and held by their checksums alone.
FILES = (
    # The original CSV of the paper's time (later commits changed 212 reference answers, then the
    # columns). Upstream's file opens with a byte-order mark and ends with a newline; the offline
    # copy of this project's machines has neither, and is the same data.
    DataFile("truthfulqa.csv", "truthfulqa", "sylinrl/TruthfulQA", "435477c3c2323a6d1ccc7e956364d2c0899eed6a",
             "TruthfulQA.csv", "8d7dd15f033196140f032d97d30f037da7a7b1192c3f36f9937c1850925335a2",
             same_data=("99d6ae7755e3b435eade956068c9de7c0c474770344237aeb66b56519ba4b697",)),
    *(DataFile(f"hhh_alignment/{subset}.json", "hhh", "google/BIG-bench", "main", f"{_HHH}/{subset}/task.json", digest)
      for subset, digest in (("harmless", "4720acbc916cc18413e48c6bb55c19af73400436a6304c7e110b8bb40f8952a1"),
                             ("helpful", "1bd2a58d9bb17b26af4806e8302374cea60671dc387fbfc2c5aa5c23e0901628"),
                             ("honest", "69ba96e5bff121327ad1366e3772b7b45c50e96e7f995b2cef62c350380f1b14"),
                             ("other", "4d6b041d79e5bf2705a9f81994efb95274179faaba9270f6dc83bd0cd17c227e"))),
    DataFile("vicuna_questions.jsonl", "vicuna", "lm-sys/FastChat", "b494d0c6b4e7935f1764f8439e75da3e66beccc7",
             "fastchat/llm_judge/data/vicuna_bench/question.jsonl",
             "c248c5c98ba45bb0c2aadae2f270e643bd32679c6c306a3b2a503ac4254cdaa5"),
    DataFile("self_instruct_seed_tasks.jsonl", "self-instruct", "yizhongw/self-instruct",
             "4ec29755a0f5a99a945863cd8e8f5e2b441f730a",
             "data/seed_tasks.jsonl", "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48"),
)
SELF_INSTRUCT = "self-instruct"  # stage 1's `seeds` may name the prepared seed tasks so (the full profile does)


def data_dir() -> Path:
    return cache_dir() / "data"


def seeds_path(seeds: str) -> Path:
    """Stage 1's `seeds` setting as a file: "self-instruct" is the prepared Self-Instruct seed tasks."""
    if seeds != SELF_INSTRUCT:
        return Path(seeds)
    path = data_dir() / next(f.name for f in FILES if f.dataset == SELF_INSTRUCT)
    if not path.is_file():
        raise DataError(f"Self-Instruct's seed tasks are not prepared in {path.parent}: run `selfalign data prepare` "
                        "(or `selfalign data prepare --from DIR` with an offline copy)")
    return path


def status(folder: Path | None = None) -> list[tuple[DataFile, str]]:
    """Each pinned file and its state in `folder` (the cache's by default): "ok", "missing" or "changed"."""
    folder = folder or data_dir()
    return [(f, "missing" if not (folder / f.name).is_file() else
             "ok" if f.accepts(_sha256(folder / f.name)) else "changed") for f in FILES]


def prepare(source: str | Path | None = None, base_url: str | None = None, timeout: float = TIMEOUT_S,
            progress=print) -> Path:
    """Every pinned file into the cache's data folder, checked: from `source` (an offline copy laid
    out as the data folder is) or fetched from `base_url` (default `SELFALIGN_DATA_URL`, else
    GitHub). Files already there with the right checksum are kept. Returns the folder."""
    folder = data_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".writable"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(f"{folder} is not writable ({error.strerror or error}); set SELFALIGN_CACHE to a folder "
                        "you can write") from None
    if source is not None and not Path(source).is_dir():
        raise DataError(f"{source} is not a folder (expected an offline copy laid out as {folder} is)")
    base = base_url or os.environ.get("SELFALIGN_DATA_URL") or BASE_URL
    for file, state in status(folder):
        if state == "ok":
            continue
        target = folder / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        try:
            if source is not None:
                _copy(Path(source) / file.name, partial)
                where = str(Path(source) / file.name)
            else:
                _download(file.url(base), partial, timeout)
                where = file.url(base)
            digest = _sha256(partial)
            if not file.accepts(digest):
                raise DataError(f"{where} has sha256 {digest}, not the pinned {file.sha256} ({file.repo} at "
                                f"{file.commit[:12]}, {file.path}); it is not the file the book was checked with")
            partial.replace(target)  # only a checked file takes the name
        finally:
            partial.unlink(missing_ok=True)
        progress(f"{file.name}: ok ({where})")
    return folder


def _copy(path: Path, partial: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path} does not exist: the offline copy lacks it (expected the layout of "
                        f"{data_dir()}: {', '.join(f.name for f in FILES)})")
    shutil.copyfile(path, partial)


def _download(url: str, partial: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
            expected, got = response.headers.get("Content-Length"), out.tell()
        if expected is not None and got < int(expected):
            raise DataError(f"could not fetch {url} (the connection closed after {got} of {expected} bytes); "
                            "run the command again")
    except urllib.error.HTTPError as error:
        raise DataError(f"could not fetch {url} (HTTP {error.code} {error.reason})") from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(f"could not fetch {url} ({reason}); without a network, pass an offline copy: "
                        "selfalign data prepare --from DIR") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
