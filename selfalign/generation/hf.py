"""The Hugging Face backend: transformers on a loaded model, with stop strings and per-prompt seeds.

`HFBackend` tokenizes and left-pads a batch, reuses a shared prefix's key/value cache, and decodes
with `model.generate` ("hf") or `StaticDecoder` ("hf-static"), both given the same logits
processors and stopping criteria; it turns new token ids into `Completion`s.

It does not batch, order or seed prompts (the engine does), nor hold the static decode loop
(static.py), the logits processors (processors.py, sampler.py) or the cache helpers (cache.py).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

from .cache import PrefixStore, cache_keyword, copy_prefix
from .contract import Completion, SamplingParams, cut_at_stop, first_token_biases, tokens_after
from .grammar import GrammarConstraint, grammar_tokenizer
from .processors import GeneratedNoRepeatNGram, GeneratedRepetitionPenalty, LogitBias
from .sampler import NucleusSampler
from .static import StaticDecoder
STATIC_CACHE_ROUNDING = 128  # tokens; cache lengths are rounded up to a multiple, to reuse compiled steps


class HFBackend:
    """transformers on a loaded model, with stop strings and per-prompt seeds.

    Sampling is done by `NucleusSampler` as the last logits processor of greedy decoding: it draws
    each row's token from that row's own generator and returns a one-hot score, which greedy search
    then picks. Besides per-prompt seeds, this gave 18% more tokens/s at batch 16 on CPU than
    transformers' top-p warper, which sorts the whole vocabulary of every row at every step
    (benchmarks/RESULTS.md).

    `static=False` decodes with `model.generate`. `static=True` runs `StaticDecoder`, a loop over a
    preallocated cache whose decode step has fixed shapes, so on CUDA it is compiled once and
    replayed as a CUDA graph; its tokens are the same as generate's (tested on CPU), since it
    applies the same logits processors (`_processors`) and transformers' own stopping criteria in
    generate's order. `compile=None` compiles on CUDA only.
    """

    def __init__(self, loaded, static: bool = False, compile: bool | None = None, share_prefix: bool = True):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.static = static
        self.compile = compile
        self.name = "hf-static" if static else "hf"
        # Shared prefixes' caches, by token ids; a new prefix starts from what it shares with a
        # stored one. Two: the prefix in use, and the one it may branch from (a batch behind several
        # prefixes raises it to hold them all, stream_batch).
        self.prefixes = PrefixStore(capacity=2)
        self._prefix_tokens: dict[str, list[int]] = {}  # shared prefix -> its ids, for the prefixes in use
        self._decoders: dict[tuple[int, int], StaticDecoder] = {}
        self._grammar_tokenizer = None  # llguidance's view of the vocabulary, built on first use
        # Rows behind a shared prefix attend to its one cached row (shared_prefix.py) where the model
        # allows; otherwise every row gets its own copy. The tokens are the same (tested).
        self.share_prefix = share_prefix and _shared_prefix_supported(self.model)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(self.loaded.bos_prefix + text)["input_ids"]

    def count_tokens(self, texts: Sequence[str], shared_prefix: str | None = None) -> list[int]:
        return [len(ids) for ids in self._split_encode(texts, [shared_prefix] * len(texts))]

    def _split_encode(self, texts: Sequence[str], prefixes: Sequence[str | None]) -> list[list[int]]:
        """Each text's ids as the model would see it without a cache: those of the whole text, which
        start with its shared prefix's (cached) ids (`tokens_after`). Where a token spans the
        boundary, the rest is tokenized on its own after the prefix's ids: the cache holds those,
        and every row behind it must start with them."""
        wholes = self.tokenizer([self.loaded.bos_prefix + text for text in texts])["input_ids"] if texts else []
        encoded = []
        for text, prefix, whole in zip(texts, prefixes, wholes):
            if prefix is None:
                encoded.append(whole)
            else:
                head = self._prefix_ids(prefix)
                encoded.append(head + tokens_after(self.tokenizer, head, whole, text[len(prefix):])[0])
        return encoded

    def _prefix_ids(self, shared_prefix: str) -> list[int]:
        # The prefix is thousands of tokens and the same for every prompt: tokenize it once.
        if shared_prefix not in self._prefix_tokens:
            if len(self._prefix_tokens) >= self.prefixes.capacity:
                self._prefix_tokens.pop(next(iter(self._prefix_tokens)))
            self._prefix_tokens[shared_prefix] = self._encode(shared_prefix)
        return self._prefix_tokens[shared_prefix]

    @property
    def multi_prefix(self) -> bool:
        """Whether one batch may sit behind several shared prefixes (`stream_batch` given a list):
        "hf" where the model has shared-prefix attention. The engine asks (`generate_groups`)."""
        return not self.static and self.share_prefix

    @property
    def mixes_adapters(self) -> bool:
        """Whether a batch may mix LoRA adapters (`stream_batch` given `adapters`): "hf"."""
        return not self.static

    def stream_batch(self, prompts, params, seeds, shared_prefix=None, max_prompt_tokens=None, grammars=None,
                     adapters=None):
        """Complete one batch (the engine's `Backend` contract).

        `shared_prefix` is one prefix of every prompt, or a list of each prompt's own (several
        different ones only where `multi_prefix`). `grammars`, one per prompt (None: free), holds
        each row to its own grammar in place of `params.grammar`, which must then be None.
        `adapters`, one per prompt, names the LoRA adapter each row runs through (None: none),
        on a model holding them unmerged (`training.adapters_for_generation`).
        """
        import torch

        if adapters is not None and not self.mixes_adapters:
            raise ValueError(f"backend {self.name!r} cannot mix adapters in a batch")
        if adapters is not None and shared_prefix is not None:
            raise ValueError("a shared prefix's cache is one model's: rows through different adapters cannot share it")

        prefixes = _per_row(shared_prefix, len(prompts))
        distinct = list(dict.fromkeys(prefixes)) if prefixes is not None else []
        if len(distinct) > 1 and not self.multi_prefix:
            raise ValueError(f"backend {self.name!r} on this model decodes a batch behind one shared prefix only; "
                             "decode each prefix's prompts apart (Engine.generate_groups does)")
        # The store keeps a batch's prefixes and one to branch from, so that the next batch behind the
        # same prefixes, or a scorer after this one (stage 2, leave-one-out), finds them.
        self.prefixes.capacity = max(self.prefixes.capacity, len(distinct) + 1)
        pad_id = self.tokenizer.pad_token_id
        encoded = self._split_encode(prompts, prefixes or [None] * len(prompts))
        prefix_ids = {text: self._prefix_ids(text) for text in distinct}
        if max_prompt_tokens is not None:
            encoded = [ids[-max_prompt_tokens:] for ids in encoded]
        device = self.model.device
        prefix_len = 0
        if prefixes is not None:
            prefix_len = max(len(ids) for ids in prefix_ids.values())
            # The gap between prefix and suffix is padded (masked), so that all rows share the
            # cached prefix positions; position ids come from the mask, so the suffix's positions
            # follow the prefix as if there were no gap. Behind several prefixes, a row behind a
            # shorter one is also padded before it, so that every row's own tokens start at the
            # longest prefix's end (shared_prefix.py) and its positions continue its own prefix.
            before = [prefix_len - len(prefix_ids[text]) for text in prefixes]
            suffixes = [ids[len(prefix_ids[text]):] for ids, text in zip(encoded, prefixes)]
            width = max(len(s) for s in suffixes)
            if width == 0:
                raise ValueError("with a shared prefix, every prompt needs text after it")
            rows = [[pad_id] * b + prefix_ids[text] + [pad_id] * (width - len(s)) + s
                    for b, text, s in zip(before, prefixes, suffixes)]
            masks = [[0] * b + [1] * (prefix_len - b) + [0] * (width - len(s)) + [1] * len(s)
                     for b, s in zip(before, suffixes)]
        else:
            width = max(len(ids) for ids in encoded)
            rows = [[pad_id] * (width - len(ids)) + ids for ids in encoded]
            masks = [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded]
        input_ids = torch.tensor(rows, device=device)
        attention_mask = torch.tensor(masks, device=device)
        processors = self._processors(params, seeds, attention_mask, grammars)
        caches = [self._cached_prefix(text, prefix_ids[text]) for text in distinct]
        if self.static:
            prefix_cache = caches[0] if caches else None
            decoder = self._static_decoder(len(prompts), input_ids.shape[1] + params.max_new_tokens,
                                           prefix_cache if self._shares(len(prompts)) else None)
            new_tokens = decoder.decode(
                input_ids, attention_mask, processors,
                self._stopping(params), params.max_new_tokens, pad_id, prefix_cache)
            return [self._finish(ids, len(e), params) for ids, e in zip(new_tokens, encoded)]

        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=self._eos_ids(),
            # Neutral, so that a model's generation_config cannot add transformers' own penalties,
            # which count the prompt; ours are in `_processors`.
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            logits_processor=processors,
        )
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        attention = contextlib.nullcontext()
        if caches:
            total = input_ids.shape[1] + params.max_new_tokens
            if self._shares(len(prompts)):
                from .shared_prefix import PrefixedCache, shared_attention

                if len(caches) == 1:  # one prefix behind every row: the one-prefix attention, as fast as before
                    cache = PrefixedCache(caches[0], total - prefix_len)
                else:
                    cache = PrefixedCache(caches, total - prefix_len, [distinct.index(text) for text in prefixes])
                kwargs[cache_keyword(self.model)] = cache
                attention = shared_attention(self.model)
            else:
                kwargs[cache_keyword(self.model)] = self._batch_cache(caches[0], len(prompts), total)

        with torch.inference_mode(), attention, _adapter_rows(self.model, adapters):
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return [self._finish(ids, len(e), params) for ids, e in zip(new_tokens, encoded)]

    def _shares(self, batch: int) -> bool:
        # One row has one copy of the prefix either way, and two attention calls cost more than one
        # (0.8x the tokens/s at batch 1, benchmarks/RESULTS.md).
        return self.share_prefix and batch > 1

    def _processors(self, params: SamplingParams, seeds, attention_mask, grammars: Sequence[str | None] | None = None):
        """The logits processors of both decoders, in one order: penalties, logit bias, grammar, sampler.

        The batch is left-padded to the width of `attention_mask` (with a shared prefix, prefix
        plus padded suffix), so the tokens after that width are the generated ones. `grammars`
        (one per row, None: free) replaces `params.grammar`.
        """
        from transformers import LogitsProcessorList

        width, device = attention_mask.shape[1], attention_mask.device
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(GeneratedRepetitionPenalty(params.repetition_penalty, width))
        if params.no_repeat_ngram_size > 0:
            processors.append(GeneratedNoRepeatNGram(params.no_repeat_ngram_size, width))
        if params.logit_bias:
            processors.append(LogitBias(first_token_biases(self.tokenizer, params.logit_bias), device))
        grammar = params.grammar
        if grammars is not None:
            if grammar is not None or len(grammars) != len(seeds):
                raise ValueError("grammars are one per prompt, in place of params.grammar (leave it None)")
            grammar = None if all(g is None for g in grammars) else list(grammars)
        if grammar is not None:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self._eos_ids())
            processors.append(GrammarConstraint(self._grammar_tokenizer, grammar, len(seeds), width))
        if params.temperature > 0:
            processors.append(NucleusSampler(params.temperature, params.top_p, seeds, device))
        return processors

    def _stopping(self, params: SamplingParams):
        from transformers import StoppingCriteriaList
        from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria

        criteria = StoppingCriteriaList([EosTokenCriteria(self._eos_ids())])
        if params.stop:
            criteria.append(StopStringCriteria(self.tokenizer, list(params.stop)))
        return criteria

    def _static_decoder(self, batch: int, total: int, shared_prefix_cache=None) -> "StaticDecoder":
        """A decoder for this batch size whose cache holds `total` tokens, reused across batches.

        The cache length is rounded up, so that batches of slightly different widths share one
        compiled step; two decoders are kept (a full batch and the last, smaller one). A decoder
        that shares a prefix's cache is for that prefix only.
        """
        length = max(total, min(-(-total // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING, self.loaded.context_length))
        key = (batch, length, id(shared_prefix_cache) if shared_prefix_cache is not None else None)
        if key not in self._decoders:
            while len(self._decoders) >= 2:
                self._decoders.pop(next(iter(self._decoders)))
            compile = self.compile if self.compile is not None else self.model.device.type == "cuda"
            self._decoders[key] = StaticDecoder(self.model, batch, length, compile=compile,
                                                shared_prefix_cache=shared_prefix_cache)
        else:
            self._decoders[key] = self._decoders.pop(key)  # most recently used last
        return self._decoders[key]

    def cache_prefix(self, shared_prefix: str) -> None:
        """Run a shared prefix into `prefixes` now, for later prefixes to branch from (leave-one-out
        runs the full principle set's first, so that a resumed run branches as a whole one does)."""
        self._cached_prefix(shared_prefix, self._prefix_ids(shared_prefix))

    def _cached_prefix(self, shared_prefix: str, prefix_ids: list[int]):
        cache = self.prefixes.cache_for(self.model, prefix_ids)
        # A static decoder bound to a prefix the store has let go would keep it alive.
        live = {id(c) for c in self.prefixes.entries.values()}
        self._decoders = {key: decoder for key, decoder in self._decoders.items() if key[2] is None or key[2] in live}
        return cache

    def _batch_cache(self, prefix_cache, batch: int, total: int):
        """The prefix's cache for a batch, as a preallocated static cache.

        A dynamic cache grows by concatenation, copying the whole (long) prefix at every decode step
        (a third of the time in a CPU profile of stage 2); a static cache is written in place.
        Falls back to a copied dynamic cache where this transformers version lacks the API.
        """
        from transformers import StaticCache

        try:
            cache = StaticCache(config=self.model.config, max_cache_len=total)
            copy_prefix(prefix_cache, cache, batch)
            return cache
        except (AttributeError, TypeError):
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(batch)
            return cache

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return list(ids) if isinstance(ids, (list, tuple)) else [ids]

    def _finish(self, ids: list[int], prompt_tokens: int, params: SamplingParams) -> Completion:
        eos = set(self._eos_ids())
        end = next((i for i, t in enumerate(ids) if t in eos), None)
        kept = ids if end is None else ids[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        text, stop = cut_at_stop(text, params.stop)
        if stop is not None:
            # Count tokens up to the one that completed the stop string (generation stopped there,
            # though padding may follow in the batch).
            used = _tokens_until(self.tokenizer, kept, stop)
            return Completion(text, "stop", prompt_tokens, used, stop)
        if end is not None:
            return Completion(text, "eos", prompt_tokens, end + 1)
        return Completion(text, "length", prompt_tokens, len(ids))


@contextlib.contextmanager
def _adapter_rows(model, adapters):
    """Route each row of the batch through its adapter: peft's LoRA layers take `adapter_names`,
    one per row ("__base__": none), which a pre-forward hook hands every one of them, as peft's
    own `generate(adapter_names=...)` does on a PeftModel (the engine drives the model inside it)."""
    if adapters is None:
        yield
        return
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    known = {name for layer in layers for name in layer.lora_A}
    unknown = sorted({a for a in adapters if a is not None} - known)
    if unknown:
        raise ValueError(f"adapters {unknown} are not on the model (it holds {sorted(known) or 'none'}); "
                         "apply them with training.adapters_for_generation")
    names = ["__base__" if a is None else a for a in adapters]

    def hand_names(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [layer.register_forward_pre_hook(hand_names, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _per_row(shared_prefix, rows: int) -> list[str] | None:
    """Each row's shared prefix (None: no prefix), from one prefix or a list of one per row."""
    if shared_prefix is None or isinstance(shared_prefix, str):
        return None if shared_prefix is None else [shared_prefix] * rows
    prefixes = list(shared_prefix)
    if len(prefixes) != rows or not all(isinstance(text, str) for text in prefixes):
        raise ValueError(f"shared_prefix must be one text or one per prompt ({rows}), got {len(prefixes)} items")
    return prefixes


def _shared_prefix_supported(model) -> bool:
    from .shared_prefix import supports  # imports transformers, which a loaded model has already

    return supports(model)


def _tokens_until(tokenizer, ids: list[int], stop: str) -> int:
    # Once the stop string appears in a prefix's text it stays, so bisect on the prefix length.
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        if stop in tokenizer.decode(ids[:middle], skip_special_tokens=True):
            high = middle
        else:
            low = middle + 1
    return high
