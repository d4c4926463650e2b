import pytest

from samtok.tokenizer.codec import MT_END, MT_START, MaskCodec, code_token

C = MaskCodec()


def span(c0, c1=-1):
    return C.format(c0, c1)


def test_vocabulary_order_and_format():
    toks = C.tokens
    assert len(toks) == 514 and toks[0] == MT_START and toks[-1] == MT_END
    assert toks[1] == "<|mt_0000|>" and toks[256] == "<|mt_0255|>" and toks[257] == "<|mt_0256|>"
    assert toks[512] == "<|mt_0511|>"
    assert span(3, 7) == "<|mt_start|><|mt_0003|><|mt_0263|><|mt_end|>"
    assert span(255, 255) == "<|mt_start|><|mt_0255|><|mt_0511|><|mt_end|>"
    assert span(9) == "<|mt_start|><|mt_0009|><|mt_end|>"
    with pytest.raises(ValueError):
        C.format(256, 0)
    with pytest.raises(ValueError):
        C.format(0, 256)


@pytest.mark.parametrize("c0,c1", [(0, 0), (255, 255), (17, -1), (100, 3)])
def test_round_trip(c0, c1):
    text = f"Sure: {span(c0, c1)}."
    (s,) = C.parse(text).spans
    assert (s.c0, s.c1, s.valid, s.repaired) == (c0, c1, True, False)
    assert text[s.start : s.end] == span(c0, c1)


CASES = [
    # text, expected [(c0, c1, valid, repaired)], ignored
    ("no masks here", [], 0),
    (span(1, 2) + " and " + span(3, 4), [(1, 2, True, False), (3, 4, True, False)], 0),
    ("<|mt_start|><|mt_0003|><|mt_0300|><|mt_0301|><|mt_end|>", [(3, 44, True, False)], 0),  # >2 codes
    ("<|mt_start|><|mt_0003|><|mt_end|>", [(3, -1, True, False)], 0),  # one code
    ("<|mt_start|><|mt_0003|><|mt_0004|><|mt_end|>", [(3, -1, True, False)], 0),  # c1 out of range
    ("<|mt_start|><|mt_0300|><|mt_0301|><|mt_end|>", [(-1, -1, False, False)], 0),  # c0 out of range
    ("<|mt_0003|><|mt_0260|><|mt_end|>", [(3, 4, True, True)], 0),  # missing start
    ("<|mt_start|><|mt_0003|><|mt_0260|>", [(3, 4, True, True)], 0),  # missing end (truncated)
    ("<|mt_start|><|mt_0003|> the rest", [(3, -1, True, True)], 0),  # text closes the span
    ("<|mt_start|><|mt_0001|><|mt_start|><|mt_0002|><|mt_0258|><|mt_end|>",
     [(1, -1, True, True), (2, 2, True, False)], 0),  # nested start
    ("stray <|mt_0003|><|mt_0260|> codes", [], 2),
    ("<|mt_end|> alone", [], 1),
    ("<|mt_start|><|mt_end|>", [], 1),
    ("<|mt_start|> <|mt_0001|> <|mt_0257|> <|mt_end|>", [(1, 1, True, False)], 0),  # blanks allowed
    ("<|mt_9999|><|mt_start|", [], 1),
]


@pytest.mark.parametrize("text, expected, ignored", CASES)
def test_parse_repair_rules(text, expected, ignored):
    res = C.parse(text)
    assert [(s.c0, s.c1, s.valid, s.repaired) for s in res.spans] == expected
    assert res.ignored == ignored


def test_parse_never_raises_on_garbage():
    import random

    rng = random.Random(0)
    pieces = [MT_START, MT_END, "<|mt_0005|>", "<|mt_0261|>", "<|mt_0999|>", "x", " ", "<|mt_", "|>"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        res = C.parse(text)
        for s in res.spans:
            assert 0 <= s.start <= s.end <= len(text)
            if s.valid:
                assert 0 <= s.c0 < 256 and -1 <= s.c1 < 256
    assert C.parse(None).spans == []  # type: ignore[arg-type]


def test_strip_and_codes():
    text = f"a {span(1, 2)} b {span(300 % 256)} c"
    assert C.strip_spans(text) == "a [mask 0] b [mask 1] c"
    assert C.parse_codes(text) == [(1, 2), (44, -1)]
    assert code_token(7) == "<|mt_0007|>"


def test_other_layouts():
    c = MaskCodec(codebook_size=16, depth=3)
    assert len(c.tokens) == 2 + 48
    assert c.format(15, 15) == "<|mt_start|><|mt_0015|><|mt_0031|><|mt_end|>"
    assert c.parse_codes("<|mt_start|><|mt_0015|><|mt_0040|><|mt_end|>") == [(15, -1)]
