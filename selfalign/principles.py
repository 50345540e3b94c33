"""The principles, the exemplars and the prompt layout of stage 2, and the parser of its outputs.

`load_principle_set()` reads `principles/principles.yaml`, `exemplars.yaml` and
`self_align_template.yaml`, validates them (one error naming the file and the entry) and gives a
`PrincipleSet` with a stable hash that every stage-2 record carries. `render_prompt` lays out the
in-context prompt for a query; `PrincipleSet.without`, `.with_text` and `.with_exemplars` make the
variants that ablations compare. `parse_response` splits a continuation into internal thoughts and
answer and finds which principles the thoughts cite.

Principle numbers are identities, not positions: removing principle 7 leaves a gap, so that
"7 fired" means the same thing in every variant. An exemplar's citations are stored as numbers and
its "I should follow rules ..." sentence is rebuilt from them, so a removed principle disappears
from the exemplars too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .inputs import PRINCIPLES_DIR, check_templates, describe, read_yaml
from .untrusted import shorten

_CITED = re.compile(r"(\d+)\s*\(([^()\n]{1,60})\)")  # "7 (Candor)"
_RULE_LIST = re.compile(r"\brules?\s+((?:\d+(?:\s*\([^()\n]{0,60}\))?(?:\s*(?:,|and|&)\s*)?)+)", re.IGNORECASE)
_RULES_SENTENCE = re.compile(r"\s*I should follow rules?\b[^\n]*$", re.IGNORECASE)


class PrincipleError(ValueError):
    """An invalid principles, exemplars or template file; the message names the file and entry."""


@dataclass(frozen=True)
class Principle:
    number: int
    name: str
    text: str


@dataclass(frozen=True)
class Exemplar:
    id: str
    user: str
    thoughts: str  # without the closing "I should follow rules ..." sentence
    cites: tuple[int, ...]
    answer: str
    markers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrincipleSet:
    principles: tuple[Principle, ...]
    exemplars: tuple[Exemplar, ...]
    template: dict = field(hash=False, compare=False)

    @property
    def numbers(self) -> set[int]:
        return {p.number for p in self.principles}

    def principle(self, number: int) -> Principle:
        return next(p for p in self.principles if p.number == number)

    @property
    def hash(self) -> str:
        """A stable digest of everything that shapes the prompt (principles, exemplars, layout)."""
        data = {"principles": [dataclasses.asdict(p) for p in self.principles],
                "exemplars": [dataclasses.asdict(e) for e in self.exemplars],
                "template": {k: self.template[k] for k in sorted(self.template)}}
        return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]

    def without(self, *numbers: int) -> "PrincipleSet":
        missing = set(numbers) - self.numbers
        if missing:
            raise PrincipleError(f"no principle numbered {sorted(missing)}")
        kept = tuple(p for p in self.principles if p.number not in numbers)
        exemplars = tuple(dataclasses.replace(e, cites=tuple(c for c in e.cites if c not in numbers))
                          for e in self.exemplars)
        return dataclasses.replace(self, principles=kept, exemplars=exemplars)

    def with_text(self, number: int, text: str) -> "PrincipleSet":
        if number not in self.numbers:
            raise PrincipleError(f"no principle numbered {number}")
        if not text.strip():
            raise PrincipleError(f"principle {number}: empty text")
        edited = tuple(dataclasses.replace(p, text=text.strip()) if p.number == number else p for p in self.principles)
        return dataclasses.replace(self, principles=edited)

    def with_exemplars(self, ids: list[str]) -> "PrincipleSet":
        by_id = {e.id: e for e in self.exemplars}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise PrincipleError(f"no exemplar {unknown}; known: {list(by_id)}")
        return dataclasses.replace(self, exemplars=tuple(by_id[i] for i in ids))


_TEMPLATE_NEEDS = {
    "preamble": [], "rule": ["{number}", "{name}", "{text}"], "examples_heading": [],
    "user_turn": ["{text}"], "thoughts_turn": ["{assistant}", "{text}"], "answer_turn": ["{assistant}", "{text}"],
    "rules_sentence": ["{rules}"], "closing": [],
}


def load_principle_set(principles: str | Path = PRINCIPLES_DIR / "principles.yaml",
                       exemplars: str | Path = PRINCIPLES_DIR / "exemplars.yaml",
                       template: str | Path = PRINCIPLES_DIR / "self_align_template.yaml") -> PrincipleSet:
    template_data = _read_yaml(template)
    unknown = sorted(map(str, set(template_data) - set(_TEMPLATE_NEEDS) - set(_OPENINGS)))
    if unknown:  # a misspelt key would silently fall back to its default
        raise PrincipleError(f"{template}: unknown key(s) {', '.join(unknown)}; the keys are "
                             f"{', '.join([*_TEMPLATE_NEEDS, *_OPENINGS])}")
    check_templates(template, template_data, _TEMPLATE_NEEDS, PrincipleError)
    for key in ("user_turn", "thoughts_turn", "answer_turn"):
        if not re.match(r"^[^{}\n]*\{assistant\}|^User:", template_data[key]):
            raise PrincipleError(f"{template}: '{key}' must start with its role marker")
    for key in _OPENINGS:
        # A lone string would be read as one opening per character, dropping nearly every answer.
        _check(f"{template}: '{key}'", template_data.setdefault(key, []), "texts")

    parsed, seen, names = [], set(), set()
    for where, row in _entries(principles, "principles", "principle", ("number", "name", "text")):
        _check(f"{where}: 'number'", row.get("number"), "number")
        if row["number"] in seen:
            raise PrincipleError(f"{where}: number {row['number']} is used twice")
        for key in ("name", "text"):
            _check(f"{where}: '{key}'", row.get(key, ""), "text")
        if not row.get("name", "").strip() or not row.get("text", "").strip():
            raise PrincipleError(f"{where}: empty name or text")
        if _normal(row["name"]) in names:  # citations are read by name as well as by number
            raise PrincipleError(f"{where}: name {shorten(row['name'])!r} is used twice")
        seen.add(row["number"])
        names.add(_normal(row["name"]))
        parsed.append(Principle(row["number"], row["name"].strip(), " ".join(row["text"].split())))
    # Filled in only once a model is loaded: one bad {field} would fail there, after minutes.
    first = parsed[0]
    for key, fields in (("rule", {"number": first.number, "name": first.name, "text": first.text}),
                        ("rules_sentence", {"rules": f"{first.number} ({first.name})"})):
        try:
            template_data[key].format(**fields)
        except (KeyError, IndexError, AttributeError, ValueError) as error:
            problem = f"unknown field {{{error.args[0]}}}" if isinstance(error, KeyError) else str(error)
            raise PrincipleError(f"{template}: template '{key}' cannot be filled in ({problem}); its fields are "
                                 f"{', '.join('{' + f + '}' for f in fields)}, and a literal brace is written twice")

    examples, ids = [], set()
    known = PrincipleSet(tuple(parsed), (), template_data)  # to read exemplar citations as model output is read
    fields = ("id", "user", "thoughts", "answer", "markers")
    for where, row in _entries(exemplars, "exemplars", "exemplar", fields):
        for key in fields[:4]:
            _check(f"{where}: '{key}'", row.get(key, ""), "text")
        markers = [] if row.get("markers") is None else row["markers"]  # "markers:" left blank: none
        _check(f"{where}: 'markers'", markers, "texts")
        missing = [k for k in fields[:4] if not row.get(k, "").strip()]
        if missing:
            raise PrincipleError(f"{where}: empty {', '.join(missing)}")
        if row["id"] in ids:
            raise PrincipleError(f"{where}: id {shorten(row['id'])!r} is used twice")
        ids.add(row["id"])
        thoughts = " ".join(row["thoughts"].split())
        sentence = _RULES_SENTENCE.search(thoughts)
        if not sentence:
            raise PrincipleError(f"{where}: thoughts must end with 'I should follow rules ...'")
        cites, unknown = _citations(known, sentence.group())
        if unknown or not cites:
            numbers = sorted({int(label.split()[0]) for label in unknown})
            raise PrincipleError(f"{where}: cites {numbers or 'no'} principle(s) not in {principles}")
        examples.append(Exemplar(row["id"], row["user"].strip(), thoughts[: sentence.start()].strip(),
                                 tuple(cites), row["answer"].strip(), tuple(markers)))
    return PrincipleSet(tuple(parsed), tuple(examples), template_data)


_OPENINGS = ("refusal_openings", "apology_openings")


def _read_yaml(path) -> dict:
    return read_yaml(path, PrincipleError)


def _entries(path, key: str, entry: str, fields: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(where, entry) for each entry of the file's `key:` list: a non-empty list of mappings that
    hold no field but `fields` (a misspelt one would silently be left out)."""
    data = _read_yaml(path)
    if key not in data:
        raise PrincipleError(f"{path}: expected a '{key}:' list")
    extra = sorted(map(str, set(data) - {key}))
    if extra:
        raise PrincipleError(f"{path}: unknown key(s) {', '.join(extra)}; the file holds only a '{key}:' list")
    rows = data[key]
    if not isinstance(rows, list) or not rows:
        raise PrincipleError(f"{path}: '{key}' must be a non-empty list of entries, each with "
                             f"{', '.join(fields)}; got {describe(rows)}")
    found = []
    for index, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise PrincipleError(f"{path}: {entry} #{index} must be a mapping of {', '.join(fields)}, "
                                 f"got {describe(row)}")
        where = f"{path}: {entry} #{index} ({shorten(row.get('name', row.get('id', '?')))})"
        unknown = sorted(map(str, set(row) - set(fields)))
        if unknown:
            raise PrincipleError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(fields)}")
        found.append((where, row))
    return found


def _check(where: str, value, kind: str) -> None:
    """`value` is of `kind`: "number" (an integer), "text" (a string, maybe empty) or "texts" (a
    list of non-empty strings). YAML reads `1.5`, `yes` or `[a, b]` as what they look like."""
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int):
            raise PrincipleError(f"{where} must be a whole number, got {describe(value)}")
    elif kind == "texts":
        if not isinstance(value, list):
            raise PrincipleError(f"{where} must be a list of non-empty texts, got {describe(value)}")
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise PrincipleError(f"{where} must be a list of non-empty texts, but it holds {describe(item)}")
    elif not isinstance(value, str):
        raise PrincipleError(f"{where} must be a text, got {describe(value)}")


def citation_label(principle_set: PrincipleSet, number: int) -> str:
    """How a citation is written in the exemplars' rules sentence: "7 (Candor)"."""
    return f"{number} ({principle_set.principle(number).name})"


def rules_sentence(principle_set: PrincipleSet, cites) -> str:
    names = [citation_label(principle_set, n) for n in cites if n in principle_set.numbers]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return principle_set.template["rules_sentence"].format(rules=listed) if names else ""


def render_prefix(principle_set: PrincipleSet, assistant: str) -> str:
    """Everything before the user's query: preamble, rules and exemplar dialogues. The same for
    every query, so the engine can compute its key/value cache once.

    It ends at the last exemplar's closing line, not at the blank line after it, so that the whole
    prompt's tokens start with the prefix's own for every tokenizer: a byte-level BPE (the embedded
    model's) writes a blank line at the end of a text as one token but as two before "User:", which
    is how the exemplars' turns read."""
    t = principle_set.template

    def fill(text: str) -> str:
        return text.replace("{assistant}", assistant).replace("{name}", assistant)

    parts = [fill(t["preamble"]), ""]
    parts += [t["rule"].format(number=p.number, name=p.name, text=p.text) for p in principle_set.principles]
    parts += ["", t["examples_heading"]]
    for e in principle_set.exemplars:
        thoughts = " ".join(x for x in (e.thoughts, rules_sentence(principle_set, e.cites)) if x)
        parts += ["", fill(t["user_turn"].replace("{text}", e.user)), "",
                  fill(t["thoughts_turn"].replace("{text}", thoughts)), "",
                  fill(t["answer_turn"].replace("{text}", fill(e.answer))), "", fill(t["closing"])]
    return "\n".join(parts)


def render_prompt(principle_set: PrincipleSet, query: str, assistant: str = "Watson") -> str:
    """The whole in-context prompt; the model continues right after the internal-thoughts marker."""
    t = principle_set.template
    thoughts_marker = t["thoughts_turn"].split("{text}")[0].replace("{assistant}", assistant).rstrip()
    return (render_prefix(principle_set, assistant) + "\n\n" + t["user_turn"].replace("{text}", query.strip())
            + "\n\n" + thoughts_marker)


@dataclass
class Parsed:
    thoughts: str
    answer: str
    triggers: list[int]  # principles cited, in order of first mention
    unknown_citations: list[str]  # numbers cited that the set lacks ("19", or "5 (Creative)" for a mismatch)
    has_answer_marker: bool
    cut_at_repeat: bool
    answer_closed: bool = False  # the answer ended at a following turn marker, so a cut-off after it is harmless


def _normal(name: str) -> str:
    return re.sub(r"[^a-z]+", " ", name.lower()).strip()


def parse_response(principle_set: PrincipleSet, completion: str, assistant: str = "Watson") -> Parsed:
    """Split a continuation of `render_prompt` into thoughts and answer, and find the citations."""
    t = principle_set.template
    answer_prefix = t["answer_turn"].split("{text}")[0].replace("{assistant}", assistant).strip()
    user_prefix = t["user_turn"].split("{text}")[0].strip()
    # Markers count only at the start of a line: "Watson:" inside a sentence is text.
    marker = re.compile(r"^[ \t]*" + re.escape(answer_prefix) + r"[ \t]*", re.MULTILINE)
    found = marker.search(completion)
    if not found:
        return Parsed(completion.strip(), "", *_citations(principle_set, completion), False, False)
    thoughts, answer = completion[: found.start()].strip(), completion[found.end():]
    # Any later turn ends the answer: the user's, or any of the assistant's ("Watson:", "Watson (auto reply):").
    ends = re.compile(r"^[ \t]*(?:" + re.escape(user_prefix) + "|" + re.escape(assistant) + r"[ \t]*[(:])",
                      re.MULTILINE)
    next_turn = ends.search(answer)
    if next_turn:
        answer = answer[: next_turn.start()]
    answer, cut = _cut_at_repeat(answer.strip())
    return Parsed(thoughts, answer, *_citations(principle_set, thoughts), True, cut, next_turn is not None)


def _citations(principle_set: PrincipleSet, thoughts: str) -> tuple[list[int], list[str]]:
    names = {_normal(p.name): p.number for p in principle_set.principles}
    triggers: list[int] = []
    unknown: list[str] = []

    def cite(number: int, label: str) -> None:
        if number in principle_set.numbers:
            if number not in triggers:
                triggers.append(number)
        else:
            mismatch(label)

    def mismatch(label: str) -> None:
        if label not in unknown:
            unknown.append(label)

    for listing in _RULE_LIST.finditer(thoughts):
        for item in re.finditer(r"(\d+)(?:\s*\(([^()\n]*)\))?", listing.group(1)):
            number, name = int(item.group(1)), item.group(2)
            if name is not None and names.get(_normal(name)) not in (None, number):
                mismatch(f"{number} ({name})")  # a number and a name that disagree
            else:
                cite(number, str(number))
    # "N (Name)" outside a "rules ..." list counts only when the name is a principle's name, so
    # "3 (three apples)" is arithmetic, not a citation.
    for item in _CITED.finditer(thoughts):
        number, name = int(item.group(1)), _normal(item.group(2))
        if names.get(name) == number:
            cite(number, str(number))
        elif name in names:
            mismatch(f"{number} ({item.group(2)})")
    return triggers, unknown


def _cut_at_repeat(answer: str) -> tuple[str, bool]:
    """Cut the answer before the first sentence that repeats an earlier one (a looping model)."""
    seen = set()
    for match in re.finditer(r"[^.!?\n]+[.!?]*", answer):
        sentence = " ".join(match.group().split()).lower()
        if len(sentence) < 12:  # short fragments ("Yes.", list numbers) repeat legitimately
            continue
        if sentence in seen:
            return answer[: match.start()].rstrip(), True
        seen.add(sentence)
    return answer, False
