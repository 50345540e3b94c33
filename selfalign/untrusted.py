"""Parsing text that a person may have edited by hand, or planted: JSON and YAML nested at most
`MAX_DEPTH` deep, YAML without aliases, and values cut short before a message quotes them.

A file nested thousands of levels deep ends Python's parsers in a RecursionError that names no
file; a YAML "billion laughs" (anchors whose aliases expand to 10^9 items) costs nothing to load
but gigabytes to print, and an error message prints what it found. None of our files needs either:
they are a few levels deep and use no aliases. A refusal is raised as the parser's own error
(`json.JSONDecodeError`, `yaml.YAMLError`), so each caller's message, naming its file (and line),
stays as it is. This module reads no file and imports nothing of ours.
"""

from __future__ import annotations

import json

import yaml

MAX_DEPTH = 64  # our deepest file (a profile, a manifest's params) is under 10 levels


def json_loads(text: str):
    """`json.loads`, refusing nesting deeper than MAX_DEPTH with a `json.JSONDecodeError`."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", text, 0) from None
    # Counting brackets is cheap; only a text with many walks the value.
    if text.count("[") + text.count("{") > MAX_DEPTH and _too_deep(value):
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", text, 0)
    return value


def _too_deep(value) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (`*name`) and nesting deeper than MAX_DEPTH where it
    composes the document, before anything is built."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "found an alias (*name): selfalign reads YAML without "
                                              "anchors and aliases; write the value out", self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def yaml_load(text: str, name: str = "<text>"):
    """`yaml.safe_load` without aliases and with bounded nesting; a refusal is a `yaml.YAMLError`
    whose position names `name` (a file's name) and its line."""
    loader = _Loader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's text on one line, cut at `limit` characters: a message quotes what it found."""
    return shorten(" ".join(str(error).split()), limit)


def shorten(text, limit: int = 60) -> str:
    """`text` (or a value's repr) cut to `limit` characters, with "..." where it was cut."""
    text = text if isinstance(text, str) else _repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def quote(value, limit: int = 60) -> str:
    """A value as Python writes it ('seven', 7, [1, 2]), cut to `limit` characters."""
    return shorten(_repr(value), limit)


def _repr(value, depth: int = 0) -> str:
    # The repr of a huge value is huge: a container shows its first few items, two levels deep.
    if not isinstance(value, (list, tuple, dict)):
        return repr(value[:200]) if isinstance(value, str) else repr(value)[:200]
    brackets = "{}" if isinstance(value, dict) else "[]"
    if depth >= 2 and value:
        return brackets[0] + "..." + brackets[1]
    if isinstance(value, dict):
        items = [f"{_repr(k, depth + 1)}: {_repr(v, depth + 1)}" for k, v in list(value.items())[:5]]
    else:
        items = [_repr(v, depth + 1) for v in list(value[:5])]
    return brackets[0] + ", ".join(items + (["..."] if len(value) > 5 else [])) + brackets[1]
