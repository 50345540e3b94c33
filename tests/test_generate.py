
import pytest
import torch

from selfalign.generate import (Completion, Engine, HFBackend, PromptTooLongError, SamplingParams, cut_at_stop,
                                prompt_seed)

PROMPTS = ["User: hello there", "User: what is the capital of France? Assistant:", "x",
           "The quick brown fox jumps over the lazy dog", "I should follow rules 1 and 2"]


def engine(loaded, **options):
    return Engine.for_model(loaded, progress=False, **options)


def test_same_seed_same_completions_and_caller_rng_untouched(tiny):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = engine(tiny, batch_size=2).generate(PROMPTS, params)
    assert torch.equal(torch.rand(1), before), "generation must not consume the caller's random state"
    second = engine(tiny, batch_size=2).generate(PROMPTS, params)
    assert first == second
    other = engine(tiny, batch_size=2).generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=12, seed=8))
    assert [c.text for c in other] != [c.text for c in first]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_prompts_sample_does_not_depend_on_its_batch(tiny, seed):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=seed)
    batched = engine(tiny, batch_size=5).generate(PROMPTS, params)
    single = engine(tiny, batch_size=1).generate(PROMPTS, params)
    assert [c.text for c in batched] == [c.text for c in single]
    keyed = engine(tiny, batch_size=2).generate(PROMPTS[::-1], params, keys=[(p, 0) for p in PROMPTS[::-1]])
    assert [c.text for c in keyed[::-1]] == [c.text for c in single]


def test_nucleus_sampler_matches_the_distribution():
    from selfalign.generate import _NucleusSampler

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack([_NucleusSampler(1.0, 0.7, [s], "cpu", candidates=2)(None, logits).argmax(-1)
                         for s in range(2000)]).flatten()
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    # top_p=0.7 keeps 0.5 and 0.3 (the mass before 0.3 is 0.5 < 0.7; before 0.15 it is 0.8).
    assert counts[2:].sum() == 0
    assert abs(counts[0] - 0.625) < 0.04 and abs(counts[1] - 0.375) < 0.04
    # With candidates=1 the nucleus is not inside the candidates: the full sort path must agree.
    full = torch.stack([_NucleusSampler(1.0, 0.7, [s], "cpu", candidates=1)(None, logits).argmax(-1)
                        for s in range(2000)]).flatten()
    assert torch.equal(full, draws)


def test_batched_greedy_matches_one_at_a_time(tiny):
    # Left padding with a correct attention mask must not change what each prompt gets.
    params = SamplingParams(temperature=0, max_new_tokens=10)
    batched = engine(tiny, batch_size=5).generate(PROMPTS, params)
    single = engine(tiny, batch_size=1).generate(PROMPTS, params)
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.finish_reason == "length" and c.completion_tokens == 10 for c in batched)
    assert [c.prompt_tokens for c in batched] == HFBackend(tiny).count_tokens(PROMPTS)


def test_results_come_back_in_prompt_order(tiny):
    params = SamplingParams(temperature=0, max_new_tokens=4)
    together = engine(tiny, batch_size=3).generate(PROMPTS, params)
    reversed_ = engine(tiny, batch_size=3).generate(PROMPTS[::-1], params)
    assert [c.text for c in together] == [c.text for c in reversed_[::-1]]


def test_stop_string_cuts_and_reports(tiny):
    free = engine(tiny).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=30))
    # Pick a stop string the model really produces in the middle of its first completion.
    text = free[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable() and text[i:i + 2].strip())
    cut = engine(tiny).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=30, stop=(stop, "\x00never")))
    assert cut[0].finish_reason == "stop" and cut[0].stop_string == stop
    assert cut[0].text == text[: text.index(stop)]
    assert cut[0].completion_tokens < 30
    for full, stopped in zip(free, cut):
        assert stop not in stopped.text
        assert full.text.startswith(stopped.text)


def test_finish_reasons_from_token_ids(tiny):
    backend = HFBackend(tiny)
    eos = tiny.tokenizer.eos_token_id
    ids = tiny.tokenizer("abc def", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=10)
    ended = backend._finish(ids + [eos, eos], 5, params)
    assert (ended.finish_reason, ended.completion_tokens, ended.text) == ("eos", len(ids) + 1, "abc def")
    assert backend._finish(ids, 5, params).finish_reason == "length"
    stopped = backend._finish(ids + [eos], 5, SamplingParams(stop=(" d",)))
    assert (stopped.finish_reason, stopped.text, stopped.stop_string) == ("stop", "abc", " d")


def test_cut_at_stop_takes_earliest():
    assert cut_at_stop("a\nUser: b ### c", ["###", "\nUser:"]) == ("a", "\nUser:")
    assert cut_at_stop("plain", ["###"]) == ("plain", None)


def test_shared_prefix_cache_gives_the_same_greedy_text(tiny):
    prefix = "User: What is the capital of France? Assistant: Paris. "
    prompts = [prefix + rest for rest in ["User: hello", "User: the quick brown fox jumps over", "U"]]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    cached = engine(tiny, batch_size=3).generate(prompts, params, shared_prefix=prefix)
    one_by_one = engine(tiny, batch_size=1).generate(prompts, params, shared_prefix=prefix)
    assert [c.text for c in cached] == [c.text for c in one_by_one]
    # Same tokens as an uncached run whose input is split the same way.
    backend = HFBackend(tiny)
    ids = backend._split_encode(prompts[1], prefix)
    out = tiny.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              pad_token_id=tiny.tokenizer.pad_token_id)
    assert tiny.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True) == cached[1].text
    with pytest.raises(ValueError, match="shared prefix"):
        engine(tiny).generate(["no prefix here"], params, shared_prefix=prefix)


def test_too_long_prompt_is_refused_or_cut_from_the_left(tiny):
    long_prompt = "the quick brown fox " * 3000
    params = SamplingParams(temperature=0, max_new_tokens=8)
    with pytest.raises(PromptTooLongError, match="truncate='left'"):
        engine(tiny).generate([long_prompt], params)
    with pytest.warns(UserWarning, match="keeping its last"):
        [completion] = engine(tiny, truncate="left").generate([long_prompt], params)
    assert completion.prompt_tokens == tiny.context_length - 8


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(stop=("",))])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_a_lone_stop_string_is_not_split_into_characters():
    assert SamplingParams(stop="###").stop == ("###",)


def test_engine_sorts_by_length_and_seeds_by_batch_content():
    class Recording:
        name = "fake"

        def __init__(self):
            self.calls = []

        def count_tokens(self, texts, shared_prefix=None):
            return [len(t) for t in texts]

        def stream_batch(self, prompts, params, seeds, shared_prefix, max_prompt_tokens):
            self.calls.append((list(prompts), list(seeds)))
            return [Completion(p.upper(), "length", len(p), 1) for p in prompts]

    backend = Recording()
    results = Engine(backend, batch_size=2, progress=False).generate(["bb", "a", "dddd", "ccc"], SamplingParams())
    assert [c.text for c in results] == ["BB", "A", "DDDD", "CCC"]
    assert [prompts for prompts, _ in backend.calls] == [["dddd", "ccc"], ["bb", "a"]]
    assert backend.calls[0][1] == [prompt_seed(0, ("dddd", 0)), prompt_seed(0, ("ccc", 0))]
    Engine(backend, progress=False).generate(["x", "x"], SamplingParams(), keys=["a", "b"])
    assert backend.calls[-1][1] == [prompt_seed(0, "a"), prompt_seed(0, "b")]
    with pytest.raises(ValueError, match="unique"):
        Engine(backend, progress=False).generate(["x", "x"], SamplingParams(), keys=["a", "a"])


def test_repeated_prompts_in_separate_batches_are_sampled_apart(tiny):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=0)
    first, second = engine(tiny, batch_size=1).generate(["same prompt", "same prompt"], params)
    assert first.text != second.text
