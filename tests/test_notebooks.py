"""The notebooks: each .py percent file is in sync with its .ipynb, and each runs top to bottom."""

import jupytext
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))
# Small, CPU-quick settings, injected after the parameters cell as papermill would.
TINY = {"model": "tiny-random", "run": "nbtest", "n_self_instruct": 2, "types_limit": 2,
        "max_new_tokens": 8, "limit": 4, "ablation_prompts": 2,
        # stage 2 on its own needs prompts; a random model's stage 1 keeps few or none
        "prompts": str(REPO / "principles" / "seed_prompts.jsonl"),
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


# The notebooks share one run directory and run in order, as in the book: each reads what the
# previous one wrote (so selecting a later one alone with -k fails).
@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_on_a_tiny_model(source, book_dir, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")  # in-process, so no inline backend; papermill kernels keep theirs
    monkeypatch.chdir(book_dir)
    namespace: dict = {}
    for cell in jupytext.read(source).cells:
        if cell.cell_type != "code":
            continue
        exec(compile(cell.source, f"{source.name}", "exec"), namespace)
        if "parameters" in cell.metadata.get("tags", []):
            namespace.update({k: v for k, v in TINY.items() if k in namespace})
