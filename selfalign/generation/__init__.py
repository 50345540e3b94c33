"""Generation: raw-text prompts in, completions out, on one of several backends.

- `contract`: `SamplingParams`, `Completion`, the `Backend` protocol and the pure helpers they share;
  imports nothing else of ours.
- `engine`: `Engine` (batching, seeding, context-length checks) and `engine_for`, the factory a
  stage's settings go through.
- `hf`: `HFBackend`, transformers on a loaded model ("hf" and "hf-static").
- `static`: `StaticDecoder`, the static-cache decode loop of "hf-static", compiled on CUDA.
- `processors` and `sampler`: the logits processors both Hugging Face decoders apply.
- `cache`: key/value cache helpers (also used by `selfalign.scoring`).
- `vllm`: `VLLMBackend`, imported only when backend "vllm" is chosen, so it is not re-exported here.
"""

from .contract import (FINISH_REASONS, Backend, Completion, PromptTooLongError, SamplingParams, cut_at_stop,
                       default_keys, first_token_biases, prompt_seed)
from .engine import BACKENDS, HF_BACKENDS, Engine, engine_for
from .hf import HFBackend
from .static import StaticDecoder

__all__ = ["BACKENDS", "FINISH_REASONS", "HF_BACKENDS", "Backend", "Completion", "Engine", "HFBackend",
           "PromptTooLongError", "SamplingParams", "StaticDecoder", "cut_at_stop", "default_keys", "engine_for",
           "first_token_biases", "prompt_seed"]
