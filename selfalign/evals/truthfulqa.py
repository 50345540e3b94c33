"""TruthfulQA multiple choice: the standard MC1 and MC2, and the paper's true/false variant of MC1.

MC1 and MC2 are scored as in the original, by the total log-likelihood of each answer after the QA
primer; the paper's variant (`truthfulqa_mc_paper`) judges each answer alone in a true/false exam
and is labelled as such, since its numbers are not comparable with MC1's.

It deliberately downloads nothing: the hub copy is read only when a caller passes `from_hub=True`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..inputs import read_text
from ..scoring import as_scorer
from .data import EvalDataError, data_dir
from .results import EvalResult, _name, _result
from .templates import exam_requests, load_templates

if TYPE_CHECKING:
    from ..chat_format import ChatFormat


@dataclass(frozen=True)
class MCQuestion:
    id: str
    question: str
    best: str
    correct: tuple[str, ...]  # every true answer, the best one included
    incorrect: tuple[str, ...]
    category: str = ""
    type: str = ""
    mc1_incorrect: tuple[str, ...] | None = None  # where MC1 has its own false set (the hub's copy)


def _close(answer: str) -> str:
    # The original adds a full stop to every reference answer that lacks one.
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


def _split_answers(text: str) -> list[str]:
    return [_close(a) for a in text.split(";") if a.strip()]


def load_truthfulqa(path: str | Path | None = None, *, from_hub: bool = False) -> list[MCQuestion]:
    """TruthfulQA's 817 questions from the original CSV (or, only if asked, the hub's
    `truthful_qa/multiple_choice`, whose MC1 choice sets are larger and which has no categories)."""
    if from_hub:
        return _truthfulqa_from_hub()
    import io

    import pandas as pd

    path = Path(path) if path else data_dir() / "truthfulqa.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; `selfalign data prepare` fetches TruthfulQA's CSV")
    try:
        # Every cell a string: a question or answer that looks like a number is still text.
        frame = pd.read_csv(io.StringIO(read_text(path, EvalDataError)), dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise EvalDataError(f"{path}: not a CSV file with a header line ({' '.join(str(error).split())})") from None
    needed = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers"]
    if missing := [c for c in needed if c not in frame.columns]:
        raise EvalDataError(f"{path} lacks the columns {missing}; is it TruthfulQA's CSV?")
    questions = []
    for index, row in frame.iterrows():
        best, correct = _close(row["Best Answer"]), _split_answers(row["Correct Answers"])
        incorrect = _split_answers(row["Incorrect Answers"])
        if not incorrect:
            continue  # the original skips questions without false references, with a warning
        questions.append(MCQuestion(f"tqa-{index:03d}", row["Question"].strip(), best,
                                    tuple(correct if best in correct else [best, *correct]), tuple(incorrect),
                                    row["Category"], row["Type"]))
    if not questions:
        raise EvalDataError(f"{path} holds no question with false reference answers; is it TruthfulQA's CSV?")
    return questions


def _truthfulqa_from_hub() -> list[MCQuestion]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError("from_hub=True needs the `datasets` package (and a reachable hub)") from None
    def pick(targets: dict, label: int) -> tuple[str, ...]:
        return tuple(c for c, mark in zip(targets["choices"], targets["labels"]) if mark == label)

    questions = []
    for index, row in enumerate(load_dataset("truthfulqa/truthful_qa", "multiple_choice", split="validation")):
        mc1_targets, mc2_targets = row["mc1_targets"], row["mc2_targets"]
        best, correct = pick(mc1_targets, 1)[0], pick(mc2_targets, 1)
        questions.append(MCQuestion(f"tqa-{index:03d}", row["question"], best,
                                    correct if best in correct else (best, *correct), pick(mc2_targets, 0),
                                    "(hub)", "", mc1_incorrect=pick(mc1_targets, 0)))
    return questions


def mc1(best_score: float, incorrect_scores: Sequence[float]) -> float:
    """1.0 if the best answer outscores every false one (strictly: a tie counts as wrong, as in the original)."""
    return 1.0 if best_score > max(incorrect_scores) else 0.0


def mc2(true_scores: Sequence[float], false_scores: Sequence[float]) -> float:
    """Probability mass on the true answers, normalized over true and false: sum(exp true) / sum(exp all)."""
    top = max(*true_scores, *false_scores)  # subtracting the max keeps exp from underflowing to 0/0
    mass = [math.exp(s - top) for s in true_scores]
    return sum(mass) / (sum(mass) + sum(math.exp(s - top) for s in false_scores))


def truthfulqa_mc(model, questions: Sequence[MCQuestion], *, with_mc2: bool = True, templates: dict | None = None,
                  batch_size: int = 32, progress: bool = True) -> EvalResult:
    """Standard TruthfulQA MC1 (best answer vs the false ones) and MC2 (all true vs all false), by the
    total log-likelihood of " {answer}" after the QA primer and "Q: {question}\\nA:".
    with_mc2=False scores only MC1's answers (about 2/3 of the work)."""
    scorer, templates = as_scorer(model, batch_size, progress), templates or load_templates()
    plans, requests = [], []
    for q in questions:
        context = templates["truthfulqa_primer"] + templates["truthfulqa_question"].format(question=q.question)
        false_mc1 = q.mc1_incorrect or q.incorrect
        answers = list(dict.fromkeys([q.best, *false_mc1, *((*q.correct, *q.incorrect) if with_mc2 else ())]))
        plans.append((q, answers, len(requests)))
        requests += [(context, " " + a) for a in answers]
    scores = [s.logprob for s in scorer(requests)]
    rows = []
    for q, answers, at in plans:
        got = dict(zip(answers, scores[at:at + len(answers)]))
        false_mc1 = [got[a] for a in (q.mc1_incorrect or q.incorrect)]
        rows.append({"id": q.id, "category": q.category, "type": q.type, "question": q.question,
                     "mc1": mc1(got[q.best], false_mc1),
                     "mc2": mc2([got[a] for a in q.correct], [got[a] for a in q.incorrect]) if with_mc2 else math.nan,
                     "best_logprob": got[q.best], "max_false_logprob": max(false_mc1),
                     "true_logprobs": [got.get(a) for a in q.correct], "false_logprobs": false_mc1})
    return _result("truthfulqa_mc", _name(scorer), rows, ["mc1", "mc2"] if with_mc2 else ["mc1"])


def truthfulqa_mc_paper(model, questions: Sequence[MCQuestion], *, chat: ChatFormat | None = None,
                        templates: dict | None = None, batch_size: int = 32, progress: bool = True) -> EvalResult:
    """The paper's variant, not comparable with standard MC1: each of MC1's candidates (best answer
    and false answers) is judged alone in a true/false exam, scored log P(true label) - log P(false
    label); MC1 = the best answer has the top score. With `chat`, the exam is asked in that
    conversation format and the label follows the opening of the assistant's reply (the paper's
    protocol); without, the bare exam ends in "Answer:" and the labels are " True" / " False"."""
    scorer, templates = as_scorer(model, batch_size, progress), templates or load_templates()
    plans, requests = [], []
    for q in questions:
        answers = list(dict.fromkeys([q.best, *(q.mc1_incorrect or q.incorrect)]))
        plans.append((q, answers, len(requests)))
        for a in answers:
            exam = templates["true_false_exam"].format(question=q.question, answer=a)
            requests += exam_requests(templates, "true_false", exam, chat)
    scores = [s.logprob for s in scorer(requests)]
    rows = []
    for q, answers, at in plans:
        got = {a: scores[at + 2 * k] - scores[at + 2 * k + 1] for k, a in enumerate(answers)}
        false = [got[a] for a in (q.mc1_incorrect or q.incorrect)]
        rows.append({"id": q.id, "category": q.category, "type": q.type, "question": q.question,
                     "mc1": mc1(got[q.best], false), "best_true_logodds": got[q.best], "false_true_logodds": false})
    return _result("truthfulqa_mc_paper", _name(scorer), rows, ["mc1"])
