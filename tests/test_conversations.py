"""Conversations for every task (spec §2): exact answer strings, ordering, zoom-in crops, dropping, determinism."""

import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from samtok.core.masks import encode_rle
from samtok.data.conversations import (
    ChatExample,
    ConversationBuildError,
    ConversationConfig,
    ImageRef,
    TurnGroup,
    add_distractor_categories,
    box_area_ratio,
    build_example,
    crop_key,
    crop_mask,
    fill_expression,
    group_turns,
    load_image_ref,
    order_by_position,
    prompt_only,
    prompts_per_turn,
    region_crop_box,
    upscaled_size,
)
from samtok.data.pretokenize import CodeTable, MissingCodeError
from samtok.data.records import (
    ConversationSample,
    GroundedCaptionSample,
    ImageRecord,
    InstanceSegSample,
    MaskAnn,
    MultiRoundSample,
    Phrase,
    ReferringSample,
    RegionCaptionSample,
    Relation,
    Round,
    SceneGraphSample,
)

W, H = 100, 80
BOXES = {  # inclusive x0, y0, x1, y1
    "a": (10, 10, 29, 29),  # 400 px: ratio 0.05
    "b": (60, 5, 89, 24),
    "c": (10, 50, 29, 69),  # same centre x as a, lower
    "d": (0, 0, 99, 39),  # ratio 0.5
    "e": (40, 40, 89, 79),  # ratio 0.25: zoomed in evaluation (< 0.3), not in training (>= 0.2)
}
CODES = {"a": (1, 2), "b": (3, 4), "c": (5, 6), "d": (7, 8), "e": (9, 10), "a@crop": (11, 12), "e@crop": (13, 14),
         "b@crop": (15, 16)}
CROP = dict(crop_min_side=40, crop_context=1.5, crop_min_short_side=96)


def S(c0, c1):
    return f"<|mt_start|><|mt_{c0:04d}|><|mt_{256 + c1:04d}|><|mt_end|>"


def rect(box):
    m = np.zeros((H, W), dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "img1.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(p)
    return p


@pytest.fixture(scope="module")
def record(image_path):
    anns = [MaskAnn(k, encode_rle(rect(b)), category={"a": "square", "c": "square", "b": "bar"}.get(k, "thing"))
            for k, b in BOXES.items()]
    return ImageRecord(source="s", image_id="img1", file_name=str(image_path), height=H, width=W, anns=anns)


def table(codes=None, **kw):
    kw.setdefault("crop_spec", ConversationConfig(**CROP).crop_spec())
    return CodeTable.from_dict({("s", "img1", k): v for k, v in (codes or CODES).items()}, **kw)


def cfg(**kw):
    base = dict(referring_templates=["Please segment {X} in this image."],
                region_caption_templates=["Give a detailed description of this region {region}."],
                gcg_templates=["Describe the image with masks."], ov_templates=["Segment these: {categories}."],
                scene_graph_templates=["Give the scene graph."], **CROP)
    base.update(kw)
    return ConversationConfig(**base).validate()


def build(sample, record, codes=None, conf=None, seed=0):
    return build_example(sample, record, codes or table(), conf or cfg(), np.random.default_rng(seed))


def ref(**kw):
    return ReferringSample(source="s", image_id="img1", sample_id="r", **kw)


# ------------------------------------------------------------------------------------------------ referring


def test_res_golden(record):
    ex = build(ref(expression="the red square", target_ids=["a"]), record)
    assert ex.messages == [
        {"role": "user", "content": "<image>\nPlease segment the red square in this image."},
        {"role": "assistant", "content": '```json\n[{"mask_2d": "' + S(1, 2) + '", "label": "the red square"}]\n```'},
    ]
    assert ex.task == "res" and ex.targets == [["a"]] and ex.answer == ex.messages[-1]["content"]
    assert ex.images == [ImageRef(path=record.file_name, crop=None, min_short_side=0, size=(H, W))]


def test_gres_several_targets_sorted_left_to_right_then_top_to_bottom_labelled_one_of_the(record):
    ex = build(ref(expression="squares", target_ids=["b", "c", "a"], generalized=True), record)
    assert ex.answer == (
        '```json\n[{"mask_2d": "' + S(1, 2) + '", "label": "one of the squares"},\n'
        '{"mask_2d": "' + S(5, 6) + '", "label": "one of the squares"},\n'
        '{"mask_2d": "' + S(3, 4) + '", "label": "one of the squares"}]\n```')
    assert ex.task == "gres" and ex.targets == [["a", "c", "b"]]


def test_gres_no_target_is_exactly_no_target(record):
    ex = build(ref(expression="a purple star", target_ids=[], generalized=True), record)
    assert ex.answer == "No target." and ex.targets == [[]] and ex.meta["no_target"] is True


def test_gres_single_target_keeps_the_expression(record):
    ex = build(ref(expression="the bar", target_ids=["b"], generalized=True), record)
    assert '"label": "the bar"' in ex.answer


@pytest.mark.parametrize("template,expression,expected", [
    ("Please segment {X} in this image.", "the red blob", "Please segment the red blob in this image."),
    ("Can you segment the {X} in this image?", "red blob", "Can you segment the red blob in this image?"),
    ("Can you segment the {X} in this image?", "the red blob", "Can you segment the red blob in this image?"),
    ("Where is the {X} in this picture? Please respond with a segmentation mask.", "all bars",
     "Where is all bars in this picture? Please respond with a segmentation mask."),
    ("one of the {X}", "two people", "one of the two people"),
    ("one of the {X}", "the cups", "one of the cups"),
    ("The {X} please", "all bars", "All bars please"),
])
def test_fill_expression(template, expression, expected):
    assert fill_expression(template, expression) == expected


def test_order_by_position_ties_break_on_y_then_id():
    boxes = {"x": (0, 10, 10, 20), "y": (0, 0, 10, 5), "z": (20, 0, 30, 5), "w": (0, 0, 10, 5)}
    assert order_by_position(["z", "x", "y", "w"], boxes) == ["w", "y", "x", "z"]


# ------------------------------------------------------------------------------------------------ GCG


def test_gcg_golden(record):
    caption = "A red square above a blue square and two bars."
    s = GroundedCaptionSample(source="s", image_id="img1", sample_id="g", caption=caption, phrases=[
        Phrase(21, 32, ["c"]), Phrase(2, 12, ["a"]), Phrase(37, 45, ["b", "d"])])
    ex = build(s, record)
    assert caption[2:12] == "red square" and caption[21:32] == "blue square" and caption[37:45] == "two bars"
    assert ex.answer == ("A <|object_ref_start|>red square<|object_ref_end|>" + S(1, 2) + " above a "
                         "<|object_ref_start|>blue square<|object_ref_end|>" + S(5, 6) + " and "
                         "<|object_ref_start|>two bars<|object_ref_end|>" + S(7, 8) + S(3, 4) + ".")
    assert ex.messages[0]["content"] == "<image>\nDescribe the image with masks."
    assert ex.targets == [["a", "c", "d", "b"]]  # phrase order; within a phrase left to right


def test_gcg_overlapping_phrases_are_refused(record):
    s = GroundedCaptionSample(source="s", image_id="img1", sample_id="g", caption="a red square",
                              phrases=[Phrase(0, 5, ["a"]), Phrase(2, 12, ["c"])])
    with pytest.raises(ConversationBuildError, match="overlaps"):
        build(s, record)


# ------------------------------------------------------------------------------------------------ regions


def region(ann_id, caption="A thing.", question=""):
    return RegionCaptionSample(source="s", image_id="img1", sample_id="rc", ann_id=ann_id, caption=caption,
                               question=question)


def test_region_caption_large_region_has_no_zoom(record):
    ex = build(region("d", "A big thing."), record)
    assert ex.messages == [
        {"role": "user", "content": "<image>\nGive a detailed description of this region " + S(7, 8) + "."},
        {"role": "assistant", "content": "A big thing."}]
    assert len(ex.images) == 1 and ex.meta["zoom"] is False and ex.task == "region_caption"


def test_region_caption_small_region_gets_the_crop_with_its_own_codes(record):
    ex = build(region("a"), record)
    # box (10,10,29,29): sides max(40, ceil(20 x 1.5)) = 40, centred then clamped at 0 -> (0, 0, 39, 39)
    assert ex.images == [ImageRef(record.file_name, None, 0, (H, W)), ImageRef(record.file_name, (0, 0, 39, 39), 96, (H, W))]
    assert ex.messages[0]["content"] == ("<image>\nZoomed-in view of the region: <image> " + S(11, 12) + "\n"
                                         "Give a detailed description of this region " + S(1, 2) + ".")
    assert ex.meta["zoom"] is True and ex.meta["crop"] == [0, 0, 39, 39]


def test_zoom_threshold_is_0_2_in_training_and_0_3_in_evaluation(record):
    assert box_area_ratio(BOXES["e"], W, H) == 0.25
    train = build(region("e"), record)
    evaluation = build(region("e"), record, conf=cfg().for_eval())
    assert len(train.images) == 1
    assert len(evaluation.images) == 2 and S(13, 14) in evaluation.messages[0]["content"]
    assert ConversationConfig().region_crop_ratio == 0.2 and ConversationConfig().eval_region_crop_ratio == 0.3
    assert ConversationConfig().crop_min_side == 140 and ConversationConfig().crop_min_short_side == 280


def test_region_vqa_puts_the_span_after_this_region(record):
    ex = build(region("d", "red", "What color is this region?"), record)
    assert ex.messages[0]["content"] == "<image>\nWhat color is this region " + S(7, 8) + "?"
    assert ex.answer == "red" and ex.task == "region_vqa"
    other = build(region("d", "top", "Where is this object?"), record)
    assert other.messages[0]["content"] == "<image>\nRegarding the region " + S(7, 8) + ": Where is this object?"


def test_missing_crop_codes_and_mismatched_crop_settings_are_clear_errors(record):
    codes = {k: v for k, v in CODES.items() if k != "a@crop"}
    with pytest.raises(MissingCodeError, match="zoom-in crop of mask s/img1/a is not in"):
        build(region("a"), record, codes=table(codes))
    with pytest.raises(ConversationBuildError, match="re-run samtok pretokenize"):
        build(region("a"), record, codes=table(crop_spec={"min_side": 140, "context": 1.5, "min_short_side": 280}))


def test_region_crop_box_is_a_pure_function_containing_the_box():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        min_side, context = int(rng.integers(1, 300)), float(rng.choice([1.0, 1.25, 1.5, 2.0]))
        c = region_crop_box((x0, y0, x1, y1), w, h, min_side, context)
        assert c == region_crop_box((x0, y0, x1, y1), w, h, min_side, context)
        assert 0 <= c[0] <= x0 and x1 <= c[2] < w and 0 <= c[1] <= y0 and y1 <= c[3] < h
        assert c[2] - c[0] + 1 == min(w, max(min_side, math.ceil((x1 - x0 + 1) * context)))
        assert c[3] - c[1] + 1 == min(h, max(min_side, math.ceil((y1 - y0 + 1) * context)))
    assert region_crop_box(BOXES["b"], W, H, 40, 1.5) == (52, 0, 96, 39)  # shifted to stay inside


def test_upscaled_size_reaches_the_short_side_and_never_downscales():
    assert upscaled_size(40, 40, 96) == (96, 96)
    assert upscaled_size(45, 40, 96) == (108, 96)
    assert upscaled_size(300, 200, 280) == (420, 280)
    assert upscaled_size(140, 500, 280) == (280, 1000)
    assert upscaled_size(500, 400, 280) == (500, 400)
    assert upscaled_size(50, 60, 0) == (50, 60)


def test_load_image_ref_crops_then_upscales_like_pil(image_path):
    ref = ImageRef(str(image_path), (52, 0, 96, 39), 96)
    img = load_image_ref(ref)
    expected = Image.open(image_path).convert("RGB").crop((52, 0, 97, 40)).resize((108, 96), Image.BICUBIC)
    assert img.size == (108, 96) and ref.output_size() == (96, 108)
    assert np.array_equal(np.asarray(img), np.asarray(expected))
    assert np.array_equal(np.asarray(load_image_ref(ImageRef(str(image_path)))), np.asarray(Image.open(image_path)))
    m = crop_mask(rect(BOXES["b"]), (52, 0, 96, 39), 96)
    assert m.shape == (96, 108) and m.any()
    assert crop_key("17") == "17@crop"


# ------------------------------------------------------------------------------------------------ multi-round, scene graphs, OV, ready-made


def test_multi_round_golden(record):
    s = MultiRoundSample(source="s", image_id="img1", sample_id="m", rounds=[
        Round("Segment the red square.", ["a"], [], "red square"),
        Round("Now segment the object below <region0>.", ["c"], ["a"], "blue square"),
        Round("Segment what is right of <region0> and <region1>.", ["b", "e"], ["a", "c"], "objects"),
        Round("Anything purple?", [], [], ""),
    ])
    ex = build(s, record)
    one = '```json\n[{"mask_2d": "%s", "label": "%s"}]\n```'
    assert ex.messages == [
        {"role": "user", "content": "<image>\nSegment the red square."},
        {"role": "assistant", "content": one % (S(1, 2), "red square")},
        {"role": "user", "content": "Now segment the object below " + S(1, 2) + "."},
        {"role": "assistant", "content": one % (S(5, 6), "blue square")},
        {"role": "user", "content": "Segment what is right of " + S(1, 2) + " and " + S(5, 6) + "."},
        {"role": "assistant", "content": '```json\n[{"mask_2d": "' + S(9, 10) + '", "label": "one of the objects"},\n'
                                         '{"mask_2d": "' + S(3, 4) + '", "label": "one of the objects"}]\n```'},
        {"role": "user", "content": "Anything purple?"},
        {"role": "assistant", "content": "No target."},
    ]
    assert ex.targets == [["a"], ["c"], ["e", "b"], []]


def test_scene_graph_golden(record):
    s = SceneGraphSample(source="s", image_id="img1", sample_id="sg",
                         relations=[Relation("a", "above", "c"), Relation("b", "right of", "a")],
                         labels={"a": "red square", "c": "blue square"})
    ex = build(s, record)
    assert ex.answer == (
        '```json\n[{"subject": {"mask_2d": "' + S(1, 2) + '", "label": "red square"}, "predicate": "above", '
        '"object": {"mask_2d": "' + S(5, 6) + '", "label": "blue square"}},\n'
        '{"subject": {"mask_2d": "' + S(3, 4) + '", "label": "bar"}, "predicate": "right of", '
        '"object": {"mask_2d": "' + S(1, 2) + '", "label": "red square"}}]\n```')
    assert ex.messages[0]["content"] == "<image>\nGive the scene graph." and ex.targets == [["a", "c", "b", "a"]]


def test_scene_graph_relations_are_fitted_so_no_span_repeats_more_than_three_times(record):
    rels = [Relation("a", "left of", "b"), Relation("a", "above", "c"), Relation("a", "near", "e"),
            Relation("a", "in", "d"), Relation("b", "above", "e")]
    ex = build(SceneGraphSample(source="s", image_id="img1", sample_id="sg", relations=rels), record)
    assert ex.answer.count(S(1, 2)) == 3 and ex.meta["relations_dropped"] == 1
    assert [r[:3] for r in ex.meta["relations"]][-1] == ["b", "above", "e"]
    dropped = build(SceneGraphSample(source="s", image_id="img1", sample_id="sg", relations=rels), record,
                    conf=cfg(scene_graph_fit_repeats=False))
    assert dropped is None


def test_ov_seg_golden_with_absent_categories(record):
    s = InstanceSegSample(source="s", image_id="img1", sample_id="ov", categories=["square", "bar", "circle"],
                          targets={"square": ["c", "a"], "bar": ["b"]})
    ex = build(s, record)
    assert ex.messages[0]["content"] == "<image>\nSegment these: square, bar, circle."
    assert ex.answer == ('```json\n[{"mask_2d": "' + S(1, 2) + '", "label": "square"},\n'
                         '{"mask_2d": "' + S(5, 6) + '", "label": "square"},\n'
                         '{"mask_2d": "' + S(3, 4) + '", "label": "bar"}]\n```')
    assert ex.meta["absent"] == ["circle"] and ex.targets == [["a", "c", "b"]]
    none = build(InstanceSegSample(source="s", image_id="img1", sample_id="ov", categories=["star"], targets={}), record)
    assert none.answer == "No target."


def test_add_distractor_categories_is_seeded_and_adds_absent_ones():
    s = InstanceSegSample(source="s", image_id="img1", sample_id="ov", categories=["square", "circle"],
                          targets={"square": ["a"]})
    pool = ["square", "bar", "circle", "star", "ring"]
    one = add_distractor_categories(s, pool, 3, np.random.default_rng(1))
    assert one == add_distractor_categories(s, pool, 3, np.random.default_rng(1))
    assert len(one.categories) == 4  # circle is already absent: 2 added
    assert set(one.categories) >= {"square", "circle"} and set(one.categories) <= set(pool)
    assert one.targets == s.targets


def test_ready_made_conversation_is_used_as_is(record):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is here?"},
            {"role": "assistant", "content": "A thing " + S(1, 2) + "."}]
    s = ConversationSample(source="s", image_id="img1", sample_id="cv", messages=msgs)
    ex = build(s, record)
    assert ex.messages == [msgs[0], {"role": "user", "content": "<image>\nWhat is here?"}, msgs[2]]
    assert ex.task == "conversation" and ex.targets == [[]] and ex.answer == msgs[2]["content"]
    placed = ConversationSample(source="s", image_id="img1", sample_id="cv",
                                messages=[{"role": "user", "content": "Look: <image>"}, msgs[2]])
    assert build(placed, record).messages[0]["content"] == "Look: <image>"


# ------------------------------------------------------------------------------------------------ dropping, determinism, prompts


def test_samples_repeating_a_span_more_than_three_times_are_dropped(record):
    same = dict(CODES, a=(1, 2), b=(1, 2), c=(1, 2), e=(1, 2))
    four = ref(expression="things", target_ids=["a", "b", "c", "e"], generalized=True)
    three = ref(expression="things", target_ids=["a", "b", "c"], generalized=True)
    assert build(four, record, codes=table(same)) is None
    assert build(three, record, codes=table(same)) is not None
    assert build(four, record) is not None  # four different spans are fine


def test_same_seed_same_conversation_and_templates_vary_with_the_seed(record):
    conf = ConversationConfig(**CROP)
    s = ref(expression="the red square", target_ids=["a"])
    first = build(s, record, conf=conf, seed=3)
    assert first == build(s, record, conf=conf, seed=3)
    prompts = {build(s, record, conf=conf, seed=k).messages[0]["content"] for k in range(20)}
    assert len(prompts) >= 3
    assert all(p.startswith("<image>\n") and "red square" in p for p in prompts)


def test_prompt_only_and_prompts_per_turn(record):
    s = MultiRoundSample(source="s", image_id="img1", sample_id="m", rounds=[
        Round("Segment the red square.", ["a"], [], "red square"),
        Round("Now the object below <region0>.", ["c"], ["a"], "blue square")])
    ex = build(s, record)
    p = prompt_only(ex)
    assert p.messages == ex.messages[:3] and p.messages[-1]["role"] == "user"
    assert p.answer == ex.messages[3]["content"] and p.targets[-1] == ["c"] and p.meta["prompt_only"]
    turns = prompts_per_turn(ex)
    assert [len(t.messages) for t in turns] == [1, 3]
    assert [t.answer for t in turns] == [ex.messages[1]["content"], ex.messages[3]["content"]]
    assert [t.targets[-1] for t in turns] == [["a"], ["c"]]
    # the teacher-forced history carries the ground-truth spans
    assert S(1, 2) in turns[1].messages[1]["content"] and S(1, 2) in turns[1].messages[2]["content"]
    assert isinstance(p, ChatExample) and ex.messages[-1]["role"] == "assistant"


def test_sample_of_another_image_is_refused(record):
    other = ReferringSample(source="s", image_id="img2", sample_id="x", expression="a", target_ids=["a"])
    with pytest.raises(ConversationBuildError, match="img2"):
        build(other, record)


def test_config_validation():
    with pytest.raises(ConversationBuildError, match=r"\{X\}"):
        ConversationConfig(referring_templates=["Segment it."]).validate()
    with pytest.raises(ConversationBuildError, match="crop_context"):
        ConversationConfig(crop_context=0.5).validate()


def test_a_turn_group_is_one_conversation_with_the_image_in_the_first_turn(record):
    a = ref(expression="the red square", target_ids=["a"])
    b = ReferringSample(source="s", image_id="img1", sample_id="g", expression="purple things", generalized=True)
    ex = build(TurnGroup((a, b)), record)
    single_a, single_b = build(a, record), build(b, record)
    assert ex.messages == single_a.messages + [{"role": "user", "content": "Please segment purple things in this image."},
                                               single_b.messages[1]]
    assert ex.targets == [["a"], []] and ex.answer == "No target." and ex.images == single_a.images
    assert ex.sample_id == "r+g" and ex.task == "res"
    assert group_turns([a, b, replace(a, image_id="img2", sample_id="c")], 2) == [TurnGroup((a, b)),
                                                                                  replace(a, image_id="img2", sample_id="c")]
    with pytest.raises(ConversationBuildError, match="referring"):
        group_turns([a, region("a")], 2)


def test_importing_samtok_data_stays_light():
    import subprocess
    import sys

    code = ("import sys, samtok.data, samtok.data.conversations\n"
            "heavy = [m for m in ('torch', 'lightning', 'datasets', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(samtok.data.load_pretokenized) and samtok.data.ChatExample.__name__ == 'ChatExample'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
