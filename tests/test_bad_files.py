"""A bad input file ends the command with one `selfalign: error:` line that names the file (and the
line, where there is one), exit code 1, no traceback; a loader raises its module's error class."""

import builtins
import errno
import io
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import pytest
import yaml

from selfalign import evals
from selfalign.cli import main
from selfalign.inputs import PRINCIPLES_DIR

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
            "--prompts", str(prompts)]
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
        message = capsys.readouterr().err
        assert message.startswith("selfalign: error: ") and message.count("\n") == 1, message
    assert case.expected.format(path=named) in message, message
    assert str(named) in message
