"""The contract between the engine and its backends: how to sample, and what comes back.

`SamplingParams` says how to sample (temperature 0 is greedy), `Completion` is one prompt's result,
and `Backend` is what every backend implements: `stream_batch` completes one batch, prompt i
sampling from seeds[i]. Each prompt samples from its own random generator, seeded by `prompt_seed`
from the run's seed and the prompt's key (a record id, or by `default_keys` the text and its
occurrence), so a prompt's completion does not depend on which batch it landed in or on a resume.
`cut_at_stop` and `first_token_biases` are the pure helpers the backends share; `tokens_after`
is how generation, training and scoring agree on the tokens that follow a context.

This module imports nothing else of ours, nor torch or transformers (`first_token_biases` takes a
tokenizer object), so that every backend can depend on it and on nothing else; it does not batch
prompts (engine.py) or decode them (the backends).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence
FINISH_REASONS = ("stop", "eos", "length")


class PromptTooLongError(ValueError):
    """A prompt plus max_new_tokens does not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy decoding.

    `repetition_penalty` (transformers' semantics) and `no_repeat_ngram_size` look at the generated
    tokens only, as Dromedary's released generation does: a teacher rewriting a question may quote
    it. `logit_bias` pairs a text with a bias added to the logit of its first token, as written and
    after a space, at every step (Dromedary's stage 2: `(("Sorry", -100.0),)`). `grammar`, a
    grammar in llguidance's Lark dialect, holds every completion to it (generation/grammar.py;
    vLLM's "guidance" structured-output backend reads the same text).
    """

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    logit_bias: tuple[tuple[str, float], ...] = ()
    grammar: str | None = None

    def __post_init__(self):
        # A float that is not finite passes a comparison (inf >= 0) or fails it silently (nan).
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
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

        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("grammar must be a non-empty grammar text or None")

    def to_dict(self) -> dict:
        """The settings as JSON; a grammar (a kilobyte, in every record's provenance) by its digest."""
        grammar = None if self.grammar is None else "sha256:" + hashlib.sha256(self.grammar.encode()).hexdigest()[:16]
        return {**asdict(self), "stop": list(self.stop), "logit_bias": [list(p) for p in self.logit_bias],
                "grammar": grammar}


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
    """A backend may also have `run_batches(batches, params, shared_prefix, max_prompt_tokens)`,
    yielding each (prompts, seeds) batch's completions in order: the engine then hands it every
    batch at once, so that it can run several together (replicas.py). One whose `multi_prefix` is
    true takes, in `stream_batch`, a list of each prompt's shared prefix (several different ones in
    a batch) and `grammars=` one per prompt (`Engine.generate_groups`; hf.py). One whose
    `mixes_adapters` is true takes `adapters=`, each prompt's LoRA adapter name (`Engine.stream`)."""

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


def tokens_after(tokenizer, head: list[int], whole: list[int], rest: str) -> tuple[list[int], bool]:
    """The ids that follow `head` (a context's ids) in `whole` (the ids of the context and `rest`
    tokenized together), and False: what the model sees, or writes, after that context. Tokenizing
    `rest` on its own would differ for SentencePiece (LLaMA), which starts a text with a word-start
    "▁" that the same text after a newline lacks. Where a token of `whole` spans the boundary (a
    context ending in a space), `head` is not its start: then `rest` tokenized on its own, and True."""
    if whole[:len(head)] == head:
        return list(whole[len(head):]), False
    return tokenizer(rest, add_special_tokens=False)["input_ids"], True


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
