"""Where the benchmark files are read from, and the error for one that cannot be read.

It deliberately downloads nothing: the loaders read local files (the hub copy of TruthfulQA only
when a caller passes `from_hub=True`).
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"  # where this project's machines keep them


class EvalDataError(ValueError):
    """A benchmark file that cannot be read as its benchmark's; the message names the file (and the
    line or example)."""
