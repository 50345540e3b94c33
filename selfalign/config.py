"""Stage settings are dataclasses; this turns one into command-line flags and back.

The notebooks' `parameters` cells and the CLI are two views of the same dataclass, so a setting
has one name, one default and one type everywhere. The fields every stage repeats are declared
once here: `StageSettings` (where a run lives, which model, the seed, restart),
`ReplicaSettings` (how many model replicas generate, and on which Ray cluster) and
`GenerationSettings` (those, batching and the backend of the stages that generate).

`check_ranges` is the one check of a setting's range: each stage config calls it when it is built
(from the command line, a profile, a notebook's parameters or Python), so a bad value stops a
command before a model loads or a file is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Iterable

from .models import DEFAULT_MODEL


@dataclass
class StageSettings:
    run: str = "demo"  # run name: a stage reads and writes <runs_dir>/<run>/<stage>/
    runs_dir: str = "runs"
    model: str = DEFAULT_MODEL  # the base model: a registered name, a model directory or a hub id
    seed: int = 0
    restart: bool = False  # move this stage's earlier results to <stage>.previous/ and start again


@dataclass
class ReplicaSettings:
    # How many model replicas generate at once, each a Ray actor (generation/replicas.py); 1 needs no Ray.
    replicas: int = 1
    ray_address: str = ""  # the Ray cluster to join; "": $RAY_ADDRESS if set, else a local Ray started here


@dataclass
class GenerationSettings(ReplicaSettings, StageSettings):  # this order puts run, model, ... first
    # Prompts decoded together. On a CPU the weights are read once a step for the whole batch: the
    # embedded model decoded 2x the tokens/s at 16 as at 8 (benchmarks/RESULTS.md, stop 17).
    batch_size: int = 16
    backend: str = "hf"  # "hf" (transformers generate), "hf-static" (static cache, compiled on CUDA), "vllm"
    tensor_parallel_size: int = 1  # GPUs vLLM splits the model over (backend "vllm" only)


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


SHARED_SIZES = ("batch_size", "tensor_parallel_size", "replicas")  # the sizes of the shared settings above


def range_problems(config, non_negative: Iterable[str] = (), positive: Iterable[str] = (),
                   probabilities: Iterable[str] = (), non_empty: Iterable[str] = ()) -> list[str]:
    """What is out of range in a settings dataclass, one phrase a setting, naming it and its value.

    Every int field must hold a whole number and every float field a finite one (`--temperature
    inf` would be written into the records as `Infinity`), whether or not it is named. Then: counts,
    limits and budgets in `non_negative` (where 0 keeps a meaning, such as limit 0 = all), sizes in
    `positive` and in `SHARED_SIZES` (where the config has them), probabilities and thresholds in
    (0, 1], and lists in `non_empty`."""
    hints = typing.get_type_hints(type(config))
    problems, bad = [], set()
    for field in dataclasses.fields(config):
        kind, value = hints[field.name], getattr(config, field.name)
        if kind not in (int, float):
            continue
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            problems.append(f"{field.name} must be a {'whole ' if kind is int else ''}number, got {value!r}")
        elif not math.isfinite(value):
            problems.append(f"{field.name} must be a finite number, got {value!r}")
        else:
            continue
        bad.add(field.name)
    positive = [*positive, *(name for name in SHARED_SIZES if hasattr(config, name) and name not in positive)]
    rules = ((non_negative, lambda v: v >= 0, ">= 0"), (positive, lambda v: v > 0, "> 0"),
             (probabilities, lambda v: 0 < v <= 1, "in (0, 1]"))
    for names, ok, rule in rules:
        for name in names:
            value = getattr(config, name)
            if name in bad:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{name} must be a number, got {value!r}")
            elif not ok(value):
                problems.append(f"{name} must be {rule}, got {value!r}")
    problems += [f"{name} must not be empty" for name in non_empty if not getattr(config, name)]
    return problems


def check_ranges(config, non_negative: Iterable[str] = (), positive: Iterable[str] = (),
                 probabilities: Iterable[str] = (), non_empty: Iterable[str] = ()) -> None:
    """ValueError, one line, listing `range_problems`; stage configs call it from `__post_init__`."""
    problems = range_problems(config, non_negative, positive, probabilities, non_empty)
    if problems:
        raise ValueError("; ".join(problems))
