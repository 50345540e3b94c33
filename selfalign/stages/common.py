"""What generating stages share: answer keyed prompts, appending one record per prompt, resumably;
the settings a manifest records; the shape of a generation record; drop tallies; stage tables."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from typing import Callable, Iterable

from ..generate import Completion, Engine, SamplingParams
from ..records import JsonlWriter


def generate_into(writer: JsonlWriter, items: list[tuple[str, str]], engine: Engine, params: SamplingParams,
                  make_record: Callable[[str, str, Completion], dict], shared_prefix: str | None = None) -> int:
    """Generate for the (key, prompt text) items whose key the writer lacks; return how many were written.

    Each record is written as soon as its batch returns, so an interruption loses at most one batch.
    """
    todo = [(key, text) for key, text in items if key not in writer]
    if not todo:
        return 0
    written = 0
    texts, keys = [text for _, text in todo], [key for key, _ in todo]
    # Seeding by record key makes each record's sample the same whether or not the run was resumed.
    for index, completion in engine.stream(texts, params, shared_prefix, keys=keys):
        key, text = todo[index]
        written += writer.write(make_record(key, text, completion))
    return written


def settings_of(config) -> dict:
    """A stage's settings as its manifest records them: all but where it runs, how it batches and
    on which backend (a run may resume on another; the records keep their shape). JSON-shaped, so
    a resumed run compares equal (tuples -> lists)."""
    skip = ("run", "runs_dir", "restart", "batch_size", "max_batch_tokens", "backend", "tensor_parallel_size")
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in skip}))


def generation_record(key: str, prompt: str, completion: Completion, origin: dict, **extra) -> dict:
    """A generation/1 record: what the model was given and what it returned."""
    return {"id": key, "prompt": prompt, "completion": completion.text, "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "provenance": origin, **extra}


def drop_reasons(rows: Iterable[dict]) -> dict[str, int]:
    """How many drops of each kind (a reason's text before any parenthesised detail)."""
    return dict(Counter(row["reason"].split(" (")[0] for row in rows))


def stage_frames(stage, columns: dict[str, list[str]]) -> dict:
    """Each of the stage's `<name>.jsonl` files as a DataFrame; an absent or empty file gives an
    empty frame that still has the columns, so notebook cells that select them keep working."""
    import pandas as pd

    frames = {}
    for name, names in columns.items():
        rows = stage.read(f"{name}.jsonl") if (stage.path / f"{name}.jsonl").exists() else []
        frames[name] = pd.DataFrame(rows) if rows else pd.DataFrame(columns=names)
    return frames
