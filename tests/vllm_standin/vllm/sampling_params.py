"""Stand-in for `vllm.sampling_params` (see ../README.md): the structured-output request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StructuredOutputsParams:
    json: object | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
