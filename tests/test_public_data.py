"""`selfalign data prepare`: the public data fetched from a server in upstream's layout (a local one
on 127.0.0.1 here), or copied from an offline copy, each file checked by sha256 before it is taken."""

import functools
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from selfalign import public_data
from selfalign.public_data import DataError, DataFile


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def serve(root, handler=None):
    """A server on 127.0.0.1 serving `root` (upstream's layout: owner/repo/commit/path); its base URL,
    the paths it was asked for, and a stop function."""
    asked = []

    class Handler(handler or http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", asked, server.shutdown


def upstream(root, files: dict[str, bytes]):
    """Pins for `files` ({name: bytes}) and the tree a server in upstream's layout would hold."""
    pins = []
    for number, (name, data) in enumerate(files.items()):
        pin = DataFile(name, name.split(".")[0], f"owner{number}/repo", "a" * 40, f"data/{name}",
                       hashlib.sha256(data).hexdigest())
        where = root / pin.repo / pin.commit / pin.path
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(data)
        pins.append(pin)
    return tuple(pins)


FILES = {"questions.csv": b"Question,Answer\nWhat is 2+2?,4\n", "tasks.jsonl": b'{"id": "t1"}\n'}


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    pins = upstream(tmp_path / "upstream", FILES)
    monkeypatch.setattr(public_data, "FILES", pins)
    return pins


def test_a_good_fetch_then_nothing_again(cache, pinned, tmp_path):
    base, asked, stop = serve(tmp_path / "upstream")
    try:
        assert public_data.prepare(base_url=base, progress=lambda line: None) == cache
        assert [(f.name, state) for f, state in public_data.status()] == [(n, "ok") for n in FILES]
        assert all((cache / name).read_bytes() == data for name, data in FILES.items())
        assert sorted(asked) == sorted(f"/{p.repo}/{p.commit}/{p.path}" for p in pinned)
        public_data.prepare(base_url=base, progress=lambda line: None)  # all there and right: not asked again
        assert len(asked) == len(FILES)
        (cache / "tasks.jsonl").write_text("edited by hand\n")  # a changed file is fetched again
        assert dict((f.name, s) for f, s in public_data.status())["tasks.jsonl"] == "changed"
        public_data.prepare(base_url=base, progress=lambda line: None)
        assert (cache / "tasks.jsonl").read_bytes() == FILES["tasks.jsonl"] and len(asked) == len(FILES) + 1
    finally:
        stop()


def test_a_corrupted_file_is_named_and_never_taken(cache, pinned, tmp_path):
    corrupted = tmp_path / "upstream" / pinned[1].repo / pinned[1].commit / pinned[1].path
    corrupted.write_bytes(b'{"id": "t2"}\n')
    base, _, stop = serve(tmp_path / "upstream")
    expected = rf"{pinned[1].url(base)} has sha256 \w+, not the pinned {pinned[1].sha256}"
    try:
        with pytest.raises(DataError, match=expected):
            public_data.prepare(base_url=base, progress=lambda line: None)
    finally:
        stop()
    assert (cache / "questions.csv").is_file()  # the good one is kept
    assert not (cache / "tasks.jsonl").exists() and not list(cache.glob("*.partial"))


def test_a_missing_file_upstream_is_one_line(cache, pinned, tmp_path):
    (tmp_path / "upstream" / pinned[0].repo / pinned[0].commit / pinned[0].path).unlink()
    base, _, stop = serve(tmp_path / "upstream")
    try:
        with pytest.raises(DataError, match=rf"could not fetch {pinned[0].url(base)} \(HTTP 404"):
            public_data.prepare(base_url=base, progress=lambda line: None)
    finally:
        stop()


def test_an_interrupted_download_leaves_no_file(cache, pinned, tmp_path):
    """The server promises more bytes than it sends, then hangs up."""
    class CutShort(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"Question,Ans")
            self.close_connection = True

    base, _, stop = serve(tmp_path / "upstream", CutShort)
    try:
        with pytest.raises(DataError, match=rf"could not fetch {pinned[0].url(base)} \(the connection closed after "
                                            r"12 of 1000 bytes\)"):
            public_data.prepare(base_url=base, progress=lambda line: None)
    finally:
        stop()
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_a_server_that_does_not_answer_is_an_error_within_seconds(cache, pinned):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        started = time.monotonic()
        with pytest.raises(DataError, match="could not fetch .*timed out.*selfalign data prepare --from DIR"):
            public_data.prepare(base_url=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1,
                                progress=lambda line: None)
        assert time.monotonic() - started < 10
    finally:
        silent.close()


def test_an_offline_copy_is_checked_the_same_way(cache, pinned, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "questions.csv").write_bytes(FILES["questions.csv"])
    with pytest.raises(DataError, match=f"{copy / 'tasks.jsonl'} does not exist: the offline copy lacks it"):
        public_data.prepare(copy, progress=lambda line: None)
    (copy / "tasks.jsonl").write_bytes(b"something else\n")
    with pytest.raises(DataError, match=f"{copy / 'tasks.jsonl'} has sha256 .* not the pinned"):
        public_data.prepare(copy, progress=lambda line: None)
    (copy / "tasks.jsonl").write_bytes(FILES["tasks.jsonl"])
    public_data.prepare(copy, progress=lambda line: None)
    assert all(state == "ok" for _, state in public_data.status())
    with pytest.raises(DataError, match="is not a folder"):
        public_data.prepare(tmp_path / "nowhere", progress=lambda line: None)


def test_a_cache_that_cannot_be_written_is_named(tmp_path, monkeypatch, pinned):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(DataError, match=f"{tmp_path / 'a-file' / 'cache' / 'data'} is not writable"):
        public_data.prepare(tmp_path, progress=lambda line: None)


def test_the_command_fails_in_one_line_offline(tmp_path):
    env = {**os.environ, "SELFALIGN_CACHE": str(tmp_path / "cache"), "SELFALIGN_DATA_URL": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "selfalign", "data", "prepare"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "could not fetch http://127.0.0.1:9/sylinrl/TruthfulQA/" in done.stderr
    listed = subprocess.run([sys.executable, "-m", "selfalign", "data", "list"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.count("missing") == len(public_data.FILES)


def test_the_real_pins_fetch_from_upstreams_layout(public_data_dir, tmp_path, monkeypatch):
    """The project's checked copy served as GitHub lays it out: every pin's URL and checksum hold.
    TruthfulQA as upstream has it (a byte-order mark first, a newline last) is taken and reads as the
    same 817 questions as the offline copy."""
    from selfalign.evals import load_truthfulqa

    for pin in public_data.FILES:
        where = tmp_path / "upstream" / pin.repo / pin.commit / pin.path
        where.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(public_data_dir / pin.name, where)
        if pin.dataset == "truthfulqa":
            where.write_bytes(b"\xef\xbb\xbf" + where.read_bytes().removeprefix(b"\xef\xbb\xbf").rstrip(b"\n") + b"\n")
            assert hashlib.sha256(where.read_bytes()).hexdigest() == pin.sha256
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))
    base, asked, stop = serve(tmp_path / "upstream")
    try:
        public_data.prepare(base_url=base, progress=lambda line: None)
    finally:
        stop()
    assert len(asked) == len(public_data.FILES) and all(s == "ok" for _, s in public_data.status())
    fetched = load_truthfulqa(tmp_path / "cache" / "data" / "truthfulqa.csv")
    assert len(fetched) == 817 and fetched == load_truthfulqa(public_data_dir / "truthfulqa.csv")
    assert public_data.seeds_path("self-instruct") == tmp_path / "cache" / "data" / "self_instruct_seed_tasks.jsonl"


@pytest.fixture
def public_data_dir(request):
    return request.getfixturevalue("public_data")
