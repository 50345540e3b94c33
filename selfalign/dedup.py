"""ROUGE-L near-duplicate filter, decision-for-decision identical to rouge_score.

`rouge_l_filter` is the Self-Instruct / Dromedary pool filter: walk the texts in
order and keep one only if its ROUGE-L F-measure against every `existing` text
and every earlier kept text is strictly below `threshold`.  The reference
(`RougeScorer(["rougeL"], use_stemmer=False)`) runs a pure-Python LCS dynamic
program for every (new, kept) pair; here the same decisions come from

* the identical tokenizer and the identical float expression for the F-measure,
  so scores that land exactly on the threshold decide the same way;
* prefix filtering (the AllPairs / PPJoin set-similarity join): ROUGE-L >= t
  needs LCS >= t*(la+lb)/2; LCS <= min(la, lb) (length bound) limits how
  small that can get for a text of length n, LCS <= the multiset overlap, and
  two multisets with overlap >= k share an element among their rarest n-k+1
  elements, so only kept texts sharing a rare token are ever looked at;
* the exact multiset-overlap bound on those candidates, then rapidfuzz's
  bit-parallel LCS over token-id strings for the few that survive it.

Deliberately not supported: non-str inputs, stemming, custom tokenizers, rougeLsum, and any
approximate scheme (MinHash, embeddings).  Ties drop: a score equal to the
threshold removes the text (Self-Instruct itself uses `> 0.7`).
"""
import math
import numbers
import re
from collections import Counter

from rapidfuzz.distance import LCSseq

__all__ = ["rouge_l_filter", "rouge_l_fmeasure", "tokenize"]

_TOKEN_RE = re.compile(r"[a-z0-9]+")
# Bounds are real-valued; comparing them against a slightly lowered threshold
# guarantees rounding can never skip a pair whose exact score reaches it.
_SLACK = 1e-9
# Token ids become code points so rapidfuzz compares plain strings (fastest
# path, no hashing); surrogates are skipped so every id is a valid code point.
_SURROGATES = 0x800
_MAX_CODE_IDS = 0x110000 - _SURROGATES


def tokenize(text):
    """rouge_score's default tokenizer without stemming.

    It lower-cases with full Unicode `str.lower()` (so 'İ' yields 'i' and the
    Kelvin sign yields 'k'), turns every run outside ASCII [a-z0-9] into a space,
    splits and drops empty tokens; that is exactly the ASCII alnum runs.
    """
    return _TOKEN_RE.findall(text.lower())


def _fmeasure(lcs, len_target, len_prediction):
    # Same expressions as rouge_scorer._score_lcs and scoring.fmeasure, so the
    # float result (and any tie with the threshold) is bit-identical.
    if not len_target or not len_prediction:
        return 0.0
    precision = lcs / len_prediction
    recall = lcs / len_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _encoder(vocab_size):
    if vocab_size <= _MAX_CODE_IDS:
        return lambda ids: "".join(
            [chr(i if i < 0xD800 else i + _SURROGATES) for i in ids])
    return list  # rapidfuzz hashes ints to themselves, still exact


def rouge_l_fmeasure(a, b):
    """ROUGE-L F-measure of `a` (target) and `b` (prediction), as rouge_score.

    The value is symmetric: 2*p*r/(p+r) is exact under swapping p and r.
    """
    ta, tb = tokenize(a), tokenize(b)
    vocab = {}
    ia = [vocab.setdefault(w, len(vocab)) for w in ta]
    ib = [vocab.setdefault(w, len(vocab)) for w in tb]
    enc = _encoder(len(vocab))
    return _fmeasure(LCSseq.similarity(enc(ia), enc(ib)), len(ta), len(tb))


def rouge_l_filter(texts, threshold=0.7, existing=()):
    """Indices of `texts` kept by the greedy ROUGE-L filter.

    A text is dropped when its ROUGE-L F-measure with any `existing` text or
    any earlier kept text is >= `threshold`; dropped texts block nothing.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    texts, existing = list(texts), list(existing)
    n_existing = len(existing)

    vocab = {}
    ids = [[vocab.setdefault(w, len(vocab)) for w in tokenize(t)]
           for t in existing + texts]
    enc = _encoder(len(vocab))
    codes = [enc(seq) for seq in ids]
    lens = [len(seq) for seq in ids]

    # (token, occurrence number) elements turn multiset overlap into set overlap.
    elems = []
    for seq in ids:
        seen = Counter()
        row = []
        for w in seq:
            row.append((w, seen[w]))
            seen[w] += 1
        elems.append(row)
    freq = Counter(e for row in elems for e in row)
    # Rarest first, so prefixes hit short posting lists.
    rank = {e: r for r, e in enumerate(sorted(freq, key=lambda e: (freq[e], e)))}
    sets = [frozenset(rank[e] for e in row) for row in elems]

    t = threshold - _SLACK
    # F = 2*LCS/(la+lb) and LCS <= min(la, lb), so a partner of a length-n
    # text must have LCS >= t*n/(2-t); floor keeps the prefix conservative.
    # Any score > 0 needs one shared token, hence the floor of 1.
    def prefix(k):
        n = lens[k]
        need = max(1, math.floor(t * n / (2 - t)))
        return sorted(sets[k])[:n - need + 1]

    index = {}  # element rank -> kept rows whose prefix contains it

    def admit(k, pre):
        for e in pre:
            index.setdefault(e, []).append(k)

    for k in range(n_existing):
        admit(k, prefix(k))

    kept = []
    for i in range(len(texts)):
        k = n_existing + i
        n = lens[k]
        pre = prefix(k)
        if n:  # an empty text scores 0 against everything
            cands = set()
            for e in pre:
                rows = index.get(e)
                if rows:
                    cands.update(rows)
            if _blocked(k, n, cands, lens, sets, codes, t, threshold):
                continue
        kept.append(i)
        admit(k, pre)
    return kept


def _blocked(k, n, cands, lens, sets, codes, t, threshold):
    code, elset = codes[k], sets[k]
    # LCS <= multiset overlap <= min(la, lb): the overlap test also covers
    # the length bound, and costs about as much as it would.
    for c in cands:
        if 2 * len(elset & sets[c]) >= t * (n + lens[c]):
            lcs = LCSseq.similarity(codes[c], code)
            if _fmeasure(lcs, lens[c], n) >= threshold:
                return True
    return False
