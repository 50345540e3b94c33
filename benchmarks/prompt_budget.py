"""Stage 2's prompt against LLaMA's context: the principles and exemplars of two revisions side by side.

For each principle set (the working tree's `principles/`, and the same three files at each `--rev`,
read with `git show`), it prints the stage-2 prefix in characters and in tokens of each tokenizer
(LLaMA-1's, from the prepared tiny-llama, and the embedded model's), and, with the paper's 256 new
tokens in LLaMA's 2,048 positions, how many tokens that leaves for the user's query (the issue's
target: at least 200). Nothing is generated.
Run: `.venv/bin/python benchmarks/prompt_budget.py [--rev 7870612] [--assistant Watson]`.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from selfalign.models import DEFAULT_MODEL, TINY_LLAMA, load_model
from selfalign.principles import load_principle_set, render_prefix, render_prompt

REPO = Path(__file__).resolve().parents[1]
FILES = ("principles.yaml", "exemplars.yaml", "self_align_template.yaml")
CONTEXT, NEW_TOKENS = 2048, 256  # LLaMA-65B's positions; the paper's stage-2 answer length


def principle_files(rev: str | None, folder: Path) -> list[Path]:
    if rev is None:
        return [REPO / "principles" / name for name in FILES]
    paths = []
    for name in FILES:
        text = subprocess.run(["git", "show", f"{rev}:principles/{name}"], cwd=REPO, check=True, capture_output=True,
                              text=True).stdout
        (folder / f"{rev}-{name}").write_text(text)
        paths.append(folder / f"{rev}-{name}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rev", action="append", default=[], help="a git revision whose principles to compare")
    parser.add_argument("--assistant", default="Watson")
    args = parser.parse_args()
    tokenizers = {name: load_model(name).tokenizer for name in (TINY_LLAMA, DEFAULT_MODEL)}
    llama = tokenizers[TINY_LLAMA]
    print(f"| principles | characters | {' | '.join(f'{n} tokens' for n in tokenizers)} | "
          f"query room on LLaMA ({CONTEXT} - {NEW_TOKENS} new) |")
    print("|---|---:|" + "---:|" * len(tokenizers) + "---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for rev in [None, *args.rev]:
            principle_set = load_principle_set(*principle_files(rev, Path(tmp)))
            prefix = render_prefix(principle_set, args.assistant)
            counts = [len(t(prefix)["input_ids"]) for t in tokenizers.values()]
            # The turn markers around the query count too: the prompt for an empty query, minus nothing.
            frame = len(llama(render_prompt(principle_set, "", args.assistant))["input_ids"])
            room = CONTEXT - NEW_TOKENS - frame
            print(f"| {rev or 'working tree'} | {len(prefix):,} | {' | '.join(f'{c:,}' for c in counts)} | {room:,} |")


if __name__ == "__main__":
    main()
