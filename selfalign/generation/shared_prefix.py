"""Shared-prefix attention: a batch behind one prefix reads the prefix's keys and values once.

Stage 2 puts the same ~1,700-token prefix (principles and exemplars) before every prompt. Copying
its cache into every row of a batch makes each decode step read the prefix once per row. Here the
prefix's one-row cache stays one row (`PrefixedCache`), every row keeps only its own tokens, and
`shared_prefix_attention` attends in two parts that it merges exactly by their log-sum-exp, as
vLLM's cascade attention and Hydragen do:

- the whole batch's queries against the one prefix, as one matrix product per key/value head;
- each row's queries against its own tokens, under the usual causal and padding mask.

A batch may also sit behind several prefixes (leave-one-out's principle sets, one per group of
rows): `PrefixedCache` then takes the prefixes' one-row caches and each row's prefix, every
prefix's rows attend to its keys and values alone, and the rows' own tokens start after a virtual
prefix as long as the longest one (HFBackend left-pads the rows behind shorter prefixes, masked, so
that position ids, computed from the mask, continue each row's real prefix).

Both are transformers' own extension points: a `Cache` whose layers hand the attention function
the prefix beside the row's own states, and a function registered in `AttentionInterface` (with
its mask in `AttentionMaskInterface`) under `ATTENTION`. Nothing in the model is patched;
`shared_attention(model)` switches a model to it for the duration of a decode and back.

It does not decide when to share a prefix (`HFBackend` does), nor compute the prefix's cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "selfalign_shared_prefix"
# Models whose attention layers hand the attention function (query, key, value, mask) in the
# Llama layout: [batch, heads, tokens, head_dim], key/value heads grouped, no sliding window or
# soft-capping. Others fall back to a per-row copy of the prefix (HFBackend).
SUPPORTED_MODEL_TYPES = ("llama",)


class Prefixed(NamedTuple):
    """A layer's keys (or values): the prefix's one row, and every row's own tokens after it.

    Behind several prefixes, `prefix` is a tuple of one-row tensors (of their own lengths) and
    `rows` holds, for each, the indices of the batch rows behind it."""

    prefix: torch.Tensor | tuple[torch.Tensor, ...]  # [1, kv_heads, prefix_len, head_dim]
    own: torch.Tensor  # [batch, kv_heads, own_len, head_dim]
    rows: tuple[torch.Tensor, ...] | None = None  # None: one prefix, behind every row


def supports(model) -> bool:
    """Whether `model` can decode with shared-prefix attention (else the prefix is copied per row)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or not hasattr(base, "set_attn_implementation"):
        return False
    config = config.get_text_config(decoder=True)
    return (config.model_type in SUPPORTED_MODEL_TYPES and getattr(config, "sliding_window", None) is None
            and getattr(config, "attn_logit_softcapping", None) is None)


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """Attention over a shared prefix and each row's own tokens; (output [batch, tokens, heads, dim], None).

    `key` and `value` are `Prefixed` (from `PrefixedCache`); anything else goes to sdpa unchanged,
    so that a forward without the shared cache (scoring, say) is what it was.
    """
    if not isinstance(key, Prefixed):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads = key.own.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, kv_heads, groups * length, dim)
    if key.rows is None:
        prefix_out, prefix_lse = _attend_prefix(grouped, key.prefix, value.prefix, scale)
    else:
        # Each prefix's rows against that prefix: its keys are read once a step, as with one prefix,
        # and with no padding to mask (the prefixes' lengths differ).
        prefix_out = grouped.new_empty(grouped.shape, dtype=torch.float32)
        prefix_lse = grouped.new_empty(grouped.shape[:-1], dtype=torch.float32)
        for prefix_keys, prefix_values, rows in zip(key.prefix, value.prefix, key.rows):
            out, lse = _attend_prefix(grouped.index_select(0, rows), prefix_keys, prefix_values, scale)
            prefix_out.index_copy_(0, rows, out)
            prefix_lse.index_copy_(0, rows, lse)
    # The rows' own tokens, causal and unpadded by the mask ([batch, 1, length, own_len], True = attend).
    allowed = attention_mask.expand(batch, 1, length, -1).repeat(1, 1, groups, 1).reshape(batch, 1, groups * length, -1)
    # Finite, not -inf: a padded query that sees none of its row's tokens gets a finite, negligible
    # weight for this part instead of NaN.
    bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, torch.finfo(query.dtype).min)
    own_out, own_lse = _attend(grouped, key.own, value.own, scale, bias)

    top = torch.maximum(prefix_lse, own_lse)
    prefix_weight, own_weight = torch.exp(prefix_lse - top), torch.exp(own_lse - top)
    merged = (prefix_out * prefix_weight.unsqueeze(-1) + own_out * own_weight.unsqueeze(-1)) \
        / (prefix_weight + own_weight).unsqueeze(-1)
    output = merged.reshape(batch, kv_heads, groups, length, dim).reshape(batch, heads, length, dim)
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


def _attend_prefix(grouped, keys, values, scale: float):
    """Rows' queries ([rows, kv_heads, queries, dim]) against one prefix's one row: (output, log-sum-exp).

    Every row's queries of a key/value head go in one call, as one row of queries, so that the
    prefix's keys and values are read once however many rows there are.
    """
    rows, kv_heads, queries, dim = grouped.shape
    shared = grouped.transpose(0, 1).reshape(1, kv_heads, rows * queries, dim)
    out, lse = _attend(shared, keys, values, scale)
    return (out.reshape(kv_heads, rows, queries, dim).transpose(0, 1),
            lse.reshape(kv_heads, rows, queries).transpose(0, 1))


# PyTorch's fused CPU attention kernel, which returns the log-sum-exp the merge needs (the public
# scaled_dot_product_attention does not): on the stage-2 shapes it was 7x faster than the products
# below at prefill and 2.5x at decode (benchmarks/RESULTS.md). A private operator, so looked up
# rather than assumed; the products are the fallback and the path on other devices.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(query, key, value, scale: float, bias=None):
    """Softmax attention of [batch, heads, tokens, dim] tensors: (output, log-sum-exp), both float32.

    `bias` is added to the scores (0 or a large negative number). Products in the model's dtype,
    softmax in float32, as transformers' eager attention does.
    """
    if query.device.type == "cpu" and _CPU_FLASH is not None:
        output, lse = _CPU_FLASH(query, key, value, 0.0, False, attn_mask=bias, scale=scale)
        return output.float(), lse.float()
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    top = scores.amax(-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(-1, keepdim=True)
    output = torch.matmul(weights.to(value.dtype), value).float() / total
    return output, (top + total.log()).squeeze(-1)


class PrefixedLayer(StaticLayer):
    """A static layer for the rows' own tokens that hands attention the shared prefix beside them.

    Positions count from the start of the prefix (masks and position ids are the full sequence's,
    as with a copied prefix); only the rows' own tokens are stored per row. Behind several
    prefixes (`rows` given: each prefix's batch rows), `prefix_keys` and `prefix_values` are
    tuples and the masks count from the end of the longest prefix.
    """

    def __init__(self, prefix_keys, prefix_values, own_len: int, rows: tuple[torch.Tensor, ...] | None = None):
        super().__init__(max_cache_len=own_len)
        self.prefix_keys, self.prefix_values, self.rows = prefix_keys, prefix_values, rows
        several = prefix_keys if rows is not None else (prefix_keys,)
        self.prefix_len = max(keys.shape[-2] for keys in several)

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return Prefixed(self.prefix_keys, keys, self.rows), Prefixed(self.prefix_values, values, self.rows)

    def get_seq_length(self):
        return self.prefix_len + super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, self.prefix_len  # the mask covers the rows' own part only


class PrefixedCache(Cache):
    """A batch's cache behind one prefix: `prefix_cache` (one row, shared) and `own_len` tokens a row.

    Behind several: `prefix_cache` is a list of one-row caches and `rows[i]` the index (into that
    list) of row i's prefix. Own tokens then start after the longest prefix (`prefix_len`), and a
    row behind a shorter one is padded up to it in the inputs (masked; HFBackend does it).
    """

    def __init__(self, prefix_cache, own_len: int, rows=None):
        if rows is None:
            layers = [PrefixedLayer(layer.keys, layer.values, own_len) for layer in prefix_cache.layers]
        else:
            caches = list(prefix_cache)
            if sorted(set(rows)) != list(range(len(caches))):
                raise ValueError(f"rows must name each of the {len(caches)} prefixes, got {list(rows)}")
            device = caches[0].layers[0].keys.device
            members = tuple(torch.tensor([r for r, p in enumerate(rows) if p == i], device=device)
                            for i in range(len(caches)))
            layers = [PrefixedLayer(tuple(c.layers[n].keys for c in caches), tuple(c.layers[n].values for c in caches),
                                    own_len, members) for n in range(len(caches[0].layers))]
        super().__init__(layers=layers)
        self.prefix_len = layers[0].prefix_len


def _materialized_mask(*args, **kwargs):
    # The rows' own part needs the mask itself: sdpa's would be None where it is plainly causal.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(ATTENTION, _materialized_mask)


@contextmanager
def shared_attention(model):
    """Decode `model` with shared-prefix attention inside the block, and with its own after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def bytes_per_row(model, prefix_len: int) -> int:
    """The key/value bytes one row no longer holds: its copy of a `prefix_len`-token prefix."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(base.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * prefix_len * element
