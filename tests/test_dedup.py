"""selfalign.dedup must make exactly the decisions of the rouge-score brute force."""
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from selfalign import dedup
from selfalign.dedup import rouge_l_filter, rouge_l_fmeasure, tokenize

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def ref_score(a, b):
    return _SCORER.score(a, b)["rougeL"].fmeasure


def ref_filter(texts, threshold=0.7, existing=()):
    """Brute force on the public rouge-score API: the ground truth."""
    pool, kept = list(existing), []
    for i, text in enumerate(texts):
        if all(ref_score(other, text) < threshold for other in pool):
            kept.append(i)
            pool.append(text)
    return kept


# Small vocabulary so near-duplicates are common; case, punctuation, accents,
# CJK and emoji exercise the tokenizer (most of those vanish or split words).
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "Cat", "DOG!", "mat.",
         "café", "naïve", "İt", "猫", "🙂", "x🙂y", "...", "", "42", "e-mail"]
SEPS = [" ", "  ", ", ", "\n", "\t", "-"]
texts_st = st.lists(st.sampled_from(WORDS), max_size=9).flatmap(
    lambda ws: st.lists(st.sampled_from(SEPS), min_size=len(ws), max_size=len(ws))
    .map(lambda seps: "".join(w + s for w, s in zip(ws, seps))))
unicode_st = st.text(max_size=40) | st.text(
    alphabet=st.sampled_from("aAbBéÉ İıKß１猫🙂 .,!\n"), max_size=30)
thresholds = st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.8, 0.9, 1.0]) | \
    st.floats(min_value=1e-6, max_value=1.0)


@settings(max_examples=300, deadline=None)
@given(unicode_st | texts_st)
def test_tokenize_matches_rouge_score(text):
    assert tokenize(text) == _SCORER._tokenizer.tokenize(text)


@pytest.mark.parametrize("text", ["", "   ", "?!.,", "İstanbul", "\u212a", "Straße",
                                  "１２３ 123", "naïve café", "猫 cat 🙂", "a\u0130b", "A_B"])
def test_tokenize_edge_cases(text):
    assert tokenize(text) == _SCORER._tokenizer.tokenize(text)


@settings(max_examples=300, deadline=None)
@given(unicode_st | texts_st, unicode_st | texts_st)
def test_fmeasure_bit_identical_and_symmetric(a, b):
    assert rouge_l_fmeasure(a, b) == ref_score(a, b)
    assert rouge_l_fmeasure(b, a) == rouge_l_fmeasure(a, b)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from("abcde"), min_size=60, max_size=150),
       st.lists(st.sampled_from("abcdef"), min_size=60, max_size=150))
def test_fmeasure_long_texts(a, b):
    # Past 64 tokens rapidfuzz switches to its multi-word bit-parallel LCS.
    a, b = " ".join(a), " ".join(b)
    assert rouge_l_fmeasure(a, b) == ref_score(a, b)


@settings(max_examples=250, deadline=None)
@given(st.lists(texts_st, max_size=14), thresholds)
def test_filter_matches_reference(texts, threshold):
    assert rouge_l_filter(texts, threshold) == ref_filter(texts, threshold)


@settings(max_examples=100, deadline=None)
@given(st.lists(unicode_st | texts_st, max_size=8), thresholds)
def test_filter_matches_reference_unicode(texts, threshold):
    assert rouge_l_filter(texts, threshold) == ref_filter(texts, threshold)


@settings(max_examples=150, deadline=None)
@given(st.lists(texts_st, max_size=5), st.lists(texts_st, max_size=10), thresholds)
def test_filter_with_existing_matches_reference(existing, texts, threshold):
    assert (rouge_l_filter(texts, threshold, existing=existing)
            == ref_filter(texts, threshold, existing))


@settings(max_examples=200, deadline=None)
@given(texts_st, texts_st)
def test_score_exactly_at_threshold_drops(a, b):
    score = ref_score(a, b)
    assume(score > 0)
    assert rouge_l_filter([a, b], score) == [0]
    if score < 1:
        assert rouge_l_filter([a, b], math.nextafter(score, 2.0)) == [0, 1]


def test_constructed_lcs_at_exact_threshold():
    # 2*l/(la+lb) in floats need not equal rouge_score's 2*p*r/(p+r); using the
    # former as threshold probes both rounding directions at the boundary.
    for la in range(1, 16):
        for lb in range(1, 16):
            for lcs in range(1, min(la, lb) + 1):
                a = " ".join(f"w{i}" for i in range(la))
                b = " ".join([f"w{i}" for i in range(lcs)] + [f"v{i}" for i in range(lb - lcs)])
                threshold = 2 * lcs / (la + lb)
                if threshold > 1:
                    continue
                assert rouge_l_filter([a, b], threshold) == ref_filter([a, b], threshold)
                assert rouge_l_fmeasure(a, b) == ref_score(a, b)


def test_half_threshold_known_lcs():
    assert ref_score("a b c d", "a b x y") == 0.5
    assert rouge_l_filter(["a b c d", "a b x y"], 0.5) == [0]
    assert rouge_l_filter(["a b c d", "b a x y"], 0.5) == [0, 1]  # LCS 1


def test_order_dependence():
    assert rouge_l_filter(["a b c", "A, B; C!", "x y z"]) == [0, 2]
    first, second, third = "1 2 3 4", "1 2 5 6", "5 6 7 8"
    # second is dropped by first, so it must not block third ...
    assert rouge_l_filter([first, second, third], 0.5) == [0, 2]
    assert ref_filter([first, second, third], 0.5) == [0, 2]
    # ... but when kept, it does.
    assert rouge_l_filter([second, third], 0.5) == [0]


def test_existing_blocks_but_is_not_filtered():
    existing = ["write a poem about cats", "write a poem about cats"]
    texts = ["Write a poem about cats!", "write a poem about dogs", "explain tides"]
    assert rouge_l_filter(texts, 0.7, existing=existing) == [2]
    assert rouge_l_filter(texts, 0.7) == [0, 2]
    assert rouge_l_filter([], existing=existing) == []


def test_empty_and_punctuation_only_texts_are_kept():
    texts = ["", "", "?!", "...", "a", "a", ""]
    assert rouge_l_filter(texts, 1e-6) == [0, 1, 2, 3, 4, 6]
    assert rouge_l_filter(texts, 1e-6, existing=[""]) == [0, 1, 2, 3, 4, 6]


def test_threshold_one_drops_only_token_identical():
    texts = ["a b c", "A b C.", "a b c d", "c b a"]
    assert rouge_l_filter(texts, 1.0) == [0, 2, 3] == ref_filter(texts, 1.0)


def test_accepts_any_iterable():
    assert rouge_l_filter(iter(["a b", "a b", "c"]), existing=("c",)) == [0]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, 2, math.nan, math.inf, -math.inf])
def test_threshold_out_of_range(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        rouge_l_filter(["a"], bad)


@pytest.mark.parametrize("bad", ["0.5", None, True])
def test_threshold_not_a_number(bad):
    with pytest.raises(ValueError, match="threshold"):
        rouge_l_filter(["a"], bad)


@settings(max_examples=50, deadline=None)
@given(st.lists(texts_st, max_size=10), thresholds)
def test_huge_vocabulary_fallback(texts, threshold):
    # Above ~1.1M distinct tokens ids no longer fit in code points.
    old = dedup._MAX_CODE_IDS
    dedup._MAX_CODE_IDS = 0
    try:
        assert rouge_l_filter(texts, threshold) == ref_filter(texts, threshold)
    finally:
        dedup._MAX_CODE_IDS = old


def test_encoder_skips_surrogates():
    ids = [0xD7FF, 0xD800, 0xDFFF, 0xE000, 0x10FFFF - dedup._SURROGATES]
    code = dedup._encoder(len(ids))(ids)
    assert len(set(code)) == len(ids)
    code.encode("utf-8")  # raises on a lone surrogate
