"""Stand-in for vLLM's offline API (see README.md beside this package); not vLLM."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

__version__ = "0.0.0+standin"


@dataclass
class SamplingParams:
    # The fields vLLM documents, with its defaults; an unknown keyword fails, as in vLLM.
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit at every step
    structured_outputs: object | None = None  # sampling_params.StructuredOutputsParams

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.temperature < 0 or not 0 < self.top_p <= 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ValueError("invalid sampling parameters")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


@dataclass
class _ModelConfig:
    max_model_len: int


@dataclass
class _Engine:
    model_config: _ModelConfig


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, tensor_parallel_size: int = 1, dtype: str = "auto",
                 seed: int = 0, gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = False,
                 max_model_len: int | None = None, enable_lora: bool = False, max_lora_rank: int = 16, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.enable_lora = enable_lora
        self.structured_outputs_config = dict(kwargs.pop("structured_outputs_config", None) or {})
        self.max_lora_rank = max_lora_rank
        self.seed = seed
        self.llm_engine = _Engine(_ModelConfig(max_model_len or self.model.config.max_position_embeddings))
        self._adapters: dict[str, object] = {}
        self._counter = 0

    def _matcher(self, structured, eos):
        if structured is None:
            return None
        if self.structured_outputs_config.get("backend") != "guidance":
            raise ValueError("this stand-in applies grammars as vLLM's 'guidance' backend only")
        import llguidance
        import llguidance.hf

        if getattr(self, "_ll_tokenizer", None) is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, eos_token=sorted(eos))
        return llguidance.LLMatcher(self._ll_tokenizer, llguidance.grammar_from("lark", structured.grammar))

    def get_tokenizer(self):
        return self._tokenizer

    def _model_for(self, lora_request):
        if lora_request is None:
            return self.model
        if not self.enable_lora:
            raise ValueError("LoRA is not enabled; create the LLM with enable_lora=True")
        if lora_request.lora_path not in self._adapters:
            from peft import PeftModel

            # A copy: peft puts the LoRA layers into the model it is given, and the base stays in use.
            base = copy.deepcopy(self.model)
            self._adapters[lora_request.lora_path] = PeftModel.from_pretrained(base, lora_request.lora_path).eval()
        return self._adapters[lora_request.lora_path]

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, lora_request=None):
        if not isinstance(prompts, list):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("the lengths of prompts and sampling_params must be the same")
        model = self._model_for(lora_request)
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            if isinstance(prompt, dict):
                ids, text = list(prompt["prompt_token_ids"]), None
            else:
                ids, text = self._tokenizer(prompt)["input_ids"], prompt
            self._counter += 1
            outputs.append(RequestOutput(str(self._counter), text, ids, [self._complete(model, ids, params)]))
        return outputs

    def _complete(self, model, prompt_ids, params) -> CompletionOutput:
        import torch

        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else self.seed)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        ids, new = list(prompt_ids), []
        text, finish, reason = "", "length", None
        matcher = self._matcher(params.structured_outputs, eos)
        while len(new) < params.max_tokens:
            with torch.inference_mode():  # also around the in-place edits: the logits are an inference tensor
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                if params.repetition_penalty != 1.0:
                    seen = torch.tensor(sorted(set(ids)))
                    picked = logits[seen]
                    logits[seen] = torch.where(picked < 0, picked * params.repetition_penalty,
                                               picked / params.repetition_penalty)
                for token, bias in (params.logit_bias or {}).items():
                    logits[token] += bias
                if matcher is not None:  # as vLLM's "guidance" backend: llguidance's mask
                    import llguidance.torch

                    mask = llguidance.torch.allocate_token_bitmask(1, self._ll_tokenizer.vocab_size)
                    llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
                    logits = logits[None].clone()
                    llguidance.torch.apply_token_bitmask_inplace(logits, mask)
                    logits = logits[0]
            if params.temperature < 1e-5:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / params.temperature, -1)
                sorted_probs, order = probs.sort(descending=True)
                keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
                sorted_probs = sorted_probs * keep
                token = int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
            ids.append(token)
            new.append(token)
            if matcher is not None:
                matcher.consume_token(token)
            if token in eos and not params.ignore_eos:
                finish = "stop"
                break
            text = self._tokenizer.decode(new, skip_special_tokens=params.skip_special_tokens)
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits:
                at, stop = min(hits)
                text = text if params.include_stop_str_in_output else text[:at]
                finish, reason = "stop", stop
                break
        else:
            # As vLLM's detokenizer: the bytes of a character not yet complete are held back.
            text = self._tokenizer.decode(new, skip_special_tokens=params.skip_special_tokens).rstrip("\ufffd")
        if finish == "stop" and reason is None:
            text = self._tokenizer.decode(new, skip_special_tokens=params.skip_special_tokens)
        return CompletionOutput(0, text, new, None, None, finish, reason)
