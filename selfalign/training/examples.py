"""Training examples for stages 3 and 4: records (id, prompt, answer) in the chat format, as token
ids with a loss mask; the identity conversations; the held-out split; padding into a batch.

Only the answer and the end-of-answer marker carry loss. An example whose answer would not fit
the cutoff is dropped with its reason (or, with overlong="truncate", keeps the start of its
answer without the marker). This module does not train or score (`lora.py`, `compare.py`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..chat_format import ChatFormat
from ..generation.contract import tokens_after
from ..inputs import read_yaml
from ..models import LoadedModel


def load_identity(path: str | Path, chat: ChatFormat) -> list[dict]:
    """The conversations in which the assistant introduces itself (`principles/identity.yaml`), as
    training records (id, prompt, answer, source "identity") under the chat format's names."""
    data = read_yaml(path, ValueError)
    conversations = data.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{path}: expected a non-empty 'conversations:' list of user/answer pairs")
    records = []
    for number, entry in enumerate(conversations, 1):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k].strip()
                                                  for k in ("user", "answer")):
            raise ValueError(f"{path}: conversation #{number} needs non-empty 'user' and 'answer' texts")
        try:
            answer = entry["answer"].format(assistant=chat.assistant, developer=chat.developer)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"{path}: conversation #{number}: only {{assistant}} and {{developer}} can be "
                             f"filled in ({error})") from None
        records.append({"id": f"identity-{number}", "prompt": entry["user"].strip(), "answer": answer.strip(),
                        "source": "identity"})
    return records


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken (everything before the answer)
    # The answer was tokenized on its own: a token of the whole text spans the end of the context, so
    # its ids differ from what the model writes after that context (build_examples).
    target_apart: bool = False

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != -100)


class ExampleError(ValueError):
    """A training example that must not be trained on: the stage stops and names it."""


def build_examples(records: list[dict], loaded: LoadedModel, chat: ChatFormat, cutoff: int,
                   overlong: str = "drop", forbidden: tuple[str, ...] = ()) -> tuple[list[Example], list[dict]]:
    """(examples, drops) from records with id, prompt and answer.

    The ids are those of the whole text (context and target), and the context's are its start: the
    tokens the model sees at inference before it answers, then the answer's tokens as they follow
    them (`generation.contract.tokens_after`; on its own, an answer after "### Dromedary\n" would
    start with SentencePiece's word-start "▁"). Where a token of the whole text spans the end of the
    context, the context's ids are kept, since generation sees them, and the target is tokenized on
    its own after them (`Example.target_apart`). A record with `"ended": False` (an answer
    cut off by the token limit) gets no end-of-answer marker: it must not teach the model to stop
    there. An example over `cutoff` is dropped, or with overlong="truncate" (Dromedary's) keeps the
    start of its answer, again without the marker. `forbidden`: texts that must not be in any
    example's context (the principles, stage 4's instruction); one that is stops the stage.
    """
    tokenizer = loaded.tokenizer
    examples, drops = [], []
    for record in records:
        answer = (record.get("answer") or "").strip()
        if not answer:
            drops.append({"id": record["id"], "reason": "empty answer"})
            continue
        context_text = chat.prompt(record["prompt"])
        if leak := next((text for text in forbidden if text.strip() and text.strip() in context_text), None):
            raise ExampleError(f"example {record['id']}: its context holds {leak.strip()[:60]!r}; what the model "
                               "trains on must not include the principles or instructions it is to learn without")
        context = tokenizer(loaded.bos_prefix + context_text)["input_ids"]
        text = chat.target(answer) if record.get("ended", True) else answer
        whole = tokenizer(loaded.bos_prefix + context_text + text)["input_ids"]
        target, apart = tokens_after(tokenizer, context, whole, text)
        total = len(context) + len(target)
        if total > cutoff and overlong == "truncate" and cutoff - len(context) >= MIN_TRUNCATED_ANSWER:
            target = target[:cutoff - len(context)]
        elif total > cutoff:
            drops.append({"id": record["id"], "reason": f"longer than the cutoff ({total} > {cutoff} tokens)"})
            continue
        examples.append(check_example(Example(record["id"], context + target, [-100] * len(context) + target,
                                              apart)))
    return examples, drops


def check_example(example: Example) -> Example:
    """Refuse an example no token of which carries loss: it would train nothing, silently."""
    if example.answer_tokens == 0:
        raise ExampleError(f"example {example.id}: no token carries the loss (an empty target)")
    return example


def loss_mask_html(example: Example, tokenizer) -> str:
    """One example as its tokens, each in a box: grey where the model only reads (no loss), green
    where it is trained to write. For looking at, in a notebook: the boxes show token boundaries,
    which plain text hides."""
    import html

    spans = []
    for token, label, piece in zip(example.input_ids, example.labels, token_texts(example.input_ids, tokenizer)):
        text = html.escape(piece).replace("\n", "↵<br>")
        colour = "#d9f2d9" if label != -100 else "#eeeeee"
        spans.append(f'<span style="background:{colour};border:1px solid #ccc;margin:1px;'
                     f'white-space:pre-wrap" title="{"loss" if label != -100 else "context"}">{text}</span>')
    return f'<div style="font-family:monospace;line-height:1.9">{"".join(spans)}</div>'


def token_texts(ids: list[int], tokenizer) -> list[str]:
    """Each token's text as it reads in the whole: what it adds to the decoded text so far. A token
    decoded alone can lose its space (SentencePiece's "▁green" alone reads "green")."""
    pieces, before = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        pieces.append(text[len(before):] if text.startswith(before) else tokenizer.decode(ids[end - 1:end]))
        before = text
    return pieces


MIN_TRUNCATED_ANSWER = 8  # tokens; a prompt that leaves less room than this is dropped, not truncated


def split_holdout(ids: list[str], fraction: float, seed: int) -> set[str]:
    """Ids held out of training: the `fraction` whose seeded hash is lowest (at least one when
    fraction > 0 and there are two or more). By hash, so one id's side does not depend on the order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout must be in [0, 1), got {fraction}")
    if fraction == 0 or len(ids) < 2:
        return set()
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(ranked[:max(1, round(fraction * len(ids)))])


def _collate(examples: list[Example], pad_id: int, device) -> dict:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [-100] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.tensor(mask, device=device)}
