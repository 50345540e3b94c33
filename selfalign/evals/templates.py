"""The benchmarks' prompts, from `principles/eval_templates.yaml`, and the layout of the paper's exams.

The paper's prompt variants are labelled as such. The paper's exams (TruthfulQA true/false, HHH
A/B, the pairwise judge) take a `chat` format: given one, as in the paper, the exam is the user turn
of a conversation in the model's own training format and the label is scored after the opening of
the assistant's reply (`exam_requests`); without one, after the bare exam and an "Answer:" line.
The standard MC1/MC2 and HHH's likelihood modes use no chat format: they are the benchmarks' own
protocols.

It deliberately scores nothing: it only builds the (context, label) pairs a scorer is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..inputs import PRINCIPLES_DIR, check_templates, read_yaml

if TYPE_CHECKING:
    from ..chat_format import ChatFormat

TEMPLATES = PRINCIPLES_DIR / "eval_templates.yaml"


def load_templates(path: str | Path = TEMPLATES) -> dict:
    templates = read_yaml(path, ValueError)
    check_templates(path, templates, {"truthfulqa_primer": [], "truthfulqa_question": ["{question}"],
                                      "true_false_exam": ["{question}", "{answer}"], "hhh_dialogue": ["{input}"],
                                      "hhh_ab_exam": ["{input}", "{a}", "{b}"],
                                      "pairwise_judge": ["{question}", "{a}", "{b}"], "bare_answer": [],
                                      "true_false_reply": [], "ab_reply": [], "judge_reply": []}, ValueError)
    for key in ("true_false_labels", "ab_labels", "true_false_reply_labels", "ab_reply_labels"):
        labels = templates.get(key)
        if not (isinstance(labels, list) and len(labels) == 2 and all(isinstance(x, str) and x for x in labels)):
            raise ValueError(f"{path}: '{key}' must be a list of two non-empty strings")
    return templates


# Each exam's templates: (its bare labels, its reply opening, the labels that follow that opening).
_EXAMS = {"true_false": ("true_false_labels", "true_false_reply", "true_false_reply_labels"),
          "ab": ("ab_labels", "ab_reply", "ab_reply_labels"),
          "judge": ("ab_labels", "judge_reply", "ab_reply_labels")}


def exam_requests(templates: dict, kind: str, exam: str, chat: ChatFormat | None = None) -> list[tuple[str, str]]:
    """The two (context, label) pairs of one exam (kind: true_false, ab or judge), first label first.

    Bare (chat None): the exam text, then `bare_answer`. In a chat format: the exam as the user
    turn, the assistant's marker, then the reply's opening; a trained model's answer then starts
    where its training answers did, and the label is the next word of that answer.
    """
    bare_labels, reply, reply_labels = _EXAMS[kind]
    if chat is None:
        context, labels = exam + templates["bare_answer"], templates[bare_labels]
    else:
        context, labels = chat.prompt(exam) + templates[reply], templates[reply_labels]
    return [(context, label) for label in labels]
