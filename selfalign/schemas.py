"""The schemas of a run's records: which fields each kind of record holds, of which types.

Every record names its schema (`"schema": "response/1"`); `JsonlWriter` checks a record against it
before writing, and `read_jsonl` again when reading, since a file may have been edited by hand. A
wrong field is a ValueError naming the field and what it holds. Beyond the fields each schema
requires, the few that export's typed columns take from a record (`source`, `type`, `topic`,
`split`, `triggers`, the provenance's `seed`...) are checked where a record has them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .untrusted import quote


@dataclass(frozen=True)
class Schema:
    name: str
    version: int
    fields: dict  # required field -> type or tuple of types

    @property
    def tag(self) -> str:
        return f"{self.name}/{self.version}"

    def validate(self, record: dict) -> None:
        for key, kind in self.fields.items():
            if key not in record:
                raise ValueError(f"{self.tag} record lacks field {key!r}: {_short(record)}")
            check_type(f"{self.tag} record field {key!r}", record[key], kind)
        # What export's typed columns take from a record, where a record has it.
        for key, kind in _OPTIONAL.items():
            if record.get(key) is not None:
                check_type(f"{self.tag} record field {key!r}", record[key], kind)
        for key, kind in _PROVENANCE.items():
            if isinstance(record.get("provenance"), dict) and record["provenance"].get(key) is not None:
                check_type(f"{self.tag} record field 'provenance.{key}'", record["provenance"][key], kind)
        if isinstance(record.get("triggers"), list):
            for item in record["triggers"]:
                check_type(f"{self.tag} record field 'triggers' item", item, int)


_OPTIONAL = {"source": str, "type": str, "topic": str, "split": str}
_PROVENANCE = {"model": str, "principles_hash": str, "seed": int}
_KINDS = {str: "a text", int: "a whole number", float: "a number", dict: "an object", list: "a list"}


def check_type(what: str, value, kind) -> None:
    """ValueError saying `what` must be of `kind` (a type or a tuple of types) and what it holds."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON's true is no number, and a whole number is a number.
    ok = (not isinstance(value, bool) or bool in kinds) and (
        isinstance(value, kinds) or (float in kinds and isinstance(value, int)))
    if not ok:
        raise ValueError(f"{what} must be {' or '.join(_KINDS.get(k, k.__name__) for k in kinds)}, "
                         f"got {quote(value)}")


SCHEMAS = {
    s.tag: s
    for s in [
        Schema("generation", 1, {"id": str, "prompt": str, "completion": str, "finish_reason": str,
                                 "prompt_tokens": int, "completion_tokens": int, "provenance": dict}),
        Schema("drop", 1, {"id": str, "reason": str}),
        Schema("prompt", 1, {"id": str, "prompt": str, "source": str, "seeds": list, "provenance": dict}),
        Schema("topic", 1, {"id": str, "type": str, "topic": str}),
        Schema("response", 1, {"id": str, "prompt": str, "thoughts": str, "answer": str, "triggers": list,
                               "provenance": dict}),
        Schema("train_step", 1, {"step": int, "loss": float, "learning_rate": float, "tokens": int}),
        Schema("sft_example", 1, {"id": str, "prompt": str, "answer": str, "split": str}),
        Schema("comparison", 1, {"id": str, "base_logprob": float, "adapted_logprob": float}),
        Schema("eval_item", 1, {"id": str, "benchmark": str, "model": str, "scores": dict}),
        Schema("eval_summary", 1, {"id": str, "benchmark": str, "metric": str, "model": str, "value": (float, int),
                                   "n": int}),
        Schema("answer", 1, {"id": str, "prompt": str, "answer": str, "provenance": dict}),
    ]
}


def provenance(model: str, generation: dict, seed: int, principles_hash: str | None = None) -> dict:
    return {"model": model, "generation": generation, "principles_hash": principles_hash, "seed": seed}


def _short(record: dict) -> str:
    text = json.dumps(record, ensure_ascii=False)
    return text if len(text) < 200 else text[:200] + "..."
