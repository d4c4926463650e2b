"""The synthetic world's language: every generated sentence is true of its image, checked independently."""

import re

import numpy as np
import pytest

from samtok.core.masks import mask_to_box
from samtok.data.records import (
    GroundedCaptionSample,
    InstanceSegSample,
    MultiRoundSample,
    ReferringSample,
    RegionCaptionSample,
    SceneGraphSample,
)
from samtok.data.synth import SynthConfig, generate_split, world
from samtok.data.synth.facts import ObjectFacts, SceneFacts, relation_value
from samtok.data.synth.language import (
    AmbiguousExpression,
    ExpressionError,
    Query,
    attribute_queries,
    evaluate,
    parse,
    render,
    resolve_robust,
)
from samtok.data.synth.tasks import request_expression


@pytest.fixture(scope="module")
def data():
    sp = generate_split(SynthConfig(seed=0), "train", count=60)
    facts = {r.image_id: SceneFacts.from_record(r) for r in sp.images}  # rebuilt from records alone
    records = {r.image_id: r for r in sp.images}
    return sp, facts, records


def _of(sp, kind):
    return [s for s in sp.samples if isinstance(s, kind)]


def _centres(record):
    """Box centres computed straight from the decoded masks (independent of SceneFacts)."""
    out = {}
    for a in record.anns:
        x0, y0, x1, y1 = mask_to_box(a.to_mask(record.height, record.width))
        out[a.ann_id] = ((x0 + x1) / 2, (y0 + y1) / 2)
    return out


# ------------------------------------------------------------------------------------------------
# a hand-made scene


def _obj(i, shape, color, size, cx, cy, area=400, hidden_by=None):
    return ObjectFacts(str(i), shape, color, size, area, (cx - 5, cy - 5, cx + 5, cy + 5), i, hidden_by or {})


@pytest.fixture()
def toy():
    # 128 x 128; spatial margin = 0.08 * 128 = 10.24 px
    return SceneFacts(
        128,
        128,
        (
            _obj(0, "square", "green", "medium", 60, 90, area=500),
            _obj(1, "triangle", "red", "medium", 60, 30, area=500, hidden_by={"3": 20}),
            _obj(2, "triangle", "blue", "medium", 100, 95, area=500),
            _obj(3, "star", "red", "large", 20, 30, area=1500),
            _obj(4, "star", "red", "small", 110, 20, area=120),
        ),
    )


def test_toy_scene_meanings(toy):
    ev = lambda text: evaluate(parse(text), toy)  # noqa: E731
    assert ev("the triangle above the green square") == ["1"]
    assert ev("the blue triangle") == ["2"]
    assert ev("the large red star") == ["3"]
    assert ev("the red star on the left") == ["3"]
    assert ev("the star on the right") == ["4"]
    assert ev("all red objects") == ["1", "3", "4"]
    assert ev("the two triangles") == ["1", "2"]
    assert ev("the triangle overlapping the large star") == ["1"]
    assert ev("the star larger than the red triangle") == ["3"]
    assert ev("all objects to the right of the large star") == ["0", "1", "2", "4"]
    assert evaluate(parse("the square below <region0>"), toy, regions=["1"]) == ["0"]
    assert evaluate(parse("the object to the left of <region0>"), toy, regions=["1"]) == ["3"]
    assert ev("the purple ring") == [] and ev("all white objects") == []
    with pytest.raises(AmbiguousExpression):
        ev("the triangle")  # two triangles
    with pytest.raises(AmbiguousExpression):
        ev("the three triangles")
    with pytest.raises(AmbiguousExpression):
        ev("the square above the triangle")  # ambiguous landmark


def test_borderline_relations_are_never_relied_on(toy):
    a, b = toy.obj("1"), toy.obj("0")
    assert relation_value("above", a, b, toy) is True
    near = SceneFacts(128, 128, (_obj(0, "circle", "red", "medium", 60, 60), _obj(1, "circle", "blue", "medium", 65, 80)))
    c0, c1 = near.objects
    # 5 px apart horizontally: not clearly "left of" (borderline), 20 px vertically: clearly above
    assert relation_value("left of", c0, c1, near) is None and relation_value("right of", c0, c1, near) is False
    assert relation_value("above", c0, c1, near) is True
    assert resolve_robust(parse("the circle to the left of the blue circle"), near) is None
    assert evaluate(parse("the circle to the left of the blue circle"), near) == []
    assert resolve_robust(parse("the circle above the blue circle"), near) == ["0"]


def test_render_parse_round_trip():
    queries = [
        Query(shape="star"),
        Query(shape="ring", color="blue", size="large"),
        Query(shape="circle", color="red", extreme="left"),
        Query(shape="triangle", predicate="above", landmark=Query(shape="square", color="green")),
        Query(predicate="right of", landmark=Query(region=0)),
        Query(color="blue", plural=True),
        Query(shape="circle", plural=True, count=2),
        Query(size="medium", shape="bar", predicate="overlaps", landmark=Query(size="small", shape="blob")),
        Query(plural=True, predicate="larger than", landmark=Query(shape="ellipse")),
    ]
    for q in queries:
        assert parse(render(q)) == q, render(q)
    assert render(queries[3]) == "the triangle above the green square"
    assert render(queries[4]) == "the object to the right of <region0>"
    assert render(queries[6]) == "the two circles"
    for bad in ("a red star", "the red", "the star behind the ring", "all star", "the red star wearing a hat"):
        with pytest.raises(ExpressionError):
            parse(bad)


# ------------------------------------------------------------------------------------------------
# generated samples


def test_res_expressions_pick_exactly_their_target(data):
    sp, facts, _ = data
    res = [s for s in _of(sp, ReferringSample) if not s.generalized]
    assert len(res) >= 100
    kinds = set()
    for s in res:
        q = parse(s.expression)
        scene = facts[s.image_id]
        assert len(s.target_ids) == 1
        assert evaluate(q, scene) == s.target_ids, s
        # the unique object satisfying it, beyond borderline values: dropping the target leaves none
        assert resolve_robust(q, scene) == s.target_ids
        kinds.add("relation" if q.predicate else "extreme" if q.extreme else "attributes")
    assert kinds == {"relation", "extreme", "attributes"}


def test_res_is_shortest_without_embellishments():
    cfg = SynthConfig(seed=5, overspecify_prob=0.0, relation_prob=0.0, tasks=["res"])
    sp = generate_split(cfg, "train", count=25)
    facts = {r.image_id: SceneFacts.from_record(r) for r in sp.images}
    for s in sp.samples:
        scene = facts[s.image_id]
        q = parse(s.expression)
        target = scene.obj(s.target_ids[0])
        heads = attribute_queries(target, scene)
        cheaper = [h for h in heads if h.cost < q.cost]
        cheaper += [Query(shape=h.shape, color=h.color, size=h.size, extreme=e) for h in heads for e in world.EXTREMES]
        cheaper = [c for c in cheaper if c.cost < q.cost]
        for c in cheaper:
            assert resolve_robust(c, scene) != s.target_ids, f"{render(c)!r} is shorter than {s.expression!r}"


def test_gres_targets_no_targets_and_multi(data):
    sp, facts, _ = data
    gres = [s for s in _of(sp, ReferringSample) if s.generalized]
    for s in gres:
        scene = facts[s.image_id]
        q = parse(s.expression)
        assert evaluate(q, scene) == sorted(s.target_ids, key=lambda a: scene.obj(a).depth), s
        if not s.target_ids:  # matches nothing, and nothing borderline
            assert resolve_robust(q, scene) == []
        if q.count is not None and s.target_ids:
            assert q.count == len(s.target_ids)
    none = sum(s.no_target for s in gres) / len(gres)
    assert 0.35 <= none <= 0.65
    assert sum(len(s.target_ids) >= 2 for s in gres) >= 15
    assert sum(len(s.target_ids) == 1 for s in gres) >= 5


def test_colour_words_match_the_pixels(data):
    sp, _, records = data
    palette = np.array(list(world.COLORS.values()), dtype=np.float64)
    names = list(world.COLORS)
    pixels = {r.image_id: p for r, p in zip(sp.images, sp.pixels)}
    for s in _of(sp, ReferringSample):
        q = parse(s.expression)
        if not q.color or q.plural:
            continue
        rec = records[s.image_id]
        for a in s.target_ids:
            m = rec.mask(a)
            median = np.median(pixels[s.image_id][m].astype(np.float64), axis=0)
            assert names[int(np.linalg.norm(palette - median, axis=1).argmin())] == q.color


def test_scene_graph_relations_hold_on_mask_geometry(data):
    sp, facts, records = data
    graphs = _of(sp, SceneGraphSample)
    assert len(graphs) >= 40
    preds = set()
    for g in graphs:
        rec = records[g.image_id]
        centre = _centres(rec)
        area = {a.ann_id: a.to_mask(rec.height, rec.width).sum() for a in rec.anns}
        attrs = {a.ann_id: a.attributes for a in rec.anns}
        for r in g.relations:
            (sx, sy), (ox, oy) = centre[r.subject_id], centre[r.object_id]
            preds.add(r.predicate)
            if r.predicate == "left of":
                assert sx < ox - 0.08 * rec.width
            elif r.predicate == "right of":
                assert sx > ox + 0.08 * rec.width
            elif r.predicate == "above":
                assert sy < oy - 0.08 * rec.height
            elif r.predicate == "below":
                assert sy > oy + 0.08 * rec.height
            elif r.predicate == "larger than":
                assert area[r.subject_id] >= 1.5 * area[r.object_id]
            else:
                assert r.predicate == "overlaps"
                assert attrs[r.object_id]["hidden_by"][r.subject_id] >= world.MIN_OCCLUDED_PIXELS
        assert set(g.labels) == {a.ann_id for a in rec.anns}
        for a in rec.anns:
            assert g.labels[a.ann_id] == f"{a.attributes['color']} {a.attributes['shape']}"
    assert preds == set(world.PREDICATES)


def test_region_descriptions_and_answers(data):
    sp, facts, records = data
    caps = [s for s in _of(sp, RegionCaptionSample) if not s.question]
    vqa = [s for s in _of(sp, RegionCaptionSample) if s.question]
    assert caps and vqa
    for s in caps:
        a = records[s.image_id].ann(s.ann_id).attributes
        scene = facts[s.image_id]
        o = scene.obj(s.ann_id)
        assert f"{a['color']} {a['shape']} {a['location']}" in s.caption
        assert s.caption[0].isupper() and s.caption.endswith(".")
        if not scene.size_borderline(o):
            assert world.SIZE_WORDS[a["size"]] in s.caption
        covered = [f for f, px in a["hidden_by"].items() if px >= world.MIN_OCCLUDED_PIXELS]
        assert ("partly covered by" in s.caption) == bool(covered)
    for s in vqa:
        a = records[s.image_id].ann(s.ann_id).attributes
        expected = {a["color"], a["shape"], world.SIZE_WORDS[a["size"]], a["location"]}
        assert s.caption in expected


def test_grounded_captions_link_every_object_once(data):
    sp, _, records = data
    for s in _of(sp, GroundedCaptionSample):
        rec = records[s.image_id]
        linked = [a for p in s.phrases for a in p.ann_ids]
        assert sorted(linked) == sorted(a.ann_id for a in rec.anns)
        for p in s.phrases:
            text = s.caption[p.start : p.end].lower()
            for a in p.ann_ids:
                attr = rec.ann(a).attributes
                noun = attr["shape"] if len(p.ann_ids) == 1 else world.PLURALS[attr["shape"]]
                assert text.endswith(f"{attr['color']} {noun}"), (text, attr)
        starts = [p.start for p in s.phrases]
        assert starts == sorted(starts)
        # phrases run left to right
        xs = [min(_centres(rec)[a][0] for a in p.ann_ids) for p in s.phrases]
        assert xs == sorted(xs)


def test_multi_round_refers_back_to_earlier_targets(data):
    sp, facts, _ = data
    dialogues = _of(sp, MultiRoundSample)
    refers = 0
    for d in dialogues:
        scene = facts[d.image_id]
        earlier: list[str] = []
        for r in d.rounds:
            assert len(r.target_ids) == 1 and r.target_ids[0] not in earlier
            text = request_expression(r.request)
            assert ("<region0>" in text) == bool(r.refer_ids)
            if r.refer_ids:
                refers += 1
                assert set(r.refer_ids) <= set(earlier)
            assert evaluate(parse(text), scene, regions=r.refer_ids) == r.target_ids, r
            assert resolve_robust(parse(text), scene, regions=r.refer_ids) == r.target_ids
            earlier += r.target_ids
    assert refers >= len(dialogues) // 2


def test_open_vocabulary_samples(data):
    sp, _, records = data
    for s in _of(sp, InstanceSegSample):
        rec = records[s.image_id]
        present = {a.category for a in rec.anns}
        assert present <= set(s.categories)
        assert len(set(s.categories) - present) == 2  # distractors, absent from the image
        for cat in s.categories:
            assert sorted(s.targets.get(cat, [])) == sorted(a.ann_id for a in rec.anns if a.category == cat)


def test_no_target_fraction_is_configurable():
    sp = generate_split(SynthConfig(seed=2, no_target_fraction=0.0, tasks=["gres"]), "val", count=15)
    assert sp.samples and not any(s.no_target for s in sp.samples)
    sp = generate_split(SynthConfig(seed=2, no_target_fraction=1.0, tasks=["gres"]), "val", count=15)
    assert sp.samples and all(s.no_target for s in sp.samples)


def test_request_expression_inverts_templates():
    assert request_expression("Now the object above <region0>, please.") == "the object above <region0>"
    assert request_expression("Can you segment the red star?") == "the red star"
    assert re.fullmatch(r"the .*", request_expression("Next, segment the ring."))
    with pytest.raises(ExpressionError):
        request_expression("Hello there.")
