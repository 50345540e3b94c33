"""One batch behind several shared prefixes, each row under its own grammar (leave-one-out's
principle sets decoded together): the same tokens as each prefix's prompts decoded alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from selfalign.generation import Engine, HFBackend, SamplingParams
from selfalign.generation import shared_prefix
from selfalign.generation.grammar import accepts
from selfalign.principles import load_principle_set, parse_response, render_prefix, render_prompt
from selfalign.stages import self_align
from selfalign.triggers import format_grammar

PRINCIPLES = load_principle_set()
# One exemplar keeps the prefixes short (~3,900 tiny-random tokens); leaving principles out makes
# them of different lengths, and their grammars list different citations. (Not one the exemplar
# cites: its grammar would allow at most two citations, and format_grammar writes "{0,0}" then.)
SHORT = PRINCIPLES.with_exemplars([PRINCIPLES.exemplars[0].id])
VARIANTS = {"all": SHORT, "without 2": SHORT.without(2), "without 3, 5": SHORT.without(3, 5)}
QUERIES = ["What is 2 + 2?", "How do I pick a lock?", "Tell me a story about a fox.", "Who won the 2030 World Cup?"]


@pytest.fixture(scope="module")
def sharp(tiny):
    """tiny-random with larger weights, so that rows and steps choose different tokens (as in
    test_shared_prefix.py, larger still: behind these long prefixes, 0.3 gave every greedy row
    the same text): a mixed-up row or prefix would show."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = LlamaForCausalLM(tiny.model.config)
        for parameter in model.parameters():
            parameter.data.normal_(0, 0.6)
    return dataclasses.replace(tiny, model=model.eval())


def _groups(params: SamplingParams, counts=(3, 2, 2), grammars=True, sentences=None):
    """(prompts, params, shared_prefix, keys) per variant: the same queries and keys in each, as
    leave-one-out seeds them; the first group is larger, so that batches of 4 hold 3 + (2 + 2)."""
    groups = []
    for (name, subset), count in zip(VARIANTS.items(), counts):
        grammar = format_grammar(subset, "Watson", max_thought_sentences=sentences) if grammars else None
        groups.append(([render_prompt(subset, q) for q in QUERIES[:count]],
                       dataclasses.replace(params, grammar=grammar), render_prefix(subset, "Watson"),
                       [f"q{i}" for i in range(count)]))
    return groups


def _engine(backend, batch_size=4):
    return Engine(backend, batch_size=batch_size, context_length=backend.loaded.context_length, progress=False)


def _prefix_cache(model, text, tokenizer):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]), use_cache=True, cache=cache)
    return cache


@pytest.mark.parametrize("kernel", ["fused", "products"])
def test_rows_behind_different_prefixes_attend_as_their_full_sequences(sharp, kernel, monkeypatch):
    """The attention itself: prefill and one decode step, rows behind three prefixes of different
    lengths (the shorter ones padded before, masked), against each row's whole sequence."""
    if kernel == "products":
        monkeypatch.setattr(shared_prefix, "_CPU_FLASH", None)
    elif shared_prefix._CPU_FLASH is None:
        pytest.skip("this PyTorch has no fused CPU attention kernel")
    model, tokenizer, pad = sharp.model, sharp.tokenizer, sharp.tokenizer.pad_token_id
    texts = ["Principles: be honest. Example: User: hi Assistant: Hello.\n", "Short preamble.\n",
             "A third preamble, the longest of them all, with more words in it than the others.\n"]
    prefixes = [tokenizer(t)["input_ids"] for t in texts]
    which = [2, 0, 1, 0, 2]  # each row's prefix, in no particular order
    suffixes = [tokenizer(s, add_special_tokens=False)["input_ids"]
                for s in ["User: hello\nAssistant:", "U:", "User: the quick brown fox?\nAssistant:", "Hi", "x y"]]
    longest, width = max(map(len, prefixes)), max(map(len, suffixes))
    before = [longest - len(prefixes[p]) for p in which]
    mask = torch.tensor([[0] * b + [1] * len(prefixes[p]) + [0] * (width - len(s)) + [1] * len(s)
                         for b, p, s in zip(before, which, suffixes)])
    own = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes])
    caches = [_prefix_cache(model, t, tokenizer) for t in texts]
    cache = shared_prefix.PrefixedCache(caches, width + 2, which)
    assert cache.get_seq_length() == longest
    steps = []
    with torch.inference_mode(), shared_prefix.shared_attention(model):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=own, attention_mask=mask, position_ids=positions[:, longest:],
                       cache=cache).logits[:, -1]
        steps.append(logits)
        chosen = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones(len(which), 1, dtype=mask.dtype)], 1)
        steps.append(model(input_ids=chosen[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                           cache=cache).logits[:, -1])
    with torch.inference_mode():
        for row, (p, suffix, token) in enumerate(zip(which, suffixes, chosen.tolist())):
            full = model(input_ids=torch.tensor([prefixes[p] + suffix + [token]])).logits[0]
            torch.testing.assert_close(steps[0][row], full[-2], atol=2e-5, rtol=0)
            torch.testing.assert_close(steps[1][row], full[-1], atol=2e-5, rtol=0)
    assert len(set(chosen.tolist())) > 1  # the rows differ, so a mixed-up row would show


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_groups_decoded_together_equal_each_group_alone(sharp, temperature, monkeypatch):
    params = self_align.sampling(self_align.SelfAlignConfig(temperature=temperature, max_new_tokens=24, seed=5), SHORT)
    groups = _groups(params)
    alone = [_engine(HFBackend(sharp), 4).generate(*group) for group in groups]

    backend = HFBackend(sharp)
    assert backend.multi_prefix
    calls = []
    generate = sharp.model.generate

    def counting(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        rows = cache.layers[0].rows if isinstance(cache, shared_prefix.PrefixedCache) else None
        calls.append(1 if rows is None else len(rows))
        return generate(*args, **kwargs)

    monkeypatch.setattr(sharp.model, "generate", counting)
    together = _engine(backend, 4).generate_groups(groups)
    # 7 rows in batches of 4 holding whole groups: the first group alone, then two prefixes at once.
    assert calls == [1, 2]
    assert together == alone
    texts = [c.text for group in together for c in group]
    assert len(set(texts)) == len(texts)  # every row its own text: a row or prefix mixed up would show


def test_each_row_keeps_to_its_own_groups_grammar(tiny):
    """Sampled on tiny-random (which reaches the citations): no row cites a principle its group
    left out, and an unconstrained group in the same batches is free."""
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=160, stop=("\nUser:",), seed=3)
    groups = _groups(params, counts=(4, 4, 4), sentences=1)
    free_prompts, _, free_prefix, free_keys = _groups(params, counts=(4,), grammars=False)[0]
    groups.append((free_prompts, params, free_prefix, free_keys))
    engine = _engine(HFBackend(tiny), 8)
    answers = engine.generate_groups(groups)
    cited = 0
    for (name, subset), (_, group_params, _, _), completions in zip(VARIANTS.items(), groups, answers):
        left_out = PRINCIPLES.numbers - subset.numbers
        for completion in completions:
            assert accepts(group_params.grammar, tiny.tokenizer, completion.text), (name, completion.text)
            parsed = parse_response(PRINCIPLES, completion.text)
            assert parsed.unknown_citations == [] and not set(parsed.triggers) & left_out, (name, completion.text)
            cited += bool(parsed.triggers)
    assert cited >= 4  # the citations were reached, not merely never begun
    assert not all(accepts(groups[0][1].grammar, tiny.tokenizer, c.text) for c in answers[-1])
    assert answers[-1] == engine.generate(*groups[-1])  # the free group, decoded alone


def test_backends_without_several_prefixes_fall_back_to_one_group_at_a_time(sharp):
    params = SamplingParams(temperature=0.9, max_new_tokens=12, seed=2)
    groups = _groups(params, grammars=True, sentences=1)
    static = HFBackend(sharp, static=True)
    copied = HFBackend(sharp, share_prefix=False)
    assert not static.multi_prefix and not copied.multi_prefix
    together = _engine(HFBackend(sharp), 4).generate_groups(groups)
    assert _engine(static, 4).generate_groups(groups) == together
    assert _engine(copied, 4).generate_groups(groups) == together
    # Asked directly, a backend that cannot says so rather than mixing prefixes up.
    prompts = [groups[0][0][0], groups[1][0][0]]
    with pytest.raises(ValueError, match="one shared prefix only"):
        static.stream_batch(prompts, params, [1, 2], [groups[0][2], groups[1][2]])


def test_groups_must_share_their_sampling_but_for_the_grammar(tiny):
    engine = _engine(HFBackend(tiny), 4)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    groups = _groups(params, counts=(1, 1, 1))
    groups[1] = (groups[1][0], dataclasses.replace(groups[1][1], temperature=0.5), *groups[1][2:])
    with pytest.raises(ValueError, match="but for their grammar"):
        engine.generate_groups(groups)
    with pytest.raises(ValueError, match="in place of params.grammar"):
        engine.backend.stream_batch([groups[0][0][0]], groups[0][1], [0], groups[0][2], grammars=[None])
    assert engine.generate_groups([]) == []


def test_batches_hold_whole_groups_where_they_fit(tiny):
    engine = _engine(HFBackend(tiny), 4)
    rows = [(g, i) for g, n in enumerate([3, 2, 2, 6, 1]) for i in range(n)]
    sizes = [[g for g, _ in batch] for batch in engine._group_batches(rows)]
    assert sizes == [[0, 0, 0], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 4]]
