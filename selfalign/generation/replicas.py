"""Generation on N model replicas, each a Ray actor: the engine's batches, several at a time.

`ReplicaBackend` is a `Backend` (contract.py) whose batches run on `replicas` Ray actors. Each
actor builds the real backend ("hf", "hf-static" or "vllm") itself from a `Recipe`: the model's name
or path, an adapter directory, the backend's name, dtype, quantization and tensor_parallel_size.
Those are plain values, so nothing unpicklable (a model, a tokenizer) crosses processes. The
engine batches as it does in one process (prompts sorted by length, cut into batches of
batch_size, each prompt seeded by its key) and hands the batches to `run_batches`, which keeps one
batch in flight per replica. The driver, the stage's own process, writes every record, as with
one process (`stages.common.generate_into`).

Same records as one process: a batch is exactly the batch one process would run, with the same
per-prompt seeds, so each completion is the same text (tested against replicas=1 on stages 1 and
2, on the CPU, where every process computes with one thread). Completions come back in batch
order, not in the order batches finish, so a stage's files are byte for byte those of one
process: stage 3 hashes stage 2's responses file and trains in its order, and a file in arrival
order would make both depend on timing. A finished batch waits only for earlier ones still running.
Stage 1 makes each round's calls in one `complete(...)` and runs its ROUGE-L filter in the driver
between rounds, so with the same completions its kept set does not depend on N either.

Faults are Ray's to handle, not ours: actors are created with `max_restarts` and
`max_task_retries`, so a replica whose process dies is restarted (it loads its model again) and
its batch is retried there (tested by SIGKILL of a replica mid-stage). A killed driver loses the
batches in flight; rerunning the stage skips the ids on disk, under any replica count.

A shared prefix (stage 2's principles) travels with each batch as text, the prompts without it,
and each replica's Hugging Face backend caches its key/value by text: computed once a replica.

Resources: each replica asks Ray for `num_cpus` (1; its torch thread count) and `num_gpus`
(tensor_parallel_size with vLLM, 1 for hf, where the cluster has GPUs; none on a CPU cluster,
where vLLM's CPU build runs too, its tensor-parallel workers the replica's own processes as
vllm.py says), all in one placement group; more than the cluster has is refused at once, and a
group Ray cannot place within `PLACEMENT_TIMEOUT_S` is an error, not a wait. Imported only when replicas > 1, so one replica
never imports Ray. This module does not batch or seed prompts (engine.py), decode (the
backends) or write records (the stages); Ray Data is not used, since the engine already batches.
"""

from __future__ import annotations

import os
import socket
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .contract import Completion, SamplingParams

INSTALL_HINT = "replicas > 1 generates on Ray, which is not installed: pip install 'selfalign[ray]'"
RESTARTS = 3  # times a replica's process may die (its batch retried each time) before the stage fails
PLACEMENT_TIMEOUT_S = 60.0  # how long Ray may take to find room for the replicas
CONNECT_TIMEOUT_S = 5.0  # how long a cluster address may take to answer
PORTS = {"ray": 10001}  # ray:// is Ray Client's port; a bare host means the head's GCS port
GCS_PORT = 6379


class ReplicaError(RuntimeError):
    """The replicas could not be placed, started or kept alive."""


@dataclass(frozen=True)
class Recipe:
    """What a replica builds its backend from (as `engine_for` would in one process)."""

    model: str  # a registered name, a model directory (absolute) or a hub id
    backend: str = "hf"
    adapter: str | None = None  # a LoRA directory, applied by the replica
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    quantize: str = ""
    batch_size = 1  # not a field: `engine_for` reads it; the driver's engine does the batching


def recipe_for(config, adapter: str | None = None) -> Recipe:
    """A stage's settings as a recipe; local paths made absolute, since a replica may run elsewhere."""
    def absolute(path):
        local = os.path.expanduser(path)
        return os.path.abspath(local) if os.path.exists(local) else path

    return Recipe(model=absolute(config.model), backend=getattr(config, "backend", "hf"),
                  adapter=absolute(str(adapter)) if adapter else None,
                  tensor_parallel_size=getattr(config, "tensor_parallel_size", 1),
                  quantize=getattr(config, "quantize", "") or "")


def load_for_replica(recipe: Recipe):
    """The loaded (and adapted) Hugging Face model a replica generates with; None for vLLM, which
    loads its own and applies the adapter itself."""
    if recipe.backend == "vllm":
        return None
    from ..models import load_model

    loaded = load_model(recipe.model, dtype=recipe.dtype, quantize=recipe.quantize or None)
    if recipe.adapter:
        from ..training import adapted_for_generation

        # Entered for the life of this process: the model is the replica's own.
        loaded = adapted_for_generation(loaded, recipe.adapter).__enter__()
    return loaded


class Replica:
    """One model replica, run as a Ray actor: builds its backend, then completes batches.

    `build` is `engine_for` (passed in, so that this module does not import the engine's): the
    replica builds the engine one process would, and keeps its backend."""

    def __init__(self, recipe: Recipe, threads: int, build):
        import torch

        torch.set_num_threads(max(1, int(threads)))  # two replicas on two cores: one thread each
        engine = build(recipe, load_for_replica(recipe), adapter=recipe.adapter)
        self.backend, self.context_length = engine.backend, engine.context_length

    def info(self) -> dict:
        return {"pid": os.getpid(), "context_length": self.context_length, "name": self.backend.name}

    def count_tokens(self, rests: list[str], shared_prefix: str | None) -> list[int]:
        return self.backend.count_tokens(_joined(rests, shared_prefix), shared_prefix)

    def stream_batch(self, rests, params, seeds, shared_prefix, max_prompt_tokens) -> list[Completion]:
        return self.backend.stream_batch(_joined(rests, shared_prefix), params, seeds, shared_prefix, max_prompt_tokens)


def _joined(rests: list[str], shared_prefix: str | None) -> list[str]:
    return [shared_prefix + rest for rest in rests] if shared_prefix is not None else rests


def _rests(texts: Sequence[str], shared_prefix: str | None) -> list[str]:
    # The prefix is kilobytes and the same for every prompt: it travels once a call, not once a prompt.
    if shared_prefix is None:
        return list(texts)
    if not all(text.startswith(shared_prefix) for text in texts):
        raise ValueError("every prompt must start with the shared prefix")
    return [text[len(shared_prefix):] for text in texts]


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """ConnectionError unless something listens at a Ray address ("host:port", "host" or
    "ray://host:port") within `timeout` seconds: `ray.init` would retry for minutes."""
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if not host:
        host, port = rest, PORTS.get(scheme, GCS_PORT)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise ConnectionError(f"no Ray cluster answers at {address!r} within {timeout:g} s ({error}); start one "
                              "(`ray start --head`), or fix ray_address / RAY_ADDRESS") from None


def connect(address: str = ""):
    """Ray, initialised: this process's connection where it has one (a notebook's, a test's), else
    the cluster at `address` or $RAY_ADDRESS, else a new local Ray on this machine."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address and address not in ("auto", "local"):
        check_reachable(address)
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False)
    return ray


def check_room(bundle: dict, replicas: int, cluster: dict) -> None:
    """ReplicaError when the cluster has fewer CPUs or GPUs in all than the replicas ask for."""
    short = {kind: (amount * replicas, cluster.get(kind, 0)) for kind, amount in bundle.items()
             if amount * replicas > cluster.get(kind, 0)}
    if short:
        wants = " and ".join(f"{need:g} {kind} in all, where the Ray cluster has {have:g}"
                             for kind, (need, have) in short.items())
        raise ReplicaError(f"{replicas} replicas of {bundle} each need {wants}: Ray cannot place them; ask for "
                           "fewer replicas, or add nodes")


def _release(actors, group) -> None:
    import ray

    if not ray.is_initialized():
        return
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        ray.kill(actor, no_restart=True)
    remove_placement_group(group)


class ReplicaBackend:
    """A `Backend` whose batches run on `replicas` Ray actors, each building its backend from
    `recipe` with `build` (`engine_for`)."""

    def __init__(self, recipe: Recipe, replicas: int, build, address: str = "", num_cpus: int = 1,
                 num_gpus: int | None = None):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.recipe, self.replicas = recipe, replicas
        ray = connect(address)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cluster = ray.cluster_resources()
        if num_gpus is None:  # vLLM's CPU build, like hf, needs none where the cluster has none
            num_gpus = (recipe.tensor_parallel_size if recipe.backend == "vllm" else 1) if cluster.get("GPU", 0) else 0
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        check_room(bundle, replicas, cluster)
        group = placement_group([bundle] * replicas, strategy="SPREAD")  # a node each, where there are enough
        self.actors: list = []
        self._release = weakref.finalize(self, _release, self.actors, group)
        self._release.atexit = False  # at exit Ray's own shutdown ends them
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self.close()
            raise ReplicaError(f"Ray could not place {replicas} replicas of {bundle} within {PLACEMENT_TIMEOUT_S:g} s: "
                               f"the cluster has {_amounts(cluster)} in all, {_amounts(ray.available_resources())} "
                               "free now (other work holds the rest)")
        remote = ray.remote(Replica)
        for index in range(replicas):
            self.actors.append(remote.options(
                num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=RESTARTS, max_task_retries=RESTARTS,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote(recipe, num_cpus, build))
        infos = self._get([actor.info.remote() for actor in self.actors])  # waits for every replica's model
        self.name = f"{infos[0]['name']} x{replicas}"
        self.context_length = infos[0]["context_length"]

    def pids(self) -> list[int]:
        """Each replica's process id now (a restarted replica has a new one)."""
        return [info["pid"] for info in self._get([actor.info.remote() for actor in self.actors])]

    def close(self) -> None:
        """End the replicas and free their resources (also done when the backend is collected)."""
        self._release()

    def count_tokens(self, texts: Sequence[str], shared_prefix: str | None = None) -> list[int]:
        rests = _rests(texts, shared_prefix)
        size = -(-len(rests) // len(self.actors)) or 1
        parts = [self.actors[i].count_tokens.remote(rests[start:start + size], shared_prefix)
                 for i, start in enumerate(range(0, len(rests), size))]
        return [n for part in self._get(parts) for n in part]

    def stream_batch(self, prompts, params: SamplingParams, seeds, shared_prefix=None, max_prompt_tokens=None):
        (outputs,) = self.run_batches([(prompts, seeds)], params, shared_prefix, max_prompt_tokens)
        return outputs

    def run_batches(self, batches: Iterable[tuple[Sequence[str], Sequence[int]]], params: SamplingParams,
                    shared_prefix: str | None, max_prompt_tokens: int | None) -> Iterator[list[Completion]]:
        """Complete (prompts, seeds) batches, one in flight per replica; yield each batch's
        completions in batch order. At most two batches a replica run ahead of the oldest one not
        yet yielded, so a driver killed mid-way loses little."""
        import ray

        jobs, free = iter(batches), deque(range(len(self.actors)))
        running: dict = {}  # object ref -> (batch number, replica)
        finished: dict[int, list[Completion]] = {}
        submitted = yielded = 0
        exhausted = False
        while True:
            while free and not exhausted and submitted - yielded < 2 * len(self.actors):
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                replica = free.popleft()
                prompts, seeds = job
                ref = self.actors[replica].stream_batch.remote(_rests(prompts, shared_prefix), params, list(seeds),
                                                               shared_prefix, max_prompt_tokens)
                running[ref] = (submitted, replica)
                submitted += 1
            if not running:
                return
            (ref,), _ = ray.wait(list(running), num_returns=1)
            number, replica = running.pop(ref)
            (finished[number],) = self._get([ref])
            free.append(replica)
            while yielded in finished:
                yield finished.pop(yielded)
                yielded += 1

    def _get(self, refs: list) -> list:
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(refs)
        except RayActorError as error:  # a backend's own exception comes back as itself, not as this
            raise ReplicaError(f"a replica of {self.recipe.model!r} failed to start, or died more often than Ray "
                               f"restarts one ({RESTARTS} times): {error}") from error


def _amounts(resources: dict) -> str:
    return ", ".join(f"{resources.get(kind, 0):g} {kind}" for kind in ("CPU", "GPU"))
