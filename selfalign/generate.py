"""The one generation engine every stage uses: raw-text prompts in, completions out.

`Engine.stream` yields `(index, Completion)` pairs batch by batch, so that a stage can append each
record to disk as soon as it exists; `Engine.generate` collects them in prompt order. Prompts are
sorted by length and left-padded into batches. Each prompt samples from its own random generator,
seeded from the run's seed and the prompt's key (a record id, or the text and its occurrence), so a
prompt's completion does not depend on which batch it landed in or on a resume, and the caller's
random state is left untouched.

A prompt set that shares a long prefix (SELF-ALIGN's principles and exemplars) passes it as
`shared_prefix`: its key/value cache is computed once and reused by every batch.

Backends implement `Backend.stream_batch`; the Hugging Face one lives here. This module does not
decide what prompts say or where results go: the stages and `records` do.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterator, Protocol, Sequence

FINISH_REASONS = ("stop", "eos", "length")
HF_BACKENDS = ("hf", "hf-static")
BACKENDS = HF_BACKENDS + ("vllm",)


class PromptTooLongError(ValueError):
    """A prompt plus max_new_tokens does not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy decoding.

    `repetition_penalty` (transformers' semantics) and `no_repeat_ngram_size` look at the generated
    tokens only, as Dromedary's released generation does: a teacher rewriting a question may quote
    it. `logit_bias` pairs a text with a bias added to the logit of its first token, as written and
    after a space, at every step (Dromedary's stage 2: `(("Sorry", -100.0),)`).
    """

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    logit_bias: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):  # a lone string would be read as a set of characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((text, float(bias)) for text, bias in pairs))
        for text, bias in self.logit_bias:
            if not isinstance(text, str) or not text or not math.isfinite(bias):
                raise ValueError(f"logit_bias needs (non-empty text, finite bias) pairs, got {(text, bias)!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop), "logit_bias": [list(p) for p in self.logit_bias]}


@dataclass
class Completion:
    text: str  # generated text, cut before the first stop string, without special tokens
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    completion_tokens: int  # tokens generated, including the one that completed a stop string or eos
    stop_string: str | None = None  # which stop string ended it

    def to_dict(self) -> dict:
        return asdict(self)


class Backend(Protocol):
    name: str

    def count_tokens(self, texts: Sequence[str], shared_prefix: str | None = None) -> list[int]: ...

    def stream_batch(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int],
                     shared_prefix: str | None, max_prompt_tokens: int | None) -> list[Completion]:
        """Complete one batch, prompt i sampling from seeds[i]; prompts longer than
        max_prompt_tokens keep their last tokens."""


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Cut `text` before the earliest stop string; return (text, the stop string or None)."""
    best, which = len(text), None
    for stop in stops:
        at = text.find(stop)
        if at != -1 and at < best:
            best, which = at, stop
    return text[:best], which


def first_token_biases(tokenizer, logit_bias: Sequence[tuple[str, float]]) -> dict[int, float]:
    """Token id -> bias: each text's first token, as written and after a space; a text's bias is
    counted once where both give the same token, and biases of different texts add up.

    A first token that is whitespace alone is passed over for the next one: LLaMA's tokenizer
    encodes " Sorry" as "▁", "▁Sorry", and biasing that lone "▁" would bias every number it
    precedes, not the word.
    """
    biases: dict[int, float] = {}
    for text, bias in logit_bias:
        ids = set()
        for variant in (text, " " + text):
            tokens = tokenizer(variant, add_special_tokens=False)["input_ids"]
            while len(tokens) > 1 and not tokenizer.decode(tokens[:1]).strip():
                tokens = tokens[1:]
            ids.update(tokens[:1])
        for token in ids:
            biases[token] = biases.get(token, 0.0) + bias
    return biases


def prompt_seed(seed: int, key) -> int:
    digest = hashlib.sha256(repr((seed, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def default_keys(prompts: Sequence[str]) -> list[tuple[str, int]]:
    """(text, how many times it occurred before): repeated prompts get different samples."""
    seen: dict[str, int] = {}
    keys = []
    for text in prompts:
        keys.append((text, seen.get(text, 0)))
        seen[text] = seen.get(text, 0) + 1
    return keys


@dataclass
class Engine:
    """Batches prompts for a backend, with a progress bar and a context-length check."""

    backend: Backend
    batch_size: int = 8
    truncate: str | None = None  # None: refuse prompts that do not fit; "left": cut their start, with a warning
    progress: bool = True
    context_length: int = 2048

    @classmethod
    def for_model(cls, loaded, backend: str = "hf", **options) -> "Engine":
        """An engine for a `models.LoadedModel` on a Hugging Face backend: "hf" (`generate`) or
        "hf-static" (a static-cache decode loop, compiled on CUDA)."""
        if backend not in HF_BACKENDS:
            raise ValueError(f"backend {backend!r} runs on a loaded model only as one of {HF_BACKENDS}; "
                             "use engine_for() for the others")
        return cls(HFBackend(loaded, static=backend == "hf-static"), context_length=loaded.context_length, **options)

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 shared_prefix: str | None = None, keys: Sequence | None = None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        for index, completion in self.stream(prompts, params, shared_prefix, keys):
            results[index] = completion
        return results  # type: ignore[return-value]

    def too_long(self, prompts: Sequence[str], params: SamplingParams,
                 shared_prefix: str | None = None) -> dict[int, int]:
        """{index: token count} of the prompts `stream` would refuse: longer than the context leaves
        room for after max_new_tokens. Empty when the engine truncates, since it cuts them instead."""
        if self.truncate:
            return {}
        budget = self.context_length - params.max_new_tokens
        lengths = self.backend.count_tokens(list(prompts), shared_prefix)
        return {i: n for i, n in enumerate(lengths) if n > budget}

    def stream(self, prompts: Sequence[str], params: SamplingParams, shared_prefix: str | None = None,
               keys: Sequence | None = None) -> Iterator[tuple[int, Completion]]:
        """Yield (index into prompts, completion) as batches finish. `keys` (e.g. record ids) seed
        each prompt's sampling; by default the text and its occurrence count do."""
        named = keys is not None  # record ids name a prompt better than its place in this call
        if keys is None:
            keys = default_keys(prompts)
        if len(keys) != len(prompts) or len(set(map(repr, keys))) != len(keys):
            raise ValueError("keys must be unique and one per prompt")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.truncate not in (None, "left"):
            raise ValueError(f"truncate must be None or 'left', got {self.truncate!r}")
        if shared_prefix is not None:
            bad = [i for i, p in enumerate(prompts) if not p.startswith(shared_prefix)]
            if bad:
                raise ValueError(f"prompts {bad[:5]} do not start with the shared prefix")
            if self.truncate:
                raise ValueError("truncate='left' would cut the shared prefix; shorten the prompts instead")
        prompts = list(prompts)
        lengths = self.backend.count_tokens(prompts, shared_prefix)
        budget = self.context_length - params.max_new_tokens
        for i, n in enumerate(lengths):
            name = f"prompt {keys[i]!r}" if named else f"prompt {i}"
            if n > budget and self.truncate is None:
                raise PromptTooLongError(
                    f"{name} has {n} tokens; with max_new_tokens={params.max_new_tokens} the model's "
                    f"context of {self.context_length} leaves room for {budget}. Shorten it, lower "
                    "max_new_tokens, or pass truncate='left' to drop its beginning."
                )
            if n > budget:
                warnings.warn(f"{name} has {n} tokens; keeping its last {budget}", stacklevel=2)
        # Longest first, so that a batch that does not fit in memory fails at once, not at the end.
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        from tqdm.auto import tqdm

        with tqdm(total=len(prompts), unit="prompt", disable=not self.progress, desc="generating") as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                texts = [prompts[i] for i in chunk]
                seeds = [prompt_seed(params.seed, keys[i]) for i in chunk]
                outputs = self.backend.stream_batch(texts, params, seeds, shared_prefix, max_prompt_tokens=budget)
                for index, completion in zip(chunk, outputs):
                    yield index, completion
                bar.update(len(chunk))


def engine_for(config, loaded=None, adapter: str | None = None, **options) -> Engine:
    """The engine a stage's settings ask for: their `backend`, `model` and `batch_size` (and, for
    vLLM, `tensor_parallel_size`). `loaded` reuses a loaded Hugging Face model; `adapter` is a LoRA
    directory, which vLLM applies itself (the Hugging Face backends get an adapted `loaded`)."""
    backend = getattr(config, "backend", "hf")
    if backend in HF_BACKENDS:
        from .models import load_model

        return Engine.for_model(loaded or load_model(config.model), backend=backend, batch_size=config.batch_size,
                                **options)
    if backend == "vllm":
        from .models import vllm_model_path
        from .vllm_backend import VLLMBackend

        path, bos_prefix = vllm_model_path(config.model)
        vllm = VLLMBackend(path, tensor_parallel_size=getattr(config, "tensor_parallel_size", 1), adapter=adapter,
                           bos_prefix=bos_prefix)
        return Engine(vllm, batch_size=config.batch_size, context_length=vllm.context_length, **options)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


class HFBackend:
    """transformers on a loaded model, with stop strings and per-prompt seeds.

    Sampling is done by `_NucleusSampler` as the last logits processor of greedy decoding: it draws
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

    def __init__(self, loaded, static: bool = False, compile: bool | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.static = static
        self.compile = compile
        self.name = "hf-static" if static else "hf"
        self._prefix_cache: dict[str, object] = {}  # shared prefix -> its key/value cache
        self._prefix_tokens: tuple[str, list[int]] = ("", [])  # the last shared prefix and its ids
        self._decoders: dict[tuple[int, int], StaticDecoder] = {}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(self.loaded.bos_prefix + text)["input_ids"]

    def count_tokens(self, texts: Sequence[str], shared_prefix: str | None = None) -> list[int]:
        return [len(self._split_encode(t, shared_prefix)) for t in texts]

    def _split_encode(self, text: str, shared_prefix: str | None) -> list[int]:
        # With a shared prefix, prefix and rest are tokenized apart, so that every prompt's first
        # tokens are the cached ones (a BPE merge across the boundary would otherwise differ).
        if shared_prefix is None:
            return self._encode(text)
        rest = text[len(shared_prefix):]
        return self._prefix_ids(shared_prefix) + self.tokenizer(rest, add_special_tokens=False)["input_ids"]

    def _prefix_ids(self, shared_prefix: str) -> list[int]:
        # The prefix is thousands of tokens and the same for every prompt: tokenize it once.
        if self._prefix_tokens[0] != shared_prefix:
            self._prefix_tokens = (shared_prefix, self._encode(shared_prefix))
        return self._prefix_tokens[1]

    def stream_batch(self, prompts, params, seeds, shared_prefix=None, max_prompt_tokens=None):
        import torch

        pad_id = self.tokenizer.pad_token_id
        encoded = [self._split_encode(p, shared_prefix) for p in prompts]
        if max_prompt_tokens is not None:
            encoded = [ids[-max_prompt_tokens:] for ids in encoded]
        device = self.model.device
        prefix_len = 0
        if shared_prefix is not None:
            prefix_ids = self._prefix_ids(shared_prefix)
            prefix_len = len(prefix_ids)
            # The gap between prefix and suffix is padded (masked), so that all rows share the
            # cached prefix positions; position ids come from the mask, so the suffix's positions
            # follow the prefix as if there were no gap.
            suffixes = [ids[prefix_len:] for ids in encoded]
            width = max(len(s) for s in suffixes)
            if width == 0:
                raise ValueError("with a shared prefix, every prompt needs text after it")
            rows = [prefix_ids + [pad_id] * (width - len(s)) + s for s in suffixes]
            masks = [[1] * prefix_len + [0] * (width - len(s)) + [1] * len(s) for s in suffixes]
        else:
            width = max(len(ids) for ids in encoded)
            rows = [[pad_id] * (width - len(ids)) + ids for ids in encoded]
            masks = [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded]
        input_ids = torch.tensor(rows, device=device)
        attention_mask = torch.tensor(masks, device=device)
        if self.static:
            prefix_cache = self._cached_prefix(shared_prefix, prefix_ids) if shared_prefix is not None else None
            new_tokens = self._static_decoder(len(prompts), input_ids.shape[1] + params.max_new_tokens).decode(
                input_ids, attention_mask, self._processors(params, seeds, attention_mask),
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
            logits_processor=self._processors(params, seeds, attention_mask),
        )
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if shared_prefix is not None:
            total = input_ids.shape[1] + params.max_new_tokens
            prefix_cache = self._cached_prefix(shared_prefix, prefix_ids)
            kwargs[cache_keyword(self.model)] = self._batch_cache(prefix_cache, len(prompts), total)

        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return [self._finish(ids, len(e), params) for ids, e in zip(new_tokens, encoded)]

    def _processors(self, params: SamplingParams, seeds, attention_mask):
        """The logits processors of both decoders, in one order: penalties, logit bias, sampler.

        The batch is left-padded to the width of `attention_mask` (with a shared prefix, prefix
        plus padded suffix), so the tokens after that width are the generated ones.
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
        if params.temperature > 0:
            processors.append(_NucleusSampler(params.temperature, params.top_p, seeds, device))
        return processors

    def _stopping(self, params: SamplingParams):
        from transformers import StoppingCriteriaList
        from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria

        criteria = StoppingCriteriaList([EosTokenCriteria(self._eos_ids())])
        if params.stop:
            criteria.append(StopStringCriteria(self.tokenizer, list(params.stop)))
        return criteria

    def _static_decoder(self, batch: int, total: int) -> "StaticDecoder":
        """A decoder for this batch size whose cache holds `total` tokens, reused across batches.

        The cache length is rounded up, so that batches of slightly different widths share one
        compiled step; two decoders are kept (a full batch and the last, smaller one).
        """
        length = max(total, min(-(-total // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING, self.loaded.context_length))
        key = (batch, length)
        if key not in self._decoders:
            while len(self._decoders) >= 2:
                self._decoders.pop(next(iter(self._decoders)))
            compile = self.compile if self.compile is not None else self.model.device.type == "cuda"
            self._decoders[key] = StaticDecoder(self.model, batch, length, compile=compile)
        else:
            self._decoders[key] = self._decoders.pop(key)  # most recently used last
        return self._decoders[key]

    def _cached_prefix(self, shared_prefix: str, prefix_ids: list[int]):
        import torch
        from transformers import DynamicCache

        if shared_prefix not in self._prefix_cache:
            self._prefix_cache.clear()  # one prefix at a time: it can be large
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([prefix_ids], device=self.model.device),
                           use_cache=True, **{cache_keyword(self.model): cache})
            self._prefix_cache[shared_prefix] = cache
        return self._prefix_cache[shared_prefix]

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


def copy_prefix(prefix_cache, cache, batch: int) -> int:
    """Write a one-row prefix cache into the first positions of every row of `cache`; return its length."""
    import torch

    for index, layer in enumerate(prefix_cache.layers):
        length = layer.keys.shape[-2]
        cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), index,
                     {"cache_position": torch.arange(length, device=layer.keys.device)})
    return length


STATIC_CACHE_ROUNDING = 128  # tokens; cache lengths are rounded up to a multiple, to reuse compiled steps


class StaticDecoder:
    """Greedy-or-sampled decoding over a preallocated `StaticCache`, one fixed-shape step at a time.

    Every decode step reads the same buffers (last tokens, their positions, the cache position, a
    full-length attention mask and the cache), so it can be compiled once with CUDA graphs
    (`torch.compile(mode="reduce-overhead")`): on an H200 the same scheme reached 70% of the
    memory floor at batch 64 where `generate` reached 10% (benchmarks/RESULTS.md). Token choice,
    penalties and stopping stay outside the graph, in the logits processors and transformers'
    stopping criteria that `generate` is given too, so they match it exactly. The prefill
    (variable width) runs eagerly.
    """

    check_every = 8  # steps between checks whether every row has stopped

    def __init__(self, model, batch: int, cache_len: int, compile: bool = False):
        import inspect

        import torch
        from transformers import StaticCache

        self.model, self.batch, self.cache_len = model, batch, cache_len
        device = model.device
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        # The whole length at once: columns not yet written are masked causally by position, and
        # a fixed shape is what lets the step be captured.
        self.mask = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Later transformers track the write position inside the cache; earlier ones need it passed.
        self._wants_cache_position = "cache_position" in inspect.signature(base.forward).parameters
        self._cache_kw = cache_keyword(model)
        self.compiled = compile
        self._step = self._forward_step
        if compile:
            for buffer in (self.tokens, self.positions, self.cache_position, self.mask):
                torch._dynamo.mark_static_address(buffer)  # written in place between replays
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self._step = torch.compile(self._forward_step, mode=mode, fullgraph=True)

    def _forward(self, input_ids, position_ids, cache_position):
        extra = {"cache_position": cache_position} if self._wants_cache_position else {}
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=self.mask, use_cache=True,
                          logits_to_keep=1, **{self._cache_kw: self.cache}, **extra).logits[:, -1].float()

    def _forward_step(self):
        return self._forward(self.tokens, self.positions, self.cache_position)

    def decode(self, input_ids, attention_mask, processors, stopping, max_new_tokens: int, pad_id: int,
               prefix_cache=None) -> list[list[int]]:
        """New token ids per row, as `generate` returns them (rows that stopped are padded)."""
        import torch

        batch, width = input_ids.shape
        if batch != self.batch or width + max_new_tokens > self.cache_len:
            raise ValueError(f"a batch of {batch}x{width}+{max_new_tokens} does not fit this decoder's "
                             f"{self.batch}x{self.cache_len}")
        with torch.inference_mode():
            self.cache.reset()
            self.mask.zero_()
            self.mask[:, :width] = attention_mask
            self.mask[:, width:width + max_new_tokens] = 1
            # Positions count real tokens only, as generate derives them from the mask.
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            start = copy_prefix(prefix_cache, self.cache, batch) if prefix_cache is not None else 0
            logits = self._forward(input_ids[:, start:], positions[:, start:],
                                   torch.arange(start, width, device=input_ids.device))
            self.positions.copy_(positions[:, -1:] + 1)
            self.cache_position.fill_(width)

            sequences = torch.full((batch, width + max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
            sequences[:, :width] = input_ids
            unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
            # Steps taken while some row was unfinished: generate's output length. Counted on the
            # device, so that asking whether all rows are done (a sync) happens every few steps only.
            steps = torch.zeros((), dtype=torch.long, device=input_ids.device)
            for step in range(max_new_tokens):
                if step:
                    if self.compiled:
                        torch.compiler.cudagraph_mark_step_begin()
                    logits = self._step().clone()  # a graph's output is overwritten by its next replay
                scores = processors(sequences[:, :width + step], logits)
                steps += unfinished.any()
                chosen = torch.where(unfinished, scores.argmax(-1), pad_id)
                sequences[:, width + step] = chosen
                unfinished &= ~stopping(sequences[:, :width + step + 1], scores)
                if step + 1 == max_new_tokens or (step % self.check_every == 0 and not bool(unfinished.any())):
                    break
                self.tokens.copy_(chosen[:, None])
                if step:
                    self.positions.add_(1)
                    self.cache_position.add_(1)
        steps = int(steps)
        return sequences[:, width:width + steps].tolist()


def cache_keyword(model) -> str:
    """The forward keyword for a key/value cache: transformers 5.x renamed `past_key_values` to
    `cache`. A peft wrapper passes unknown keywords through, so its base model is asked."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


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


class GeneratedRepetitionPenalty:
    """transformers' repetition penalty (positive logits divided by it, negative ones multiplied)
    over the tokens each row has generated, those after `prompt_width`; the prompt's are free."""

    def __init__(self, penalty: float, prompt_width: int):
        self.penalty, self.prompt_width = penalty, prompt_width

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_width:]
        if generated.shape[1] == 0:
            return scores
        picked = scores.gather(1, generated)
        return scores.scatter(1, generated, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))


class GeneratedNoRepeatNGram:
    """Bans a token that would complete an n-gram already in the row's generated tokens (those
    after `prompt_width`); an n-gram of the prompt may be generated once."""

    def __init__(self, size: int, prompt_width: int):
        self.size, self.prompt_width = size, prompt_width

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_width:]
        length, n = generated.shape[1], self.size
        if length < n:
            return scores
        grams = generated.unfold(1, n, 1)  # (batch, length - n + 1, n)
        continues = (grams[:, :, :-1] == generated[:, None, length - n + 1:]).all(-1)
        vocab = scores.shape[-1]
        # Rows' non-matching n-grams point at a spare column, so that every write is True.
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(continues, grams[:, :, -1], vocab), True)
        return scores.masked_fill(banned[:, :vocab], float("-inf"))


class LogitBias:
    """Adds a fixed bias to some token ids' logits at every step (`first_token_biases`)."""

    def __init__(self, biases: dict[int, float], device):
        import torch

        self.ids = torch.tensor(list(biases), dtype=torch.long, device=device)
        self.values = torch.tensor(list(biases.values()), device=device)

    def __call__(self, input_ids, scores):
        values = self.values.to(scores.dtype).expand(scores.shape[0], -1)
        return scores.index_add(1, self.ids, values)


class _NucleusSampler:
    """A logits processor that samples (temperature, then top-p) with one random stream per row.

    Vectorised over the batch, by inverse transform: each row draws a uniform u from its own CPU
    generator (in chunks, moved to the device once per chunk), and takes the first token of the
    nucleus whose cumulative probability exceeds u times the nucleus mass. Nucleus membership is
    decided on the `candidates` most likely tokens, which hold the nucleus almost always; when some
    row's candidates hold less than top_p of the mass, the whole vocabulary is sorted, so the result
    is exact either way. Returns 0 for the drawn token and -inf elsewhere.
    """

    chunk = 64  # uniforms drawn per row at a time; a row's stream is the same whatever its batch

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int], device, candidates: int = 256):
        import torch

        self.temperature = temperature
        self.top_p = top_p
        self.candidates = candidates
        self.device = device
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self._uniforms = None
        self._used = self.chunk

    def _next_uniforms(self):
        import torch

        if self._used == self.chunk:
            draws = torch.stack([torch.rand(self.chunk, generator=g, dtype=torch.float64) for g in self.generators])
            self._uniforms, self._used = draws.to(self.device), 0
        self._used += 1
        return self._uniforms[:, self._used - 1]

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        k = min(self.candidates, probs.shape[-1])
        p, ids = probs.topk(k, dim=-1)
        if self.top_p >= 1.0 or bool((p.sum(-1) < self.top_p).any()):
            p, ids = probs.sort(dim=-1, descending=True)
        if self.top_p < 1.0:
            inside = (p.cumsum(-1) - p) < self.top_p  # the mass before a token is below top_p
            inside[:, 0] = True
            p = p * inside
        cdf = p.double().cumsum(-1)
        target = self._next_uniforms() * cdf[:, -1]
        index = torch.searchsorted(cdf, target[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        chosen = ids.gather(-1, index).squeeze(-1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen), device=out.device), chosen] = 0.0
        return out
