"""`selfalign run` executes the notebooks with papermill, stops at a failure, and resumes."""

import html as markup
import json
import re

import nbformat
import pytest

from selfalign.cli import main
from conftest import REPO

TINY = ["--model", "tiny-random", "-p", "self-align.limit", "2", "-p", "n_self_instruct", "2", "-p", "types_limit", "2",
        "-p", "max_new_tokens", "8", "-p", "loo_prompts", "2", "-p", "loo_max_new_tokens", "4",
        "-p", "self-align.prompts", str(REPO / "principles" / "seed_prompts.jsonl"), "-p", "min_responses", "0",
        "-p", "responses", str(REPO / "tests" / "data" / "responses.jsonl"), "-p", "epochs", "1",
        "-p", "sample_prompts", "1", "-p", "sample_max_new_tokens", "4",
        "-p", "evaluate.limit", "3", "-p", "vicuna_limit", "2", "-p", "evaluate.max_new_tokens", "4"]


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def visible(text: str) -> str:
    """The printable characters of a text (a random model writes control characters, which the pages
    may drop), HTML entities decoded."""
    return "".join(c for c in markup.unescape(text) if c.isprintable())


def shows(page: str, text: str) -> bool:
    """Whether a page shows the start of a text (tables cut long cells at 50 characters)."""
    start = visible(text[:30])
    return bool(start.strip()) and start in visible(page)


# Plots each chapter draws whatever the run found (chapter 5's needs TruthfulQA; chapter 6's are the
# leave-one-out chart and the two heatmaps its widgets show live).
PLOTS = {"00_setup": 0, "01_red_team_prompts": 1, "02_self_align": 2, "03_principle_engraving": 2,
         "04_verbose_cloning": 3, "05_evaluation": 0, "06_explore_principles": 3, "07_scale": 2}


def assert_pages_show_the_run(run):
    """The built pages carry this run's own results, not just the chapters' headings."""
    from selfalign.records import Run
    from selfalign.stages.evaluate import models_of

    html = run / "book" / "_build" / "html"
    pages = {p.stem: p.read_text() for p in (html / "notebooks").glob("*.html")}
    assert set(pages) == set(PLOTS)
    for stem, page in pages.items():  # every plot the executed chapter drew is on its page
        executed = nbformat.read(run / "notebooks" / f"{stem}.ipynb", as_version=4)
        drawn = sum("image/png" in o.get("data", {}) for c in executed.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
        truthfulqa = stem == "05_evaluation" and any(r["benchmark"] == "truthfulqa_mc"
                                                     for r in jsonl(run / "evaluate" / "summary.jsonl"))
        assert page.count("<img") >= max(drawn, PLOTS[stem] + truthfulqa), stem
    # One parameters cell a chapter: the declared one, with the values this run used (TINY's limit 2).
    text = {stem: markup.unescape(re.sub(r"<[^>]+>", "", page)) for stem, page in pages.items()}
    assert not any("# Parameters" in t for t in text.values())
    assert "limit: int = 2  # answer the first N prompts" in text["02_self_align"]
    # Chapter 1 shows a sample of up to 12 of the kept prompts.
    kept = jsonl(run / "prompts" / "prompts.jsonl")
    found = [shows(pages["01_red_team_prompts"], p["prompt"]) for p in kept]
    assert kept and (all(found) if len(kept) <= 12 else any(found))
    # Chapter 2: why its answers were dropped, the first kept answers, a record of the run by its id.
    self_aligned = json.loads((run / "self_align" / "manifest.json").read_text())["counts"]
    for reason, count in self_aligned["drop_reasons"].items():
        assert re.search(rf"<th>{re.escape(markup.escape(reason))}</th>\s*<td>{count}</td>", pages["02_self_align"])
    assert all(shows(pages["02_self_align"], r["answer"]) for r in jsonl(run / "self_align" / "responses.jsonl")[:8])
    assert any(r["id"] in pages["02_self_align"] for r in jsonl(run / "self_align" / "calls.jsonl"))
    # Chapter 3: the held-out test of this run.
    engraved = json.loads((run / "engrave" / "manifest.json").read_text())["counts"]
    assert f"held-out answers: {engraved['holdout']}" in pages["03_principle_engraving"]
    # Chapter 6: the leave-one-out table (a row per principle) and the edit's comparison, though no widget is live.
    import csv

    explored = pages["06_explore_principles"]
    summary = list(csv.DictReader((run / "leave_one_out" / "summary.csv").open()))
    from selfalign.ablation import LeaveOneOutConfig

    assert len(summary) == (len(LeaveOneOutConfig().loo_principles) or 16) and all(f"<td>{markup.escape(row['principle'])}</td>" in explored for row in summary)
    assert 'class="selfalign-comparison"' in explored and markup.escape(f"edited: {summary[0]['principle']}: off") in explored
    # Chapter 5: the run's models, each a column of the results.
    models = list(models_of(Run(run.name, run.parent)))
    assert models == ["base", "engraved", "verbose"]  # stages 3 and 4 ran
    evaluation = pages["05_evaluation"]
    assert f"models: {', '.join(models)}" in evaluation
    if (run / "evaluate" / "summary.jsonl").exists():  # the benchmarks' data was there
        assert all(f"<th>{m}</th>" in evaluation for m in models)


def test_the_book_shows_one_parameters_cell_with_the_values_the_run_used():
    from selfalign.book import one_parameters_cell

    def cell(source, tag):
        return {"cell_type": "code", "metadata": {"tags": [tag]}, "source": source, "outputs": []}

    declared = cell('run: str = "demo"  # the run\nlimit: int = 16  # prompts (0: all)\n'
                    'settings: dict = {\n    "a": 1,\n}  # more\n', "parameters")
    injected = cell('# Parameters\nrun = "r"\nlimit = 2\nsettings = {"b": [1, 2]}\n', "injected-parameters")
    notebook = {"cells": [declared, injected, cell("print(limit)", "other")]}
    shown = one_parameters_cell(notebook)
    assert [c["metadata"]["tags"] for c in shown["cells"]] == [["parameters"], ["other"]]
    assert shown["cells"][0]["source"] == ('run: str = "r"  # the run\nlimit: int = 2  # prompts (0: all)\n'
                                           'settings: dict = {"b": [1, 2]}  # more\n')
    assert len(notebook["cells"]) == 3  # the executed copy itself is left as it is
    # A name the declared cell lacks: both cells stay, so that no value the run used is hidden.
    extra = {"cells": [declared, cell(injected["source"] + "other = 3\n", "injected-parameters")]}
    assert one_parameters_cell(extra) == extra


@pytest.mark.slow
def test_notebooks_run_headless_then_resume(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    # A principle that does not exist makes the leave-one-out of notebook 06 fail: the run stops
    # there and says where the failed copy is.
    assert main(["run", "--run", "b", "--runs-dir", runs, *TINY, "-p", "loo_principles", "[99]"]) == 1
    error = capsys.readouterr().err
    failed = tmp_path / "runs" / "b" / "notebooks" / "06_explore_principles.ipynb"
    assert str(failed) in error and "no principle numbered [99]" in error
    assert nbformat.read(failed, as_version=4).metadata.papermill.exception
    assert not (tmp_path / "runs" / "b" / "notebooks" / "07_scale.ipynb").exists()

    assert main(["run", "--run", "b", "--runs-dir", runs, *TINY]) == 0
    out = capsys.readouterr().out
    assert "[00_setup] finished earlier, skipped" in out and "[05_evaluation] finished earlier" in out
    assert "[06_explore_principles] running" in out
    executed = nbformat.read(failed, as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "tiny-random" in injected.source and str(tmp_path / "runs") in injected.source
    manifest = json.loads((tmp_path / "runs" / "b" / "self_align" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["params"]["model"] == "tiny-random"
    from selfalign.book import completed

    assert completed(tmp_path / "runs" / "b" / "notebooks" / "06_explore_principles.ipynb")  # widgets, headless

    # The book is built from those executed copies, with Sphinx warnings as errors.
    assert main(["book", "--run", "b", "--runs-dir", runs]) == 0
    html = tmp_path / "runs" / "b" / "book" / "_build" / "html"
    page = (html / "notebooks" / "02_self_align.html").read_text()
    assert "Which principles fired" in page and "<img" in page
    assert (html / "index.html").exists()
    assert "Knowledge Recitation" in (html / "book" / "principles.html").read_text()
    assert "Did the principles move into the weights?" in (html / "notebooks" / "03_principle_engraving.html").read_text()
    assert (tmp_path / "runs" / "b" / "verbose" / "adapter" / "adapter_config.json").exists()
    assert "The principle editor" in (html / "notebooks" / "06_explore_principles.html").read_text()
    scale = (html / "notebooks" / "07_scale.html").read_text()
    assert "GPU-hours" in scale and "4-bit QLoRA (nf4), one GPU" in scale and "<img" in scale

    assert_pages_show_the_run(tmp_path / "runs" / "b")


def test_book_needs_a_finished_run(tmp_path, capsys):
    assert main(["book", "--run", "nothing", "--runs-dir", str(tmp_path)]) == 1
    assert "selfalign run --run nothing" in capsys.readouterr().err


def test_unknown_parameter_is_refused(tmp_path, capsys):
    assert main(["run", "--run", "b", "--runs-dir", str(tmp_path), "-p", "no_such_setting", "1"]) == 1
    assert "no stage or notebook takes the parameters ['no_such_setting']" in capsys.readouterr().err


def test_profiles(tmp_path, capsys):
    from selfalign.profiles import load_profile

    assert not any(load_profile("tiny").values())  # the stages' own defaults
    assert load_profile("full")["self-align"]["limit"] == 0
    assert main(["run", "--run", "b", "--runs-dir", str(tmp_path), "--profile", "huge"]) == 1
    assert "choose one of ['full', 'full-cluster', 'small', 'tiny']" in capsys.readouterr().err
    # A profile file's values reach the notebooks (here: one that no notebook declares is refused).
    custom = tmp_path / "mine.yaml"
    custom.write_text("self-align: {limit: 3}\nchapters: {no_such_key: 1}\n")
    assert main(["run", "--run", "b", "--runs-dir", str(tmp_path), "--profile", str(custom)]) == 1
    assert "['no_such_key']" in capsys.readouterr().err
