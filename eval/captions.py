"""Reference-based caption metrics, offline: BLEU-1..4, METEOR (exact-match only), ROUGE-L, CIDEr-D.

Our own implementations of the scorers of the COCO caption toolkit (``pycocoevalcap``), which the
GLaMM GCG evaluation calls through ``COCOEvalCap``. Every scorer takes

* ``hypotheses``: ``list[list[str]]`` — one tokenised candidate per item,
* ``references``: ``list[list[list[str]]]`` — one or more tokenised references per item,

and returns a corpus-level float. :func:`caption_scores` tokenises raw strings with
:func:`tokenize_caption` and runs them all.

Conventions (each matches ``pycocoevalcap`` 1.2 unless said otherwise):

* Tokenisation: ``pycocoevalcap`` runs the Stanford PTB tokenizer (Java) with ``-lowerCase`` and
  then drops punctuation tokens. :func:`tokenize_caption` approximates it in Python: lower case,
  contractions split PTB-style (``don't`` → ``do n't``, ``it's`` → ``it 's``), hyphenated words and
  decimal numbers kept whole, tokens made only of punctuation dropped — except brackets, which
  become ``-lrb-``/``-rrb-``/... and stay, as they do in ``pycocoevalcap`` (its removal list has
  the upper-case ``-LRB-`` while the tokenizer runs with ``-lowerCase``).
* BLEU: corpus-level (clipped n-gram counts and lengths summed over the corpus, then one geometric
  mean), effective reference length = the reference closest in length to each candidate (ties →
  the shorter), brevity penalty ``exp(1 - r/c)`` when ``c < r``. As in ``pycocoevalcap`` the
  precisions are ``(correct + 1e-15) / (guessed + 1e-9)``, so a corpus without a single matching
  n-gram scores ~1e-4..1e-15 rather than exactly 0.
* ROUGE-L: per item, LCS precision and recall against every reference, the best precision and the
  best recall (possibly from different references) combined as
  ``F = (1 + β²)·P·R / (R + β²·P)`` with β = 1.2; corpus score = mean over items. An empty
  candidate scores 0 (``pycocoevalcap`` divides by zero there).
* CIDEr-D: n = 1..4, tf-idf n-gram vectors with document frequencies counted over the reference
  sets of the evaluated corpus (``df`` = number of items whose references contain the n-gram,
  ``idf = log(N_items) - log(max(1, df))``), candidate weights clipped to the reference weights,
  cosine-like similarity per n, Gaussian length penalty ``exp(-δ²/2σ²)`` with σ = 6, mean over n,
  mean over references, × 10; corpus score = mean over items. Faithful to ``pycocoevalcap``
  quirks: the "length" in δ is the number of *bigrams* of a sentence, and a corpus of a single
  item scores 0 (``log(1) = 0`` zeroes every weight).
* METEOR: the real METEOR 1.5 (as run by ``pycocoevalcap``) also matches stems, WordNet synonyms
  and paraphrases and uses tuned parameters; WordNet is not available offline. This is an
  **exact-match-only** METEOR, reported as ``"METEOR (exact-match only)"``: unigram alignment of
  exact (lower-cased) tokens, ``P = m/|hyp|``, ``R = m/|ref|``,
  ``Fmean = P·R / (α·P + (1-α)·R)``, fragmentation penalty ``γ·(chunks/m)^β`` with α = 0.9,
  β = 3, γ = 0.5 (Lavie & Agarwal 2007 / NLTK defaults), score ``Fmean·(1 - penalty)``; as in
  METEOR 1.5 a pair matched entirely in one chunk (identical sentences) counts 0 chunks, so it
  scores 1 and adds no fragmentation to the corpus aggregate. With
  several references the best-scoring one is used. Like METEOR's own aggregate (the number
  ``pycocoevalcap`` reports) the corpus score is computed once from the matches, lengths and chunks
  summed over the corpus, not as a mean of sentence scores. The alignment takes longest runs of
  consecutive matching tokens first, a greedy stand-in for METEOR's search for the alignment with
  the fewest chunks: it always reaches the maximum number of matches, and the fewest chunks in
  all but contrived cases.

Scores are in [0, 1] except CIDEr-D (0..10 in principle, x10 scaling as in the toolkit).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

Tokens = list[str]

METEOR_NAME = "METEOR (exact-match only)"
CAPTION_METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", METEOR_NAME, "ROUGE-L", "CIDEr-D")

# ------------------------------------------------------------------------------------------------
# text preparation

_SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>]*\|>")
_CONTRACTION_NT_RE = re.compile(r"(\w)n't\b")
_CONTRACTION_RE = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_TOKEN_RE = re.compile(r"n't|'[a-z]+|[^\W_]+(?:[-.,'][^\W_]+)*|\S")
# PTB escapes brackets; lower-cased they no longer match pycocoevalcap's (upper-case) removal list,
# so ``-lrb-`` / ``-rrb-`` stay in its token stream. Kept for parity.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "…", "–", "—"}


def strip_grounding_markup(text: str) -> str:
    """Remove special tokens of the ``<|...|>`` form (object-ref and mask words) from a GCG caption.

    ``"<|object_ref_start|>a man<|object_ref_end|><|mt_start|><|mt_0001|><|mt_0300|><|mt_end|> runs"``
    → ``"a man runs"``. Whitespace is collapsed.
    """
    return " ".join(_SPECIAL_TOKEN_RE.sub(" ", text).split())


def tokenize_caption(text: str) -> Tokens:
    """Lower-cased word tokens without punctuation (a Python stand-in for the PTB tokenizer)."""
    t = text.lower().replace("’", "'").replace("‘", "'")
    t = _CONTRACTION_NT_RE.sub(r"\1 n't", t)
    t = _CONTRACTION_RE.sub(r"\1 '\2", t)
    tokens = _TOKEN_RE.findall(t)
    out = []
    for tok in tokens:
        if tok in _BRACKETS:
            out.append(_BRACKETS[tok])
        elif not all(ch in _PUNCT for ch in tok):
            out.append(tok)
    return out


def _check_corpus(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"item {i} has no reference caption")


def _ngrams(tokens: Tokens, n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


# ------------------------------------------------------------------------------------------------
# BLEU

_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def bleu_statistics(
    hypothesis: Tokens, references: Sequence[Tokens], max_n: int = 4
) -> tuple[int, int, list[int], list[int]]:
    """``(hyp_len, closest_ref_len, correct[n], guessed[n])`` of one item (clipped n-gram counts)."""
    hyp_len = len(hypothesis)
    ref_len = min((abs(len(r) - hyp_len), len(r)) for r in references)[1]
    correct, guessed = [], []
    for n in range(1, max_n + 1):
        hyp_counts = _ngrams(hypothesis, n)
        max_ref: Counter = Counter()
        for r in references:
            max_ref |= _ngrams(r, n)  # elementwise max
        correct.append(sum(min(c, max_ref[g]) for g, c in hyp_counts.items()))
        guessed.append(max(0, hyp_len - n + 1))
    return hyp_len, ref_len, correct, guessed


def bleu_from_statistics(hyp_len: int, ref_len: int, correct: Sequence[int], guessed: Sequence[int]) -> list[float]:
    """BLEU-1..N from summed statistics (pycocoevalcap's smoothing constants and brevity penalty)."""
    scores = []
    product = 1.0
    for k, (c, g) in enumerate(zip(correct, guessed)):
        product *= (c + _BLEU_TINY) / (g + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        bp = math.exp(1 - 1 / ratio)
        scores = [s * bp for s in scores]
    return scores


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..``max_n`` (a list; index 3 is BLEU-4)."""
    _check_corpus(hypotheses, references)
    hyp_len = ref_len = 0
    correct = [0] * max_n
    guessed = [0] * max_n
    for hyp, refs in zip(hypotheses, references):
        h, r, c, g = bleu_statistics(hyp, refs, max_n)
        hyp_len += h
        ref_len += r
        correct = [a + b for a, b in zip(correct, c)]
        guessed = [a + b for a, b in zip(guessed, g)]
    return bleu_from_statistics(hyp_len, ref_len, correct, guessed)


# ------------------------------------------------------------------------------------------------
# ROUGE-L


def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: Tokens, references: Sequence[Tokens], beta: float = 1.2) -> float:
    """Sentence ROUGE-L F-measure against several references (best P and best R)."""
    if not hypothesis:
        return 0.0
    precisions, recalls = [], []
    for ref in references:
        lcs = lcs_length(ref, hypothesis)
        precisions.append(lcs / len(hypothesis))
        recalls.append(lcs / len(ref) if ref else 0.0)
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def corpus_rouge_l(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], beta: float = 1.2) -> float:
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return float("nan")
    return math.fsum(rouge_l(h, r, beta) for h, r in zip(hypotheses, references)) / len(hypotheses)


# ------------------------------------------------------------------------------------------------
# CIDEr-D


def _cider_counts(tokens: Tokens, max_n: int) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        counts.update(_ngrams(tokens, n))
    return counts


def cider_d_scores(
    hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-item CIDEr-D scores; document frequencies come from the references of this corpus."""
    _check_corpus(hypotheses, references)
    ref_counts = [[_cider_counts(r, max_n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*[c.keys() for c in refs]))
    log_n_items = math.log(float(len(references))) if references else 0.0

    def to_vec(counts: Counter):
        vec: list[dict] = [{} for _ in range(max_n)]
        norm = [0.0] * max_n
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            w = float(tf) * (log_n_items - math.log(max(1.0, float(doc_freq[gram]))))
            vec[n][gram] = w
            norm[n] += w * w
            if n == 1:  # pycocoevalcap counts bigrams as the sentence "length"
                length += tf
        return vec, [math.sqrt(v) for v in norm], length

    def sim(vh, nh, lh, vr, nr, lr) -> list[float]:
        delta = float(lh - lr)
        penalty = math.e ** (-(delta**2) / (2 * sigma**2))
        out = []
        for n in range(max_n):
            val = 0.0
            for gram, w in vh[n].items():
                wr = vr[n].get(gram, 0.0)
                val += min(w, wr) * wr
            if nh[n] != 0 and nr[n] != 0:
                val /= nh[n] * nr[n]
            out.append(val * penalty)
        return out

    scores = []
    for hyp, refs in zip(hypotheses, ref_counts):
        vh, nh, lh = to_vec(_cider_counts(hyp, max_n))
        total = [0.0] * max_n
        for rc in refs:
            vr, nr, lr = to_vec(rc)
            total = [a + b for a, b in zip(total, sim(vh, nh, lh, vr, nr, lr))]
        scores.append(sum(total) / max_n / len(refs) * 10.0)
    return scores


def corpus_cider_d(
    hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 4, sigma: float = 6.0
) -> float:
    scores = cider_d_scores(hypotheses, references, max_n, sigma)
    return math.fsum(scores) / len(scores) if scores else float("nan")


# ------------------------------------------------------------------------------------------------
# METEOR, exact match only

METEOR_ALPHA = 0.9
METEOR_BETA = 3.0
METEOR_GAMMA = 0.5


def exact_alignment(hypothesis: Tokens, reference: Tokens) -> list[tuple[int, int]]:
    """One-to-one exact-token alignment, longest runs of consecutive matches first.

    Returns ``(hyp_index, ref_index)`` pairs sorted by ``hyp_index``. Ties between runs of equal
    length go to the earliest position in the hypothesis, then in the reference.
    """
    used_h = [False] * len(hypothesis)
    used_r = [False] * len(reference)
    pairs: list[tuple[int, int]] = []
    while True:
        best = (0, 0, 0)  # (length, i, j)
        # longest common run among unused tokens (dynamic programming over suffix runs)
        prev = [0] * (len(reference) + 1)
        for i in range(len(hypothesis)):
            cur = [0] * (len(reference) + 1)
            if not used_h[i]:
                for j in range(len(reference)):
                    if not used_r[j] and hypothesis[i] == reference[j]:
                        cur[j + 1] = prev[j] + 1
                        if cur[j + 1] > best[0]:
                            best = (cur[j + 1], i, j)
            prev = cur
        length, i_end, j_end = best
        if length == 0:
            break
        for k in range(length):
            used_h[i_end - k] = used_r[j_end - k] = True
            pairs.append((i_end - k, j_end - k))
    return sorted(pairs)


def meteor_statistics(hypothesis: Tokens, reference: Tokens) -> tuple[int, int, int, int]:
    """``(matches, chunks, hyp_len, ref_len)`` of one hypothesis/reference pair."""
    pairs = exact_alignment(hypothesis, reference)
    chunks = 0
    prev = None
    for i, j in pairs:
        if prev is None or i != prev[0] + 1 or j != prev[1] + 1:
            chunks += 1
        prev = (i, j)
    if chunks == 1 and len(pairs) == len(hypothesis) == len(reference):
        chunks = 0  # identical sentences: no fragmentation at all (METEOR 1.5, also in its aggregate)
    return len(pairs), chunks, len(hypothesis), len(reference)


def meteor_from_statistics(
    matches: int, chunks: int, hyp_len: int, ref_len: int,
    alpha: float = METEOR_ALPHA, beta: float = METEOR_BETA, gamma: float = METEOR_GAMMA,
) -> float:
    if matches == 0:
        return 0.0
    p = matches / hyp_len
    r = matches / ref_len
    fmean = p * r / (alpha * p + (1 - alpha) * r)
    penalty = gamma * (chunks / matches) ** beta
    return fmean * (1 - penalty)


def corpus_meteor_exact(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> float:
    """Exact-match-only METEOR, aggregated over the corpus (see the module docstring)."""
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return float("nan")
    total = [0, 0, 0, 0]
    for hyp, refs in zip(hypotheses, references):
        candidates = [meteor_statistics(hyp, r) for r in refs]
        # best reference by sentence score; ties: first reference
        best = max(range(len(candidates)), key=lambda k: (meteor_from_statistics(*candidates[k]), -k))
        total = [a + b for a, b in zip(total, candidates[best])]
    return meteor_from_statistics(*total)


# ------------------------------------------------------------------------------------------------
# all together


def caption_scores(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """All caption metrics on raw strings.

    Args:
        hypotheses: one candidate caption per item.
        references: per item, one reference string or a list of them.

    Returns:
        ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR (exact-match only)", "ROUGE-L",
        "CIDEr-D"}`` → float (NaN for an empty corpus).
    """
    hyps = [tokenize_caption(h) for h in hypotheses]
    refs = [[tokenize_caption(r)] if isinstance(r, str) else [tokenize_caption(x) for x in r] for r in references]
    if not hyps:
        return {k: float("nan") for k in CAPTION_METRIC_NAMES}
    bleu = corpus_bleu(hyps, refs)
    return {
        "BLEU-1": bleu[0],
        "BLEU-2": bleu[1],
        "BLEU-3": bleu[2],
        "BLEU-4": bleu[3],
        METEOR_NAME: corpus_meteor_exact(hyps, refs),
        "ROUGE-L": corpus_rouge_l(hyps, refs),
        "CIDEr-D": corpus_cider_d(hyps, refs),
    }
