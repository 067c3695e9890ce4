"""The generation metrics of the paper's Table 2, by hand, matching the research group's protocol.

The protocol (Huatuo-26M's, which the paper follows in §4.1, as this project reconstructed it; no
metric script is in the public Huatuo-26M repository to cite): every text is tokenised as single
characters (whitespace dropped), then

    BLEU-n      nltk corpus_bleu, cumulative weights (1,0,0,0), (.5,.5,0,0), (.33,.33,.33,0) — 0.33,
                not 1/3 — and (.25,.25,.25,.25), smoothing method1 (epsilon 0.1)
    GLEU        nltk corpus_gleu over 1- to 4-grams
    ROUGE-1/2/L the `rouge` package (1.0.1) F-scores of each pair, the characters joined by spaces,
                averaged over the pairs
    Distinct-n  per prediction, distinct n-grams / n-grams, averaged over predictions

BLEU, GLEU and ROUGE are reported ×100, Distinct as a fraction. Each function below restates
its reference library's arithmetic, quirks included, so that the numbers agree to 1e-9
(tests/test_metrics.py checks this against nltk and rouge themselves).

Defined values where the libraries would raise: a pair whose prediction or reference has no
tokens (or, for ROUGE, only ASCII full stops) scores ROUGE 0; a prediction shorter than n has
Distinct-n 0; an empty corpus scores 0 everywhere.
"""

from __future__ import annotations

import math
from collections import Counter

BLEU_WEIGHTS = {1: (1, 0, 0, 0), 2: (0.5, 0.5, 0, 0), 3: (0.33, 0.33, 0.33, 0), 4: (0.25, 0.25, 0.25, 0.25)}
EPSILON = 0.1  # nltk SmoothingFunction().method1


def tokens(text: str) -> list[str]:
    """Single characters; whitespace is not a token."""
    return [c for c in text if not c.isspace()]


def ngrams(seq, n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def corpus_bleu(refs: list[list[str]], hyps: list[list[str]], weights) -> float:
    """nltk.translate.bleu_score.corpus_bleu with one reference per hypothesis and method1.

    Clipped n-gram matches and hypothesis n-gram counts are summed over the corpus for n = 1..4
    (a hypothesis shorter than n contributes a denominator of 1, as nltk's max(1, count) does);
    a zero match count becomes epsilon / its denominator; the score is the brevity penalty
    times exp(sum of weight * log precision). No unigram match at all gives 0.
    """
    num, den = Counter(), Counter()
    hyp_len = ref_len = 0
    for ref, hyp in zip(refs, hyps):
        for n in range(1, 5):
            h = Counter(ngrams(hyp, n))
            r = Counter(ngrams(ref, n))
            num[n] += sum(min(c, r[g]) for g, c in h.items())
            den[n] += max(1, sum(h.values()))
        hyp_len += len(hyp)
        ref_len += len(ref)  # with one reference, the "closest" reference length is its length
    if num[1] == 0:
        return 0.0
    # Brevity penalty: 1 if the corpus hypothesis is longer, else exp(1 - r / c).
    bp = 1.0 if hyp_len > ref_len else 0.0 if hyp_len == 0 else math.exp(1 - ref_len / hyp_len)
    logs = []
    for w, n in zip(weights, range(1, 5)):
        p = (EPSILON / den[n]) if num[n] == 0 else num[n] / den[n]
        logs.append(w * math.log(p))
    return bp * math.exp(math.fsum(logs))


def corpus_gleu(refs: list[list[str]], hyps: list[list[str]]) -> float:
    """nltk corpus_gleu (1..4-grams): sum over pairs of matches / sum of max(hyp, ref) n-gram
    counts, where matches are the clipped common n-grams of all orders together."""
    match = total = 0
    for ref, hyp in zip(refs, hyps):
        h = Counter(g for n in range(1, 5) for g in ngrams(hyp, n))
        r = Counter(g for n in range(1, 5) for g in ngrams(ref, n))
        n_all = max(sum(h.values()), sum(r.values()))
        if n_all > 0:
            match += sum((h & r).values())
            total += n_all
    return match / total if total else 0.0


def _rouge_sentences(toks: list[str]) -> list[list[str]]:
    """rouge 1.0.1's preprocessing of ' '.join(toks): split on '.', keep pieces of length > 0,
    normalise the whitespace of each, then split each on ' ' (an all-space piece becomes one
    empty word)."""
    text = " ".join(toks)
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if len(piece) > 0]


def _f(p: float, r: float) -> float:
    return 2.0 * ((p * r) / (p + r + 1e-8))  # rouge's F, with its 1e-8


def rouge_n(hyp: list[list[str]], ref: list[list[str]], n: int) -> float:
    """Set semantics: distinct n-grams of the flattened words (n-grams cross sentence ends)."""
    h = set(ngrams([w for s in hyp for w in s], n))
    r = set(ngrams([w for s in ref for w in s], n))
    overlap = len(h & r)
    return _f(overlap / len(h) if h else 0.0, overlap / len(r) if r else 0.0)


def _lcs_words(x: list[str], y: list[str]) -> set:
    """The words of one longest common subsequence of x and y, reconstructed the way rouge
    1.0.1 walks its table back (diagonal on a match, else up only if strictly greater)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(hyp: list[list[str]], ref: list[list[str]]) -> float:
    """rouge 1.0.1's summary-level ROUGE-L with set semantics: the distinct words found in the
    LCS of any (reference sentence, hypothesis sentence) pair, over the distinct words of the
    reference (recall) and of the hypothesis (precision)."""
    m = len({w for s in ref for w in s})
    n = len({w for s in hyp for w in s})
    union = set()
    for r in ref:
        for h in hyp:
            union |= _lcs_words(r, h)
    return _f(len(union) / n, len(union) / m)


def distinct(toks: list[str], n: int) -> float:
    grams = ngrams(toks, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def compute_metrics(predictions: list[str], references: list[str]) -> dict:
    """Table 2's ten numbers for paired predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return dict.fromkeys(
            [
                "BLEU-1",
                "BLEU-2",
                "BLEU-3",
                "BLEU-4",
                "GLEU",
                "ROUGE-1",
                "ROUGE-2",
                "ROUGE-L",
                "Distinct-1",
                "Distinct-2",
            ],
            0.0,
        )
    hyps = [tokens(p) for p in predictions]
    refs = [tokens(r) for r in references]
    out = {f"BLEU-{n}": 100 * corpus_bleu(refs, hyps, BLEU_WEIGHTS[n]) for n in (1, 2, 3, 4)}
    out["GLEU"] = 100 * corpus_gleu(refs, hyps)
    r1 = r2 = rl = 0.0
    for h, r in zip(hyps, refs):
        hs, rs = _rouge_sentences(h), _rouge_sentences(r)
        if hs and rs:  # rouge raises on an empty side; we score such a pair 0
            r1 += rouge_n(hs, rs, 1)
            r2 += rouge_n(hs, rs, 2)
            rl += rouge_l(hs, rs)
    k = len(hyps)
    out.update({"ROUGE-1": 100 * r1 / k, "ROUGE-2": 100 * r2 / k, "ROUGE-L": 100 * rl / k})
    out["Distinct-1"] = sum(distinct(h, 1) for h in hyps) / k
    out["Distinct-2"] = sum(distinct(h, 2) for h in hyps) / k
    return out
