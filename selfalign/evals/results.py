"""What a benchmark returns and how it is tabled.

An `EvalResult` holds one row per item and a summary (one row per metric, and per category or
subset where the benchmark reports them). `summary_table`, `by_category` and `plot_by_category`
compare results; `markdown_table` and `write_table` write tables; `item_records` and
`summary_records` turn results into the eval_item/1 and eval_summary/1 records of `EVAL_SCHEMAS`.

It deliberately does not write run directories: the records are for the stage that does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..records import SCHEMAS


@dataclass
class EvalResult:
    benchmark: str
    model: str
    items: object  # pandas DataFrame, one row per question or example
    summary: object  # pandas DataFrame: benchmark, metric, value, n
    metrics: tuple[str, ...]  # the items' per-item metric columns
    group: str = "category"  # the items' column that `by_category` groups on
    note: str = ""  # e.g. the judge_note of a weak judge


def _result(benchmark, model, rows, metrics, group="category", note="", groups_in_summary=False) -> EvalResult:
    import pandas as pd

    items = pd.DataFrame(rows)
    summary = [{"benchmark": benchmark, "metric": m, "value": float(items[m].mean()) if len(items) else math.nan,
                "n": int(items[m].notna().sum()) if len(items) else 0} for m in metrics]
    if groups_in_summary and len(items):
        for name, part in items.groupby(group, sort=False):
            summary += [{"benchmark": f"{benchmark}/{name}", "metric": m, "value": float(part[m].mean()),
                         "n": int(part[m].notna().sum())} for m in metrics]
    return EvalResult(benchmark, model, items, pd.DataFrame(summary), tuple(metrics), group, note)


def summary_table(results: Sequence[EvalResult]):
    """One row per (benchmark, metric) of each result: benchmark, metric, model, value, n, note."""
    import pandas as pd

    frames = [r.summary.assign(model=r.model, note=r.note) for r in results]
    columns = ["benchmark", "metric", "model", "value", "n", "note"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def by_category(result: EvalResult):
    """Mean of each per-item metric by category (HHH: by subset), with n, largest groups first."""
    table = result.items.groupby(result.group)[list(result.metrics)].mean()
    table.insert(0, "n", result.items.groupby(result.group).size())
    return table.sort_values(["n", *result.metrics], ascending=False)


def plot_by_category(table, metric: str | Sequence[str] | None = None, ax=None, label: str | None = None):
    """Horizontal bars of a `by_category` table, largest groups on top, each labelled with its n.

    metric: one column, or several side by side (the stage's tables have one per model); by default
    every column but n. label: the x axis title (default: the columns' names).
    """
    columns = [metric] if isinstance(metric, str) else list(metric or [c for c in table.columns if c != "n"])
    table = table.iloc[::-1]  # barh draws the first row at the bottom
    ax = table[columns].plot.barh(ax=ax, figsize=None if ax is not None else (6, 0.25 * len(table) + 1.5))
    ax.set_yticklabels([f"{name} ({n})" for name, n in zip(table.index, table["n"])])
    ax.set_xlabel(label or ", ".join(columns))
    return ax


def markdown_table(frame, digits: int = 3) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, which we do not depend on)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    head = [str(c) for c in frame.columns]
    numeric = [frame[c].dtype.kind in "iuf" for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(frame, path: str | Path) -> Path:
    """Write a table as CSV, or as Markdown when the path ends in .md."""
    path = Path(path)
    if path.suffix == ".md":
        path.write_text(markdown_table(frame), encoding="utf-8")
    else:
        frame.to_csv(path, index=False)
    return path


EVAL_SCHEMAS = {tag: SCHEMAS[tag] for tag in ("eval_item/1", "eval_summary/1")}  # defined in records.py


def item_records(result: EvalResult) -> list[dict]:
    """eval_item/1 records of a result's items (id: benchmark:item id; scores: every other column)."""
    rows = json.loads(result.items.to_json(orient="records"))
    return [{"id": f"{result.benchmark}:{row.pop('id')}", "benchmark": result.benchmark, "model": result.model,
             "scores": row} for row in rows]


def summary_records(results: Sequence[EvalResult]) -> list[dict]:
    rows = json.loads(summary_table(results).to_json(orient="records"))
    return [{"id": f"{r['benchmark']}:{r['metric']}:{r['model']}", **r,
             "value": math.nan if r["value"] is None else float(r["value"])} for r in rows]


def _name(scorer) -> str:
    return str(getattr(scorer, "name", type(scorer).__name__))
