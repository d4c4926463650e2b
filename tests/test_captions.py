"""Caption metrics against hand-computed values.

Also checked (outside the test suite, in a throw-away venv) against pycocoevalcap 1.2 on 200
random multi-reference items: BLEU-1..4, ROUGE-L and CIDEr-D identical to the last bit; the
tokenizer identical to the PTB tokenizer on the sentences of ``test_tokenizer_matches_ptb``; and
the exact-match METEOR identical (per segment and corpus aggregate) to the METEOR 1.5 jar run with
``-m exact -p "0.9 3.0 0.5 0.5"``.
"""

import math

import pytest

from samtok.eval.captions import (
    METEOR_NAME,
    caption_scores,
    cider_d_scores,
    corpus_bleu,
    corpus_cider_d,
    corpus_meteor_exact,
    corpus_rouge_l,
    exact_alignment,
    lcs_length,
    meteor_from_statistics,
    meteor_statistics,
    rouge_l,
    strip_grounding_markup,
    tokenize_caption,
)


def t(s):
    return s.split()


def test_bleu_hand_computed():
    # unigrams 5/6 (clipped "the": 2), bigrams 3/5, trigrams 1/4, 4-grams 0/3, equal lengths
    b = corpus_bleu([t("the cat sat on the mat")], [[t("the cat is on the mat")]])
    assert b[0] == pytest.approx(5 / 6, rel=1e-8)
    assert b[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), rel=1e-8)
    assert b[2] == pytest.approx(0.5, rel=1e-8)
    assert b[3] < 1e-3  # no 4-gram: ~0 (pycocoevalcap's 1e-15 smoothing, not exactly 0)


def test_bleu_clipping_brevity_penalty_and_closest_reference():
    assert corpus_bleu([t("the the the")], [[t("the cat")]])[0] == pytest.approx(1 / 3, rel=1e-8)
    b = corpus_bleu([t("the cat")], [[t("the cat is here")]])
    assert b[0] == pytest.approx(math.exp(1 - 4 / 2), rel=1e-8)
    assert b[1] == pytest.approx(math.exp(1 - 4 / 2), rel=1e-8)
    # refs of length 2 and 4 are equally close to a 3-token candidate: the shorter wins, no penalty
    assert corpus_bleu([t("a b c")], [[t("a b"), t("a b c d")]])[0] == pytest.approx(1.0, rel=1e-8)


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
    b = corpus_bleu([t("a b"), t("c d e f")], [[t("a b")], [t("w x y z")]])
    assert b[0] == pytest.approx(2 / 6, rel=1e-8)  # a sentence mean would give 0.5


def test_rouge_l_hand_computed():
    assert lcs_length(t("a b c d"), t("a c d e f")) == 3
    p, r = 3 / 4, 3 / 5
    assert rouge_l(t("a b c d"), [t("a c d e f")]) == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))
    # best precision and best recall may come from different references (pycocoevalcap)
    assert rouge_l(t("a b c d"), [t("a b"), t("a b c d e f g h")]) == pytest.approx(1.0)
    assert rouge_l([], [t("a")]) == 0.0
    assert rouge_l(t("x y"), [t("a b")]) == 0.0
    assert corpus_rouge_l([t("a b"), t("x")], [[t("a b")], [t("y")]]) == pytest.approx(0.5)


def test_cider_d_hand_computed():
    # 2 items: idf of every reference n-gram = log(2) - log(1)
    scores = cider_d_scores([t("a"), t("b")], [[t("a")], [t("c")]])
    assert scores == pytest.approx([2.5, 0.0])  # unigram cosine 1, n = 2..4 empty → mean 1/4, x10
    assert corpus_cider_d([t("a b c d"), t("e f g h")], [[t("a b c d")], [t("e f g h")]]) == pytest.approx(10.0)
    # clipping: the candidate's tf-idf weight of "a" (4 log 2) is clipped to the reference's (log 2);
    # length penalty from the bigram counts 3 vs 0
    s = cider_d_scores([t("a a a a"), t("b")], [[t("a")], [t("b")]])
    assert s[0] == pytest.approx(0.25 * math.exp(-9 / 72) / 4 * 10)
    assert s[1] == pytest.approx(2.5)
    # multiple references are averaged
    s2 = cider_d_scores([t("a"), t("z")], [[t("a"), t("q")], [t("r")]])
    assert s2[0] == pytest.approx(2.5 / 2)


def test_cider_d_single_item_corpus_is_zero_like_pycocoevalcap():
    assert corpus_cider_d([t("a b")], [[t("a b")]]) == 0.0


def test_meteor_exact_hand_computed():
    m, chunks, hl, rl = meteor_statistics(t("a b c d"), t("a b x c d"))
    assert (m, chunks, hl, rl) == (4, 2, 4, 5)
    p, r = 1.0, 0.8
    fmean = p * r / (0.9 * p + 0.1 * r)
    assert meteor_from_statistics(m, chunks, hl, rl) == pytest.approx(fmean * (1 - 0.5 * (2 / 4) ** 3))
    assert corpus_meteor_exact([t("a b c")], [[t("a b c")]]) == pytest.approx(1.0)
    assert corpus_meteor_exact([t("x y")], [[t("a b")]]) == 0.0
    # reversed order: 3 chunks of one word
    assert meteor_statistics(t("c b a"), t("a b c"))[:2] == (3, 3)
    # the best reference is used
    assert corpus_meteor_exact([t("a b c")], [[t("x"), t("a b c")]]) == pytest.approx(1.0)


def test_meteor_alignment_prefers_long_runs():
    # "the cat" must align as one chunk even though the first "the" of the reference comes earlier
    pairs = exact_alignment(t("the cat"), t("the dog and the cat"))
    assert pairs == [(0, 3), (1, 4)]
    assert meteor_statistics(t("the cat"), t("the dog and the cat"))[1] == 1


def test_meteor_corpus_aggregate_sums_statistics():
    hyps, refs = [t("a b x c"), t("c b a e e")], [[t("a b c")], [t("a b c d")]]
    stats = [meteor_statistics(h, r[0]) for h, r in zip(hyps, refs)]
    total = [sum(col) for col in zip(*stats)]
    assert corpus_meteor_exact(hyps, refs) == pytest.approx(meteor_from_statistics(*total))
    assert corpus_meteor_exact(hyps, refs) == pytest.approx(0.5922067901234568)  # METEOR 1.5 jar, -m exact


def test_tokenizer_matches_ptb():
    # expected strings are the output of pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1)
    cases = {
        "A man's dog, sitting on the grass.": "a man 's dog sitting on the grass",
        "Two people don't walk -- they RUN!": "two people do n't walk they run",
        "The black-and-white cat (left) is 3.5 years old; isn't it?":
            "the black-and-white cat -lrb- left -rrb- is 3.5 years old is n't it",
        "\"Quoted\" words... and the end": "quoted words and the end",
        "It's a 10,000-piece puzzle: wow?": "it 's a 10,000-piece puzzle wow",
    }
    for text, expected in cases.items():
        assert " ".join(tokenize_caption(text)) == expected


def test_strip_grounding_markup():
    text = ("<|object_ref_start|>A man<|object_ref_end|><|mt_start|><|mt_0012|><|mt_0300|><|mt_end|> "
            "rides <|object_ref_start|>a horse<|object_ref_end|><|mt_start|><|mt_0001|><|mt_end|>.")
    assert strip_grounding_markup(text) == "A man rides a horse ."


def test_caption_scores_keys_and_identity():
    out = caption_scores(["A dog runs.", "Two cats sleep"], ["a dog runs", ["two cats sleep", "cats asleep"]])
    assert set(out) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", METEOR_NAME, "ROUGE-L", "CIDEr-D"}
    assert METEOR_NAME == "METEOR (exact-match only)"
    assert out["BLEU-1"] == pytest.approx(1.0)
    assert out["BLEU-3"] == pytest.approx(1.0)
    assert out["ROUGE-L"] == pytest.approx(1.0)
    assert out[METEOR_NAME] == pytest.approx(1.0)
    assert out["CIDEr-D"] > 5
    assert all(math.isnan(v) for v in caption_scores([], []).values())
    with pytest.raises(ValueError):
        corpus_bleu([t("a")], [])
