"""The Vicuna questions and the pairwise judge: which of two answers a judge model prefers.

The judge is asked in both orders, by log P(" A") - log P(" B"), and a small judge's verdicts are
flagged (`judge_note`): the paper's judge was GPT-4.

It deliberately does not generate answers: it compares answers made elsewhere (the stage makes them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..inputs import read_text
from ..untrusted import json_loads, shorten
from ..scoring import as_scorer
from .data import EvalDataError, data_dir
from .results import EvalResult, _name, _result
from .templates import exam_requests, load_templates

if TYPE_CHECKING:
    from ..chat_format import ChatFormat

WEAK_JUDGE_PARAMETERS = 7e9  # below this, a judge's verdicts are a smoke test (the paper's judge was GPT-4)


def load_vicuna_questions(path: str | Path | None = None) -> list[dict]:
    """FastChat's question.jsonl: question_id, category, turns; `question` joins the turns."""
    path = Path(path) if path else data_dir() / "vicuna_questions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; `selfalign data prepare` fetches FastChat's Vicuna questions")
    questions, seen = [], {}
    for number, line in enumerate(read_text(path, EvalDataError).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json_loads(line)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)
                and isinstance(row.get("question_id"), (int, str))):
            raise EvalDataError(f"{path}:{number}: expected an object with a 'question_id' and 'turns', a "
                                "non-empty list of texts (FastChat's question.jsonl)")
        # Answers are keyed by the id (as text): a repeated one would be answered once, judged twice.
        key = str(row["question_id"])
        if key in seen:
            raise EvalDataError(f"{path}:{number}: question_id {shorten(key)} is used twice (line {seen[key]} "
                                "too); each question needs its own id")
        seen[key] = number
        questions.append({**row, "question": "\n\n".join(turns)})
    if not questions:
        raise EvalDataError(f"{path} holds no questions")
    return questions


def judge_note(judge) -> str:
    """A warning to print beside a judge's verdicts when the judge is small (or of unknown size)."""
    loaded = getattr(judge, "loaded", judge)
    name = getattr(loaded, "name", None) or getattr(judge, "name", "an unnamed scorer")
    if not hasattr(loaded, "model"):
        return f"judge {name}: size unknown; treat its verdicts as unverified"
    count = sum(p.numel() for p in loaded.model.parameters())
    if count < WEAK_JUDGE_PARAMETERS:
        return (f"weak judge: {name} has {count / 1e6:,.0f}M parameters (the paper's judge was GPT-4); "
                "its verdicts are a smoke test, not a finding")
    return ""


def judge_pairwise(judge, questions: Sequence[dict], answers_a: Sequence[str], answers_b: Sequence[str], *,
                   name_a: str = "a", name_b: str = "b", chat: ChatFormat | None = None,
                   templates: dict | None = None, batch_size: int = 32, progress: bool = True) -> EvalResult:
    """Ask the judge which answer is better, in both orders, by log P(" A") - log P(" B"); with
    `chat`, in that conversation format, after the opening of the judge's reply (`exam_requests`).

    A win for `name_a` needs both orders to prefer its answer, a loss both to prefer the other; a
    judge that changes its mind with the order gives a tie. Rows hold the verdict, the mean
    log-odds for answer a (`preference`) and the judge's pull towards "A" (`position_bias`).
    """
    if not len(questions) == len(answers_a) == len(answers_b):
        raise ValueError("questions, answers_a and answers_b must have the same length")
    scorer, templates = as_scorer(judge, batch_size, progress), templates or load_templates()
    requests = []
    for q, a, b in zip(questions, answers_a, answers_b):
        for first, second in ((a, b), (b, a)):
            prompt = templates["pairwise_judge"].format(question=q["question"], a=first, b=second)
            requests += exam_requests(templates, "judge", prompt, chat)
    s = [x.logprob for x in scorer(requests)]
    rows = []
    for k, q in enumerate(questions):
        forward, backward = s[4 * k] - s[4 * k + 1], s[4 * k + 2] - s[4 * k + 3]  # > 0: prefers what is shown as A
        verdict = "win" if forward > 0 and backward < 0 else "loss" if forward < 0 and backward > 0 else "tie"
        rows.append({"id": str(q.get("question_id", k)), "category": q.get("category", ""), "verdict": verdict,
                     "win": float(verdict == "win"), "tie": float(verdict == "tie"), "loss": float(verdict == "loss"),
                     "preference": (forward - backward) / 2, "position_bias": (forward + backward) / 2})
    return _result("vicuna_pairwise", f"{name_a} vs {name_b} (judge: {_name(scorer)})", rows, ["win", "tie", "loss"],
                   note=judge_note(scorer), groups_in_summary=True)


def judge_pair(judge, question: str, answer_a: str, answer_b: str, templates: dict | None = None,
               chat: ChatFormat | None = None) -> dict:
    """One comparison: the row `judge_pairwise` would give, plus the judge note."""
    result = judge_pairwise(judge, [{"question": question}], [answer_a], [answer_b], chat=chat, templates=templates,
                            progress=False)
    return {**result.items.iloc[0].to_dict(), "judge_note": result.note}
