"""Read prompt files: this project's seed prompts, Self-Instruct seed tasks, and stage outputs.

Every format comes out as the same list of `{"id", "prompt", ...}` dicts, so a stage never cares
where its prompts came from. Self-Instruct's `seed_tasks.jsonl` has an `instruction` and a list
of `instances` whose `input` (possibly empty) is appended on its own line, as Self-Instruct did.

`read_text`, `read_yaml` and `check_templates` are the readers every module uses for the files in
`principles/`: a file that is not UTF-8, not YAML (or YAML with aliases or nested too deep:
`untrusted`) or not of the expected shape raises the caller's error class with one line that names
the file (and the line, where there is one).
"""

from __future__ import annotations

import json
from pathlib import Path

from .untrusted import json_loads, one_line, yaml_load

PRINCIPLES_DIR = Path(__file__).resolve().parents[1] / "principles"


class PromptFileError(ValueError):
    pass


def read_text(path: str | Path, error: type[ValueError] = PromptFileError) -> str:
    """A UTF-8 text file's contents (a byte-order mark dropped), or `error` naming the file and the
    line of the first byte that is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as problem:
        line = raw.count(b"\n", 0, problem.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {raw[problem.start]:#04x}); save the file as UTF-8") from None


def describe(value) -> str:
    """A value as an error message shows what was found instead: "the text 'Instagram'", "a list"."""
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return f"the text {value[:40]!r}" if value.strip() else "an empty text"
    if isinstance(value, (bool, int, float)):
        return f"the value {value!r}"
    return {list: "a list", dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")


def read_yaml(path: str | Path, error: type[ValueError] = PromptFileError) -> dict:
    """A YAML file holding a mapping, or `error` naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist")
    try:
        data = yaml_load(read_text(path, error), path.name)
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid YAML ({one_line(problem)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {describe(data)}")
    return data


def check_templates(path, templates: dict, needs: dict[str, list[str]], error: type[ValueError] = PromptFileError):
    """Each template in `needs` is a text holding the {fields} the code fills or the parser relies on."""
    for key, fields in needs.items():
        text = templates.get(key)
        if text is None:
            raise error(f"{path}: template '{key}' is missing")
        if not isinstance(text, str):
            raise error(f"{path}: template '{key}' must be a text, got {describe(text)}")
        absent = [f for f in fields if f not in text]
        if absent:
            raise error(f"{path}: template '{key}' lacks {', '.join(absent)}")


def load_prompts(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    prompts, seen = [], set()
    # Split on newlines only: str.splitlines would also split inside a JSON string holding U+2028.
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json_loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{where}: expected a JSON object with a 'prompt', got {describe(row)}")
        prompt = _prompt_text(row, where)
        if not prompt:
            raise PromptFileError(f"{where}: no 'prompt' or 'instruction' text")
        key = row.get("id", f"line-{number}")
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise PromptFileError(f"{where}: 'id' must be a text or a whole number, got {describe(key)}")
        key = str(key)
        if key in seen:
            raise PromptFileError(f"{where}: duplicate id {key!r}")
        seen.add(key)
        prompts.append({**row, "id": key, "prompt": prompt})
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts


def _prompt_text(row: dict, where: str) -> str:
    if row.get("prompt") is not None:
        if not isinstance(row["prompt"], str):
            raise PromptFileError(f"{where}: 'prompt' must be a text, got {describe(row['prompt'])}")
        return row["prompt"].strip()
    instruction = row.get("instruction", "")
    if not isinstance(instruction, str):
        raise PromptFileError(f"{where}: 'instruction' must be a text, got {describe(instruction)}")
    instances = row.get("instances") or []
    bad = [i for i in instances if not (isinstance(i, dict) and isinstance(i.get("input", ""), str))] \
        if isinstance(instances, list) else [instances]
    if bad:
        found = f"a list holding {describe(bad[0])}" if isinstance(instances, list) else describe(instances)
        raise PromptFileError(f"{where}: 'instances' must be a list of objects whose 'input' is a text "
                              f"(Self-Instruct's seed_tasks.jsonl layout), got {found}")
    first_input = instances[0].get("input", "").strip() if instances else ""
    instruction = instruction.strip()
    return f"{instruction}\n{first_input}" if instruction and first_input else instruction
