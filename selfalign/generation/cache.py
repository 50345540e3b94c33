"""Key/value cache helpers shared by the Hugging Face backend, its static decoder and `scoring`.

`cache_keyword` names the forward keyword a model takes its cache by; `copy_prefix` writes a
shared prefix's one-row cache into every row of a batch's cache. `PrefixStore` keeps the one-row
caches of the last few prefixes a model ran, by token ids, and starts a new prefix from the
longest stretch of tokens it already holds: leave-one-out's sixteen principle sets share their
preamble and the rules before the one left out, and stage 2's scorer reads the principles the
generation has just run. Which prefixes to run, and whether to hand a store to a scorer (only
for the same weights), is the caller's business.
"""

from __future__ import annotations
def cache_keyword(model) -> str:
    """The forward keyword for a key/value cache: transformers 5.x renamed `past_key_values` to
    `cache`. A peft wrapper passes unknown keywords through, so its base model is asked."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def copy_prefix(prefix_cache, cache, batch: int) -> int:
    """Write a one-row prefix cache into the first positions of every row of `cache`; return its length."""
    import torch

    for index, layer in enumerate(prefix_cache.layers):
        length = layer.keys.shape[-2]
        cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), index,
                     {"cache_position": torch.arange(length, device=layer.keys.device)})
    return length


class PrefixStore:
    """The one-row key/value caches of the last `capacity` token prefixes a model ran (least
    recently used goes first), and what any new prefix shares with them."""

    least = 8  # tokens: a shorter shared stretch is recomputed rather than copied
    piece = 1024  # tokens a pass after a shared stretch (2,000 tokens ran 0.87x the time of one pass, RESULTS.md)

    def __init__(self, capacity: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.entries: dict[tuple[int, ...], object] = {}  # token ids -> DynamicCache, oldest first
        self.tokens_run = 0  # prefix tokens forwarded, for tests and benchmarks

    def longest(self, ids) -> tuple[int, object | None]:
        """(n, cache): the most tokens at the start of `ids` that a stored prefix also starts with
        (n >= `least`, else 0), and that prefix's cache; the first n positions of its keys and values
        are those of `ids`, since a causal model's position depends on the tokens before it only."""
        ids, best, found = tuple(ids), 0, None
        for stored, cache in self.entries.items():
            limit = min(len(stored), len(ids))
            shared = next((i for i in range(limit) if stored[i] != ids[i]), limit)
            if shared > best:
                best, found = shared, stored
        if best < self.least:
            return 0, None
        self.entries[found] = self.entries.pop(found)  # most recently used last
        return best, self.entries[found]

    def cache_for(self, model, ids):
        """The one-row DynamicCache of `ids`: stored, or run from the longest stored stretch it
        shares (its keys and values copied, the rest forwarded) and then stored."""
        import torch
        from transformers import DynamicCache

        key = tuple(ids)
        if key in self.entries:
            self.entries[key] = self.entries.pop(key)
            return self.entries[key]
        shared, source = self.longest(key)
        shared = min(shared, len(key) - 1)  # at least one token runs, so the forward has input
        cache = DynamicCache(config=model.config)
        if shared >= self.least:
            for index, layer in enumerate(source.layers):
                cache.update(layer.keys[..., :shared, :], layer.values[..., :shared, :], index)
        else:
            shared = 0
        device = model.get_input_embeddings().weight.device
        # After a cached stretch the causal mask is no longer plain, and attention then runs over
        # every key, the future ones masked; in pieces, each piece runs over the keys before its end.
        step = self.piece if shared else len(key)
        with torch.inference_mode():
            for start in range(shared, len(key), step):
                # Only the caches are wanted: keeping one position's logits spares the vocabulary
                # projection of thousands (0.81x the prefill time on the embedded model, RESULTS.md).
                model(input_ids=torch.tensor([list(key[start:start + step])], device=device), use_cache=True,
                      logits_to_keep=1, **{cache_keyword(model): cache})
        self.tokens_run += len(key) - shared
        while len(self.entries) >= self.capacity:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = cache
        return cache
