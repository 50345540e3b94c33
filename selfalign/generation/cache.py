"""Key/value cache helpers shared by the Hugging Face backend, its static decoder and `scoring`.

`cache_keyword` names the forward keyword a model takes its cache by; `copy_prefix` writes a
shared prefix's one-row cache into every row of a batch's cache. They hold no cache themselves:
which prefix is cached, and for how long, is `HFBackend`'s business.
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
