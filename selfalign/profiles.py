"""Run profiles: the settings of every stage of a run, from one YAML file and the command line.

A profile (`profiles/<name>.yaml`, or any YAML file) is keyed by stage, as `selfalign stage NAME`
names them, with two more sections:

    all:        {model: /data/llama-65b}          # every stage (and chapter) that has the setting
    self-align: {limit: 0, max_new_tokens: 256}   # one stage's dataclass fields
    engrave:    {total_batch_size: 768}
    chapters:   {loo_prompts: 64}                 # the book's own parameters, not a stage's

`resolve` builds each stage's settings dataclass from, in order: its defaults, the profile's `all`,
its own section, then the command line's `-p KEY VALUE` (every stage and chapter that has KEY) and
`-p STAGE.KEY VALUE` (that stage only). `selfalign run --direct` calls the stages with exactly these
settings, and `selfalign run` (the notebooks) hands each stage notebook the same ones, so
`selfalign run --dry-run` shows what either would run, without loading a model or writing a file.

A profile may start from another with `extends: NAME` (a profile name, or a YAML file beside it):
the other's sections, then this one's, merged key by key (`profiles/full-cluster.yaml` is `full`
with a cluster's layout). A stage's own section still wins over `all:`, whichever file holds it.

A key that no stage has, a value of the wrong type, or a section that is not a stage is refused with
its name. This module resolves settings; it runs nothing.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from .untrusted import one_line, yaml_load
from .stages import baseline, engrave, evaluate, prompts, self_align, verbose

# Stages in pipeline order: CLI name -> (settings dataclass, run function).
STAGES = {
    "prompts": (prompts.PromptsConfig, prompts.run),
    "self-align": (self_align.SelfAlignConfig, self_align.run),
    "baseline": (baseline.BaselineConfig, baseline.run),
    "engrave": (engrave.EngraveConfig, engrave.run),
    "verbose": (verbose.VerboseConfig, verbose.run),
    "evaluate": (evaluate.EvaluateConfig, evaluate.run),
}
PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"
# Where a run goes comes from --run and --runs-dir; --restart and --allow-pickle are decisions about
# one invocation's files, not settings of the method.
RUN_FIELDS = ("run", "runs_dir", "restart", "allow_pickle")
LORA_STAGES = ("engrave", "verbose")


class ProfileError(ValueError):
    """A profile or override that names an unknown stage or setting, or gives a wrong type."""


@dataclasses.dataclass
class Resolved:
    stages: dict  # stage name -> its settings dataclass
    chapters: dict  # chapter (notebook) parameters: `all`, `chapters` and bare -p keys no stage has

    def as_dict(self, processes: int = 1) -> dict:
        """The dry run's JSON: each stage's fields as they would be used, plus, for the LoRA stages,
        the processes assumed and the accumulation and effective batch they give."""
        out = {}
        for name, config in self.stages.items():
            fields = _jsonable(dataclasses.asdict(config))
            if name in LORA_STAGES:
                accumulation = config.accumulation_steps(processes)
                fields.update(processes=processes, accumulation_steps=accumulation,
                              effective_batch_size=config.micro_batch_size * accumulation * processes)
            out[name] = fields
        return out


def load_profile(name: str, _extending: tuple[Path, ...] = ()) -> dict:
    """A profile's mapping, from `profiles/<name>.yaml` or a YAML file path, over the profile it
    `extends` if it names one; its sections checked."""
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{name}.yaml"
    if _extending and name.endswith((".yaml", ".yml")) and not path.is_absolute():
        path = _extending[-1].parent / path  # a file named by `extends` is beside the one naming it
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {name!r}: choose one of {known} or give a YAML file")
    try:
        values = yaml_load(path.read_text(encoding="utf-8"), path.name) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as problem:
        raise ProfileError(f"{path}: not valid YAML ({one_line(problem)})") from None
    if not isinstance(values, dict):
        raise ProfileError(f"{path}: expected a mapping of stage names to settings")
    base = values.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ProfileError(f"{path}: 'extends' names one profile, got {base!r}")
        if path.resolve() in _extending:
            raise ProfileError(f"{path}: 'extends: {base}' comes back to itself")
        parent = load_profile(base, (*_extending, path.resolve()))
        for key, section in values.items():  # checked below, once merged
            if not isinstance(section, dict):
                raise ProfileError(f"{path}: section {key!r} must be a mapping of settings, "
                                   f"got {type(section).__name__}")
        values = {key: {**parent.get(key, {}), **values.get(key, {})} for key in {**parent, **values}}
    sections = {"all", "chapters", *STAGES}
    for key, section in values.items():
        if key not in sections:
            hint = " (a setting belongs under a stage or under 'all:')" if _stages_with(key) else ""
            raise ProfileError(f"{path}: unknown section {key!r}{hint}; sections: {', '.join(sorted(sections))}")
        if not isinstance(section, dict):
            raise ProfileError(f"{path}: section {key!r} must be a mapping of settings, got {type(section).__name__}")
    for key in values.get("all", {}):
        if not _stages_with(key):
            raise ProfileError(f"{path}: no stage has the setting {key!r} given under 'all:'")
    for stage in STAGES:
        fields = {f.name for f in dataclasses.fields(STAGES[stage][0])}
        unknown = sorted(set(values.get(stage, {})) - fields)
        if unknown:
            raise ProfileError(f"{path}: stage {stage!r} has no settings {unknown}; "
                               f"`selfalign stage {stage} --help` lists them")
    return values


def parse_override(key: str) -> tuple[str | None, str]:
    """`-p` keys: "STAGE.KEY" for one stage, "KEY" for every stage and chapter that has it."""
    if "." in key:
        stage, field = key.split(".", 1)
        if stage not in STAGES:
            raise ProfileError(f"-p {key}: no stage {stage!r}; stages: {', '.join(STAGES)}")
        if field not in {f.name for f in dataclasses.fields(STAGES[stage][0])}:
            raise ProfileError(f"-p {key}: stage {stage!r} has no setting {field!r}")
        return stage, field
    return None, key


def resolve(profile: dict, overrides: dict | None = None, *, run: str = "demo", runs_dir: str = "runs",
            stages=None) -> Resolved:
    """Every stage's settings (or those in `stages`) under `profile` and the `-p` overrides
    ({key: value}); bare keys that no stage has are returned as chapter parameters."""
    overrides = overrides or {}
    for_all = {**profile.get("all", {}), **{k: v for k, v in overrides.items() if "." not in k}}
    for key in RUN_FIELDS:
        if key in for_all or any(key in profile.get(s, {}) for s in STAGES):
            raise ProfileError(f"{key!r} is not a profile setting: use --run, --runs-dir, --restart or --allow-pickle")
    resolved = {}
    for name in stages or STAGES:
        config_class = STAGES[name][0]
        fields = {f.name for f in dataclasses.fields(config_class)}
        values = {k: v for k, v in for_all.items() if k in fields}
        values.update(profile.get(name, {}))
        for key, value in overrides.items():
            stage, field = parse_override(key)
            if stage == name or (stage is None and field in fields):
                values[field] = value
        values.update(run=run, runs_dir=str(runs_dir))
        resolved[name] = build(config_class, values, where=f"stage {name!r}")
    chapters = {**profile.get("all", {}), **profile.get("chapters", {}),
                **{k: v for k, v in overrides.items() if "." not in k}}
    return Resolved(resolved, chapters)


def unknown_keys(profile: dict, overrides: dict, chapter_parameters: set[str]) -> list[str]:
    """Keys of the profile's chapters section and bare -p keys that neither a stage nor a chapter has."""
    keys = set(profile.get("chapters", {})) | {k for k in overrides if "." not in k}
    return sorted(k for k in keys if not _stages_with(k) and k not in chapter_parameters)


def build(config_class, values: dict, where: str = ""):
    """The dataclass from a mapping, each value checked against the field's type (ints where ints
    are meant, lists of strings for tuples), so that a typo in a YAML file fails here, by name."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ProfileError(f"{where or config_class.__name__}: unknown settings {unknown}")
    checked = {key: _checked(hints[key], value, f"{where} setting {key!r}") for key, value in values.items()}
    try:
        return config_class(**checked)
    except ValueError as error:  # a range the dataclass refuses (check_ranges): say which stage's
        raise ProfileError(f"{where or config_class.__name__}: {error}") from None


def _checked(kind, value, where: str):
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ProfileError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return tuple(_checked(item, v, where + " item") for v in value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where} must be a whole number, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ProfileError(f"{where} must be text, got {value!r}")
        return str(value)  # a YAML `model: 7b` or a number-like path stays what it says
    return value


def _stages_with(field: str) -> list[str]:
    return [name for name, (config_class, _) in STAGES.items()
            if field in {f.name for f in dataclasses.fields(config_class)}]


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
