"""Stage settings are dataclasses; this turns one into command-line flags and back.

The notebooks' `parameters` cells and the CLI are two views of the same dataclass, so a setting
has one name, one default and one type everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def add_arguments(parser: argparse.ArgumentParser, config_class) -> None:
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="*", default=default, metavar=field.name.upper(),
                                help=f"default: {list(default)}")
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"default: {default!r}")


def from_args(config_class, namespace: argparse.Namespace):
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_class)}
    return from_mapping(config_class, values)


def from_mapping(config_class, values: dict):
    """Build a config from a dict (papermill parameters, YAML), refusing unknown keys."""
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} settings {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(config_class)
    converted = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in values.items()}
    return config_class(**converted)
