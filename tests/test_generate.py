
import pytest
import torch

from selfalign.generation import (Completion, Engine, HFBackend, PromptTooLongError, SamplingParams, cut_at_stop,
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
    from selfalign.generation.sampler import NucleusSampler

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack([NucleusSampler(1.0, 0.7, [s], "cpu", candidates=2)(None, logits).argmax(-1)
                         for s in range(2000)]).flatten()
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    # top_p=0.7 keeps 0.5 and 0.3 (the mass before 0.3 is 0.5 < 0.7; before 0.15 it is 0.8).
    assert counts[2:].sum() == 0
    assert abs(counts[0] - 0.625) < 0.04 and abs(counts[1] - 0.375) < 0.04
    # With candidates=1 the nucleus is not inside the candidates: the full sort path must agree.
    full = torch.stack([NucleusSampler(1.0, 0.7, [s], "cpu", candidates=1)(None, logits).argmax(-1)
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
    ids = backend._split_encode([prompts[1]], [prefix])[0]
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


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(stop=("",)),
                                 dict(repetition_penalty=0), dict(no_repeat_ngram_size=-1)])
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


# Repetition controls count generated tokens only; logit bias by text.

def test_repetition_penalty_counts_generated_tokens_only():
    from transformers import RepetitionPenaltyLogitsProcessor

    from selfalign.generation.processors import GeneratedRepetitionPenalty

    prompt, generated = [10, 11, 12], [13, 3, 13]
    scores = torch.linspace(-2, 2, 20)[None]  # token 3 has a negative logit, 13 a positive one
    out = GeneratedRepetitionPenalty(2.0, len(prompt))(torch.tensor([prompt + generated]), scores.clone())
    assert torch.equal(out[0, prompt], scores[0, prompt])  # a prompt token is free
    assert out[0, 13] == scores[0, 13] / 2 and out[0, 3] == scores[0, 3] * 2
    assert torch.equal(out[0, 14:], scores[0, 14:])
    # Reference: transformers' processor given the generated tokens alone.
    rng = torch.Generator().manual_seed(0)
    for length in range(1, 8):
        ids = torch.randint(0, 6, (3, 4 + length), generator=rng)
        scores = torch.randn(3, 6, generator=rng)
        ours = GeneratedRepetitionPenalty(1.3, 4)(ids, scores.clone())
        assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(1.3)(ids[:, 4:], scores.clone()))


def test_no_repeat_ngram_bans_generated_ngrams_only():
    from transformers import NoRepeatNGramLogitsProcessor

    from selfalign.generation.processors import GeneratedNoRepeatNGram

    a, b, c, d, e, f, x = range(1, 8)
    scores = torch.zeros(1, 10)
    quoting = torch.tensor([[a, b, c, d, e, f] + [a, b, c, d, e]])  # the prompt holds the 6-gram
    assert NoRepeatNGramLogitsProcessor(6)(quoting, scores.clone())[0, f] == float("-inf")  # transformers bans f
    assert torch.isfinite(GeneratedNoRepeatNGram(6, 6)(quoting, scores.clone())).all()  # ours does not
    repeating = torch.tensor([[x, x] + [a, b, c, d, e, f, x, a, b, c, d, e]])  # the generated part holds it
    out = GeneratedNoRepeatNGram(6, 2)(repeating, scores.clone())
    assert out[0, f] == float("-inf") and torch.isfinite(out[0, torch.arange(10) != f]).all()
    # Reference: transformers' processor given the generated tokens alone, over sizes and lengths.
    rng = torch.Generator().manual_seed(0)
    for size in (1, 2, 3):
        for length in range(1, 12):
            ids = torch.randint(0, 3, (4, 5 + length), generator=rng)
            scores = torch.randn(4, 5, generator=rng)
            ours = GeneratedNoRepeatNGram(size, 5)(ids, scores.clone())
            assert torch.equal(ours, NoRepeatNGramLogitsProcessor(size)(ids[:, 5:], scores.clone()))


@pytest.mark.parametrize("backend", ["hf", "hf-static"])
def test_a_prompts_ngram_can_be_generated_again(tiny, backend, monkeypatch):
    """The tiny model's greedy answer to this prompt repeats a 6-gram; a prompt that already holds it
    still gets it with no_repeat_ngram_size=6, where transformers' processor bans its last token."""
    ids = tiny.tokenizer(PROMPTS[4])["input_ids"]
    answer = tiny.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tiny.tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert answer[3:9] == answer[12:18]  # the 6-gram the prompt below holds, and the model goes on to repeat
    prompt = ids + answer[:12]  # token ids: these bytes do not survive a decode and re-encode
    banned = tiny.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tiny.tokenizer.pad_token_id, no_repeat_ngram_size=6)
    assert banned[0, len(prompt):].tolist()[:6] != answer[12:18]
    engine_ = Engine.for_model(tiny, backend=backend, progress=False)
    monkeypatch.setattr(engine_.backend, "_split_encode", lambda texts, prefixes: [prompt])
    [completion] = engine_.generate(["(ids above)"], SamplingParams(temperature=0, max_new_tokens=12,
                                                                    no_repeat_ngram_size=6))
    assert completion.text == tiny.tokenizer.decode(answer[12:24], skip_special_tokens=True)


def test_logit_bias_goes_to_a_texts_first_token_with_and_without_a_space(tiny):
    from selfalign.generation import first_token_biases

    tokenizer = tiny.tokenizer
    first = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    assert first_token_biases(tokenizer, [("the", -5.0)]) == {first("the"): -5.0, first(" the"): -5.0}
    assert first("the") != first(" the")
    # This tokenizer splits " Sorry" into " ", "S", ...: the lone space is passed over, not biased.
    assert tokenizer.decode([first(" Sorry")]) == " "
    assert first_token_biases(tokenizer, [("Sorry", -100.0)]) == {first("Sorry"): -100.0}
    assert first_token_biases(tokenizer, [("Sorry", -1.0), ("S", -2.0)]) == {first("S"): -3.0}


def test_a_big_negative_logit_bias_keeps_a_texts_first_token_out(tiny, monkeypatch):
    from selfalign.generation import first_token_biases

    backend = HFBackend(tiny)
    generated: list[list[int]] = []
    finish = backend._finish
    monkeypatch.setattr(backend, "_finish", lambda ids, *rest: generated.append(ids) or finish(ids, *rest))
    run = Engine(backend, progress=False, context_length=tiny.context_length).generate
    run(PROMPTS, SamplingParams(temperature=0, max_new_tokens=16))
    # The token greedy decoding chose most often, as a text, so that the test can fail.
    counts = torch.bincount(torch.tensor(sum(generated, [])))
    token = next(int(t) for t in counts.argsort(descending=True) if tiny.tokenizer.decode([int(t)]).strip())
    text = tiny.tokenizer.decode([token])
    assert token in first_token_biases(tiny.tokenizer, [(text, -100.0)])
    generated.clear()
    biased = run(PROMPTS, SamplingParams(temperature=0, max_new_tokens=16, logit_bias=[[text, -100]]))
    assert generated and all(token not in ids for ids in generated)
    assert any(c.text for c in biased)


def test_logit_bias_is_validated_and_json_able():
    import json

    params = SamplingParams(logit_bias=[["Sorry", -100]])
    assert params.logit_bias == (("Sorry", -100.0),)
    assert json.loads(json.dumps(params.to_dict()))["logit_bias"] == [["Sorry", -100.0]]
    assert SamplingParams(**params.to_dict()) == params
    for bad in ([("", -1.0)], [("Sorry", float("inf"))], [("Sorry", float("nan"))]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
