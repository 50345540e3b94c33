"""A bad input file ends the command with one `selfalign: error:` line that names the file (and the
line, where there is one), exit code 1, no traceback; a loader raises its module's error class."""

import builtins
import errno
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import yaml

from conftest import REPO
from selfalign import evals
from selfalign.cli import main
from selfalign.inputs import PRINCIPLES_DIR, PromptFileError
from selfalign.red_team import load_red_team_types
from test_export import make_run

SHIPPED = {name: (PRINCIPLES_DIR / name).read_text(encoding="utf-8")
           for name in ("principles.yaml", "exemplars.yaml", "self_align_template.yaml")}
FLAGS = {"principles.yaml": "--principles", "exemplars.yaml": "--exemplars", "self_align_template.yaml": "--template"}


def edited(name: str, old: str, new: str) -> str:
    """A shipped principles file with one edit, as a user might make it."""
    assert old in SHIPPED[name], old
    return SHIPPED[name].replace(old, new, 1)


def changed(name: str, edit) -> str:
    """A shipped principles file with its YAML data changed by `edit` (a function that changes it in place)."""
    data = yaml.safe_load(SHIPPED[name])
    edit(data)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def latin1(text: str) -> bytes:
    """The text saved by an editor that writes Latin-1: 'é' becomes the lone byte 0xe9."""
    return text.encode("utf-8").replace("é".encode(), b"\xe9")


def stage_two(tmp_path, flag="--prompts", name="prompts.jsonl"):
    """Stage 2 on the tiny model with one file swapped: it fails on the file before loading a model."""
    prompts = tmp_path / "good.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Hello?"}\n')
    argv = ["stage", "self-align", "--model", "tiny-random", "--run", "r", "--runs-dir", str(tmp_path / "runs"),
            "--min-responses", "0", "--prompts", str(prompts)]
    return argv + [flag, str(tmp_path / name)]


@dataclass
class Case:
    id: str
    files: dict  # name under tmp_path -> content (str or bytes); the first is the one the error names
    expected: str  # in the message, with {path} the named file
    argv: Callable | None = None  # tmp_path -> the command; None: `loader` is called instead
    loader: Callable | None = None  # tmp_path -> raises `error`
    error: type = ValueError
    setup: Callable | None = None  # (tmp_path, monkeypatch) -> the path the error names, for failures of the disk
    marks: list = field(default_factory=list)
    after: Callable | None = None  # tmp_path -> checks of what the failed command left behind


def principles_case(id, name, content, expected):
    return Case(id, {name: content}, expected, argv=lambda tmp: stage_two(tmp, FLAGS[name], name))


def prompts_case(id, content, expected):
    return Case(id, {"prompts.jsonl": content}, expected, argv=stage_two)


def failing_writes(code):
    """Every write into the stage's folder fails with `code`, as on a read-only or full disk."""
    def setup(tmp_path, monkeypatch):
        stage = tmp_path / "runs" / "r" / "self_align"
        opened = builtins.open

        def refuse(path):
            if str(path).startswith(str(stage)):
                raise OSError(code, os.strerror(code), str(path))

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                refuse(file)
            return opened(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)  # pathlib's write_text goes through io.open
        return stage
    return setup


def full_disk(name):
    """Writes to the file `name` in the stage's folder fail as on a full disk: the file opens, and its
    write raises ENOSPC with no file named (as the OS reports it)."""
    def setup(tmp_path, monkeypatch):
        target = tmp_path / "runs" / "r" / "self_align" / name.format(pid=os.getpid())
        opened = builtins.open

        class Full(io.TextIOWrapper):
            def write(self, text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def open_(file, mode="r", *args, **kwargs):
            handle = opened(file, mode, *args, **kwargs)
            if str(file) == str(target) and "b" not in mode:
                return Full(handle.detach(), encoding="utf-8")
            return handle

        # A record file is opened by descriptor (os.open without following links, then os.fdopen).
        descriptors, os_open, fdopen = set(), os.open, os.fdopen

        def os_open_(file, flags, *args, **kwargs):
            fd = os_open(file, flags, *args, **kwargs)
            if str(file) == str(target):
                descriptors.add(fd)
            return fd

        def fdopen_(fd, mode="r", *args, **kwargs):
            handle = fdopen(fd, mode, *args, **kwargs)
            if fd in descriptors and "b" not in mode:
                descriptors.discard(fd)
                return Full(handle.detach(), encoding="utf-8")
            return handle

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "open", os_open_)
        monkeypatch.setattr(os, "fdopen", fdopen_)
        return target
    return setup


def stage_two_is(status):
    def check(tmp_path):
        manifest = tmp_path / "runs" / "r" / "self_align" / "manifest.json"
        assert not manifest.exists() or json.loads(manifest.read_text())["status"] == status
    return check


# A YAML "billion laughs": nine aliases of nine aliases ... expand to 10^9 items when printed.
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
DEEP_YAML = "[" * 10_000 + "]" * 10_000
DEEP_JSON = "[" * 100_000 + "]" * 100_000
GOOD_RESPONSE = {"id": "a", "prompt": "What is 2 plus 2?", "answer": "It is 4."}


def engrave_on(tmp_path, name="responses.jsonl"):
    return ["stage", "engrave", "--model", "tiny-random", "--run", "r", "--runs-dir", str(tmp_path / "runs"),
            "--responses", str(tmp_path / name)]


def generate_with(folder: str, *extra):
    return lambda tmp: ["generate", "Hi", "--model", *extra, str(tmp / folder)]


def safetensors_bytes(cut: int = 0) -> bytes:
    """A small safetensors file's bytes, less its last `cut` bytes (a copy that ran out of space)."""
    import torch
    from safetensors.torch import save

    data = save({"weight": torch.zeros(64)})
    return data[:len(data) - cut]


HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers\n"

CASES = [
    # principles.yaml
    principles_case("principles-a-list-of-strings", "principles.yaml", "principles:\n  - Be ethical.\n  - Be honest.\n",
                    "{path}: principle #1 must be a mapping of number, name, text, got the text 'Be ethical.'"),
    principles_case("principles-a-mapping", "principles.yaml", "principles:\n  ethical: Be ethical.\n",
                    "{path}: 'principles' must be a non-empty list of entries, each with number, name, text; "
                    "got a mapping"),
    principles_case("number-as-text", "principles.yaml", edited("principles.yaml", "number: 1\n", 'number: "1"\n'),
                    "{path}: principle #1 (Ethical): 'number' must be a whole number, got the text '1'"),
    principles_case("name-as-list", "principles.yaml", edited("principles.yaml", "name: Ethical", "name: [Ethical]"),
                    "{path}: principle #1 (['Ethical']): 'name' must be a text, got a list"),
    principles_case("misspelt-field", "principles.yaml", edited("principles.yaml", "    text: >-", "    txt: >-"),
                    "{path}: principle #1 (Ethical): unknown field(s) txt; the fields are number, name, text"),
    principles_case("principles-not-utf8", "principles.yaml", latin1(SHIPPED["principles.yaml"] + "# café\n"),
                    "{path}:%d: not UTF-8 text (byte 0xe9)" % (SHIPPED["principles.yaml"].count("\n") + 1)),
    # exemplars.yaml
    principles_case("markers-a-string", "exemplars.yaml",
                    edited("exemplars.yaml", 'markers: ["Instagram\'s reporting tools", "between former partners"]',
                           'markers: "Instagram"'),
                    "{path}: exemplar #1 (harmful_request): 'markers' must be a list of non-empty texts, got the text "
                    "'Instagram'"),
    principles_case("duplicate-exemplar-id", "exemplars.yaml",
                    edited("exemplars.yaml", "id: real_time_knowledge", "id: harmful_request"),
                    "{path}: exemplar #2 (harmful_request): id 'harmful_request' is used twice"),
    principles_case("answer-a-number", "exemplars.yaml",
                    changed("exemplars.yaml", lambda data: data["exemplars"][1].update(answer=42)),
                    "{path}: exemplar #2 (real_time_knowledge): 'answer' must be a text, got the value 42"),
    principles_case("exemplars-not-utf8", "exemplars.yaml", latin1(SHIPPED["exemplars.yaml"] + "# café\n"),
                    "{path}:%d: not UTF-8 text" % (SHIPPED["exemplars.yaml"].count("\n") + 1)),
    # self_align_template.yaml
    principles_case("rule-with-an-unknown-field", "self_align_template.yaml",
                    edited("self_align_template.yaml", 'rule: "{number} ({name}). {text}"',
                           'rule: "{number} ({name}) [{weight}]. {text}"'),
                    "{path}: template 'rule' cannot be filled in (unknown field {{weight}})"),
    principles_case("refusal-openings-empty", "self_align_template.yaml",
                    changed("self_align_template.yaml", lambda data: data.update(refusal_openings="")),
                    "{path}: 'refusal_openings' must be a list of non-empty texts, got an empty text"),
    principles_case("refusal-openings-a-string", "self_align_template.yaml",
                    changed("self_align_template.yaml", lambda data: data.update(refusal_openings="I'm sorry")),
                    "{path}: 'refusal_openings' must be a list of non-empty texts, got the text \"I'm sorry\""),
    principles_case("template-key-misspelt", "self_align_template.yaml",
                    edited("self_align_template.yaml", "refusal_openings:", "refusal_opening:"),
                    "{path}: unknown key(s) refusal_opening"),
    principles_case("apology-openings-a-string", "self_align_template.yaml",
                    SHIPPED["self_align_template.yaml"].split("apology_openings:")[0] + 'apology_openings: "Sorry"\n',
                    "{path}: 'apology_openings' must be a list of non-empty texts, got the text 'Sorry'"),
    # prompt files (inputs.py)
    prompts_case("prompt-line-a-json-list", '{"id": "a", "prompt": "Hi"}\n["Hello?"]\n',
                 "{path}:2: expected a JSON object with a 'prompt', got a list"),
    prompts_case("prompt-line-a-json-string", '"Hello?"\n',
                 "{path}:1: expected a JSON object with a 'prompt', got the text 'Hello?'"),
    prompts_case("instances-strings", '{"instruction": "Add the numbers.", "instances": ["1 + 1"]}\n',
                 "{path}:1: 'instances' must be a list of objects whose 'input' is a text"),
    prompts_case("prompt-a-number", '{"id": "a", "prompt": 7}\n', "{path}:1: 'prompt' must be a text, got the value 7"),
    prompts_case("prompts-not-utf8", b'{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "caf\xe9?"}\n',
                 "{path}:2: not UTF-8 text (byte 0xe9)"),
    # a model directory (models.py)
    Case("config-json-invalid", {"model/config.json": '{"model_type": "llama",'}, "{path}: not a valid config.json",
         argv=lambda tmp: ["generate", "Hi", "--model", str(tmp / "model")]),
    Case("config-json-a-list", {"model/config.json": "[]"}, "{path}: expected a JSON object with a 'model_type'",
         argv=lambda tmp: ["generate", "Hi", "--model", str(tmp / "model")]),
    # the disk (cli.main)
    Case("stage-directory-read-only", {}, "Read-only file system", argv=lambda tmp: stage_two(tmp)[:-2],
         setup=failing_writes(errno.EROFS)),
    Case("disk-full", {}, "No space left on device", argv=lambda tmp: stage_two(tmp)[:-2],
         setup=failing_writes(errno.ENOSPC)),
    # benchmark files (selfalign/evals/)
    Case("truthfulqa-empty", {"truthfulqa.csv": ""}, "{path}: not a CSV file with a header line",
         loader=lambda tmp: evals.load_truthfulqa(tmp / "truthfulqa.csv"), error=evals.EvalDataError),
    Case("truthfulqa-header-only", {"truthfulqa.csv": HEADER}, "{path} holds no question",
         loader=lambda tmp: evals.load_truthfulqa(tmp / "truthfulqa.csv"), error=evals.EvalDataError),
    Case("truthfulqa-not-utf8", {"truthfulqa.csv": latin1(HEADER + "Adversarial,Food,Is café open?,Yes,Yes,No\n")},
         "{path}:2: not UTF-8 text", loader=lambda tmp: evals.load_truthfulqa(tmp / "truthfulqa.csv"),
         error=evals.EvalDataError),
    Case("hhh-not-json", {"hhh/harmless.json": '{"examples": [\n'}, "{path}:2: not valid JSON",
         loader=lambda tmp: evals.load_hhh(tmp / "hhh", ["harmless"]), error=evals.EvalDataError),
    Case("hhh-no-examples", {"hhh/harmless.json": '{"name": "hhh"}'}, "{path}: expected BIG-bench's task.json",
         loader=lambda tmp: evals.load_hhh(tmp / "hhh", ["harmless"]), error=evals.EvalDataError),
    Case("hhh-one-answer", {"hhh/harmless.json": json.dumps({"examples": [{"input": "Hi",
                                                                             "target_scores": {"Hello": 1}}]})},
         "{path} example 0: expected an 'input' text and 'target_scores' mapping two answers to 1 and 0",
         loader=lambda tmp: evals.load_hhh(tmp / "hhh", ["harmless"]), error=evals.EvalDataError),
    Case("vicuna-not-json", {"vicuna.jsonl": '{"question_id": 1, "turns": ["Hi"]}\nnot json\n'},
         "{path}:2: not valid JSON", loader=lambda tmp: evals.load_vicuna_questions(tmp / "vicuna.jsonl"),
         error=evals.EvalDataError),
    Case("vicuna-turns-a-string", {"vicuna.jsonl": '{"question_id": 1, "turns": "Hi"}\n'},
         "{path}:1: expected an object with a 'question_id' and 'turns', a non-empty list of texts",
         loader=lambda tmp: evals.load_vicuna_questions(tmp / "vicuna.jsonl"), error=evals.EvalDataError),
    # a run's records
    Case("manifest-truncated", {"runs/r/self_align/manifest.json": '{"stage": "self_align", "sta'}, "{path}",
         argv=lambda tmp: ["status", "--run", "r", "--runs-dir", str(tmp / "runs")]),
    *[Case(f"manifest-{name}", {"runs/r/self_align/manifest.json": json.dumps(manifest)},
           "{path}: a stage manifest needs a 'status' (running, finished or failed) and 'params' (an object)",
           argv=lambda tmp: stage_two(tmp)[:-2])
      for name, manifest in [("without-status", {"stage": "self_align", "format_version": 1, "params": {}}),
                             ("params-a-list", {"stage": "self_align", "format_version": 1, "status": "running",
                                                "params": []}),
                             ("without-params", {"stage": "self_align", "format_version": 1, "status": "finished"})]],
    Case("manifest-nested-deep", {"runs/r/self_align/manifest.json": DEEP_JSON}, "{path} is unreadable (nested deeper",
         argv=lambda tmp: ["status", "--run", "r", "--runs-dir", str(tmp / "runs")]),
    Case("response-without-id", {"responses.jsonl": json.dumps({"prompt": "Hi?", "answer": "Hello."}) + "\n"},
         "{path}:1: the record has no 'id'", argv=engrave_on),
    Case("response-without-answer", {"responses.jsonl": json.dumps(GOOD_RESPONSE) + "\n"
                                     + json.dumps({"id": "b", "prompt": "Hi?"}) + "\n"},
         "{path}:2: the record has no 'answer'", argv=engrave_on),
    Case("response-answer-a-number", {"responses.jsonl": json.dumps({**GOOD_RESPONSE, "answer": 7}) + "\n"},
         "{path}:1: its 'answer' must be a text, got 7", argv=engrave_on),
    Case("tagged-response-prompt-a-number",
         {"responses.jsonl": json.dumps({"schema": "response/1", **GOOD_RESPONSE, "prompt": 7, "thoughts": "",
                                         "triggers": [], "provenance": {}}) + "\n"},
         "{path}:1: response/1 record field 'prompt' must be a text, got 7", argv=engrave_on),
    Case("response-ids-repeated", {"responses.jsonl": (json.dumps(GOOD_RESPONSE) + "\n") * 2},
         "{path}:2: id 'a' is used twice (line 1 too): the file is damaged", argv=engrave_on),
    Case("record-a-list", {"responses.jsonl": "[1, 2]\n"}, "{path}:1: expected a JSON object, a record",
         argv=engrave_on),
    Case("record-nested-deep", {"responses.jsonl": DEEP_JSON + "\n"},
         "{path}:1 is not valid JSON: nested deeper than 64 levels", argv=engrave_on),
    # hostile YAML and JSON: refused by the one loader (untrusted.py), the message short
    Case("profile-billion-laughs", {"laughs.yaml": LAUGHS + "all: {seed: *i}\n"},
         "{path}: not valid YAML (found an alias (*name)",
         argv=lambda tmp: ["run", "--direct", "--dry-run", "--profile", str(tmp / "laughs.yaml")]),
    Case("profile-nested-deep", {"deep.yaml": "all:\n  seed: " + DEEP_YAML + "\n"},
         "{path}: not valid YAML (nested deeper than 64 levels",
         argv=lambda tmp: ["run", "--direct", "--dry-run", "--profile", str(tmp / "deep.yaml")]),
    principles_case("principle-name-billion-laughs", "principles.yaml",
                    LAUGHS + edited("principles.yaml", "name: Ethical", "name: *i"),
                    "{path}: not valid YAML (found an alias (*name)"),
    principles_case("principles-nested-deep", "principles.yaml", "principles: " + DEEP_YAML + "\n",
                    "{path}: not valid YAML (nested deeper than 64 levels"),
    principles_case("principle-name-a-long-list", "principles.yaml",
                    edited("principles.yaml", "name: Ethical", "name: [" + ", ".join(["Ethical"] * 100_000) + "]"),
                    "{path}: principle #1 (['Ethical', 'Ethical', 'Ethical', 'Ethical', 'Ethical', ...]): 'name' must "
                    "be a text, got a list"),
    prompts_case("prompt-nested-deep", '{"id": "a", "prompt": ' + DEEP_JSON + "}\n",
                 "{path}:1: not valid JSON (nested deeper than 64 levels)"),
    Case("red-team-types-a-list-of-names", {"types.yaml": "types: [a]\n"},
         "{path}: type #1 must be a mapping of id, name, description, seed_topics, seed_questions, got the text 'a'",
         loader=lambda tmp: load_red_team_types(tmp / "types.yaml"), error=PromptFileError),
    Case("red-team-seed-topics-a-text", {"types.yaml": yaml.safe_dump({"types": [
        {"id": "a", "name": "A", "description": "d", "seed_topics": "fog", "seed_questions": ["Why?"]}]})},
         "{path}: type #1 (a): 'seed_topics' must be a list of non-empty texts, got the text 'fog'",
         loader=lambda tmp: load_red_team_types(tmp / "types.yaml"), error=PromptFileError),
    Case("red-team-types-billion-laughs", {"types.yaml": LAUGHS + "types: *i\n"},
         "{path}: not valid YAML (found an alias (*name)",
         loader=lambda tmp: load_red_team_types(tmp / "types.yaml"), error=PromptFileError),
    Case("vicuna-question-ids-repeated", {"vicuna.jsonl": '{"question_id": 1, "turns": ["Hi"]}\n'
                                                          '{"question_id": 1, "turns": ["Ho"]}\n'},
         "{path}:2: question_id 1 is used twice (line 1 too)",
         loader=lambda tmp: evals.load_vicuna_questions(tmp / "vicuna.jsonl"), error=evals.EvalDataError),
    Case("hhh-nested-deep", {"hhh/harmless.json": DEEP_JSON}, "{path}:1: not valid JSON (nested deeper",
         loader=lambda tmp: evals.load_hhh(tmp / "hhh", ["harmless"]), error=evals.EvalDataError),
    # model and adapter folders (model_files.py), refused before a stage starts
    Case("config-json-a-wrong-type", {"model/config.json": json.dumps({"model_type": "llama", "hidden_size": "big"})},
         "{path}: transformers' llama config refuses it (", argv=generate_with("model")),
    Case("config-json-nested-deep", {"model/config.json": DEEP_JSON}, "{path}: not a valid config.json (nested",
         argv=generate_with("model")),
    Case("model-safetensors-cut-short", {"model/model.safetensors": safetensors_bytes(cut=100),
                                         "model/config.json": json.dumps({"model_type": "llama"})},
         "{path}: cut short or damaged (its header describes", argv=lambda tmp: [*stage_two(tmp)[:-2], "--model",
                                                                                 str(tmp / "model")],
         after=stage_two_is("never started")),
    Case("model-safetensors-empty", {"model/model.safetensors": b"",
                                     "model/config.json": json.dumps({"model_type": "llama"})},
         "{path}: not a whole safetensors file", argv=generate_with("model")),
    Case("adapter-only-pickled", {"adapter/adapter_model.bin": b"pickle", "adapter/adapter_config.json": "{}"},
         "{path}: a pickled adapter, which can run code when loaded; selfalign loads adapter_model.safetensors only",
         argv=lambda tmp: ["generate", "Hi", "--model", "tiny-random", "--adapter", str(tmp / "adapter")]),
    Case("adapter-cut-short", {"adapter/adapter_model.safetensors": safetensors_bytes(cut=1),
                               "adapter/adapter_config.json": "{}"}, "{path}: cut short or damaged",
         argv=lambda tmp: ["generate", "Hi", "--model", "tiny-random", "--adapter", str(tmp / "adapter")]),
    Case("adapter-info-nested-deep", {"adapter/selfalign_adapter.json": DEEP_JSON, "adapter/adapter_config.json": "{}"},
         "{path}: not valid JSON (nested deeper than 64 levels",
         argv=lambda tmp: ["generate", "Hi", "--model", "tiny-random", "--adapter", str(tmp / "adapter")]),
    Case("adapter-info-without-base-shape", {"adapter/selfalign_adapter.json": '{"base_model": "tiny-random"}',
                                             "adapter/adapter_config.json": "{}"},
         "{path}: 'base_shape' must be an object, found 'None'",
         argv=lambda tmp: ["generate", "Hi", "--model", "tiny-random", "--adapter", str(tmp / "adapter")]),
    Case("adapter-info-chat-format-unknown-field",
         {"adapter/selfalign_adapter.json": '{"base_model": "m", "base_shape": {}, "chat_format": {"colour": 1}}',
          "adapter/adapter_config.json": "{}"}, "{path}: 'chat_format' must be an object of ChatFormat's fields",
         argv=lambda tmp: ["generate", "Hi", "--model", "tiny-random", "--adapter", str(tmp / "adapter")]),
    # a full disk whose error names no file: the message names it, the manifest does not stay `running`
    Case("disk-full-on-a-record", {}, "{path}: No space left on device", argv=lambda tmp: stage_two(tmp)[:-2],
         setup=full_disk("calls.jsonl"), after=stage_two_is("failed")),
    Case("disk-full-on-the-manifest-at-restart", {}, "{path}: No space left on device",
         argv=lambda tmp: [*stage_two(tmp)[:-2], "--restart"], setup=full_disk("manifest.json.partial-{pid}"),
         after=stage_two_is("never started")),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_a_bad_file_ends_in_one_line_naming_it(case, tmp_path, capsys, monkeypatch):
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    named = tmp_path / next(iter(case.files)) if case.files else None
    if case.setup:
        named = case.setup(tmp_path, monkeypatch)
    if case.loader:
        with pytest.raises(case.error) as raised:
            case.loader(tmp_path)
        message = str(raised.value)
        assert "\n" not in message
    else:
        assert main(case.argv(tmp_path)) == 1
        # A generating stage's progress bar may come first: a line redrawn after carriage returns.
        message = "\n".join(line for line in capsys.readouterr().err.split("\n") if "\r" not in line)
        assert message.startswith("selfalign: error: ") and message.count("\n") == 1, message
    assert case.expected.format(path=named) in message, message
    assert str(named) in message
    assert len(message) < 1000  # what a message quotes is cut short
    if case.after:
        case.after(tmp_path)


def last_line(err: str) -> str:
    """The error line after what a command printed before it (progress bars, training's output)."""
    lines = [line for line in err.split("\n") if line.strip()]
    assert "Traceback" not in err, err
    return lines[-1]


def test_every_yaml_file_is_read_by_the_one_safe_loader():
    sources = {path: path.read_text(encoding="utf-8") for path in (REPO / "selfalign").rglob("*.py")}
    direct = [path.name for path, text in sources.items()
              if re.search(r"yaml\.(safe_)?load\(|yaml\.(Safe|Full|Unsafe)?Loader\b", text) and path.name != "untrusted.py"]
    assert not direct, f"read YAML with untrusted.yaml_load (no aliases, bounded depth): {direct}"


def test_a_record_whose_seed_is_text_stops_export_naming_the_file_and_line(tmp_path, capsys):
    make_run(tmp_path / "runs")
    responses = tmp_path / "runs" / "r" / "self_align" / "responses.jsonl"
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    rows[1]["provenance"]["seed"] = "seven"
    responses.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["export", "--run", "r", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 1
    assert last_line(capsys.readouterr().err) == (
        f"selfalign: error: {responses}:2: response/1 record field 'provenance.seed' must be a whole number, "
        "got 'seven'")
    assert not (tmp_path / "out").exists()


def test_export_on_a_full_disk_names_the_folder(tmp_path, capsys, monkeypatch):
    import datasets

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    make_run(tmp_path / "runs")
    monkeypatch.setattr(datasets.Dataset, "to_parquet", full)
    assert main(["export", "--run", "r", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 1
    assert last_line(capsys.readouterr().err) == f"selfalign: error: {tmp_path / 'out'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # the half-built folder is gone


def test_engrave_on_a_full_disk_names_the_checkpoint_and_leaves_the_stage_failed(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    (tmp_path / "responses.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."}) + "\n"
        for i in range(6)))
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    argv = [*engrave_on(tmp_path), "--epochs", "1", "--micro-batch-size", "2", "--checkpoint-every", "1",
            "--holdout", "0"]
    assert main(argv) == 1
    checkpoint = tmp_path / "runs" / "r" / "engrave" / "checkpoints" / "step-1"
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"selfalign: error: {checkpoint}: cannot save the checkpoint (Error while serializing: "), line
    assert "No space left on device" in line
    manifest = json.loads((tmp_path / "runs" / "r" / "engrave" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failure"] == line.removeprefix("selfalign: error: ")
