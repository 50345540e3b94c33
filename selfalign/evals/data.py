"""Where the benchmark files are read from, and the error for one that cannot be read.

The loaders read local files and download nothing (the hub copy of TruthfulQA only when a caller
passes `from_hub=True`); by default, the public data `selfalign data prepare` put into the cache
(`selfalign.public_data`).
"""

from __future__ import annotations

from ..public_data import data_dir  # noqa: F401  (the loaders' default folder, exported by `selfalign.evals`)


class EvalDataError(ValueError):
    """A benchmark file that cannot be read as its benchmark's; the message names the file (and the
    line or example)."""
