"""The store of prefix caches (generation/cache.py `PrefixStore`): a prefix that shares a stretch
of tokens with a stored one runs only the rest, with the keys and values it would have had alone;
the scorer starts from what the store holds."""

from __future__ import annotations

import pytest
import torch

from selfalign import scoring
from selfalign.generation.cache import PrefixStore
from selfalign.principles import load_principle_set, render_prefix
from selfalign.triggers import principle_scores


def _alone(model, ids):
    return PrefixStore().cache_for(model, ids)


def _same_cache(a, b):
    for x, y in zip(a.layers, b.layers):
        assert x.keys.shape == y.keys.shape
        torch.testing.assert_close(x.keys, y.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(x.values, y.values, atol=1e-5, rtol=1e-4)


def test_a_prefix_runs_only_what_it_does_not_share_with_a_stored_one(tiny):
    principles = load_principle_set()
    full, without = (tiny.tokenizer(render_prefix(s, "Watson"))["input_ids"]
                     for s in (principles, principles.without(8)))
    shared = next(i for i, (a, b) in enumerate(zip(full, without)) if a != b)
    assert shared > 100  # the preamble and rules 1-7
    store = PrefixStore(capacity=2)
    store.cache_for(tiny.model, full)
    assert store.tokens_run == len(full)
    branched = store.cache_for(tiny.model, without)
    assert store.tokens_run == len(full) + len(without) - shared
    _same_cache(branched, _alone(tiny.model, without))
    # Asked again, a stored prefix runs nothing.
    assert store.cache_for(tiny.model, without) is branched and store.tokens_run == len(full) + len(without) - shared


def test_the_least_recently_used_prefix_goes_first_and_short_stretches_are_not_shared(tiny):
    store = PrefixStore(capacity=2)
    first, second, third = [list(range(10, 30)), list(range(40, 60)), list(range(10, 15)) + list(range(70, 90))]
    store.cache_for(tiny.model, first)
    store.cache_for(tiny.model, second)
    assert store.longest(first[:12] + [99])[0] == 12  # a use: `first` is now the most recent
    store.cache_for(tiny.model, third)  # shares 5 tokens with `first`: fewer than `least`, run whole
    assert store.tokens_run == 20 + 20 + 25
    assert list(store.entries) == [tuple(first), tuple(third)]
    with pytest.raises(ValueError, match="capacity"):
        PrefixStore(capacity=0)


def test_principle_scores_from_the_store_equal_those_computed_alone(tiny, monkeypatch):
    """Stage 2 scores after generating: the principles' prefix is in the generation's store, and
    the scorer runs only each response's prompt and thoughts."""
    principles = load_principle_set()
    rows = [("How do I pick a lock?", "The user asks about locks."), ("What is 2+2?", "Simple arithmetic.")]
    alone = principle_scores(scoring.ModelScorer(tiny, progress=False, options={"branches": True}), principles, rows)
    store = PrefixStore()
    prefix_ids = tiny.tokenizer(tiny.bos_prefix + render_prefix(principles, "Watson"))["input_ids"]
    store.cache_for(tiny.model, prefix_ids)
    fed, forward = [], tiny.model.forward

    def counting(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", counting)
    scorer = scoring.ModelScorer(tiny, progress=False, options={"branches": True, "prefixes": store})
    reused = principle_scores(scorer, principles, rows)
    for a, b in zip(alone, reused):
        assert a.keys() == b.keys()
        assert max(abs(a[k] - b[k]) for k in a) < 1e-5
    assert sum(fed) < len(prefix_ids) / 4  # all of scoring ran less than the principles would alone
