"""Rewards on hand-computed cases: answer matching (+ partial credit), format, no-repeat, GCG, IoU, combiner."""

import json
import random

import numpy as np
import pytest

from samtok.core.config import ConfigError, load_config
from samtok.core.errors import SamtokError
from samtok.core.masks import MaskFormatError, encode_rle
from samtok.rl.rewards import (
    RewardSpec,
    RewardWeights,
    answer_matching_reward,
    answer_matching_score,
    build_reward_fn,
    completion_text,
    format_reward,
    format_score,
    gcg_phrase_reward,
    gcg_phrase_score,
    iou_reward,
    mask_set_score,
    no_repeat_reward,
    no_repeat_score,
    parse_groundings,
    partial_credit_reward,
    phrase_similarity,
    trl_reward_funcs,
)
from samtok.tokenizer.codec import MT_END, MT_START, MaskCodec

C = MaskCodec()
A, B, E = C.format(1, 2), C.format(3, 4), C.format(5, 5)
A_FIRST = C.format(1, 9)  # same first code as A, other second code
A_ONE = C.format(1)  # one-code span (c1 = -1)
INVALID = f"{MT_START}<|mt_0300|><|mt_0301|>{MT_END}"  # c0 out of range: counted, never matched
REF_S, REF_E = "<|object_ref_start|>", "<|object_ref_end|>"


def answer(*spans, label="the chair"):
    """The release's mask-generation answer format (spec §2)."""
    if not spans:
        return "No target."
    items = ",\n".join(json.dumps({"mask_2d": s, "label": label}) for s in spans)
    return f"```json\n[{items}]\n```"


def trl_kwargs(completions, ground_truth, **extra):
    """What TRL 1.16 passes to a reward function (see test_grpo_parity for the real call)."""
    n = len(completions)
    return dict(prompts=["p"] * n, completions=completions, completion_ids=[[1, 2]] * n,
                ground_truth=ground_truth, trainer_state=None, log_extra=lambda *a: None,
                log_metric=lambda *a: None, **extra)


# ------------------------------------------------------------------------------ answer matching


@pytest.mark.parametrize("pred, gt, expected", [
    (answer(A, B), answer(A, B), 1.0),  # exact match
    (answer(B, A), answer(A, B), 1.0),  # order does not matter
    (answer(A, A, B), answer(A, B), 2 / 3),  # duplicates count in N_pred: 2 TP / max(3, 2)
    (answer(A, A), answer(A), 1 / 2),  # 1 unique TP / max(2, 1)
    (answer(A, B, E), answer(A, B), 2 / 3),  # an extra span
    (answer(A), answer(A, B), 1 / 2),  # a missing span
    (answer(E), answer(A, B), 0.0),  # wrong span
    (answer(), answer(), 1.0),  # both empty: a correct "No target."
    ("", answer(), 1.0),  # no text and no target: no span either way
    (answer(), answer(A), 0.0),  # "No target." but GT has a target
    (answer(A), answer(), 0.0),  # spans but GT is "No target."
    (answer(A, INVALID), answer(A), 1 / 2),  # an invalid span is a prediction that never matches
    (INVALID, answer(), 0.0),  # an invalid span is still a non-empty prediction
    (answer(A_ONE), answer(A), 0.0),  # a one-code span (1, -1) is not (1, 2)
    (answer(A_ONE), answer(A_ONE), 1.0),
    (f"{MT_START}<|mt_0001|><|mt_0258|>", answer(A), 1.0),  # truncated (end repaired) still counts
    (answer(A), answer(A, A), 1.0),  # GT repeats collapse: a copy of the GT always scores 1
    (answer(A), answer(A) + INVALID, 1.0),  # invalid GT spans are dropped
])
def test_answer_matching_hand_computed(pred, gt, expected):
    assert answer_matching_score(pred, gt) == pytest.approx(expected)


def test_answer_matching_never_raises_on_malformed_text():
    rng = random.Random(0)
    pieces = [MT_START, MT_END, "<|mt_0001|>", "<|mt_0258|>", "<|mt_0999|>", "<|mt_", "|>", "x", " ", "{", "]"]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 15)))
        r = answer_matching_score(text, answer(A, B))
        assert 0.0 <= r <= 1.0
    weird = [None, 3, {"role": "user"}, [{"role": "assistant", "content": None}], [], "<|mt_start|"]
    assert answer_matching_reward(completions=weird, ground_truth=[answer()] * len(weird)) == [1.0] * len(weird)


def test_answer_matching_reward_trl_contract_and_conversational():
    comps = [answer(A, B), [{"role": "assistant", "content": answer(A)}],
             [{"role": "assistant", "content": [{"type": "text", "text": answer(A, B)}]}], answer()]
    gts = [answer(A, B)] * 3 + [answer()]
    out = answer_matching_reward(**trl_kwargs(comps, gts, image_key=["k"] * 4))
    assert out == [1.0, 0.5, 1.0, 1.0] and all(isinstance(v, float) for v in out)
    with pytest.raises(SamtokError, match="ground_truth"):
        answer_matching_reward(completions=comps)
    with pytest.raises(SamtokError, match="entries"):
        answer_matching_reward(completions=comps, ground_truth=gts[:2])


def test_completion_text():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "tool", "content": "t"},
                            {"role": "assistant", "content": "final"}]) == "final"
    assert completion_text([{"role": "user", "content": "q"}]) == ""
    assert completion_text({"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "t"}]}) == "t"
    assert completion_text(None) == ""


def test_answer_tag_scoping():
    text = f"<think>maybe {A}</think><answer>{answer(B)}</answer>"
    assert answer_matching_reward(completions=[text], ground_truth=[answer(B)]) == [0.5]
    assert answer_matching_reward(completions=[text], ground_truth=[answer(B)], from_answer_tag=True) == [1.0]


# ------------------------------------------------------------------------------ partial credit


@pytest.mark.parametrize("pred, gt, expected", [
    (answer(A_FIRST, B), answer(A, B), (1 + 0.4) / 2),
    (answer(A_ONE), answer(A), 0.4),  # one-code prediction, first code right
    (answer(A_FIRST, C.format(1, 8)), answer(A), 0.4 / 2),  # each GT span gives credit once
    (answer(A_FIRST, A), answer(A, E), 1 / 2),  # exact matches first: A is taken by the exact A
    (answer(A_FIRST, A), answer(A, C.format(1, 7)), (1 + 0.4) / 2),  # A_FIRST takes the other c0=1 span
    (answer(A_FIRST, A_FIRST), answer(A), 0.4 / 2),  # duplicates still count in N_pred
    (answer(E), answer(A), 0.0),
    (answer(), answer(), 1.0),
])
def test_partial_credit_hand_computed(pred, gt, expected):
    assert partial_credit_reward(completions=[pred], ground_truth=[gt]) == [pytest.approx(expected)]


def test_partial_credit_is_configurable():
    comps, gts = [answer(A_FIRST, B)], [answer(A, B)]
    assert partial_credit_reward(completions=comps, ground_truth=gts, credit=0.5) == [0.75]
    assert partial_credit_reward(completions=comps, ground_truth=gts, credit=0.0) == \
        answer_matching_reward(completions=comps, ground_truth=gts)
    with pytest.raises(SamtokError):
        partial_credit_reward(completions=comps, ground_truth=gts, credit=1.5)


# ------------------------------------------------------------------------------ format, no-repeat


@pytest.mark.parametrize("text, expected", [
    ("<think>reasoning</think><answer>No target.</answer>", 1.0),
    ("<think>\nreasoning\n</think>\n<answer>\n" + answer(A) + "\n</answer>\n", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<answer>x</answer>", 0.0),  # no think block
    ("<think>x</think>", 0.0),  # no answer block
    ("<answer>x</answer><think>y</think>", 0.0),  # wrong order
    ("<think>x</think><answer>y</answer> trailing", 0.0),
    ("preamble <think>x</think><answer>y</answer>", 0.0),
    ("<think>x</think>between<answer>y</answer>", 0.0),
    ("<think>x</think><answer>y</answer><answer>z</answer>", 0.0),
    ("<think>a<think>b</think><answer>y</answer>", 0.0),  # nested tag
    ("<think>x</think><answer>y", 0.0),  # unclosed
    ("", 0.0),
])
def test_format_score(text, expected):
    assert format_score(text) == expected


def test_format_reward_conversational():
    good = "<think>x</think><answer>y</answer>"
    assert format_reward(**trl_kwargs([good, [{"role": "assistant", "content": good}], "y"], ["", "", ""])) == \
        [1.0, 1.0, 0.0]


@pytest.mark.parametrize("text, expected", [
    (A * 3, 1.0),
    (A * 4, 0.0),
    (A * 3 + B * 3, 1.0),
    (A + B + A + B + A + B + A, 0.0),  # repeats need not be adjacent
    (INVALID * 4, 0.0),  # garbage spans repeating count too
    (A_ONE * 2 + A * 2, 1.0),  # (1, -1) and (1, 2) are different spans
    ("No target.", 1.0),
])
def test_no_repeat(text, expected):
    assert no_repeat_score(text) == expected


def test_no_repeat_threshold_configurable():
    assert no_repeat_reward(completions=[A * 2], max_repeats=1) == [0.0]
    assert no_repeat_reward(completions=[A * 4], max_repeats=4) == [1.0]
    with pytest.raises(SamtokError):
        no_repeat_reward(completions=[A], max_repeats=0)


# ------------------------------------------------------------------------------ grounded captions


def ground(phrase, span):
    return f"{REF_S}{phrase}{REF_E}{span}"


GCG_GT = f"A {ground('man', A)} is riding {ground('a horse', B)} on the beach."


def test_parse_groundings():
    gs = parse_groundings(f"{ground('man', A)} next to {B} and {ground('dog', '')} {REF_S}cat{REF_E} {E}")
    assert [(g.codes, g.phrase) for g in gs] == [((1, 2), "man"), ((3, 4), None), ((5, 5), "cat")]


@pytest.mark.parametrize("pred, expected", [
    (GCG_GT, 1.0),
    (f"{ground('man', A)} and {ground('a horse', B)}", 1.0),  # caption wording outside phrases is free
    (f"{ground('woman', A)} {ground('a horse', B)}", 2 * 1 / 4),  # one phrase wrong: M=1
    (f"{ground('man', A)} {ground('a horse', E)}", 2 * 1 / 4),  # one span wrong
    (f"{ground('man', B)} {ground('a horse', A)}", 0.0),  # spans swapped between phrases
    (f"{GCG_GT} and {C.format(7, 7)}", 2 * 2 / 5),  # an extra ungrounded span is a prediction
    (f"{ground('man', A)} {ground('man', A)}", 2 * 1 / 4),  # a duplicate pair matches once
    (f"{ground('A Man!', A)} {ground('a  HORSE', B)}", 1.0),  # case, punctuation, articles ignored
    (f"{ground('man', A)}", 2 * 1 / 3),  # a missing pair
    ("A man is riding a horse.", 0.0),  # no grounding at all
    (f"{ground('man', INVALID)} {ground('a horse', B)}", 2 * 1 / 4),
])
def test_gcg_phrase_score(pred, expected):
    assert gcg_phrase_score(pred, GCG_GT) == pytest.approx(expected)


def test_gcg_phrase_threshold_and_empty_cases():
    assert phrase_similarity("brown horse", "a horse") == pytest.approx(2 / 3)  # {brown, horse} vs {horse}
    assert phrase_similarity("the horse", "Horse.") == 1.0 and phrase_similarity(None, None) == 1.0
    assert phrase_similarity("horse", None) == 0.0
    pred = f"{ground('man', A)} {ground('brown horse', B)}"
    assert gcg_phrase_score(pred, GCG_GT) == pytest.approx(0.5)
    assert gcg_phrase_score(pred, GCG_GT, phrase_threshold=0.6) == pytest.approx(1.0)
    assert gcg_phrase_score("A plain caption.", "Another plain caption.") == 1.0
    assert gcg_phrase_score(GCG_GT, "A plain caption.") == 0.0
    with pytest.raises(SamtokError):
        gcg_phrase_reward(completions=[pred], ground_truth=[GCG_GT], phrase_threshold=0.0)


def test_gcg_reward_reads_special_tokens_from_ids():
    """TRL strips special tokens (Qwen's object-ref markers) from completions; ids keep them."""

    class ToyTokenizer:
        def decode(self, ids, skip_special_tokens=False):
            assert skip_special_tokens is False
            return GCG_GT if ids == [7] else ""

    stripped = GCG_GT.replace(REF_S, "").replace(REF_E, "")
    kw = trl_kwargs([stripped], [GCG_GT])
    assert gcg_phrase_reward(**kw) == [0.0]
    kw["completion_ids"] = [[7]]
    assert gcg_phrase_reward(**kw, tokenizer=ToyTokenizer()) == [1.0]


# ------------------------------------------------------------------------------ IoU (toy decoder)


def toy_masks():
    left = np.zeros((4, 4), bool)
    left[:, :2] = True  # 8 px
    top = np.zeros((4, 4), bool)
    top[:2, :] = True  # 8 px, 4 shared with left
    left3 = np.zeros((4, 4), bool)
    left3[:, :3] = True  # 12 px, contains left
    return {(1, 2): left, (3, 4): top, (1, 9): left3, (5, 5): np.zeros((4, 4), bool)}


class ToyDecoder:
    def __init__(self):
        self.masks, self.calls = toy_masks(), []

    def __call__(self, image_key, codes):
        self.calls.append((image_key, codes))
        return self.masks[codes]


@pytest.mark.parametrize("pred, gt, mode, expected", [
    (answer(A), answer(A), "matched", 1.0),
    (answer(A_FIRST), answer(A), "matched", 8 / 12),
    (answer(A, B), answer(A), "matched", (1 + 0) / 2),  # B is left unpaired (A is taken)
    (answer(B), answer(A), "matched", 4 / 12),
    (answer(A, B), answer(A), "mean_best", 1.0),  # extra predictions not penalised
    (answer(A, B), answer(A), "union", 8 / 12),
    (answer(A, B), answer(A, B), "union", 1.0),
    (answer(A, INVALID), answer(A), "matched", 1 / 2),  # invalid span: an empty prediction
    (answer(), answer(), "matched", 1.0),
    (answer(), answer(A), "matched", 0.0),
    (answer(A), answer(), "matched", 0.0),
    (INVALID, answer(), "union", 1.0),  # nothing decodable: empty union, like an empty GT
    (answer(E), answer(), "union", 1.0),  # decodes to an empty mask
    (answer(A), answer(), "union", 0.0),
])
def test_iou_reward_decoding_gt_spans(pred, gt, mode, expected):
    dec = ToyDecoder()
    out = iou_reward(**trl_kwargs([pred], [gt], image_key=["img0"]), decode=dec, mode=mode)
    assert out == [pytest.approx(expected)]
    assert all(k == "img0" for k, _ in dec.calls)


def test_iou_reward_with_gt_mask_column_and_cache():
    dec = ToyDecoder()
    m = toy_masks()
    gt_masks = [[m[(1, 2)]], [encode_rle(m[(1, 2)])], np.stack([m[(1, 2)], m[(3, 4)]])]
    comps = [answer(A, A, A), answer(A_FIRST), answer(A, B)]
    out = iou_reward(completions=comps, gt_masks=gt_masks, image_key=["x", "x", "y"], decode=dec,
                     gt_mask_column="gt_masks")
    assert out == [pytest.approx(1 / 3), pytest.approx(8 / 12), pytest.approx(1.0)]
    # One decoder call per distinct (image, codes): (x, A), (x, A_FIRST), (y, A), (y, B).
    assert sorted(dec.calls) == [("x", (1, 2)), ("x", (1, 9)), ("y", (1, 2)), ("y", (3, 4))]


def test_iou_reward_errors():
    dec = ToyDecoder()
    with pytest.raises(SamtokError, match="decode"):
        iou_reward(completions=[A], ground_truth=[A], image_key=["k"])
    with pytest.raises(SamtokError, match="image_key"):
        iou_reward(completions=[A], ground_truth=[A], decode=dec)
    with pytest.raises(MaskFormatError):
        iou_reward(completions=[A], gt_masks=[[np.ones((5, 5), bool)]], image_key=["k"], decode=dec,
                   gt_mask_column="gt_masks")
    with pytest.raises(SamtokError):
        mask_set_score([], [], mode="dice")


# ------------------------------------------------------------------------------ combination


def test_default_spec_is_the_paper_reward():
    comps, gts = [answer(A, A, B), answer(), answer(A)], [answer(A, B), answer(), answer()]
    fn = build_reward_fn()
    assert fn(**trl_kwargs(comps, gts)) == answer_matching_reward(completions=comps, ground_truth=gts)
    assert fn.__name__ == "samtok_reward"


def test_weighted_sum_and_components():
    spec = RewardSpec(weights=RewardWeights(answer_matching=1.0, format=0.5, no_repeat=0.25),
                      from_answer_tag=True)
    fn = build_reward_fn(spec)
    comps = [f"<think>x</think><answer>{answer(A)}</answer>", answer(A) + A * 4]
    logged = []
    kw = trl_kwargs(comps, [answer(A), answer(A)])
    kw["log_metric"] = lambda name, value: logged.append((name, value))
    total = fn(**kw)
    # 1: match 1, format 1, no-repeat 1 -> 1.75;  2: 1 TP / 5 spans, no format, A repeated 5 times -> 0.2
    assert total == [pytest.approx(1.75), pytest.approx(0.2)]
    assert fn.last.components == {"answer_matching": [1.0, 0.2], "format": [1.0, 0.0], "no_repeat": [1.0, 0.0]}
    assert dict(logged) == {"reward_components/answer_matching": pytest.approx(0.6),
                            "reward_components/format": 0.5, "reward_components/no_repeat": 0.5}
    spec.log_components = False
    logged.clear()
    build_reward_fn(spec)(**kw)
    assert logged == []


def test_every_component_through_the_combiner():
    spec = RewardSpec(weights=RewardWeights(answer_matching=1, partial_credit=1, format=1, no_repeat=1,
                                            gcg_phrase=1, iou=1), ground_truth_column="answer")
    fn = build_reward_fn(spec, decode=ToyDecoder())
    kw = trl_kwargs([answer(A_FIRST)], None, answer=[answer(A)], image_key=["k"])
    del kw["ground_truth"]
    parts = fn.breakdown(**kw).components
    assert parts == {"answer_matching": [0.0], "partial_credit": [0.4], "format": [0.0], "no_repeat": [1.0],
                     "gcg_phrase": [0.0], "iou": [pytest.approx(8 / 12)]}
    assert fn(**kw) == [pytest.approx(0.4 + 1.0 + 8 / 12)]


def test_spec_validation_and_yaml_overrides():
    with pytest.raises(SamtokError, match="decode"):
        build_reward_fn(RewardSpec(weights=RewardWeights(iou=1.0)))
    with pytest.raises(SamtokError, match="nothing"):
        build_reward_fn(RewardSpec(weights=RewardWeights(answer_matching=0.0)))
    with pytest.raises(SamtokError):
        build_reward_fn(RewardSpec(iou_mode="dice"))
    with pytest.raises(SamtokError):
        build_reward_fn(RewardSpec(partial_credit=2.0))
    spec = load_config(RewardSpec, overrides=["weights.format=0.5", "weights.answer_matching=0", "max_repeats=5"])
    assert (spec.weights.format, spec.weights.answer_matching, spec.max_repeats) == (0.5, 0.0, 5)
    with pytest.raises(ConfigError):
        load_config(RewardSpec, overrides=["weights.fromat=0.5"])


def test_trl_reward_funcs():
    spec = RewardSpec(weights=RewardWeights(answer_matching=1.0, no_repeat=0.5))
    funcs, weights = trl_reward_funcs(spec)
    assert [f.__name__ for f in funcs] == ["answer_matching", "no_repeat"] and weights == [1.0, 0.5]
    kw = trl_kwargs([answer(A) + A * 4], [answer(A)])
    assert [f(**kw) for f in funcs] == [[0.2], [0.0]]
