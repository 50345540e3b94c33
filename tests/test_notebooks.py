"""The notebooks: each .py percent file is in sync with its .ipynb, and each runs top to bottom."""

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import jupytext
import numpy as np
import pandas as pd
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))
# Small, CPU-quick settings, injected after the parameters cell as papermill would.
TINY = {"model": "tiny-random", "run": "nbtest", "n_self_instruct": 2, "types_limit": 2,
        "max_new_tokens": 8, "limit": 4, "loo_prompts": 2, "loo_max_new_tokens": 4,
        # stage 2 on its own needs prompts; a random model's stage 1 keeps few or none
        "prompts": str(REPO / "principles" / "seed_prompts.jsonl"),
        "min_responses": 0,  # ... and a random model's stage 2 keeps none of its answers
        # stage 3 needs answers a random model cannot write
        "responses": str(REPO / "tests" / "data" / "responses.jsonl"),
        "epochs": 1, "sample_prompts": 1, "sample_max_new_tokens": 4, "vicuna_limit": 2}


def cells(notebook):
    return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in notebook.cells]


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_is_in_sync(source):
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: run `jupytext --sync {source}`"
    ipynb = jupytext.read(paired)
    assert cells(jupytext.read(source)) == cells(ipynb), f"run `jupytext --sync {source}`"
    assert ipynb.metadata.get("kernelspec", {}).get("name"), "papermill needs the kernel name"
    tagged = [c for c in ipynb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters`"


@pytest.fixture(scope="module")
def book_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("book")


# ---- what a chapter showed ----

@dataclass
class Chapter:
    """A notebook after it ran: its namespace, what its cells displayed (each cell's last expression,
    as a kernel shows it, and every `display` call) and the figures its cells drew."""

    namespace: dict
    shown: list = field(default_factory=list)
    figures: list = field(default_factory=list)

    def __getitem__(self, name):
        return self.namespace[name]

    @property
    def stage_dir(self) -> Path:
        return Path(self["runs_dir"]) / self["run"]

    def frames(self, *columns) -> list:
        """The displayed DataFrames that have all these columns, in display order (at least one)."""
        found = [s for s in self.shown if isinstance(s, pd.DataFrame) and set(columns) <= set(s.columns)]
        assert found, f"no table with columns {columns} was shown"
        return found

    def shown_of(self, kind) -> list:
        found = [s for s in self.shown if isinstance(s, kind)]
        assert found, f"no {kind.__name__} was shown"
        return found

    def axes(self, xlabel: str = None, ylabel: str = None, title: str = None):
        """The one plotted Axes whose labels start with the given texts."""
        found = [ax for figure in self.figures for ax in figure.axes
                 if (xlabel is None or ax.get_xlabel().startswith(xlabel))
                 and (ylabel is None or ax.get_ylabel().startswith(ylabel))
                 and (title is None or ax.get_title().startswith(title))]
        assert len(found) == 1, f"{len(found)} plots with xlabel={xlabel!r} ylabel={ylabel!r} title={title!r}"
        return found[0]


def execute(source: Path, namespace: dict, monkeypatch) -> Chapter:
    """Runs the code cells in-process into `namespace` (TINY injected after the parameters cell)."""
    import IPython.display
    import matplotlib.pyplot as plt

    chapter = Chapter(namespace)
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **_: chapter.shown.extend(objects))
    plt.close("all")
    for cell in jupytext.read(source).cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source, source.name)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        try:
            exec(compile(tree, source.name, "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), source.name, "eval"), namespace)
                if value is not None and not cell.source.rstrip().endswith(";"):
                    chapter.shown.append(value)
        finally:
            # As the inline backend does: a cell's figures are shown, then closed.
            chapter.figures += [plt.figure(number) for number in plt.get_fignums()]
            plt.close("all")
        if "parameters" in cell.metadata.get("tags", []):
            namespace.update({k: v for k, v in TINY.items() if k in namespace})
    return chapter


def jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file ([] for one never written: a stage writes a file at its first record)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(stage: Path) -> dict:
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "finished", manifest
    return manifest


def bar_sizes(ax, horizontal: bool = True) -> list[list[float]]:
    """Each bar series' bar lengths (the widths of horizontal bars, the heights of vertical ones)."""
    return [[bar.get_width() if horizontal else bar.get_height() for bar in container]
            for container in ax.containers]


def labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


def line_data(ax) -> tuple[list, list]:
    (line,) = ax.lines
    return list(line.get_xdata()), list(line.get_ydata())


def check_heatmap(ax, per_type):
    """The heatmap shows per_type: its cells, its principles (rows) and its types (columns)."""
    if per_type.shape[1] == 0:  # no response was kept: the plot says so rather than showing nothing
        assert not ax.images and labels(ax.texts) == ["no responses"]
        return
    (image,) = ax.images
    np.testing.assert_allclose(np.asarray(image.get_array()), per_type.to_numpy(dtype=float))
    assert labels(ax.get_xticklabels()) == list(per_type.columns)
    assert labels(ax.get_yticklabels()) == list(per_type.index)


# ---- per chapter: what it must have produced ----

def check_setup(chapter):
    prompts, completions, loaded = chapter["prompts"], chapter["completions"], chapter["loaded"]
    assert len(completions) == len(prompts) > 0
    assert all(0 < c.completion_tokens <= chapter["max_new_tokens"] for c in completions)
    assert all(c.finish_reason in ("stop", "eos", "length") for c in completions)
    (table,) = chapter.frames("model", "parameters (M)")
    assert table.to_dict("records") == [{"model": loaded.name, "parameters (M)": round(loaded.model.num_parameters() / 1e6, 1),
                                         "context": loaded.context_length, "dtype": str(loaded.model.dtype)}]
    assert loaded.name == chapter["model"]
    (answers,) = chapter.frames("completion", "tokens")
    assert len(answers) == len(prompts)
    assert answers["tokens"].tolist() == [c.completion_tokens for c in completions]
    assert answers["completion"].tolist() == [c.text.strip() for c in completions]


def check_red_team_prompts(chapter):
    stage = chapter.stage_dir / "prompts"
    manifest = finished(stage)
    assert chapter["manifest"] == manifest
    counts, prompts, drops = manifest["counts"], chapter["prompts"], chapter["drops"]
    kept, dropped = jsonl(stage / "prompts.jsonl"), jsonl(stage / "drops.jsonl")
    assert counts["self_instruct"] + counts["red_team"] == len(kept) == len(prompts) > 0
    assert sum(counts["drops"].values()) == len(dropped) == len(drops) > 0
    assert prompts["prompt"].tolist() == [p["prompt"] for p in kept]
    assert (prompts["source"] == "self_instruct").sum() == counts["self_instruct"]
    assert counts["topics"] == len(jsonl(stage / "topics.jsonl")) == len(chapter["frames"]["topics"])
    assert [s for s in chapter.shown if isinstance(s, dict)] == [{k: v for k, v in counts.items() if k != "drops"}]
    # The bar chart: one bar per source/type, summing to the kept prompts.
    ax = chapter.axes(xlabel="kept prompts")
    (bars,) = bar_sizes(ax)
    assert sum(bars) == len(prompts)
    assert sorted(labels(ax.get_yticklabels())) == sorted(prompts["type"].fillna("(self-instruct)").unique())
    (sample,) = chapter.frames("source", "type", "topic", "prompt")
    assert len(sample) == min(12, len(prompts)) and set(sample["prompt"]) <= set(prompts["prompt"])
    (reasons,) = chapter.frames("candidates")
    assert reasons["candidates"].sum() == len(drops)
    (topics,) = [s for s in chapter.shown if isinstance(s, pd.DataFrame) and list(s.columns) == ["topic"]]
    assert len(topics) == chapter["frames"]["topics"]["type"].nunique() == counts["topics"]


def check_self_align(chapter):
    stage = chapter.stage_dir / "self_align"
    manifest = finished(stage)
    counts, responses, principles = manifest["counts"], chapter["responses"], chapter["principles"]
    kept, dropped = jsonl(stage / "responses.jsonl"), jsonl(stage / "drops.jsonl")
    (shown_principles,) = chapter.frames("number", "name", "text")
    assert shown_principles["number"].tolist() == [p.number for p in principles.principles] == list(range(1, 17))
    assert counts["prompts"] == chapter["limit"] == counts["responses"] + counts["drops"]
    assert counts["responses"] == len(kept) == len(responses) and counts["drops"] == len(dropped)
    assert sum(counts["drop_reasons"].values()) == counts["drops"]
    (reasons,) = chapter.frames("dropped")
    assert reasons["dropped"].to_dict() == counts["drop_reasons"]
    overall, per_type = chapter["overall"], chapter["per_type"]
    assert len(overall) == len(principles.principles) == 16 and len(per_type) == 16
    assert overall["responses"].sum() == sum(len(r["triggers"]) for r in kept)
    assert list(per_type.columns) == sorted(responses["type"].fillna("(self-instruct)").unique())
    assert chapter.frames("responses", "share")[0] is overall
    check_heatmap(chapter.axes(title="Which principles fired"), per_type)
    # The likelihood heatmap shows each type's mean principle_scores, from the kept records.
    likely = chapter.axes(title="Which principles the model finds likely")
    if len(responses):
        means = pd.DataFrame([{**{k: v for k, v in r["principle_scores"].items()}, "type": r["type"] or "(self-instruct)"}
                              for r in kept]).groupby("type").mean()
        grid = np.asarray(likely.images[0].get_array())
        assert grid.shape == (16, len(means))
        assert grid[:, 0] == pytest.approx(means.iloc[0][[str(n) for n in range(1, 17)]].to_numpy(dtype=float))
    else:
        assert not likely.images and "no responses" in labels(likely.texts)
    assert all(r["constrained"] is True for r in kept + dropped)
    disagree = chapter.frames("most_likely", "agrees")[-1]
    assert len(disagree) == len(kept) and disagree["id"].tolist() == [r["id"] for r in kept]
    (bins,) = bar_sizes(chapter.axes(xlabel="answer length (words)"), horizontal=False)  # a histogram, even of none
    assert len(bins) == 20 and sum(bins) == len(responses)
    (head,) = chapter.frames("type", "prompt", "thoughts", "answer")
    assert len(head) == min(8, len(responses))


def check_principle_engraving(chapter):
    stage = chapter.stage_dir / "engrave"
    manifest = finished(stage)
    counts, frames = manifest["counts"], chapter["frames"]
    assert (chapter["engrave"].adapter_dir(chapter["run"], chapter["runs_dir"]) / "adapter_config.json").exists()
    assert chapter.frames("value")[0]["value"].to_dict() == pytest.approx(counts)
    data = jsonl(stage / "data.jsonl")
    assert counts["records"] == len(data) == len(frames["data"]) == counts["train"] + counts["holdout"] + counts["dropped"]
    (splits,) = chapter.frames("count")
    assert splits["count"].to_dict() == {k: counts[k] for k in ("train", "holdout", "dropped") if counts[k]}
    # The loss curve: one point per optimizer step of loss.jsonl.
    loss = jsonl(stage / "loss.jsonl")
    assert counts["steps"] == len(loss) > 0
    steps, losses = line_data(chapter.axes(ylabel="training loss"))
    assert steps == [s["step"] for s in loss] and losses == pytest.approx([s["loss"] for s in loss])
    # Held-out answers: one point each, at (base, engraved) log-prob.
    comparison = chapter["comparison"]
    assert len(comparison) == counts["holdout"] == len(jsonl(stage / "comparison.jsonl")) > 0
    (points,) = chapter.axes(title="Held-out answers").collections
    np.testing.assert_allclose(points.get_offsets(), comparison[["base_logprob", "adapted_logprob"]].to_numpy())
    assert counts["holdout_improved"] == (comparison["adapted_logprob"] > comparison["base_logprob"]).sum()
    # Side by side: a row per sampled held-out prompt, an answer from each model.
    answers, held = chapter["answers"], chapter["held"]
    assert len(answers) == len(held) == min(chapter["sample_prompts"], counts["holdout"]) > 0
    assert list(answers.columns) == ["prompt", "base", "engraved", "stage 2 (with principles)"]
    assert answers["prompt"].tolist() == held["prompt"].tolist()
    assert chapter.shown[-1] is answers


def check_verbose_cloning(chapter):
    stage = chapter.stage_dir / "verbose"
    manifest = finished(stage)
    counts, frames, answers = manifest["counts"], chapter["frames"], chapter["answers"]
    assert (chapter["engrave"].adapter_dir(chapter["run"], chapter["runs_dir"], "verbose") / "adapter_config.json").exists()
    assert chapter.frames("value")[0]["value"].to_dict() == pytest.approx(counts)
    assert counts["answers"] == len(jsonl(stage / "answers.jsonl")) == len(answers) > 0
    assert counts["drops"] == len(jsonl(stage / "drops.jsonl"))
    assert counts["cut_at_length"] == answers["cut_at_length"].sum()
    assert counts["records"] == len(frames["data"]) == counts["train"] + counts["holdout"] + counts["dropped"]
    # Answer lengths: one histogram for stage 2's answers, one for the teacher's.
    ax = chapter.axes(xlabel="answer length (words)")
    stage_two, teacher = bar_sizes(ax, horizontal=False)
    assert (sum(stage_two), sum(teacher)) == (len(chapter["stage_two"]), len(answers))
    assert labels(ax.get_legend().get_texts()) == ["stage 2", "verbose teacher"]
    (head,) = chapter.frames("prompt", "answer", "cut_at_length")
    assert len(head) == min(5, len(answers))
    loss = jsonl(stage / "loss.jsonl")
    assert counts["steps"] == len(loss) > 0
    steps, losses = line_data(chapter.axes(ylabel="training loss"))
    assert steps == [s["step"] for s in loss] and losses == pytest.approx([s["loss"] for s in loss])
    comparison = frames["comparison"]
    assert len(comparison) == counts["holdout"] == len(jsonl(stage / "comparison.jsonl"))
    plotted = chapter.axes(title="Held-out answers").collections
    assert sum(len(c.get_offsets()) for c in plotted) == len(comparison)
    sides = chapter.frames("prompt", "base", "engraved", "verbose (final)")[-1]
    assert len(sides) == min(chapter["sample_prompts"], counts["holdout"])
    assert sides["prompt"].tolist() == chapter["held"]["prompt"].tolist()


def check_evaluation(chapter):
    from selfalign.records import Run
    from selfalign.stages import evaluate

    config, table, benchmarks = chapter["config"], chapter["table"], chapter["benchmarks"]  # those evaluated
    assert set(benchmarks) == set(config.benchmarks) & set(evaluate.available(chapter["data_dir"]))
    models = list(evaluate.models_of(Run(chapter["run"], chapter["runs_dir"])))
    assert models == ["base", "engraved", "verbose"]  # stages 3 and 4 ran before
    if not benchmarks:  # no benchmark data here: the chapter says so and shows nothing
        assert chapter["manifest"] is None and not len(table)
        return
    stage = chapter.stage_dir / "evaluate"
    manifest = finished(stage)
    assert manifest["counts"]["models"] == models
    summary = jsonl(stage / "summary.jsonl")
    assert manifest["counts"]["rows"] == len(table) == len({(r["benchmark"], r["metric"]) for r in summary})
    # A row per (benchmark, metric), a column per model of the run, a score in every cell (Vicuna:
    # each trained model against the base model).
    assert [c for c in table.columns if c not in ("benchmark", "metric", "n", "note")] == models
    prefixes = {"truthfulqa": "truthfulqa_mc", "hhh": "hhh", "vicuna": "vicuna_pairwise"}
    for benchmark in benchmarks:
        rows = table[table["benchmark"].str.split("/").str[0] == prefixes[benchmark]]
        assert len(rows), f"no rows for {benchmark}"
        scored = models[1:] if benchmark == "vicuna" else models
        assert rows[scored].notna().all().all(), rows
    assert {(r["model"], r["benchmark"].split("/")[0]) for r in summary} >= {
        (m, prefixes[b]) for b in benchmarks for m in (models[1:] if b == "vicuna" else models)}
    headline = chapter.frames("benchmark", "metric")[0]
    assert len(headline) == (~table["benchmark"].str.contains("/")).sum()
    if "truthfulqa" in benchmarks:
        per_category, n = chapter["per_category"], table.set_index(["benchmark", "metric"]).loc[("truthfulqa_mc", "mc1"), "n"]
        assert per_category["n"].sum() == n == min(chapter["limit"], 817)
        assert any(s is per_category for s in chapter.shown) and len(per_category)
        ax = chapter.axes(xlabel="MC1")
        # bars: one series per model, one bar per category (the largest group on top)
        assert bar_sizes(ax) == [pytest.approx(per_category[m].iloc[::-1].tolist()) for m in models]
        assert labels(ax.get_yticklabels()) == [f"{c} ({k})" for c, k in zip(per_category.index[::-1], per_category["n"][::-1])]
    if "hhh" in benchmarks:
        hhh = chapter["hhh"]
        assert len(hhh) and hhh["benchmark"].str.startswith("hhh/").all()
        assert any(s is not hhh and isinstance(s, pd.DataFrame) and s.index.equals(hhh.index) for s in chapter.shown)
    if "vicuna" in benchmarks:
        (answers,) = chapter.frames("question")
        assert len(answers) == chapter["vicuna_limit"]
        assert set(models) | {f"{m} vs base" for m in models[1:]} <= set(answers.columns)
        assert answers[models].notna().all().all()
    responses, per_type = chapter["responses"], chapter["per_type"]
    assert len(responses) == len(jsonl(chapter.stage_dir / "self_align" / "responses.jsonl"))
    assert len(chapter["overall"]) == len(per_type) == 16 and list(per_type.columns) == sorted(
        responses["type"].fillna("(self-instruct)").unique())
    assert chapter.shown[-1] is chapter["overall"]


def check_explore_principles(chapter):
    import html

    from IPython.display import HTML

    from selfalign import widgets

    stage = chapter.stage_dir / "self_align"
    kept, dropped = jsonl(stage / "responses.jsonl"), jsonl(stage / "drops.jsonl")
    records = chapter["records"]
    assert [r["id"] for r in records] == [r["id"] for r in kept + dropped] and records
    assert sum(r["status"] == "kept" for r in records) == len(kept)
    (tally,) = [s for s in chapter.shown if isinstance(s, pd.DataFrame) and "count" in s.columns]
    assert tally["count"].sum() == len(records)
    # Leave-one-out: 17 variants of the same prompts, on disk and in the table; a bar per principle.
    answers, summary = chapter["answers"], chapter["summary"]
    n = min(chapter["loo_prompts"], len({r["prompt"] for r in records}))
    assert len(answers) == ((len(chapter["loo_principles"]) or 16) + 1) * n == len(jsonl(chapter.stage_dir / "leave_one_out" / "answers.jsonl")) > 0
    (shown,) = chapter.frames("left_out", "changed", "median_overlap", "score_shift", "most_moved_type")
    assert shown is summary and len(summary) == (len(chapter["loo_principles"]) or 16) and (summary["n"] == n).all()
    assert summary["effect"].is_monotonic_decreasing
    ax = chapter.axes(xlabel="1 - mean ROUGE-L overlap")
    assert bar_sizes(ax) == [pytest.approx(summary["effect"][::-1].tolist())]
    assert labels(ax.get_yticklabels()) == summary["principle"][::-1].tolist()
    # The static results: the edit's comparison, the explorer's largest cell, the two heatmaps.
    pages = [s.data for s in chapter.shown if isinstance(s, HTML)]
    (comparison,) = [p for p in pages if 'class="selfalign-comparison"' in p]
    edit = chapter["principles"].principle(chapter["edit"])
    assert html.escape(f"edited: {edit.number} {edit.name}: off") in comparison and comparison.count("<tr>") == n + 1
    (cell,) = [p for p in pages if p is not comparison]
    cells = widgets.heatmap_cells(chapter["per_type"])
    assert ('class="selfalign-examples"' in cell and cells[0][0] in cell) if cells else "No kept response" in cell
    heatmaps = [a for f in chapter.figures for a in f.axes if a.images or "no responses" in labels(a.texts)]
    assert len(heatmaps) == 2  # the triggers', then the likelihoods' (the widget's own is not a figure of the page)
    check_heatmap(heatmaps[0], chapter["per_type"])
    check_heatmap(heatmaps[1], chapter["likely"])
    (editor,) = chapter.shown_of(widgets.PrincipleEditor)
    assert editor.prompts == chapter["prompts"] == widgets.editor_prompts(records, chapter["regenerate_prompts"])
    assert len(editor.prompts) == min(chapter["regenerate_prompts"], len({r["prompt"] for r in records})) > 0
    assert len(editor.texts) == len(editor.toggles) == len(chapter["principles"].principles)
    (inspector,) = chapter.shown_of(widgets.ResponseInspector)
    assert inspector.records is records and len(inspector.choice.options) == len(records)
    assert inspector.count.value == f"{len(records)} of {len(records)} records"
    assert inspector.detail.value  # the first record is open
    (explorer,) = chapter.shown_of(widgets.TriggerExplorer)
    assert list(explorer.per_type.columns) == sorted({widgets.type_of(r) for r in kept})
    assert bytes(explorer.heatmap.value).startswith(b"\x89PNG") and explorer.examples.value


def check_scale(chapter):
    from selfalign import paper

    from selfalign import cost

    memory, table, hours = chapter["memory"], chapter["table"], chapter["hours"]
    (model_shape,) = chapter.frames(chapter["model_shape"])
    assert model_shape.loc["parameters (billions)", chapter["model_shape"]] == round(cost.param_count(chapter["shape"]) / 1e9, 2) > 0
    comparison = chapter["comparison"]
    # The profile beside the paper: every setting, and what no setting reproduces.
    assert len(chapter.frames("paper", "this profile")[0]) == len(comparison) > 0
    assert len(chapter.frames("the paper", "ours", "why")[0]) == len(paper.NOT_SETTINGS) > 0
    # Memory: the table, and its plot, a stacked bar per configuration.
    assert len(memory) == 4 and chapter.frames("configuration", "fits")[0]["configuration"].tolist() == memory["configuration"].tolist()
    ax = chapter.axes(xlabel="GB per GPU")
    assert bar_sizes(ax) == [pytest.approx(memory[part].tolist()) for part in chapter["parts"]]
    assert labels(ax.get_yticklabels()) == memory["configuration"].tolist()
    # GPU-hours: the cost table's stages and the plotted bars agree, and sum to the total.
    assert chapter.frames("stage", "kind", "gpu_hours")[0]["stage"].tolist() == table["stage"].tolist()
    stages = table[table["stage"] != "total"]
    assert len(stages) == len(hours) == 5 and table["stage"].iloc[-1] == "total"
    ax = chapter.axes(xlabel="GPU-hours")
    assert bar_sizes(ax) == [pytest.approx(stages["gpu_hours"].tolist())]
    assert labels(ax.get_yticklabels()) == stages["stage"].tolist()
    assert table["gpu_hours"].iloc[-1] == pytest.approx(stages["gpu_hours"].sum())
    (backends,) = chapter.frames("backend", "GPU-hours")
    assert len(backends) == 2 and backends["GPU-hours"].is_monotonic_decreasing
    # Replicas: the wall time shrinks with them, the GPU-hours do not move.
    assert (table["gpus"].iloc[:-1] > 0).all() and table["wall_hours"].iloc[-1] == pytest.approx(
        (stages["gpu_hours"] / stages["gpus"]).sum())
    (replicas,) = chapter.frames("replicas", "GPU-hours", "wall days")
    assert replicas["GPU-hours"].nunique() == 1 and replicas["wall days"].is_monotonic_decreasing


# ---- the "open the box" sections: each shows one example going through the stage's own functions ----

def open_box_red_team_prompts(chapter):
    (table,) = chapter.frames("item", "filter", "kept")
    assert table["item"].tolist() == chapter["items"] and len(table) == 5  # the cut-off sixth item is gone
    passes = table["filter"] == "passes"
    assert not passes.all() and passes.any()  # the filter refused some, not all
    assert table["kept"].sum() == len(chapter["survivors"]) < passes.sum()  # and ROUGE-L dropped a near-copy
    assert not (table["kept"] & ~passes).any()


def open_box_self_align(chapter):
    table = chapter.frames("thoughts", "answer", "triggers", "unknown citations", "drop reason")[-1]
    by_hand, the_run = table.iloc[0], table.iloc[1]
    other = chapter["other"]
    assert by_hand["triggers"] == [2, 7] and by_hand["unknown citations"] == [f"11 ({other.name})", "23"]
    assert by_hand["answer"] == "Paris is the capital of France." and by_hand["drop reason"] == "(kept)"
    first_call = jsonl(chapter.stage_dir / "self_align" / "calls.jsonl")[0]
    assert table.index[1] == f"the run's {first_call['id']}" and the_run["drop reason"]
    # The grammar refuses the hand-written continuation and allows it with its citations fixed.
    allowed = chapter.frames("continuation", "allowed")[-1]
    assert allowed["allowed"].tolist() == [False, True]
    assert f'"{other.number} ({other.name})"' in chapter["grammar"]


def open_box_principle_engraving(chapter):
    from IPython.display import HTML

    shown = [s for s in chapter.shown if isinstance(s, HTML)]
    sources = chapter["trained"]["source"].unique()
    assert len(shown) == len(sources) > 0
    for html in shown:  # each a real example: context tokens and trained ones
        assert html.data.count('title="loss"') > 0 and html.data.count('title="context"') > 0


def open_box_verbose_cloning(chapter):
    chat, teacher, student = chapter["chat"], chapter["teacher_prompt"], chapter["student_prompt"]
    instruction = chapter["read_instruction"](chapter["config"].instruction)
    told = instruction.strip().format(assistant=chat.assistant, developer=chat.developer)
    assert told in teacher and told not in student  # the instruction is the only difference
    assert teacher.replace(told + "\n\n", "") == student
    (cut,) = chapter.frames("text")
    assert cut["text"].iloc[0].startswith(cut["text"].iloc[1]) and len(cut) == 2


def open_box_evaluation(chapter):
    if "truthfulqa" not in chapter["benchmarks"]:
        return
    table = chapter.frames("answer", "true", "log P(answer | question)")[-1]
    assert len(table) == len(chapter["candidates"]) > 1 and table["true"].tolist()[0] and not table["true"][1:].any()
    best, rest = table["log P(answer | question)"].iloc[0], table["log P(answer | question)"].iloc[1:]
    assert chapter["by_hand"] == chapter["by_stage"] == float(best > rest.max())


def both(check, open_box):
    return lambda chapter: (check(chapter), open_box(chapter))


CHECKS = {"00_setup": check_setup,
          "01_red_team_prompts": both(check_red_team_prompts, open_box_red_team_prompts),
          "02_self_align": both(check_self_align, open_box_self_align),
          "03_principle_engraving": both(check_principle_engraving, open_box_principle_engraving),
          "04_verbose_cloning": both(check_verbose_cloning, open_box_verbose_cloning),
          "05_evaluation": both(check_evaluation, open_box_evaluation),
          "06_explore_principles": check_explore_principles,
          "07_scale": check_scale}


# The notebooks share one run directory and run in order, as in the book: each reads what the
# previous one wrote (so selecting a later one alone with -k fails). After each, its checker looks at
# what it produced: the run's files, and the tables, plots and widgets it showed.
@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_on_a_tiny_model(source, book_dir, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")  # in-process, so no inline backend; papermill kernels keep theirs
    monkeypatch.chdir(book_dir)
    assert source.stem in CHECKS, f"{source.name} has no check of what it shows"
    chapter = execute(source, {}, monkeypatch)
    CHECKS[source.stem](chapter)


def test_chapter_six_declares_the_leave_one_out_settings_with_their_defaults():
    """Chapter 6's loo_* parameters are LeaveOneOutConfig's fields (the CLI's flags and the profiles'
    `chapters:` keys), each with the dataclass's default and each handed to the config; every
    profile's values for them build a config."""
    import dataclasses

    import papermill

    from selfalign.ablation import LeaveOneOutConfig
    from selfalign.profiles import build, load_profile

    source = REPO / "notebooks" / "06_explore_principles.py"
    declared = {k: ast.literal_eval(v["default"])
                for k, v in papermill.inspect_notebook(str(source.with_suffix(".ipynb"))).items()}
    fields = {f.name: f.default for f in dataclasses.fields(LeaveOneOutConfig) if f.name.startswith("loo_")}
    assert {k: v for k, v in declared.items() if k.startswith("loo_")} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    (call,) = [n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.Call)
               and getattr(n.func, "attr", "") == "LeaveOneOutConfig"]
    passed = {k.arg for k in call.keywords}
    assert set(fields) | {"run", "runs_dir", "model", "seed"} <= passed
    for name in ("tiny", "small", "full"):
        chosen = {k: v for k, v in load_profile(name).get("chapters", {}).items() if k in fields}
        build(LeaveOneOutConfig, chosen, where=f"profile {name!r}")
