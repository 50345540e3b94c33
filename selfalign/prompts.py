"""Read prompt files: this project's seed prompts, Self-Instruct seed tasks, and stage outputs.

Every format comes out as the same list of `{"id", "prompt", ...}` dicts, so a stage never cares
where its prompts came from. Self-Instruct's `seed_tasks.jsonl` has an `instruction` and a list
of `instances` whose `input` (possibly empty) is appended on its own line, as Self-Instruct did.
"""

from __future__ import annotations

import json
from pathlib import Path

PRINCIPLES_DIR = Path(__file__).resolve().parents[1] / "principles"


class PromptFileError(ValueError):
    pass


def read_yaml(path: str | Path, error: type[ValueError] = PromptFileError) -> dict:
    """A YAML file holding a mapping, or `error` naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return data


def check_templates(path, templates: dict, needs: dict[str, list[str]], error: type[ValueError] = PromptFileError):
    """Each template in `needs` exists and holds the {fields} the code fills or the parser relies on."""
    for key, fields in needs.items():
        text = templates.get(key)
        if not isinstance(text, str):
            raise error(f"{path}: template '{key}' is missing")
        absent = [f for f in fields if f not in text]
        if absent:
            raise error(f"{path}: template '{key}' lacks {', '.join(absent)}")


def load_prompts(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    prompts, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            prompt = _prompt_text(row)
            if not prompt:
                raise PromptFileError(f"{path}:{number}: no 'prompt' or 'instruction' text")
            key = str(row.get("id", f"line-{number}"))
            if key in seen:
                raise PromptFileError(f"{path}:{number}: duplicate id {key!r}")
            seen.add(key)
            prompts.append({**row, "id": key, "prompt": prompt})
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts


def _prompt_text(row: dict) -> str:
    if isinstance(row.get("prompt"), str):
        return row["prompt"].strip()
    instruction = str(row.get("instruction", "")).strip()
    instances = row.get("instances") or []
    first_input = str(instances[0].get("input", "")).strip() if instances else ""
    return f"{instruction}\n{first_input}" if instruction and first_input else instruction
