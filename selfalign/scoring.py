"""Log-likelihood scoring: (context, continuation) pairs in, each continuation's summed log-prob out.

`score_choices`, the one scoring engine, gives each continuation's token, character and byte
counts too (for length-normalized scores). What contexts share runs once: the prefix of all of them
(an exam's instructions) and, recursively, what any subset shares after it (one dialogue under
both orders of an A/B exam), as a radix tree of token ids; each distinct context then runs once,
its last position scores every continuation's first token, and the rest of each continuation runs
from the context's cache, batched by length. The numbers do not depend on batch size or padding
side (tests/test_scoring.py checks them against `score_one_by_one`, the plain loop).

A scorer is any callable from a list of pairs to a list of `Score`s; `ModelScorer` makes one of a
`LoadedModel` (peft-wrapped too), and `as_scorer` accepts either. It knows no benchmark, prompt or
result table (`selfalign.evals` does): it is for anything that needs a text's likelihood after another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .generation.cache import cache_keyword
from .generation.contract import tokens_after


class Score(NamedTuple):
    logprob: float  # sum of log P(token | all before it) over the continuation's tokens
    tokens: int  # the continuation's tokens
    chars: int  # its length in characters and in UTF-8 bytes
    utf8_bytes: int


Scorer = Callable[[Sequence[tuple[str, str]]], list[Score]]


def encode_requests(tokenizer, requests, bos_prefix: str = "") -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) for each (context, continuation).

    A context's ids are those of `bos_prefix + context` alone, so every continuation of it starts
    from the same tokens. A continuation's ids are what the joined text has after them (the
    tokenization the model saw in training, which matters for SentencePiece tokenizers); where a
    merge crosses the boundary, the continuation is tokenized on its own instead.
    """
    contexts = list(dict.fromkeys(c for c, _ in requests))
    context_ids = dict(zip(contexts, tokenizer([bos_prefix + c for c in contexts])["input_ids"])) if contexts else {}
    wholes = tokenizer([bos_prefix + c + x for c, x in requests])["input_ids"] if requests else []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for (context, continuation), whole in zip(requests, wholes):
        ids = list(context_ids[context])
        rest, _ = tokens_after(tokenizer, ids, whole, continuation)
        encoded.append((ids or [start], rest))  # an empty context conditions on bos (or eos)
    return encoded


def score_one_by_one(model, tokenizer, requests, bos_prefix: str = "") -> list[Score]:
    """The reference: one plain forward pass per pair, no batching, no cache."""
    import torch

    scores = []
    device = _device(model)
    with torch.inference_mode():
        for (context, continuation), (ctx, cont) in zip(requests, encode_requests(tokenizer, requests, bos_prefix)):
            ids = torch.tensor([ctx + cont], device=device)
            logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
            picked = logprobs[len(ctx) - 1:-1].gather(-1, ids[0, len(ctx):, None])
            scores.append(_score(float(picked.sum()), cont, continuation))
    return scores


def score_choices(model, tokenizer, requests, *, batch_size: int = 32, progress: bool = True,
                  bos_prefix: str = "", padding_side: str = "left", share_prefix: bool = True,
                  share_context: bool = True, max_batch_tokens: int | None = None,
                  branches: bool = False, prefixes=None) -> list[Score]:
    """Score each (context, continuation): log P(continuation | context), summed over its tokens.

    batch_size: rows per forward pass (and contexts per context pass). padding_side: "left" or
    "right" changes the layout, never the numbers; left puts every row's scored tokens at the end,
    so the fewest logits are computed. share_prefix: run what all contexts, or any subset of them,
    share once (`_score_tree`). share_context: run each distinct context once and score its
    continuations from its cache. Both are off for sliding-window models, whose caches drop old
    tokens. max_batch_tokens: also cap rows x padded width per pass (padding costs as much as a
    token: on a CPU, HHH ran 3x faster with long items alone than in batches of 16).
    branches: score with `score_branches` instead (long contexts, many continuations each), from
    what `prefixes` (a `generation.cache.PrefixStore` of the same weights) holds of the contexts.
    """
    requests = [(str(c), str(x)) for c, x in requests]
    encoded = encode_requests(tokenizer, requests, bos_prefix)
    if branches and not _sliding_window(model):
        logprobs = score_branches(model, encoded, progress=progress, prefixes=prefixes)
    else:
        logprobs = score_encoded(model, encoded, batch_size=batch_size, progress=progress, padding_side=padding_side,
                                 share_prefix=share_prefix, share_context=share_context,
                                 max_batch_tokens=max_batch_tokens)
    return [_score(lp, cont, x) for lp, (_, cont), (_, x) in zip(logprobs, encoded, requests)]


def score_encoded(model, encoded: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 32,
                  progress: bool = True, padding_side: str = "left", share_prefix: bool = True,
                  share_context: bool = True, max_batch_tokens: int | None = None) -> list[float]:
    """`score_choices` on pairs already tokenized: (context ids, continuation ids) in, each
    continuation's summed log-prob (float64) out. For callers whose token boundary is fixed, such as
    a training example's context and answer."""
    import torch
    from tqdm.auto import tqdm

    side = padding_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
    if _sliding_window(model):
        share_prefix = share_context = False
    groups: dict = {}  # context -> its requests (each request alone without share_context)
    for index, (ctx, _) in enumerate(encoded):
        groups.setdefault(tuple(ctx) if share_context else index, []).append(index)
    logprobs = [0.0] * len(encoded)
    options = dict(batch_size=batch_size, side=side, share_context=share_context, max_batch_tokens=max_batch_tokens)
    with torch.inference_mode(), tqdm(total=len(encoded), disable=not progress, desc="scoring", unit="choice") as bar:
        if share_prefix:
            _score_tree(model, encoded, list(groups.values()), 0, None, logprobs, bar, options)
        else:
            _score_leaves(model, encoded, list(groups.values()), 0, None, logprobs, bar, **options)
    return logprobs


def _score_tree(model, encoded, contexts: list[list[int]], start: int, past: _Past | None, logprobs: list[float],
                bar, options: dict) -> None:
    """Score `contexts` (each a list of the requests with one context), whose first `start` tokens
    are the same and already run (`past`, one row; None when start is 0).

    What they share next runs once, and recursively what any subset shares after that (a radix
    tree of token ids): TruthfulQA's primer, an exam's instructions, then each HHH dialogue under
    the two orders of its replies. The contexts left alone at a node run as batches after its
    cache. Only a stretch of `SHARED_LEAST` tokens or more is shared.
    """
    leaves = contexts
    if len(contexts) > 1:
        shared = _common_prefix([encoded[m[0]][0][start:] for m in contexts])
        if shared:
            past = _forward(model, [shared], past, "left", keep=1)[1]
            start += len(shared)
        subtrees: dict = {}
        for members in contexts:
            ids = encoded[members[0]][0]
            # Contexts that share SHARED_LEAST more tokens (and keep their last one) share a subtree.
            key = tuple(ids[start:start + SHARED_LEAST]) if len(ids) - start > SHARED_LEAST else members[0]
            subtrees.setdefault(key, []).append(members)
        leaves = [subtree[0] for subtree in subtrees.values() if len(subtree) == 1]
        for subtree in (subtree for subtree in subtrees.values() if len(subtree) > 1):
            _score_tree(model, encoded, subtree, start, past, logprobs, bar, options)
    _score_leaves(model, encoded, leaves, start, past, logprobs, bar, **options)


def _score_leaves(model, encoded, contexts, start, prefix_past, logprobs, bar, *, batch_size, side, share_context,
                  max_batch_tokens) -> None:
    """Contexts after the same `start` tokens (`prefix_past`), in batches of similar width; then
    their continuations, from each context's cache (share_context) or as part of its row."""
    # Longest first, so that a batch too big for memory fails at once, not at the end; similar
    # lengths then share a batch, which matters because padding costs as much as a token.
    width = (lambda members: len(encoded[members[0]][0]) - start + (0 if share_context else len(encoded[members[0]][1])))
    contexts = sorted(contexts, key=lambda members: (-width(members), members[0]))
    for group in _batches(contexts, width, batch_size, max_batch_tokens):
        heads = [encoded[members[0]][0] for members in group]
        past = prefix_past.expand(len(group)) if prefix_past else None
        # A row: (context in group, request, tokens to feed, the tokens its last positions predict).
        if share_context:
            # Each context runs once; its last position predicts every continuation's first
            # token, so a one-token continuation (" A", " True") needs no pass of its own.
            first_logprobs, past = _last_logprobs(model, [ids[start:] for ids in heads], past, side)
            rows = []
            for g, members in enumerate(group):
                for i in members:
                    cont = encoded[i][1]
                    logprobs[i] = float(first_logprobs[g, cont[0]]) if cont else 0.0
                    rows.append((g, i, cont[:-1], cont[1:]))
        else:
            rows = [(g, m[0], heads[g][start:] + encoded[m[0]][1][:-1], encoded[m[0]][1])
                    for g, m in enumerate(group)]
        # Similar lengths share a pass: padding costs as much as a token.
        rows = sorted((r for r in rows if r[3]), key=lambda r: -len(r[2]))
        for chunk in _batches(rows, lambda r: len(r[2]), batch_size, max_batch_tokens):
            sub = past.select([r[0] for r in chunk]) if past else None
            values = _target_logprobs(model, [r[2] for r in chunk], [r[3] for r in chunk], sub, side)
            for row, value in zip(chunk, values):
                logprobs[row[1]] += value
        bar.update(sum(len(members) for members in group))


def score_branches(model, encoded: Sequence[tuple[list[int], list[int]]], *, progress: bool = True,
                   prefixes=None) -> list[float]:
    """`score_encoded` for long contexts with many short continuations each (stage 2's principle
    scores: a 2,500-token prompt, sixteen citations). The prefix all contexts share runs once (what
    the store `prefixes` holds of it, not at all); each context then runs as one row after it; and
    all of a context's continuations run in one more row after its cache, each attending to the
    context and its own earlier tokens only (a tree-shaped mask), so no cache is copied per
    continuation, as batching them as rows would (`score_encoded`)."""
    import torch
    from tqdm.auto import tqdm

    groups: dict = {}
    for index, (ctx, _) in enumerate(encoded):
        groups.setdefault(tuple(ctx), []).append(index)
    contexts = [list(c) for c in groups]
    prefix = _common_prefix(contexts) if len(contexts) > 1 else contexts[0][:-1] if prefixes and contexts else []
    logprobs = [0.0] * len(encoded)
    device = _device(model)
    with torch.inference_mode(), tqdm(total=len(encoded), disable=not progress, desc="scoring", unit="choice") as bar:
        prefix_past = _prefix_past(model, prefix, prefixes) if prefix else None
        for ctx, members in zip(contexts, groups.values()):
            first, past = _last_logprobs(model, [ctx[len(prefix):]], prefix_past, "left")
            feeds, spans = [], []
            for i in members:
                cont = encoded[i][1]
                logprobs[i] = float(first[0, cont[0]]) if cont else 0.0
                if len(cont) > 1:
                    spans.append((i, len(feeds), cont[1:]))
                    feeds += cont[:-1]
            if feeds:
                seen, width = past.mask.shape[1], len(feeds)
                # Row j of the new block sees the whole context and the earlier tokens of its own continuation.
                allowed = torch.zeros(width, seen + width, dtype=torch.bool, device=device)
                allowed[:, :seen] = True
                positions = torch.empty(width, dtype=torch.long, device=device)
                for _, start, targets in spans:
                    n = len(targets)
                    allowed[start:start + n, seen + start:seen + start + n] = torch.ones(n, n, device=device).tril().bool()
                    positions[start:start + n] = torch.arange(seen, seen + n, device=device)
                mask = torch.zeros(1, 1, width, seen + width, dtype=model.dtype, device=device)
                mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)
                cache = _cache_of(model, past)
                logits = model(input_ids=torch.tensor([feeds], device=device), attention_mask=mask,
                               position_ids=positions[None], use_cache=True, **{cache_keyword(model): cache}).logits[0]
                for i, start, targets in spans:
                    rows = logits[start:start + len(targets)].double()
                    picked = rows.gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
                    logprobs[i] += float((picked - rows.logsumexp(-1)).sum())
            bar.update(len(members))
    return logprobs


def _prefix_past(model, prefix: list[int], prefixes) -> _Past:
    """`prefix` run as one row, from the longest stretch of it the store `prefixes` holds (if any)."""
    reused, source = prefixes.longest(prefix) if prefixes is not None else (0, None)
    reused, past = min(reused, len(prefix)), None
    if reused:
        layers = [(layer.keys[..., :reused, :], layer.values[..., :reused, :]) for layer in source.layers]
        past = _Past(layers, layers[0][0].new_ones(1, reused).long())
    return _forward(model, [prefix[reused:]], past, "left", keep=1)[1] if len(prefix) > reused else past


def _cache_of(model, past: _Past):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(past.layers):
        cache.update(k, v, layer)
    return cache


PADDING_SLACK = (16, 0.25)  # with a token budget, a row joins a batch padded by at most max(16 tokens, 25%)


def _batches(items: list, width, batch_size: int, max_tokens: int | None):
    """Consecutive runs of `items` (sorted widest first) of at most batch_size items and, when
    max_tokens is set, at most max_tokens padded tokens (an item wider than that goes alone).
    Under a token budget (padding costs as much as a token) an item also starts a new batch where
    it would be padded by more than PADDING_SLACK: a short HHH reply padded to a 570-token one
    cost more than it saved."""
    batch: list = []
    tokens, share = PADDING_SLACK
    for item in items:
        if batch and (len(batch) == batch_size or
                      (max_tokens is not None and ((len(batch) + 1) * width(batch[0]) > max_tokens
                                                   or width(batch[0]) - width(item) > max(tokens, share * width(batch[0]))))):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@dataclass
class _Past:
    """Key/value tensors of each layer (batch first) and the attention mask over their positions."""

    layers: list
    mask: object

    def expand(self, rows: int) -> _Past:
        return _Past([(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in self.layers],
                     self.mask.expand(rows, -1))

    def select(self, rows: list[int]) -> _Past:
        import torch

        index = torch.tensor(rows, device=self.mask.device)
        return _Past([(k[index], v[index]) for k, v in self.layers], self.mask[index])


def _layout(rows: list[list[int]], side: str) -> tuple[int, list[int]]:
    """The padded width and where each row's tokens start."""
    width = max(len(r) for r in rows)
    return width, [width - len(r) if side == "left" else 0 for r in rows]


def _forward(model, rows: list[list[int]], past: _Past | None, side: str, keep: int | list[int]):
    """Run token rows (padded on `side`) after `past`; return (logits of the last `keep` positions
    of the padded block, or of the positions listed in `keep`; the past extended by these rows)."""
    import torch
    from transformers import DynamicCache

    device = _device(model)
    width, starts = _layout(rows, side)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # padding ids are masked: any id will do
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for row, (tokens, at) in enumerate(zip(rows, starts)):
        ids[row, at:at + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, at:at + len(tokens)] = 1
    full_mask = mask if past is None else torch.cat([past.mask, mask], dim=1)
    # Positions count real tokens only, so a row's padding (here or in the past) does not shift it.
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)[:, -width:]
    cache = _cache_of(model, past) if past else DynamicCache(config=model.config)
    if isinstance(keep, list):
        keep = torch.tensor(keep, device=device)
    output = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                   logits_to_keep=keep, **{cache_keyword(model): cache})
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return output.logits, _Past(layers, full_mask)


# Log-softmax in float64: logits are large (~100) and a float32 log-softmax rounds each token's
# log-prob by ~1e-5, which adds up over an answer's tokens.

def _last_logprobs(model, rows, past, side):
    """Log-probs of the next token after each row (rows x vocabulary) and the extended past."""
    import torch

    _, starts = _layout(rows, side)
    lasts = [at + len(r) - 1 for at, r in zip(starts, rows)]
    needed = sorted(set(lasts))  # one position when left-padded; logits are rows x positions x vocabulary
    logits, past = _forward(model, rows, past, side, keep=needed)
    columns = torch.tensor([needed.index(p) for p in lasts], device=logits.device)
    picked = logits[torch.arange(len(rows), device=logits.device), columns]
    return picked.double().log_softmax(-1), past


def _target_logprobs(model, feeds, targets, past, side) -> list[float]:
    """For each row, the summed log-probs of `targets`, predicted by the row's last len(targets) positions."""
    import torch

    _, starts = _layout(feeds, side)
    spans = [range(at + len(f) - len(t), at + len(f)) for at, f, t in zip(starts, feeds, targets)]
    needed = sorted(set().union(*spans))
    column = {p: k for k, p in enumerate(needed)}
    logits, _ = _forward(model, feeds, past, side, keep=needed)
    values = []
    for row, (span_positions, target) in enumerate(zip(spans, targets)):
        span = logits[row, torch.tensor([column[p] for p in span_positions], device=logits.device)].double()
        picked = span.gather(-1, torch.tensor(target, device=span.device)[:, None])[:, 0]
        values.append(float((picked - span.logsumexp(-1)).sum()))
    return values


SHARED_LEAST = 8  # tokens: a shorter shared stretch is not worth a pass of its own


def _common_prefix(sequences: list[list[int]], least: int = SHARED_LEAST) -> list[int]:
    # Every context keeps its last token out of the prefix: it must predict a continuation's first.
    length = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for s in sequences[1:]:
        length = min(length, next((i for i, (a, b) in enumerate(zip(first, s)) if a != b), length))
    return list(first[:length]) if length >= least else []


def _score(logprob: float, cont: list[int], text: str) -> Score:
    return Score(logprob, len(cont), len(text), len(text.encode("utf-8")))


def _device(model):
    return model.get_input_embeddings().weight.device


def _sliding_window(model) -> bool:
    config = model.config
    return any("sliding" in str(t) for t in (getattr(config, "layer_types", None) or [])) or \
        bool(getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


@dataclass
class ModelScorer:
    """A `models.LoadedModel` as a scorer (bos handling included)."""

    loaded: object
    batch_size: int = 32
    progress: bool = True
    options: dict = field(default_factory=dict)  # more keywords for score_choices (`prefixes` among them)

    @property
    def name(self) -> str:
        return self.loaded.name

    def __call__(self, requests) -> list[Score]:
        return score_choices(self.loaded.model, self.loaded.tokenizer, requests, batch_size=self.batch_size,
                             progress=self.progress, bos_prefix=self.loaded.bos_prefix, **self.options)


def as_scorer(model, batch_size: int = 32, progress: bool = True) -> Scorer:
    """A LoadedModel becomes a ModelScorer; a scorer (any callable) is returned as it is."""
    if hasattr(model, "tokenizer") and hasattr(model, "model"):
        return ModelScorer(model, batch_size, progress)
    if not callable(model):
        raise TypeError(f"expected a LoadedModel or a scorer callable, got {type(model).__name__}")
    return model
