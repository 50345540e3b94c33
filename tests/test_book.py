"""`selfalign run` executes the notebooks with papermill, stops at a failure, and resumes."""

import json

import nbformat
import pytest

from selfalign.cli import main
from conftest import REPO

TINY = ["--model", "tiny-random", "-p", "self-align.limit", "2", "-p", "n_self_instruct", "2", "-p", "types_limit", "2",
        "-p", "max_new_tokens", "8", "-p", "ablation_prompts", "2",
        "-p", "self-align.prompts", str(REPO / "principles" / "seed_prompts.jsonl"),
        "-p", "responses", str(REPO / "tests" / "data" / "responses.jsonl"), "-p", "epochs", "1",
        "-p", "sample_prompts", "1", "-p", "sample_max_new_tokens", "4",
        "-p", "evaluate.limit", "3", "-p", "vicuna_limit", "2", "-p", "evaluate.max_new_tokens", "4"]


@pytest.mark.slow
def test_notebooks_run_headless_then_resume(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    # A principle that does not exist makes the ablation at the end of notebook 02 fail: the run stops
    # there and says where the failed copy is.
    assert main(["run", "--run", "b", "--runs-dir", runs, *TINY, "-p", "ablate_principle", "99"]) == 1
    error = capsys.readouterr().err
    failed = tmp_path / "runs" / "b" / "notebooks" / "02_self_align.ipynb"
    assert str(failed) in error
    assert nbformat.read(failed, as_version=4).metadata.papermill.exception

    assert main(["run", "--run", "b", "--runs-dir", runs, *TINY]) == 0
    out = capsys.readouterr().out
    assert "[00_setup] finished earlier, skipped" in out and "[01_red_team_prompts] finished earlier" in out
    assert "[02_self_align] running" in out
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
    assert "choose one of ['full', 'small', 'tiny']" in capsys.readouterr().err
    # A profile file's values reach the notebooks (here: one that no notebook declares is refused).
    custom = tmp_path / "mine.yaml"
    custom.write_text("self-align: {limit: 3}\nchapters: {no_such_key: 1}\n")
    assert main(["run", "--run", "b", "--runs-dir", str(tmp_path), "--profile", str(custom)]) == 1
    assert "['no_such_key']" in capsys.readouterr().err
