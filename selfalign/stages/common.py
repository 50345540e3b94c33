"""What generating stages share: answer keyed prompts, appending one record per prompt, resumably."""

from __future__ import annotations

from typing import Callable

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
