"""Principle triggers: which principles a stage-2 response cites, and which it would have chosen.

- `format_grammar` writes stage 2's output format as a grammar (llguidance's Lark dialect): free
  thoughts on one line, "I should follow rules" and a list of the set's own "N (Name)" citations,
  the answer marker, then a free answer. With `constrain_format` every backend decodes under it
  (`selfalign.generation.grammar`), so that a small model cannot cite "11 (Numerical Sensitivity)"
  when principle 11 is another one, or forget the marker.
- `principle_scores` is the evidence a citation is not: after the prompt and the response's own
  thoughts, the model's probability of citing each principle first ("I should follow rules" and
  then "N (Name)"), normalised over the set, from one batched pass of the evaluation scorer.
- `trigger_stats`, `score_stats`, `disagreements` and the two heatmaps summarise both by red-team type.

A valid citation is not proof that the model followed the principle: the grammar only lets it
write well-formed ones. The likelihood view says which citation the model prefers.
"""

from __future__ import annotations

import json
import math
import re
from typing import Sequence

from .principles import PrincipleSet, citation_label, render_prompt

SELF_INSTRUCT = "(self-instruct)"  # the type column of prompts without a red-team type


def _parts(principle_set: PrincipleSet, assistant: str) -> tuple[str, str, str]:
    """(what opens the citation list, what closes it, the answer marker) as the template writes them."""
    t = principle_set.template
    opener, closer = t["rules_sentence"].split("{rules}")
    marker = t["answer_turn"].split("{text}")[0].replace("{assistant}", assistant)
    return opener, closer, marker


def format_grammar(principle_set: PrincipleSet, assistant: str = "Watson", max_thought_sentences: int | None = None,
                   max_answer_sentences: int = 0) -> str:
    """The stage-2 continuation (what follows "<assistant> (internal thoughts):") as a grammar.

    Thoughts are one to `max_thought_sentences` sentences on one line (each ending in . ! or ?,
    of at most 200 characters, without parentheses, so that no "N (Name)" citation can hide in
    them; by default as many sentences as the longest exemplar's thoughts), followed by the
    template's rules sentence: " I should follow rules " and one to as many of the set's own
    citations as an exemplar cites ("a", "a and b", "a, b and c"), then a blank line, the answer
    marker and the answer. The answer is free text that ends where generation stops (a stop
    string, end of text or max_new_tokens); with `max_answer_sentences`, it is one to that many
    sentences or lines, after which the next user turn is the only way on, so that an answer
    ends whole rather than at max_new_tokens. The defaults accept every exemplar.
    """
    if max_thought_sentences is None:
        max_thought_sentences = max([len(re.findall(r"[.!?]+(?=\s|$)", e.thoughts)) for e in principle_set.exemplars] or [1])
    for name, value, least in (("max_thought_sentences", max_thought_sentences, 1),
                               ("max_answer_sentences", max_answer_sentences, 0)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    opener, closer, marker = _parts(principle_set, assistant)
    most = max([len(e.cites) for e in principle_set.exemplars] or [1])
    labels = " | ".join(json.dumps(citation_label(principle_set, p.number), ensure_ascii=False)
                        for p in principle_set.principles)
    # Each free part is one lazy lexeme that ends at the first delimiter after whole sentences.
    # (Sentences and the delimiter as separate lexemes would let llguidance's greedy lexer read
    # the delimiter as one more sentence.)
    thoughts = f"( [^\\n.!?()]{{1,200}}[.!?]+){{1,{max_thought_sentences}}}{_regex(' ' + opener)}"
    if max_answer_sentences:
        user = principle_set.template["user_turn"].split("{text}")[0].rstrip()
        # A sentence or a line, then its end: . ! ? or the line's end. The whitespace before it is
        # bounded, or blank lines would be free (a small model writes hundreds).
        sentence = "\\s{0,8}[^\\s.!?][^\\n.!?]{0,199}"
        answer = (f"answer[lazy]: /({sentence}([.!?]+|\\n)){{0,{max_answer_sentences - 1}}}"
                  f"{sentence}([.!?]+[ \\t]*)?\\s{{0,8}}\\n{_regex(user)}/")
    else:
        answer = r"answer: /[ \t]*[^\s](.|\n)*/"
    return "\n".join([
        "%llguidance {}",
        f"start: thoughts citations {json.dumps(closer)} {json.dumps(chr(10) * 2 + marker.rstrip())} answer",
        f"thoughts[lazy]: /{thoughts}/",
        # llguidance refuses a {0,0} repeat: with at most two citations, "A and B" has no commas.
        ("citations: CITE (" + (f'(", " CITE){{0,{most - 2}}} ' if most > 2 else "") + '" and " CITE)?'
         if most > 1 else "citations: CITE"),
        f"CITE: {labels}",
        answer,
    ]) + "\n"


def _regex(text: str) -> str:
    """`text` as a literal inside a /.../ regex of the grammar."""
    return "".join("\\" + c if not c.isalnum() and c != " " else c for c in text)


def scoring_context(principle_set: PrincipleSet, query: str, thoughts: str, assistant: str = "Watson") -> str:
    """The prompt, the response's thoughts without any rules sentence, and the sentence's opening
    words ("I should follow rules"), after which each principle's citation is scored."""
    opener, _, _ = _parts(principle_set, assistant)
    words = opener.strip()
    cut = thoughts.lower().rfind(words.lower())
    before = (thoughts[:cut] if cut != -1 else thoughts).strip()
    return render_prompt(principle_set, query, assistant) + " " + (before + " " if before else "") + words


def principle_scores(scorer, principle_set: PrincipleSet, rows: Sequence[tuple[str, str]],
                     assistant: str = "Watson") -> list[dict[str, float]]:
    """For each (query, thoughts): {principle number (as text, as JSON keys are): probability}.

    The probability of citing principle n first is that of " n (Name)" after `scoring_context`,
    normalised over the set's principles. All rows' pairs go to `scorer` (a `scoring` scorer) in
    one call: the principles' prefix is computed once, each row's context once, and each citation
    from that context's cache.
    """
    numbers = [p.number for p in principle_set.principles]
    requests = []
    for query, thoughts in rows:
        context = scoring_context(principle_set, query, thoughts, assistant)
        requests += [(context, " " + citation_label(principle_set, n)) for n in numbers]
    scores = scorer(requests) if requests else []
    result = []
    for start in range(0, len(scores), len(numbers)):
        logprobs = [s.logprob for s in scores[start:start + len(numbers)]]
        top = max(logprobs)
        weights = [math.exp(lp - top) for lp in logprobs]
        total = sum(weights)
        result.append({str(n): w / total for n, w in zip(numbers, weights)})
    return result


def _type(value) -> str:
    return value if isinstance(value, str) and value else SELF_INSTRUCT


def trigger_stats(responses, principle_set: PrincipleSet):
    """(overall, per_type): how often each principle fired, overall and by red-team type.

    overall: one row per principle with the count and the share of responses citing it.
    per_type: principles x types, the share of that type's responses citing each principle.
    """
    import pandas as pd

    labels = {p.number: f"{p.number} {p.name}" for p in principle_set.principles}
    rows = []
    for _, response in responses.iterrows():
        for number in response["triggers"]:
            rows.append({"principle": labels.get(number, str(number)), "type": _type(response.get("type")),
                         "id": response["id"]})
    fired = pd.DataFrame(rows, columns=["principle", "type", "id"])
    counts = fired["principle"].value_counts().reindex(list(labels.values()), fill_value=0)
    overall = pd.DataFrame({"responses": counts, "share": counts / max(len(responses), 1)})
    sizes = responses["type"].map(_type).value_counts().sort_index() if len(responses) else pd.Series(dtype=int)
    # Every type with responses gets a column, even where nothing fired: a zero is a finding.
    per_type = (pd.crosstab(fired["principle"], fired["type"])
                .reindex(index=list(labels.values()), columns=sizes.index, fill_value=0))
    per_type = per_type.div(sizes, axis=1).fillna(0.0)
    return overall, per_type


def score_stats(responses, principle_set: PrincipleSet):
    """principles x types: the mean `principle_scores` probability of each principle among a
    type's responses (records without scores are left out)."""
    import pandas as pd

    labels = {str(p.number): f"{p.number} {p.name}" for p in principle_set.principles}
    rows = []
    for _, response in responses.iterrows():
        scores = response.get("principle_scores")
        if isinstance(scores, dict):
            for number, label in labels.items():
                rows.append({"principle": label, "type": _type(response.get("type")),
                             "probability": float(scores.get(number, 0.0))})
    frame = pd.DataFrame(rows, columns=["principle", "type", "probability"])
    table = frame.pivot_table(index="principle", columns="type", values="probability", aggfunc="mean")
    return table.reindex(index=list(labels.values())).fillna(0.0)


def disagreements(responses, principle_set: PrincipleSet):
    """One row per scored response: what it cites, the principle it would most likely cite first,
    and whether that one is among its citations."""
    import pandas as pd

    names = {str(p.number): p.name for p in principle_set.principles}
    rows = []
    for _, response in responses.iterrows():
        scores = response.get("principle_scores")
        if not isinstance(scores, dict) or not scores:
            continue
        best = max(scores, key=scores.get)
        rows.append({"id": response["id"], "type": _type(response.get("type")), "triggers": list(response["triggers"]),
                     "most_likely": f"{best} ({names.get(best, '?')})", "probability": round(scores[best], 3),
                     "agrees": int(best) in list(response["triggers"])})
    return pd.DataFrame(rows, columns=["id", "type", "triggers", "most_likely", "probability", "agrees"])


def _heatmap(table, title: str, label: str, ax=None, vmax: float = 1.0):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * max(table.shape[1], 4) + 3, 0.35 * table.shape[0] + 2))
    ax.set_title(title)
    if table.shape[1] == 0:
        ax.text(0.5, 0.5, "no responses", ha="center", va="center", transform=ax.transAxes)
        return ax
    image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    ax.figure.colorbar(image, ax=ax, label=label)
    return ax


def plot_trigger_heatmap(per_type, ax=None):
    """Heatmap of the per-type trigger shares from `trigger_stats`."""
    return _heatmap(per_type, "Which principles fired, by red-team type", "share of responses citing the principle", ax)


def plot_score_heatmap(per_type, ax=None):
    """Heatmap of `score_stats`: the colour scale runs to the largest mean, since sixteen
    probabilities share each response's unit."""
    largest = float(per_type.to_numpy(dtype=float).max()) if per_type.size else 1.0
    return _heatmap(per_type, "Which principles the model finds likely, by red-team type",
                    "mean probability of citing it first", ax, vmax=max(largest, 1e-9))

