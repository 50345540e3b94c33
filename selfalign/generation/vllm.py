"""vLLM behind the engine's `Backend` contract, for generating at LLaMA-65B scale.

Optional: `pip install 'selfalign[vllm]'` on a CUDA machine, then `backend: vllm` in a stage's
settings (`--backend vllm`). Imported only when chosen (by `engine_for`, or a stage checking its settings).

**Not run against a real vLLM here.** vLLM cannot be installed on this project's machines, so
this module is written against vLLM's documented offline API (`vllm.LLM`, `vllm.SamplingParams`,
`vllm.lora.request.LoRARequest`, prompts given as `{"prompt_token_ids": [...]}`, outputs'
`finish_reason` and `stop_reason`) and tested against a stand-in module with that API
(tests/vllm_standin/), through the same contract tests as the other backends.

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
- the engine's batch is what vLLM schedules within: give it hundreds of prompts (`batch_size`).
"""

from __future__ import annotations

from typing import Sequence

from .contract import Completion, SamplingParams, cut_at_stop, first_token_biases

INSTALL_HINT = "the vllm backend needs vLLM on a CUDA machine: pip install 'selfalign[vllm]'"


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
                 bos_prefix: str = "", lora_rank: int = 64):
        vllm = _import_vllm()
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        options = dict(model=str(model_path), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
        if max_model_len:
            options["max_model_len"] = max_model_len
        if adapter is not None:
            options.update(enable_lora=True, max_lora_rank=lora_rank)
        # Our grammars are llguidance's Lark dialect; vLLM's default (xgrammar) reads another.
        options["structured_outputs_config"] = {"backend": "guidance"}
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
        return [completion_of(out, len(i["prompt_token_ids"]), params) for out, i in zip(outputs, inputs)]


def completion_of(request_output, prompt_tokens: int, params: SamplingParams) -> Completion:
    """A vLLM `RequestOutput` as a `Completion`.

    vLLM reports finish_reason "stop" for a stop string, a stop token and EOS alike; `stop_reason`
    tells them apart (the string, the token id, or None for EOS). It leaves the stop string out of
    the text, as the other backends do.
    """
    out = request_output.outputs[0]
    text, stop = cut_at_stop(out.text, params.stop)  # a no-op unless vLLM's own cut missed one
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
