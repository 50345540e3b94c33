"""The one generation engine every stage uses: raw-text prompts in, completions out.

`Engine.stream` yields `(index, Completion)` pairs batch by batch, so that a stage can append each
record to disk as soon as it exists; `Engine.generate` collects them in prompt order. Prompts are
sorted by length and left-padded into batches. Each prompt samples from its own random generator,
seeded from the run's seed and the prompt's key (contract.py), so a prompt's completion does not
depend on which batch it landed in or on a resume, and the caller's random state is left untouched.

A prompt set that shares a long prefix (SELF-ALIGN's principles and exemplars) passes it as
`shared_prefix`: its key/value cache is computed once and reused by every batch.
`Engine.generate_groups` decodes several such prompt sets, each behind its own prefix and
grammar (leave-one-out's principle sets), in shared batches where the backend can (its
`multi_prefix`: "hf"), and one set after another where it cannot, with the same completions.

`engine_for` builds the engine a stage's settings ask for. Backends implement
`Backend.stream_batch`: the Hugging Face ones are in hf.py, vLLM's in vllm.py, which is imported
only when chosen; with `replicas` > 1, replicas.py runs the same batches on Ray actors, several at a
time (a backend's optional `run_batches`), and is imported only then. This module does not decide
what prompts say or where results go: the stages and `records` do; nor how a batch is decoded: the
backends do.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

from .contract import Backend, Completion, PromptTooLongError, SamplingParams, default_keys, prompt_seed
from .hf import HFBackend
HF_BACKENDS = ("hf", "hf-static")
BACKENDS = HF_BACKENDS + ("vllm",)


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

    def generate(self, prompts: Sequence[str], params: SamplingParams, shared_prefix: str | None = None,
                 keys: Sequence | None = None, adapters: Sequence[str | None] | None = None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        for index, completion in self.stream(prompts, params, shared_prefix, keys, adapters):
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
               keys: Sequence | None = None, adapters: Sequence[str | None] | None = None
               ) -> Iterator[tuple[int, Completion]]:
        """Yield (index into prompts, completion) as batches finish. `keys` (e.g. record ids) seed
        each prompt's sampling; by default the text and its occurrence count do. `adapters` names
        each prompt's LoRA adapter (None: the base model) on a model holding several
        (`training.adapters_for_generation`), mixed in a batch where the backend can (`mixes_adapters`)."""
        prompts, keys, lengths, budget = self._checked(prompts, params, shared_prefix, keys)
        if adapters is not None:
            adapters = list(adapters)
            if len(adapters) != len(prompts):
                raise ValueError("adapters are one per prompt (None: the base model)")
            if not getattr(self.backend, "mixes_adapters", False) or hasattr(self.backend, "run_batches"):
                raise ValueError(f"backend {self.backend.name!r} cannot mix adapters in a batch; apply one "
                                 "adapter (training.adapted_for_generation) and generate its prompts apart")
        # Longest first, so that a batch that does not fit in memory fails at once, not at the end.
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        from tqdm.auto import tqdm

        chunks = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        batches = (([prompts[i] for i in chunk], [prompt_seed(params.seed, keys[i]) for i in chunk])
                   for chunk in chunks)
        extra = (({"adapters": [adapters[i] for i in chunk]} if adapters is not None else {}) for chunk in chunks)
        # A backend with several replicas (replicas.py) runs some batches at once, handing them back in order.
        run_batches = getattr(self.backend, "run_batches", None)
        if run_batches is not None:
            results = run_batches(batches, params, shared_prefix, budget)
        else:
            results = (self.backend.stream_batch(texts, params, seeds, shared_prefix, max_prompt_tokens=budget, **more)
                       for (texts, seeds), more in zip(batches, extra))
        with tqdm(total=len(prompts), unit="prompt", disable=not self.progress, desc="generating") as bar:
            for chunk, outputs in zip(chunks, results):
                for index, completion in zip(chunk, outputs):
                    yield index, completion
                bar.update(len(chunk))

    def generate_groups(self, groups: Sequence[tuple[Sequence[str], SamplingParams, str | None, Sequence | None]]
                        ) -> list[list[Completion]]:
        """Complete several prompt sets, each `(prompts, params, shared_prefix, keys)`; one list of
        completions per group, in its prompts' order: each the same as `generate(*group)`.

        The groups' params may differ in `grammar` only (ValueError otherwise). Where the backend
        decodes a batch behind several prefixes (`multi_prefix`), batches hold whole groups where
        they fit (rows ordered by group, then longest first), so that a small model's weights are
        read once a step for several groups; otherwise each group runs through `generate` in turn.
        """
        groups = [(list(prompts), params, prefix, keys) for prompts, params, prefix, keys in groups]
        if not groups:
            return []
        common = {dataclasses.replace(params, grammar=None) for _, params, _, _ in groups}
        if len(common) > 1:
            raise ValueError("the groups' sampling params must be the same but for their grammar")
        if (not getattr(self.backend, "multi_prefix", False) or len(groups) == 1
                or any(prefix is None for _, _, prefix, _ in groups)):
            return [self.generate(*group) for group in groups]
        checked = [self._checked(*group) for group in groups]
        budget = checked[0][3]  # the same for every group: the params agree on max_new_tokens
        rows = [(g, i) for g, (_, _, lengths, _) in enumerate(checked)
                for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))]
        params = common.pop()  # without a grammar: each row's goes to the backend beside it
        constrained = any(group[1].grammar is not None for group in groups)
        results: list[list[Completion | None]] = [[None] * len(prompts) for prompts, *_ in checked]
        from tqdm.auto import tqdm

        with tqdm(total=len(rows), unit="prompt", disable=not self.progress, desc="generating") as bar:
            for batch in self._group_batches(rows):
                outputs = self.backend.stream_batch(
                    [checked[g][0][i] for g, i in batch], params,
                    [prompt_seed(params.seed, checked[g][1][i]) for g, i in batch], [groups[g][2] for g, _ in batch],
                    max_prompt_tokens=budget,
                    grammars=[groups[g][1].grammar for g, _ in batch] if constrained else None)
                for (g, i), completion in zip(batch, outputs):
                    results[g][i] = completion
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def _group_batches(self, rows: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """`rows` ((group, index), by group) cut into batches: a group that does not fit in the room
        left starts a new batch (each prefix then runs in as few batches as it can), unless it is
        larger than a batch itself."""
        batches: list[list[tuple[int, int]]] = [[]]
        for _, members in itertools.groupby(rows, key=lambda row: row[0]):
            members = list(members)
            if batches[-1] and len(batches[-1]) + len(members) > self.batch_size >= len(members):
                batches.append([])
            for row in members:
                if len(batches[-1]) == self.batch_size:
                    batches.append([])
                batches[-1].append(row)
        return [batch for batch in batches if batch]

    def _checked(self, prompts: Sequence[str], params: SamplingParams, shared_prefix: str | None,
                 keys: Sequence | None) -> tuple[list[str], list, list[int], int]:
        """(prompts, keys, token counts, the prompt token budget) of one call, checked: keys unique
        and one per prompt, prompts starting with the shared prefix and fitting the context (else
        PromptTooLongError, or a warning where the engine truncates)."""
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
                warnings.warn(f"{name} has {n} tokens; keeping its last {budget}", stacklevel=3)
        return prompts, list(keys), lengths, budget


def engine_for(config, loaded=None, adapter: str | None = None, **options) -> Engine:
    """The engine a stage's settings ask for: their `backend`, `model` and `batch_size` (and, for
    vLLM, `tensor_parallel_size`). `loaded` reuses a loaded Hugging Face model; `adapter` is a LoRA
    directory, which vLLM applies itself (the Hugging Face backends get an adapted `loaded`).

    With `replicas` > 1 the batches run on that many Ray actors (replicas.py, joining `ray_address`),
    each loading its own copy of the model and applying `adapter` itself: `loaded` is not used."""
    if getattr(config, "replicas", 1) > 1:
        from .replicas import ReplicaBackend, recipe_for

        replicas = ReplicaBackend(recipe_for(config, adapter), config.replicas, engine_for,
                                  getattr(config, "ray_address", ""))
        return Engine(replicas, batch_size=config.batch_size, context_length=replicas.context_length, **options)
    backend = getattr(config, "backend", "hf")
    if backend in HF_BACKENDS:
        from ..models import load_model

        return Engine.for_model(loaded or load_model(config.model), backend=backend, batch_size=config.batch_size,
                                **options)
    if backend == "vllm":
        from ..models import vllm_model_path
        from .vllm import VLLMBackend

        path, bos_prefix = vllm_model_path(config.model)
        vllm = VLLMBackend(path, tensor_parallel_size=getattr(config, "tensor_parallel_size", 1), adapter=adapter,
                           bos_prefix=bos_prefix)
        return Engine(vllm, batch_size=config.batch_size, context_length=vllm.context_length, **options)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
