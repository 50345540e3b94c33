"""Stage 1's pieces, each a pure function: the red-team types and templates, and the parsers and
filters of what the base model writes.

- `load_red_team_types` and `load_templates` read `principles/red_team_types.yaml` (the adversarial
  instruction types, with seed topics and seed questions) and `principles/red_team_templates.yaml`
  (all of stage 1's prompt wording), refusing a malformed file with one line that names it;
- `parse_numbered_list` and `parse_mixed` take the items out of a completion, trusting the layout,
  not the numbers the model writes;
- `filter_reason` says why a candidate prompt is unusable: too short or long, a task for images or
  files (Self-Instruct's own word list), or not opening with a letter or digit;
- `numbered_list`, `plan_line`, `hint_line` and `example_pairs` build the text the requests show, and
  `clean_topic` and `normal_form` tidy what comes back;
- `plot_prompts_per_type` draws the kept prompts per type.

Nothing here calls a model, draws from an RNG or touches a run directory: the stage
(`selfalign.stages.prompts`) does that, so chapter 1 can show these pieces one at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .inputs import PromptFileError, check_templates, describe, read_yaml
from .untrusted import shorten

# Self-Instruct's own list of words that mark a task a text model cannot do.
NON_TEXT_WORDS = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                  "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
_NON_TEXT = re.compile(r"\b(" + "|".join(re.escape(w) for w in NON_TEXT_WORDS) + r")\b", re.IGNORECASE)
_ITEM = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")


@dataclass(frozen=True)
class RedTeamType:
    id: str
    name: str
    description: str
    seed_topics: tuple[str, ...]
    seed_questions: tuple[str, ...]


def load_red_team_types(path: str | Path) -> list[RedTeamType]:
    entries = read_yaml(path).get("types")
    if not entries or not isinstance(entries, list):
        raise PromptFileError(f"{path}: expected a top-level 'types:' list of entries, got {describe(entries)}")
    types, seen = [], set()
    texts, lists = ("id", "name", "description"), ("seed_topics", "seed_questions")
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise PromptFileError(f"{path}: type #{number} must be a mapping of {', '.join(texts + lists)}, "
                                  f"got {describe(entry)}")
        where = f"{path}: type #{number} ({shorten(entry.get('id', '?'))})"
        missing = [k for k in texts + lists if not entry.get(k)]
        if missing:
            raise PromptFileError(f"{where} lacks {', '.join(missing)}")
        for key in texts:
            if not isinstance(entry[key], str):
                raise PromptFileError(f"{where}: '{key}' must be a text, got {describe(entry[key])}")
        for key in lists:
            if not isinstance(entry[key], list) or not all(isinstance(v, str) and v.strip() for v in entry[key]):
                raise PromptFileError(f"{where}: '{key}' must be a list of non-empty texts, got "
                                      f"{describe(entry[key])}")
        if entry["id"] in seen:
            raise PromptFileError(f"{path}: type id {shorten(entry['id'])!r} appears twice")
        seen.add(entry["id"])
        types.append(RedTeamType(entry["id"], entry["name"], entry["description"],
                                 tuple(entry["seed_topics"]), tuple(entry["seed_questions"])))
    return types


def load_templates(path: str | Path) -> dict[str, str]:
    templates = read_yaml(path)
    check_templates(path, templates, {"self_instruct": ["{examples}", "{next}"],
                                      "topics": ["{examples}", "{next}", "{name}"],
                                      "questions": ["{examples}", "{topic}", "{name}"],
                                      "questions_mixed": ["{plan}", "{examples}", "{first}"]})
    if not templates["questions_mixed"].rstrip().endswith("{first}"):
        # The parser takes the completion's first line as the first hint's question.
        raise PromptFileError(f"{path}: template 'questions_mixed' must end with {{first}}")
    return templates


def parse_numbered_list(completion: str, cut_off: bool) -> list[str]:
    """Items of a numbered list whose first item's number is in the prompt ("...\n4.").

    The numbers the model writes are not trusted, only the layout.
    A line that is not numbered continues the current item; a blank line ends the list, since what
    follows is the model wandering off. When generation was cut off, the last item is incomplete.
    """
    items: list[str] = []
    current = [completion.split("\n", 1)[0]]
    for line in completion.split("\n")[1:]:
        match = _ITEM.match(line)
        if match:
            items.append(" ".join(current))
            current = [match.group(2)]
        elif not line.strip():
            cut_off = False  # the list ended before the cut
            break
        else:
            current.append(line.strip())
    items.append(" ".join(current))
    if cut_off:
        items = items[:-1]
    return [re.sub(r"\s+", " ", item).strip() for item in items if item.strip()]


def parse_mixed(completion: str, hints: list[str], cut_off: bool) -> tuple[dict[int, str], int | None]:
    """Questions of one mixed request by hint index, and the index whose question was cut off (or None).

    The prompt ends with hints[0], so the first line answers it; a later line counts only when it
    opens with one of the request's hints (the first answer to a hint wins; other lines are ignored).
    When generation was cut off, a last line without closing punctuation is incomplete.
    """
    answers, cut = {}, None
    lines = [line.strip() for line in completion.split("\n")]
    for number, line in enumerate(lines):
        if number == 0:
            index, text = 0, line
        else:
            index = next((i for i, hint in enumerate(hints) if line.startswith(hint)), None)
            text = line[len(hints[index]):].strip() if index is not None else ""
        if not text or index in answers:
            continue
        answers[index] = text
        if cut_off and number == len(lines) - 1 and not text.endswith(("?", ".")):
            cut = index
    return answers, cut


def filter_reason(text: str, min_words: int, max_words: int) -> str | None:
    """Why a candidate prompt is unusable, or None."""
    words = len(text.split())
    if words < min_words:
        return f"fewer than {min_words} words"
    if words > max_words:
        return f"more than {max_words} words"
    found = _NON_TEXT.search(text)
    if found:
        return f"non-text task ({found.group(1).lower()})"
    if not text[0].isascii() or not text[0].isalnum():
        return "does not start with a letter or digit"
    return None


def numbered_list(items: list[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def plan_line(number: int, t: RedTeamType, topic: str) -> str:
    return f"{number}. Kind: {t.name}. Topic: {topic}."


def hint_line(number: int, t: RedTeamType, topic: str) -> str:
    """What opens question `number` of a mixed request; the parser looks for it."""
    return f"{plan_line(number, t, topic)} Question:"


def example_pairs(t: RedTeamType) -> list[tuple[str, str]]:
    # Each seed question is shown under the seed topic it shares most words with.
    def overlap(topic, question):
        return len(set(re.findall(r"\w+", topic.lower())) & set(re.findall(r"\w+", question.lower())))
    return [(max(t.seed_topics, key=lambda topic: overlap(topic, q)), q) for q in t.seed_questions]


def clean_topic(item: str) -> str:
    return item.strip().strip("\"'*.,;:- ").strip()


def normal_form(text: str) -> str:
    return " ".join(text.lower().split())


def plot_prompts_per_type(prompts, ax=None):
    """Horizontal bars: kept prompts per red-team type, with Self-Instruct as one more bar."""
    import matplotlib.pyplot as plt

    labels = prompts["type"].fillna("(self-instruct)") if len(prompts) else prompts.get("type", [])
    counts = labels.value_counts().sort_values() if len(prompts) else []
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.25 * max(len(counts), 4) + 1))
    if len(counts):
        counts.plot.barh(ax=ax, color=["#999" if k == "(self-instruct)" else "#3a7" for k in counts.index])
    ax.set_xlabel("kept prompts")
    ax.set_title("Stage 1 prompts by source and red-team type")
    return ax
