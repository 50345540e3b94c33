"""What generating stages share: answer keyed prompts, appending one record per prompt, resumably;
the settings a manifest records; the shape of a generation record; stage tables;
and the checks a stage makes before it starts (setting ranges, from `config`; backend, model, room in the
model's context for the new tokens, stale records).

A resume skips the ids already on disk, so each generation record carries the hash of the exact
text the model was given (`input_sha256`): an id whose text has changed since (an edited prompt
file, a restarted earlier stage that renumbered its ids) is refused, never answered from the old
text. This module loads no model and writes no manifest.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from ..config import check_ranges  # noqa: F401  (the stages import it from here with the other checks)
from ..generation import BACKENDS, Completion, Engine, SamplingParams
from ..inputs import PRINCIPLES_DIR
from .. import tiny_models
from ..models import check_model  # noqa: F401  (the stages import it from here with the other checks)
from ..models import KNOWN_MODELS, TINY_LLAMA, TINY_RANDOM, context_length, converted_dir
# drop_reasons and shortfall live beside StageFailed (training uses them too); the stages import them from here.
from ..records import JsonlWriter, RunError, drop_reasons, read_jsonl, shortfall  # noqa: F401


def generate_into(writer: JsonlWriter, items: list[tuple[str, str]], engine: Engine, params: SamplingParams,
                  make_record: Callable[[str, str, Completion], dict], shared_prefix: str | None = None, *,
                  drops: JsonlWriter | None = None, drop_fields: Callable[[str], dict] | None = None,
                  prompts: dict[str, str] | None = None, earlier: dict[str, dict] | None = None,
                  adapters: dict[str, str | None] | None = None) -> int:
    """Generate for the (key, prompt text) items not yet on disk; return how many records were written.

    Each record is written as soon as its batch returns, so an interruption loses at most one batch,
    and carries `input_sha256`, the hash of its text. Keys already on disk are skipped, after
    `refuse_stale` has checked that their text is unchanged. With `drops`, a prompt too long for
    the context is written there (id, `drop_fields(key)`, reason, its hash) and the rest go on;
    without, the engine refuses it. `prompts` and `earlier` are as for `refuse_stale`; `earlier`
    defaults to what the writer's and the drops' files hold. `adapters` ({key: adapter name or
    None}) runs each item through its own adapter (`Engine.stream`).
    """
    if earlier is None:
        earlier = on_disk(writer.path, drops.path if drops is not None else None)
    refuse_stale(writer.path, items, earlier, prompts)
    todo = [(key, text) for key, text in items if key not in writer and key not in earlier]
    if drops is not None and todo:
        todo = _drop_too_long(todo, engine, params, shared_prefix, drops, drop_fields)
    if not todo:
        return 0
    written = 0
    texts, keys = [text for _, text in todo], [key for key, _ in todo]
    # Seeding by record key makes each record's sample the same whether or not the run was resumed.
    for index, completion in engine.stream(texts, params, shared_prefix, keys=keys,
                                           adapters=[adapters[key] for key in keys] if adapters else None):
        key, text = todo[index]
        record = make_record(key, text, completion)
        record["input_sha256"] = input_sha256(text)  # in place: a caller may keep the record it made
        written += writer.write(record)
    return written


def _drop_too_long(todo, engine, params, shared_prefix, drops, drop_fields) -> list[tuple[str, str]]:
    """Write a drop for each item too long for the engine's context; return the others."""
    long = engine.too_long([text for _, text in todo], params, shared_prefix)
    room = engine.context_length - params.max_new_tokens
    for index, tokens in long.items():
        key, text = todo[index]
        drops.write({"id": key, **(drop_fields(key) if drop_fields else {}),
                     "reason": f"prompt too long ({tokens} tokens; the context of {engine.context_length} leaves "
                               f"{room} after max_new_tokens={params.max_new_tokens})",
                     "prompt_tokens": tokens, "input_sha256": input_sha256(text)})
    if long:
        ids = [todo[i][0] for i in sorted(long)]
        warnings.warn(f"{len(ids)} prompts are too long for the context and were dropped (ids "
                      f"{', '.join(map(repr, ids[:5]))}{', ...' if len(ids) > 5 else ''}); see {drops.path}",
                      stacklevel=3)
    return [item for index, item in enumerate(todo) if index not in long]


def input_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def on_disk(path: Path, drops: Path | None = None) -> dict[str, dict]:
    """What a stage holds already, by id: the records of its generation file, and the drops of
    prompts too long for the context (those carry `input_sha256`; other drops follow a record)."""
    found = {}
    if drops is not None and drops.exists():
        found.update((row["id"], row) for row in read_jsonl(drops) if "input_sha256" in row)
    if path.exists():
        found.update((row["id"], row) for row in read_jsonl(path))
    return found


def refuse_stale(path: Path, items: Iterable[tuple[str, str]], earlier: dict[str, dict],
                 prompts: dict[str, str] | None = None) -> None:
    """RunError when a (key, text) item's record on disk (`earlier`, by id) was made from another
    text: resuming would keep an answer to a prompt that is no longer the one under its id.

    A record written before input hashes has only its `prompt`, which must equal the text, or
    `prompts[key]` where the stage records the bare prompt rather than the rendered text."""
    prompts = prompts or {}
    stale = []
    for key, text in items:
        old = earlier.get(key)
        if old is None:
            continue
        if "input_sha256" in old:
            same = old["input_sha256"] == input_sha256(text)
        else:
            same = old.get("prompt") in (text, prompts.get(key, text))
        if not same:
            stale.append(key)
    if stale:
        shown = ", ".join(map(repr, stale[:5])) + (", ..." if len(stale) > 5 else "")
        raise RunError(
            f"stage {Path(path).parent.name!r}: {path} holds answers to other prompts than the ones these ids have "
            f"now ({shown}; {len(stale)} in all): the prompt under an id changed (an edited prompt file, or an "
            "earlier stage restarted and renumbered its ids), and resuming would keep the old answers. Rerun with "
            "--restart (restart=True) to set this stage's results aside and answer the new prompts, or use a new "
            "run name."
        )


def settings_of(config) -> dict:
    """A stage's settings as its manifest records them: all but where it runs, how it batches, on
    which backend and how many replicas (a run may resume on others; the records keep their
    shape). JSON-shaped, so a resumed run compares equal (tuples -> lists)."""
    skip = ("run", "runs_dir", "restart", "allow_pickle", "batch_size", "max_batch_tokens", "backend",
            "tensor_parallel_size", "replicas", "ray_address")
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in skip}))


def generation_record(key: str, prompt: str, completion: Completion, origin: dict, **extra) -> dict:
    """A generation/1 record: what the model was given and what it returned."""
    return {"id": key, "prompt": prompt, "completion": completion.text, "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "provenance": origin, **extra}


def check_resume(stage, settings: dict, restart: bool, filename: str, items: Iterable[tuple[str, str]],
                 prompts: dict[str, str] | None = None, drops: str | None = "drops.jsonl") -> None:
    """`refuse_stale` on what the stage's files hold, for a stage to call before it starts, so that a
    refused resume leaves the manifest (a finished stage stays finished) as it was. Skipped on a
    restart, and where the manifest has other settings: `Stage.start` refuses those by name."""
    if restart:  # before reading the manifest: a damaged one is what --restart sets aside
        return
    manifest = stage.manifest()
    if manifest is not None and manifest["params"] != settings:
        return
    path = stage.path / filename
    refuse_stale(path, items, on_disk(path, stage.path / drops if drops else None), prompts)


def check_room(model: str, loaded=None, **new_tokens: int) -> None:
    """ValueError when a setting of new tokens (`max_new_tokens=160`, by name) fills the model's
    whole context: every prompt would be dropped as too long. The context is `loaded`'s (a loaded
    model or an engine), else read from the model's config.json before it loads; a model with
    nothing here to read passes (its prompts are dropped, and the stage fails, as too long)."""
    context = loaded.context_length if loaded is not None else _context_length(model)
    over = [f"{name}={n}" for name, n in new_tokens.items() if context is not None and n >= context]
    if over:
        raise ValueError(f"{' and '.join(over)} leaves no room for a prompt in the context of model {model!r} "
                         f"({context} tokens); ask for fewer new tokens")


def _context_length(model: str) -> int | None:
    """A model's context as `LoadedModel.context_length` reads it, from config.json alone; None where
    there is none here to read (a hub id, an unprepared model, a config.json `check_model` refuses)."""
    if model == TINY_RANDOM:
        return tiny_models.RANDOM_CONTEXT
    folder = converted_dir(model) if model == TINY_LLAMA or model in KNOWN_MODELS else Path(model).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    positions = config.get("max_position_embeddings", 2048) if isinstance(config, dict) else None
    return context_length(config) if isinstance(positions, int) and not isinstance(positions, bool) else None


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")


def stage_one_prompts(run_dir) -> Path:
    """The run's stage-1 prompt file; RunError when stage 1 has not run or not finished, since
    a stage answering a part of its prompts would call itself finished."""
    path = run_dir.root / "prompts" / "prompts.jsonl"
    if not path.exists():
        raise RunError(f"run {run_dir.name!r} has no stage-1 prompts ({path}); run `selfalign stage prompts` "
                       "first, or pass a prompt file (--prompts FILE)")
    manifest = run_dir.stage("prompts").manifest() or {}
    if manifest.get("status") == "failed":
        raise RunError(f"stage 1 (prompts) of run {run_dir.name!r} failed: {manifest.get('failure')}; rerun it "
                       "with other settings (--restart), or pass a prompt file (--prompts FILE)")
    if not run_dir.stage("prompts").finished:
        raise RunError(f"stage 1 (prompts) of run {run_dir.name!r} is not finished ({path} holds the prompts so "
                       "far); finish it (rerun `selfalign stage prompts`, it resumes), or pass a prompt file "
                       "(--prompts FILE)")
    return path


def stage_frames(stage, columns: dict[str, list[str]]) -> dict:
    """Each of the stage's `<name>.jsonl` files as a DataFrame; an absent or empty file gives an
    empty frame that still has the columns, so notebook cells that select them keep working."""
    import pandas as pd

    frames = {}
    for name, names in columns.items():
        rows = stage.read(f"{name}.jsonl") if (stage.path / f"{name}.jsonl").exists() else []
        frames[name] = pd.DataFrame(rows) if rows else pd.DataFrame(columns=names)
    return frames


def principles_of(run):
    """(path, principle set, notes): the principles file stage 2 answered behind (the one its
    manifest names, else this project's), loaded with its exemplars and template, and what the card
    should say about it (a fallback, a hash that is not the run's)."""
    from ..principles import PrincipleError, load_principle_set

    params = run.stages().get("self_align", {}).get("params", {})
    recorded, notes = params.get("principles"), []
    path = Path(recorded) if recorded and Path(recorded).is_file() else PRINCIPLES_DIR / "principles.yaml"
    if path != Path(recorded or ""):
        notes.append(f"stage 2's manifest names {recorded!r}, which is not on this machine: shown instead is this "
                     f"project's `principles/principles.yaml`, which may differ from the one the run used")
    others = {key: params[key] for key in ("exemplars", "template") if params.get(key) and Path(params[key]).is_file()}
    try:
        principle_set = load_principle_set(path, **others)
    except PrincipleError as error:  # an old run's file: the project's own set still catches a leak
        notes.append(f"it does not load with stage 2's exemplars and template ({error})")
        return path, load_principle_set(), notes
    if params.get("principles_hash") and principle_set.hash != params["principles_hash"]:
        notes.append(f"its principle set hashes to {principle_set.hash}, not the run's {params['principles_hash']}: "
                     "a file changed after the run")
    return path, principle_set, notes


def principle_texts(run) -> tuple[str, ...]:
    """The texts of the principles this run's stage 2 answered behind (`principles_of`). Stages 3
    and 4 refuse a training example whose context holds one: the point of engraving is that the
    principles are not there."""
    return tuple(p.text for p in principles_of(run)[1].principles)
