"""Run the book's notebooks headless with papermill, in order, resuming finished ones.

Each notebook in `notebooks/` is executed into `runs/<run>/notebooks/<name>.ipynb` with its
`parameters` cell overridden (run name, runs directory, model, and any `-p key value` that the
notebook declares). A notebook whose executed copy exists without an error is not run again; the
first failure stops the run, keeping the failed copy (with its traceback) and printing its path.

This module only orchestrates: every computation lives in the stage modules the notebooks call.
"""

from __future__ import annotations

from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


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
