"""Run the book's notebooks headless with papermill, in order, resuming finished ones; build the book.

Each notebook in `notebooks/` is executed into `runs/<run>/notebooks/<name>.ipynb` with its
`parameters` cell overridden: a stage chapter gets its stage's settings as `selfalign.profiles`
resolves them from the profile and `-p`, every chapter its own parameters. A notebook whose executed copy exists without an error is not run again; the
first failure stops the run, keeping the failed copy (with its traceback) and printing its path.

`build_book` then turns a run's executed notebooks into the Jupyter Book (1.x) HTML, offline.

This module only orchestrates: every computation lives in the stage modules the notebooks call.
"""

from __future__ import annotations

from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
# The chapter that runs each stage (by its number). The others (00, 06, 07) run no stage.
CHAPTER_STAGES = {"01": "prompts", "02": "self-align", "03": "engrave", "04": "verbose", "05": "evaluate"}


def chapter_stage(notebook: Path) -> str | None:
    return CHAPTER_STAGES.get(notebook.stem[:2])


def notebook_parameters(notebook: Path, declared: set[str], resolved, run: str, runs_dir: str) -> dict:
    """What papermill injects into one chapter: its stage's resolved settings (the fields it
    declares by name, every other non-default one in its `settings` dict) and its own parameters.

    So a stage chapter runs with exactly the settings `selfalign run --dry-run` prints."""
    import dataclasses

    from .profiles import RUN_FIELDS, _jsonable

    values = {k: v for k, v in {"run": run, "runs_dir": runs_dir}.items() if k in declared}
    stage = chapter_stage(notebook)
    config = resolved.stages.get(stage) if stage else None
    fields = _jsonable(dataclasses.asdict(config)) if config is not None else {}
    for name in declared:
        if name in fields and name not in RUN_FIELDS:
            values[name] = fields[name]
        elif name in resolved.chapters:
            values[name] = _jsonable(resolved.chapters[name])
    if config is not None and "settings" in declared:
        defaults = _jsonable(dataclasses.asdict(type(config)()))
        values["settings"] = {k: v for k, v in fields.items()
                              if k not in declared and k not in RUN_FIELDS and v != defaults[k]}
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


def plan_book(run: str, runs_dir: str | Path = "runs", profile: dict | None = None, overrides: dict | None = None,
              only: list[str] | None = None):
    """(plan, resolved) without running anything: the plan is (notebook, injected parameters) for
    each chapter to run, and `resolved.stages` holds the settings of the stages those chapters run
    (what the dry run prints). Raises ProfileError for a key that no stage and no chapter takes."""
    import papermill

    from .profiles import ProfileError, resolve, unknown_keys
    from .records import Run

    Run(run, runs_dir, create=False)  # refuses a run name that leads outside runs_dir; a plan writes nothing
    profile, overrides = profile or {}, overrides or {}
    runs_dir = str(Path(runs_dir).resolve())
    chosen = [n for n in notebooks() if not only or any(n.stem.startswith(prefix) for prefix in only)]
    declared = {n: set(papermill.inspect_notebook(str(n))) for n in chosen}
    unknown = unknown_keys(profile, overrides, set().union(*declared.values()) if declared else set())
    if unknown:
        raise ProfileError(f"no stage or notebook takes the parameters {unknown}")
    resolved = resolve(profile, overrides, run=run, runs_dir=runs_dir)
    plan = [(n, notebook_parameters(n, declared[n], resolved, run, runs_dir)) for n in chosen]
    resolved.stages = {chapter_stage(n): resolved.stages[chapter_stage(n)] for n in chosen if chapter_stage(n)}
    return plan, resolved


def run_book(run: str, runs_dir: str | Path, plan: list[tuple[Path, dict]], progress: bool = True,
             log=print) -> list[Path]:
    """Execute a `plan_book` plan in order; return the executed copies. Raises NotebookFailed."""
    import papermill
    from traitlets.config import Config

    from .records import Run

    out_dir = Run(run, Path(runs_dir).resolve()).root / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    executed_paths = []
    for notebook, values in plan:
        executed = out_dir / notebook.name
        executed_paths.append(executed)
        if completed(executed):
            log(f"[{notebook.stem}] finished earlier, skipped ({executed})")
            continue
        log(f"[{notebook.stem}] running into {executed}")
        try:
            # The kernel talks to papermill over local sockets (IPC), not unencrypted TCP, which ipykernel
            # warns about at the top of every chapter's log.
            papermill.execute_notebook(str(notebook), str(executed), parameters=values, kernel_name="python3",
                                       progress_bar=progress, cwd=str(NOTEBOOK_DIR.parent),
                                       config=Config({"KernelManager": {"transport": "ipc"}}))
        except Exception as error:  # papermill's execution error, a dead kernel, a timeout
            raise NotebookFailed(notebook, executed, error) from error
    return executed_paths


def build_book(run: str, runs_dir: str | Path = "runs", log=print) -> Path:
    """Build the Jupyter Book (1.x) from the run's executed notebooks; return the HTML index.

    The repository's `_config.yml`, `_toc.yml` and `book/` are staged beside the executed copies
    in `runs/<run>/book/`, so pages show that run's outputs and nothing is executed at build time.
    Sphinx warnings (a missing page, say) fail the build.
    """
    import json
    import shutil
    import subprocess
    import sys

    from .links import refuse_links
    from .records import Run
    from .untrusted import yaml_load

    root = NOTEBOOK_DIR.parent
    run_root = Run(run, runs_dir, create=False).root  # the rmtree below must stay inside runs_dir
    executed_dir = run_root / "notebooks"
    stage = run_root / "book"
    refuse_links(stage, start=run_root, walk=True)  # a linked book/ would be emptied and written outside the run
    wanted = [entry["file"] for entry in yaml_load((root / "_toc.yml").read_text())["chapters"]]
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
    shutil.copytree(root / "_static", stage / "_static")  # the book's CSS: long code lines wrap
    shutil.copytree(root / "principles", stage / "principles")  # the reference page includes them
    for name in wanted:
        if name.startswith("notebooks/"):
            executed = json.loads((executed_dir / (Path(name).name + ".ipynb")).read_text(encoding="utf-8"))
            (stage / "notebooks" / (Path(name).name + ".ipynb")).write_text(
                json.dumps(one_parameters_cell(executed), ensure_ascii=False, indent=1), encoding="utf-8")
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or shutil.which("jupyter-book")
    if jupyter_book is None:
        raise FileNotFoundError('jupyter-book is not installed: pip install "jupyter-book>=1,<2"')
    log(f"building the book from {executed_dir}")
    subprocess.run([jupyter_book, "build", str(stage), "--warningiserror", "--quiet"], check=True)
    return stage / "_build" / "html" / "index.html"


def one_parameters_cell(notebook: dict) -> dict:
    """An executed notebook as the book shows it: its declared `parameters` cell, whose comments say
    what each parameter is, holding the values papermill injected (the ones the run used), and no
    injected cell after it. Where the injected cell sets a name the declared one lacks, both stay."""
    import ast
    import copy

    cells = notebook.get("cells", [])
    tagged = {tag: i for i, cell in enumerate(cells) for tag in cell.get("metadata", {}).get("tags", [])}
    if "parameters" not in tagged or "injected-parameters" not in tagged:
        return notebook
    declared_cell, injected_cell = cells[tagged["parameters"]], cells[tagged["injected-parameters"]]
    declared, injected = ("".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                          for c in (declared_cell, injected_cell))
    values = {node.targets[0].id: ast.get_source_segment(injected, node.value)
              for node in ast.parse(injected).body if isinstance(node, ast.Assign)}
    spans = {}
    for node in ast.parse(declared).body:
        target = (node.target if isinstance(node, ast.AnnAssign) else
                  node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and node.value is not None and target.id in values:
            spans[target.id] = node.value
    if set(values) - set(spans):
        return notebook
    lines = declared.splitlines(keepends=True)
    for name, value in sorted(spans.items(), key=lambda item: (item[1].lineno, item[1].col_offset), reverse=True):
        first, last = lines[value.lineno - 1], lines[value.end_lineno - 1]
        replaced = first[:value.col_offset] + values[name] + last[value.end_col_offset:]
        lines[value.lineno - 1:value.end_lineno] = [replaced]
    shown = copy.deepcopy(notebook)
    shown["cells"][tagged["parameters"]]["source"] = "".join(lines)
    del shown["cells"][tagged["injected-parameters"]]
    return shown

