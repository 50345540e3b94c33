"""`make run` as a newcomer runs it, for several revisions back to back: a fresh clone, no pip
cache, an empty `$SELFALIGN_CACHE`, setup included; wall time, peak memory and each chapter's time.

    python benchmarks/fresh_clone.py REV [REV ...] [--data-from DIR] [--keep]

Each revision is cloned from this repository into a temporary folder and run with
`PIP_NO_CACHE_DIR=1` under `/usr/bin/time -v` (peak RSS of the largest process: the kernels and
pip run as children, so it is the peak of one process, not the sum). `--data-from` passes
`DATA_FROM` (an offline copy of the public data, where GitHub is not reachable); a revision whose
Makefile has no `DATA_FROM` reads what it reads by default. Chapters' times are papermill's, from
the executed notebooks. The machine is shared and noisy: compare revisions of one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(rev: str, data_from: str | None, root: Path) -> dict:
    clone, cache = root / f"clone-{rev}", root / f"cache-{rev}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", rev], check=True)
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "SELFALIGN_CACHE": str(cache)}
    command = ["/usr/bin/time", "-v", "make", "run"] + ([f"DATA_FROM={data_from}"] if data_from else [])
    start = time.monotonic()
    done = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    (root / f"make-run-{rev}.log").write_text(done.stdout + done.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    chapters = {}
    for notebook in sorted((clone / "runs" / "demo" / "notebooks").glob("*.ipynb")):
        meta = json.loads(notebook.read_text()).get("metadata", {}).get("papermill", {})
        chapters[notebook.name[:2]] = meta.get("duration")
    summary = clone / "runs" / "demo" / "evaluate" / "summary.csv"
    return {"rev": rev, "exit": done.returncode, "wall_s": round(wall), "peak_kb": int(peak[1]) if peak else None,
            "setup_s": round(wall - sum(d or 0 for d in chapters.values())),
            "chapters_s": {k: round(v) if v else None for k, v in chapters.items()},
            "evaluation_rows": max(0, len(summary.read_text().splitlines()) - 1) if summary.exists() else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="+")
    parser.add_argument("--data-from", help="DATA_FROM for make run: an offline copy of the public data")
    parser.add_argument("--keep", action="store_true", help="keep the clones and caches (printed)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fresh-clone-"))
    data_from = str(Path(args.data_from).resolve()) if args.data_from else None
    try:
        results = [run_one(rev, data_from, root) for rev in args.revs]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    names = sorted({k for r in results for k in r["chapters_s"]})
    print("| rev | exit | wall | peak RSS (kB) | setup, preparing, kernel starts (s) | "
          + " | ".join(names) + " | evaluation rows |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(names) + "---:|")
    for r in results:
        cells = [str(r["chapters_s"].get(n, "-")) for n in names]
        peak = f"{r['peak_kb']:,}" if r["peak_kb"] else "?"
        print(f"| {r['rev']} | {r['exit']} | {r['wall_s']} s | {peak} | {r['setup_s']} | "
              + " | ".join(cells) + f" | {r['evaluation_rows']} |")
    print(json.dumps(results))
    if args.keep:
        print(f"clones and caches kept in {root}")


if __name__ == "__main__":
    main()
