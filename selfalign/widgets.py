"""Notebook widgets for exploring the principles: an editor, a response inspector, a trigger explorer.

- `PrincipleEditor`: the principles as editable text with on/off toggles; "regenerate" answers a
  few prompts under the original and the edited set (`ablation.ablate`, fixed seeds) and shows
  the answers side by side with the changed triggers marked; "save" writes the edited set as a
  principles file the loader reads again.
- `ResponseInspector`: a stage's kept and dropped records, filtered by red-team type, cited
  principle and drop reason; one record's full rendered prompt and raw model output.
- `TriggerExplorer`: stage 2's trigger heatmap (`triggers.plot_trigger_heatmap`) and, for a
  chosen (type, principle) cell, the responses behind it.

Every decision is a plain function below (tested without a browser or kernel); the classes only
wire them to ipywidgets, and their callbacks write into HTML widgets' values, never into Output
captures. This module computes no statistics and generates nothing itself: `triggers` and
`ablation` do.
"""

from __future__ import annotations

import html
import io
import os
import shutil
import tempfile
from pathlib import Path

import ipywidgets as w
import yaml

from .ablation import ablate
from .principles import PrincipleError, PrincipleSet, load_principle_set, render_prompt, rules_sentence
from .inputs import PRINCIPLES_DIR
from .stages import self_align
from .stages.common import drop_reasons
from .triggers import (SELF_INSTRUCT, disagreements, plot_score_heatmap, plot_trigger_heatmap, score_stats,
                       trigger_stats)

EVERY = "(any)"  # the dropdowns' value for "no filter": a Dropdown shows nothing selected when its value is None


# ---- principle editor: pure functions ----

def _clean(text: str) -> str:
    return " ".join(text.split())  # as the loader reads a text, so a saved set reloads with the same hash


def edited_set(base: PrincipleSet, texts: dict[int, str], enabled: dict[int, bool]) -> PrincipleSet:
    """The base set with each principle's text replaced by texts[n] and those with enabled[n] False
    removed (with their citations in the exemplars). Raises PrincipleError for an empty text or set."""
    result = base
    for p in base.principles:
        if enabled.get(p.number, True) and _clean(texts.get(p.number, p.text)) != p.text:
            result = result.with_text(p.number, _clean(texts[p.number]))
    off = [p.number for p in base.principles if not enabled.get(p.number, True)]
    if len(off) == len(base.principles):
        raise PrincipleError("every principle is off: keep at least one on")
    return result.without(*off) if off else result


def describe_edits(base: PrincipleSet, edited: PrincipleSet) -> list[str]:
    """One line per principle that differs: 'N Name: off' or 'N Name: reworded'."""
    lines = []
    for p in base.principles:
        if p.number not in edited.numbers:
            lines.append(f"{p.number} {p.name}: off")
        elif edited.principle(p.number).text != p.text:
            lines.append(f"{p.number} {p.name}: reworded")
    return lines


def trigger_diff(before: list[int], after: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(added, removed, kept): principles cited only after the edit, only before it, and in both."""
    return ([n for n in after if n not in before], [n for n in before if n not in after],
            [n for n in before if n in after])


def trigger_html(before: list[int], after: list[int], names: dict[int, str]) -> str:
    """The triggers after an edit, with those it added in green and those it removed struck in red."""
    added, removed, kept = trigger_diff(before, after)
    label = {n: html.escape(f"{n} {names.get(n, '?')}") for n in {*before, *after}}
    spans = ([f"<span>{label[n]}</span>" for n in kept]
             + [f'<span class="added" style="background:#c6efce">+{label[n]}</span>' for n in added]
             + [f'<span class="removed" style="background:#ffc7ce;text-decoration:line-through">'
                f"{label[n]}</span>" for n in removed])
    return " ".join(spans) or "<i>none</i>"


def comparison_html(table, base: PrincipleSet, edits: list[str]) -> str:
    """An `ablate` table (a: the base set, b: the edited one) as an HTML table, answers side by side."""
    names = {p.number: p.name for p in base.principles}

    def answer(text: str) -> str:
        return html.escape(text) if text else "<i>(empty)</i>"

    rows = []
    for _, row in table.iterrows():
        after = answer(row["answer_b"]) if row["answer_changed"] else "<i>(the same)</i>"
        rows.append(f"<tr><td>{html.escape(row['prompt'])}</td><td>{answer(row['answer_a'])}</td>"
                    f"<td>{after}</td><td>{trigger_html(row['triggers_a'], row['triggers_b'], names)}</td>"
                    f"<td>{row['answer_overlap']:.2f}</td></tr>")
    cell = 'style="text-align:left;vertical-align:top;white-space:pre-wrap"'
    return (f'<p class="selfalign-edits">edited: {html.escape("; ".join(edits) or "nothing")}</p>'
            '<table class="selfalign-comparison" border="1" style="border-collapse:collapse">'
            f"<tr><th {cell}>prompt</th><th {cell}>before</th><th {cell}>after</th>"
            f"<th {cell}>triggers after (+added, -removed)</th><th {cell}>overlap</th></tr>"
            + "".join(rows).replace("<td>", f"<td {cell}>") + "</table>")


def save_principles(principle_set: PrincipleSet, path: str | Path, overwrite: bool = False,
                    exemplars: str | Path = PRINCIPLES_DIR / "exemplars.yaml",
                    template: str | Path = PRINCIPLES_DIR / "self_align_template.yaml") -> list[Path]:
    """Write the set as a principles YAML file; return the files written.

    The exemplars cite principles by number, so a set without a cited principle cannot be read
    with the original exemplars: then `<stem>_exemplars.yaml` is written beside it, without
    those citations. Either way the files are checked to load back into exactly this set (same
    hash) before they replace anything; an existing file is replaced only with `overwrite`.
    """
    path = Path(path)
    extra = exemplars_path(path)
    uncited = [e.id for e in principle_set.exemplars if not e.cites]
    if uncited:
        raise PrincipleError(f"exemplar {', '.join(uncited)} would cite no principle: keep one of its principles on")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: choose another name, or tick 'overwrite'")
    rows = [{"number": p.number, "name": p.name, "text": p.text} for p in principle_set.principles]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        draft = Path(tmp) / path.name
        draft.write_text(yaml.safe_dump({"principles": rows}, sort_keys=False, allow_unicode=True, width=100),
                         encoding="utf-8")
        try:
            reproduced = load_principle_set(draft, exemplars, template).hash == principle_set.hash
        except PrincipleError:
            reproduced = False
        written = [path]
        if not reproduced:
            if extra.exists() and not overwrite:
                raise FileExistsError(f"{extra} exists: choose another name, or tick 'overwrite'")
            draft_extra = Path(tmp) / extra.name
            draft_extra.write_text(_exemplars_yaml(principle_set), encoding="utf-8")
            if load_principle_set(draft, draft_extra, template).hash != principle_set.hash:
                raise PrincipleError(f"the saved files would not reproduce this principle set (is {template} "
                                     "the template it was made with?)")
            _replace_keeping_previous(draft_extra, extra)
            written.append(extra)
        _replace_keeping_previous(draft, path)
    return written


def exemplars_path(path: Path) -> Path:
    """Where `save_principles` writes the exemplars a saved set needs beside it."""
    return path.with_name(f"{path.stem}_exemplars{path.suffix or '.yaml'}")


def previous_path(path: Path) -> Path:
    """Where an overwritten file is kept: one version back, as a restart keeps a stage's records."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def _replace_keeping_previous(draft: Path, target: Path) -> None:
    if target.exists():
        shutil.copy2(target, previous_path(target))
    os.replace(draft, target)


def _exemplars_yaml(principle_set: PrincipleSet) -> str:
    rows = [{"id": e.id, "user": e.user, "thoughts": f"{e.thoughts} {rules_sentence(principle_set, e.cites)}",
             "answer": e.answer, "markers": list(e.markers)} for e in principle_set.exemplars]
    return yaml.safe_dump({"exemplars": rows}, sort_keys=False, allow_unicode=True, width=100)


# ---- records: pure functions ----

def type_of(record: dict) -> str:
    return record.get("type") or SELF_INSTRUCT


def reason_kind(record: dict) -> str | None:
    """A drop's reason without its detail ("copies exemplar"), as `drop_reasons` tallies it; None if kept."""
    return next(iter(drop_reasons([record])), None) if record.get("reason") else None


def filter_records(records: list[dict], type: str | None = None, principle: int | None = None,
                   drop_reason: str | None = None) -> list[dict]:
    """Records of a red-team type (SELF_INSTRUCT for none), citing a principle, dropped for a reason
    (its kind, as `drop_reasons` counts it; "" selects the kept records). None matches anything."""
    return [r for r in records
            if (type is None or type_of(r) == type)
            and (principle is None or principle in (r.get("triggers") or []))
            and (drop_reason is None or (reason_kind(r) or "") == drop_reason)]


def editor_prompts(records: list[dict], limit: int) -> list[str]:
    """The first `limit` distinct prompts, kept responses' first (their answers are worth comparing)."""
    ordered = sorted(records, key=lambda r: r.get("status") != "kept")
    return list(dict.fromkeys(r["prompt"] for r in ordered))[:limit]


def record_html(record: dict, principle_set: PrincipleSet | None, assistant: str = "Watson") -> str:
    """One record: its fields, the full prompt as the model saw it, and its raw continuation."""
    status = record.get("status", "")
    if record.get("reason"):
        status += f": {record['reason']}"
    prompt, note = record.get("prompt", ""), ""
    if principle_set is not None:
        prompt = render_prompt(principle_set, prompt, assistant)
        used = (record.get("provenance") or {}).get("principles_hash")
        if used and used != principle_set.hash:
            note = (f"<p><b>Note:</b> generated under principle set {used}; shown rendered with "
                    f"{principle_set.hash}, so the prompt above the query may differ.</p>")

    def pre(text) -> str:
        return f'<pre style="white-space:pre-wrap">{html.escape(str(text or ""))}</pre>'

    fields = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(str(record.get(k)))}</td></tr>"
                     for k in ("id", "type", "topic", "triggers", "unknown_citations", "finish_reason"))
    return (f'<div class="selfalign-record"><h4>{html.escape(record.get("id", ""))} ({html.escape(status)})</h4>'
            f"<table>{fields}</table>{note}"
            f"<details><summary>full prompt ({len(prompt)} characters)</summary>{pre(prompt)}</details>"
            f"<b>raw output</b>{pre(record.get('raw'))}<b>answer</b>{pre(record.get('answer'))}</div>")


# ---- trigger explorer: pure functions ----

def examples_for(records: list[dict], type: str, principle: int, limit: int = 5) -> list[dict]:
    """Up to `limit` kept responses of that red-team type whose thoughts cite that principle."""
    kept = [r for r in records if r.get("status", "kept") == "kept"]
    return filter_records(kept, type=type, principle=principle)[:limit]


def heatmap_cells(per_type) -> list[tuple[str, tuple[str, int]]]:
    """The non-empty cells of `trigger_stats`' per-type table, largest share first, as
    (label, (type, principle number)) options."""
    cells = [(-share, kind, int(label.split()[0]), label)
             for label, row in per_type.iterrows() for kind, share in row.items() if share > 0]
    return [(f"{kind} / {label} ({-negative:.0%})", (kind, number)) for negative, kind, number, label in sorted(cells)]


def examples_html(examples: list[dict]) -> str:
    if not examples:
        return "<p><i>no responses</i></p>"
    rows = "".join(f"<tr><td>{html.escape(r['prompt'])}</td><td>{html.escape(r.get('thoughts', ''))}</td>"
                   f"<td>{html.escape(r.get('answer', ''))}</td></tr>" for r in examples)
    return ('<table class="selfalign-examples" border="1" style="border-collapse:collapse">'
            "<tr><th>prompt</th><th>thoughts</th><th>answer</th></tr>" + rows + "</table>")


def heatmap_png(per_type, plot=plot_trigger_heatmap) -> bytes:
    import matplotlib.pyplot as plt

    ax = plot(per_type)
    buffer = io.BytesIO()
    ax.figure.savefig(buffer, format="png", bbox_inches="tight", dpi=80)
    plt.close(ax.figure)  # shown once, in the widget, not again by the inline backend
    return buffer.getvalue()


def _error(text: str) -> str:
    return f'<span style="color:#b00">{html.escape(text)}</span>'


# ---- the widgets ----

class _Shown:
    """Displays as its `widget` in a notebook."""

    widget: w.Widget

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


class PrincipleEditor(_Shown):
    def __init__(self, base: PrincipleSet, prompts: list[str], engine, config=None,
                 save_as: str = "principles_edited.yaml"):
        self.base, self.prompts, self.engine = base, prompts, engine
        self.config = config or self_align.SelfAlignConfig()
        self.toggles = {p.number: w.Checkbox(value=True, description=f"{p.number} {p.name}", indent=False,
                                             layout=w.Layout(width="14em")) for p in base.principles}
        self.texts = {p.number: w.Textarea(value=p.text, rows=2, layout=w.Layout(width="100%"))
                      for p in base.principles}
        self.regenerate_button = w.Button(description="regenerate", button_style="primary")
        self.save_path = w.Text(value=save_as, description="save as")
        self.overwrite = w.Checkbox(value=False, description="overwrite")
        self.save_button = w.Button(description="save")
        self.status, self.comparison = w.HTML(), w.HTML()
        self.regenerate_button.on_click(self.regenerate)
        self.save_button.on_click(self.save)
        rows = [w.HBox([self.toggles[n], self.texts[n]]) for n in self.texts]
        self.widget = w.VBox(rows + [w.HBox([self.regenerate_button, self.save_path, self.overwrite,
                                             self.save_button]), self.status, self.comparison])

    def edited(self) -> PrincipleSet:
        return edited_set(self.base, {n: t.value for n, t in self.texts.items()},
                          {n: t.value for n, t in self.toggles.items()})

    def regenerate(self, _button=None) -> None:
        try:
            edited = self.edited()
        except PrincipleError as error:
            self.status.value = _error(str(error))
            return
        self.regenerate_button.disabled = True
        self.status.value = f"answering {len(self.prompts)} prompts under both sets..."
        try:
            table = ablate(self.prompts, self.engine, self.base, edited, self.config)
        except Exception as error:  # noqa: BLE001 - shown here: a callback's traceback goes to a log nobody reads
            self.status.value = _error(f"{type(error).__name__}: {error}")
            return
        finally:
            self.regenerate_button.disabled = False
        self.comparison.value = comparison_html(table, self.base, describe_edits(self.base, edited))
        self.status.value = (f"{int(table['answer_changed'].sum())} of {len(table)} answers changed, triggers "
                             f"changed in {int(table['triggers_changed'].sum())} (seed {self.config.seed})")

    def save(self, _button=None) -> None:
        target = Path(self.save_path.value)
        replaced = {p for p in (target, exemplars_path(target)) if p.exists()}
        try:
            written = save_principles(self.edited(), target, overwrite=self.overwrite.value)
        except (PrincipleError, OSError) as error:
            self.status.value = _error(str(error))
            return
        kept = [f"the previous {p.name} is kept as {previous_path(p).name}" for p in written if p in replaced]
        self.status.value = "saved " + " and ".join(html.escape(str(p)) for p in written) + \
            "".join(f"; {html.escape(k)}" for k in kept)


class ResponseInspector(_Shown):
    def __init__(self, records: list[dict], principle_set: PrincipleSet | None = None, assistant: str = "Watson"):
        self.records, self.principle_set, self.assistant = records, principle_set, assistant
        names = {p.number: p.name for p in principle_set.principles} if principle_set else {}
        cited = sorted({n for r in records for n in r.get("triggers") or []})
        self.type = w.Dropdown(description="type", options=[EVERY] + sorted({type_of(r) for r in records}))
        self.principle = w.Dropdown(description="principle", options=[(EVERY, EVERY)]
                                    + [(f"{n} {names.get(n, '')}".strip(), n) for n in cited])
        self.reason = w.Dropdown(description="drop reason", options=[(EVERY, EVERY), ("(kept)", "")]
                                 + [(k, k) for k in sorted(drop_reasons(r for r in records if r.get("reason")))])
        self.choice = w.Select(rows=8, layout=w.Layout(width="100%"))
        self.count, self.detail = w.HTML(), w.HTML()
        for control in (self.type, self.principle, self.reason):
            control.observe(self.refilter, names="value")
        self.choice.observe(self.show, names="value")
        self.widget = w.VBox([w.HBox([self.type, self.principle, self.reason]), self.count, self.choice, self.detail])
        self.refilter()

    def refilter(self, _change=None) -> None:
        shown = filter_records(self.records, *(None if c.value == EVERY else c.value
                                               for c in (self.type, self.principle, self.reason)))
        self.count.value = f"{len(shown)} of {len(self.records)} records"
        wanted = {id(r) for r in shown}
        self.choice.options = [(f"[{r['status']}] {r['id']}: {r['prompt'][:80]}", i)
                               for i, r in enumerate(self.records) if id(r) in wanted]
        self.choice.value = self.choice.options[0][1] if shown else None
        self.show()

    def show(self, _change=None) -> None:
        index = self.choice.value
        self.detail.value = "" if index is None else record_html(self.records[index], self.principle_set,
                                                                 self.assistant)


class TriggerExplorer(_Shown):
    def __init__(self, records: list[dict], principle_set: PrincipleSet, limit: int = 5):
        import pandas as pd

        self.records, self.limit = records, limit
        kept = pd.DataFrame([r for r in records if r.get("status", "kept") == "kept"],
                            columns=["id", "type", "triggers", "answer", "principle_scores"])
        _, self.per_type = trigger_stats(kept, principle_set)
        # Beside what the thoughts cite, what the model finds likely (principle_scores), and where they differ.
        self.likely = score_stats(kept, principle_set)
        self.disagreements = disagreements(kept, principle_set)
        # Not stretched to the notebook's width, which would blow a small heatmap up.
        self.heatmap = w.Image(value=heatmap_png(self.per_type), format="png", layout=w.Layout(align_self="flex-start"))
        self.likely_heatmap = w.Image(value=heatmap_png(self.likely, plot_score_heatmap), format="png",
                                      layout=w.Layout(align_self="flex-start"))
        self.disagreement_table = w.HTML(self.disagreements.to_html(index=False) if len(self.disagreements) else
                                         "<p><i>No kept response has principle_scores.</i></p>")
        cells = heatmap_cells(self.per_type)
        self.cell = w.Dropdown(description="cell", options=cells or [("(no principle fired)", "none")],
                               layout=w.Layout(width="40em"))
        self.examples = w.HTML()
        self.cell.observe(self.show, names="value")
        self.widget = w.VBox([w.HBox([self.heatmap, self.likely_heatmap]), self.disagreement_table, self.cell,
                              self.examples])
        self.show()

    def show(self, _change=None) -> None:
        if self.cell.value == "none":
            self.examples.value = "<p><i>No kept response cites a principle, so there is nothing to click.</i></p>"
            return
        kind, number = self.cell.value
        self.examples.value = examples_html(examples_for(self.records, kind, number, self.limit))
