"""Run the book's notebooks headless with papermill, in order, resuming finished ones; build the book.

Each notebook in `notebooks/` is executed into `runs/<run>/notebooks/<name>.ipynb` with its
`parameters` cell overridden (run name, runs directory, model, and any `-p key value` that the
notebook declares). A notebook whose executed copy exists without an error is not run again; the
first failure stops the run, keeping the failed copy (with its traceback) and printing its path.

`build_book` then turns a run's executed notebooks into the Jupyter Book (1.x) HTML, offline.

This module only orchestrates: every computation lives in the stage modules the notebooks call.
"""

from __future__ import annotations

from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
PROFILE_DIR = NOTEBOOK_DIR.parent / "profiles"


def load_profile(name: str) -> dict:
    """Notebook parameters of a named profile (`profiles/<name>.yaml`) or of a YAML file path."""
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {name!r}: choose one of {known} or give a YAML file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of notebook parameters")
    return values


class NotebookFailed(RuntimeError):
    def __init__(self, notebook: Path, executed: Path, cause: Exception):
        super().__init__(f"{notebook.name} failed; the executed notebook with the error is {executed}\n{cause}")
        self.executed = executed


def notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    found = sorted(directory.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks in {directory}; run `jupytext --sync notebooks/*.py` to pair them")
    return found


def completed(executed: Path) -> bool:
    """An executed notebook that papermill ran to the end without an exception."""
    if not executed.exists():
        return False
    import nbformat

    metadata = nbformat.read(executed, as_version=4).metadata.get("papermill", {})
    return bool(metadata.get("end_time")) and not metadata.get("exception")


def run_book(run: str, runs_dir: str | Path = "runs", parameters: dict | None = None,
             only: list[str] | None = None, progress: bool = True, log=print) -> list[Path]:
    """Execute the notebooks in order; return the executed copies. Raises NotebookFailed."""
    import papermill

    runs_dir = Path(runs_dir).resolve()
    out_dir = runs_dir / run / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"run_name": run, "runs_dir": str(runs_dir), **(parameters or {})}
    declared_anywhere: set[str] = set()
    plan = []
    for notebook in notebooks():
        if only and not any(notebook.stem.startswith(prefix) for prefix in only):
            continue
        declared = set(papermill.inspect_notebook(str(notebook)))
        declared_anywhere |= declared
        plan.append((notebook, {k: v for k, v in common.items() if k in declared}))
    unknown = sorted(set(parameters or {}) - declared_anywhere)
    if unknown:
        raise ValueError(f"no notebook takes the parameters {unknown}")

    executed_paths = []
    for notebook, values in plan:
        executed = out_dir / notebook.name
        executed_paths.append(executed)
        if completed(executed):
            log(f"[{notebook.stem}] finished earlier, skipped ({executed})")
            continue
        log(f"[{notebook.stem}] running into {executed}")
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=values, kernel_name="python3",
                                       progress_bar=progress, cwd=str(NOTEBOOK_DIR.parent))
        except Exception as error:  # papermill's execution error, a dead kernel, a timeout
            raise NotebookFailed(notebook, executed, error) from error
    return executed_paths


def build_book(run: str, runs_dir: str | Path = "runs", log=print) -> Path:
    """Build the Jupyter Book (1.x) from the run's executed notebooks; return the HTML index.

    The repository's `_config.yml`, `_toc.yml` and `book/` are staged beside the executed copies
    in `runs/<run>/book/`, so pages show that run's outputs and nothing is executed at build time.
    Sphinx warnings (a missing page, say) fail the build.
    """
    import shutil
    import subprocess
    import sys

    import yaml

    root = NOTEBOOK_DIR.parent
    executed_dir = Path(runs_dir) / run / "notebooks"
    stage = Path(runs_dir) / run / "book"
    wanted = [entry["file"] for entry in yaml.safe_load((root / "_toc.yml").read_text())["chapters"]]
    missing = [name for name in wanted if name.startswith("notebooks/")
               and not completed(executed_dir / (Path(name).name + ".ipynb"))]
    if missing:
        raise FileNotFoundError(f"run {run!r} has no finished executed copy of {', '.join(missing)} in "
                                f"{executed_dir}: run `selfalign run --run {run}` (or `make run`) first")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "notebooks").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(root / name, stage / name)
    shutil.copytree(root / "book", stage / "book")
    shutil.copytree(root / "principles", stage / "principles")  # the reference page includes them
    for name in wanted:
        if name.startswith("notebooks/"):
            shutil.copy(executed_dir / (Path(name).name + ".ipynb"), stage / "notebooks")
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or shutil.which("jupyter-book")
    if jupyter_book is None:
        raise FileNotFoundError('jupyter-book is not installed: pip install "jupyter-book>=1,<2"')
    log(f"building the book from {executed_dir}")
    subprocess.run([jupyter_book, "build", str(stage), "--warningiserror", "--quiet"], check=True)
    return stage / "_build" / "html" / "index.html"
