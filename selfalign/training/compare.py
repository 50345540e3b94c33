"""How well a model predicts answers: the mean log-probability per answer token of held-out
examples under the base model and the adapted one, and the training loss curve.

This scores the training format only (nothing but the chat format in the context); it is no
benchmark, and stage 5's evaluation does not use it.
"""

from __future__ import annotations

from ..models import LoadedModel
from ..scoring import score_encoded
from .examples import Example


def answer_logprobs(model, examples: list[Example], batch_size: int = 8) -> list[float]:
    """Mean log-probability per answer token of each example (the negative of its training loss),
    by the evaluation's scorer: the same float64 numbers as any other likelihood in the book."""
    pairs = []
    for example in examples:
        start = next((i for i, label in enumerate(example.labels) if label != -100), len(example.labels))
        if any(label == -100 for label in example.labels[start:]):
            raise ValueError(f"example {example.id}: its trained tokens are not one run at the end")
        pairs.append((example.input_ids[:start], example.input_ids[start:]))
    sums = score_encoded(model, pairs, batch_size=batch_size, progress=False)
    return [total / max(1, example.answer_tokens) for total, example in zip(sums, examples)]


def compare_on(adapted: LoadedModel, examples: list[Example]) -> list[dict]:
    """Per example: mean answer-token log-probability under the base model (adapter disabled) and
    under the adapted model, with nothing but the training format in the context."""
    with adapted.model.disable_adapter():
        base = answer_logprobs(adapted.model, examples)
    tuned = answer_logprobs(adapted.model, examples)
    return [{"id": e.id, "answer_tokens": e.answer_tokens, "base_logprob": b, "adapted_logprob": t}
            for e, b, t in zip(examples, base, tuned)]


def plot_loss(steps, ax=None):
    """Training loss per optimizer step from a `loss.jsonl` DataFrame."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    if len(steps):
        ax.plot(steps["step"], steps["loss"], marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    return ax
