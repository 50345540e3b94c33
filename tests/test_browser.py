"""Notebook 06 in a real browser: JupyterLab on localhost, headless Chromium driven by Playwright.

The test runs every cell, edits a principle in the editor widget, switches another off, presses
"regenerate" and waits for the comparison table, which shows the edits only if they travelled
from the page to the kernel. Chromium is Debian's (`make browser` installs it; Playwright cannot
download its own here). Without it the test skips, except under CI, where it fails.
"""

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import REPO, unavailable

CHROMIUM = Path("/usr/bin/chromium")
# Without the networking switches Chromium keeps calling home, and the closed network refuses it.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = "06_explore_principles.ipynb"
PARAMETERS = {"run": "web", "model": "tiny-random", "max_new_tokens": 8, "regenerate_prompts": 2}
BROWSER_IN_CI = "CI must run the browser test (`make browser` installs Chromium)"
WAIT_MS = 180_000  # kernel start, torch import and the first cells, on 2 busy cores


@pytest.fixture
def browser_context(tmp_path):
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium, or `make browser` as root)", BROWSER_IN_CI)
    if importlib.util.find_spec("jupyterlab") is None:
        unavailable("jupyterlab is not installed (pip install -e '.[dev]')", BROWSER_IN_CI)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[dev]')", BROWSER_IN_CI)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def notebook_root(tmp_path, tiny):
    """A folder with notebook 06, its parameters pointing at a stage-2 run made on the tiny model."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from selfalign.stages import self_align

    runs = tmp_path / "runs"
    self_align.run(self_align.SelfAlignConfig(run="web", runs_dir=str(runs), model="tiny-random", limit=4,
                                              max_new_tokens=8, prompts=str(REPO / "principles" / "seed_prompts.jsonl"),
                                              min_responses=0),
                   loaded=tiny)
    notebook = load_notebook_node(str(REPO / "notebooks" / NOTEBOOK))  # as papermill reads it, tags and all
    notebook.metadata.pop("jupytext", None)  # so the server does not write a paired .py beside the copy
    root = tmp_path / "root"
    root.mkdir()
    nbformat.write(parameterize_notebook(notebook, {**PARAMETERS, "runs_dir": str(runs)}), root / NOTEBOOK)
    return root


@pytest.fixture
def lab(notebook_root, tmp_path):
    """JupyterLab serving notebook_root on a free localhost port; yields its base URL and token."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}  # nothing read from or left in the user's ~/.jupyter
    with open(tmp_path / "lab.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={notebook_root}", "--allow-root", "--LabApp.expose_app_in_browser=True",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its own group: kernels too
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{(tmp_path / 'lab.log').read_text()}")
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer in 60 s:\n{(tmp_path / 'lab.log').read_text()}")
                time.sleep(0.5)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        try:
            os.killpg(server.pid, signal.SIGKILL)  # a kernel the server did not stop
        except ProcessLookupError:
            pass


# JupyterLab drops a run asked for before the page has connected to the notebook's kernel (or
# asks which kernel to start), so the test waits for that connection through the app object that
# --LabApp.expose_app_in_browser puts on the page, as JupyterLab's own browser tests do.
KERNEL_CONNECTED = """() => {
    const kernel = window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel;
    return kernel?.connectionStatus === "connected" && kernel?.status === "idle";
}"""


@pytest.mark.slow
def test_edit_a_principle_and_regenerate_in_jupyterlab(browser_context, lab, notebook_root, tmp_path):
    from selfalign.principles import load_principle_set
    from selfalign.stages import self_align

    url, token = lab
    page = browser_context.new_page()
    page.set_default_timeout(WAIT_MS)
    started = time.monotonic()
    try:
        page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
        page.wait_for_function(KERNEL_CONNECTED)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()

        principle_7 = page.locator(".widget-textarea textarea").nth(6)
        principle_7.wait_for()
        assert principle_7.input_value() == load_principle_set().principle(7).text
        principle_7.fill("Be candid about what you do not know.")
        page.get_by_label("15 Creative").uncheck()
        page.get_by_role("button", name="regenerate").click()
        # The chapter also shows a static comparison (one principle left out) for the built book:
        # the editor's own is the one that names this edit.
        shown = page.locator(".selfalign-edits", has_text="7 Candor: reworded")
        shown.wait_for()
        edits = shown.inner_text()
        assert "7 Candor: reworded" in edits and "15 Creative: off" in edits, edits
        table = shown.locator("xpath=following-sibling::table[contains(@class, 'selfalign-comparison')][1]")
        assert table.locator("tr").count() == 1 + PARAMETERS["regenerate_prompts"]
        # The inspector's filters reach the kernel too; the explorer shows its heatmap; no cell raised.
        records = self_align.records(PARAMETERS["run"], notebook_root.parent / "runs")
        kept = sum(r["status"] == "kept" for r in records)
        page.get_by_text(f"{len(records)} of {len(records)} records", exact=True).wait_for()
        page.get_by_label("drop reason").select_option(label="(kept)")
        page.get_by_text(f"{kept} of {len(records)} records", exact=True).wait_for()
        assert page.locator(".widget-image").count() == 2  # the explorer: written triggers and likelihoods
        assert page.locator('[data-mime-type="application/vnd.jupyter.error"]').count() == 0
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'failure.png'}; server log: {tmp_path / 'lab.log'}")
        raise
    print(f"notebook run, edited and regenerated in {time.monotonic() - started:.1f} s")
