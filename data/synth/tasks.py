"""Task samples of one scene: RES, GRES, GCG, region captions / VQA, multi-round, scene graph, OV seg.

Every builder takes the scene's :class:`SceneFacts` and its own ``numpy`` generator, so turning a
task on or off never changes the images or the other tasks' samples.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import numpy as np

from samtok.data.records import (
    GroundedCaptionSample,
    InstanceSegSample,
    MultiRoundSample,
    Phrase,
    ReferringSample,
    RegionCaptionSample,
    Relation,
    Round,
    SceneGraphSample,
    TaskSample,
)
from samtok.data.synth import world
from samtok.data.synth.config import SynthConfig
from samtok.data.synth.facts import ObjectFacts, SceneFacts, relation_value
from samtok.data.synth.language import (
    ExpressionError,
    LandmarkCache,
    Query,
    describe_region,
    noun_phrase,
    object_label,
    render,
    resolve_robust,
    shortest_referring,
)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


# ------------------------------------------------------------------------------------------------
# referring segmentation


def referring_query(
    o: ObjectFacts,
    scene: SceneFacts,
    rng: np.random.Generator,
    landmarks: LandmarkCache,
    overspecify_prob: float = 0.0,
    relation_prob: float = 0.0,
) -> Optional[Query]:
    """A shortest unique description of ``o`` (random among ties).

    With ``relation_prob`` the shortest RELATIONAL description is used instead, when there is one;
    with ``overspecify_prob`` the colour is added when the description leaves it out (still
    unique: a further attribute only narrows the match).
    """
    qs: list[Query] = []
    if rng.random() < relation_prob:
        qs = shortest_referring(o, scene, landmarks, relational=True)
    if not qs:
        qs = shortest_referring(o, scene, landmarks)
    if not qs:
        return None
    q = _pick(rng, qs)
    if q.color is None and rng.random() < overspecify_prob:
        richer = replace(q, color=o.color)
        if resolve_robust(richer, scene) == [o.ann_id]:
            q = richer
    return q


def make_res(
    scene: SceneFacts,
    rng: np.random.Generator,
    count: int,
    image_id: str,
    source: str,
    landmarks: LandmarkCache,
    overspecify_prob: float = 0.0,
    relation_prob: float = 0.0,
) -> list[ReferringSample]:
    """Up to ``count`` expressions, each naming a different single object by its shortest unique description."""
    out: list[ReferringSample] = []
    for i in rng.permutation(len(scene.objects)):
        if len(out) >= count:
            break
        o = scene.objects[int(i)]
        q = referring_query(o, scene, rng, landmarks, overspecify_prob, relation_prob)
        if q is None:
            continue
        out.append(
            ReferringSample(
                source=source,
                image_id=image_id,
                sample_id=f"{image_id}_res{len(out)}",
                expression=render(q),
                target_ids=[o.ann_id],
                generalized=False,
            )
        )
    return out


def multi_target_queries(scene: SceneFacts, landmarks: LandmarkCache) -> list[tuple[Query, list[str]]]:
    """Plural queries that robustly pick two or more objects: by attributes, or by a relation."""
    seen: set[Query] = set()
    out = []
    for o in scene.objects:
        sizes = [None] if scene.size_borderline(o) else [None, o.size]
        for shape in (None, o.shape):
            for color in (None, o.color):
                for size in sizes:
                    q = Query(shape=shape, color=color, size=size, plural=True)
                    if q in seen or (shape, color, size) == (None, None, None):
                        continue
                    seen.add(q)
                    ids = resolve_robust(q, scene)
                    if ids and len(ids) >= 2:
                        out.append((q, ids))
    for lid, lqs in landmarks.names().items():
        for lq in lqs[:1]:
            for p in world.PREDICATES:
                q = Query(plural=True, predicate=p, landmark=lq)
                ids = resolve_robust(q, scene)
                if ids and len(ids) >= 2:
                    out.append((q, ids))
    return out


def no_target_queries(scene: SceneFacts, cfg: SynthConfig) -> tuple[list[Query], list[Query]]:
    """(hard, easy) queries that match nothing. Hard: every word is in the scene, the combination is not."""
    colors = {o.color for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    pairs = {(o.color, o.shape) for o in scene.objects}
    hard = [Query(shape=s, color=c) for s in sorted(shapes) for c in sorted(colors) if (c, s) not in pairs]
    for s in sorted(shapes):
        same = [o for o in scene.objects if o.shape == s]
        if any(scene.size_borderline(o) for o in same):
            continue
        hard += [Query(shape=s, size=z) for z in world.SIZES if z not in {o.size for o in same}]
    easy = [Query(shape=s) for s in cfg.shapes if s not in shapes]
    easy += [Query(color=c, plural=True) for c in cfg.colors if c not in colors]
    easy += [Query(shape=s, color=c) for s in cfg.shapes for c in cfg.colors if c not in colors and s not in shapes]
    keep = lambda qs: [q for q in qs if resolve_robust(q, scene) == []]  # noqa: E731
    return keep(hard), keep(easy)


def make_gres(
    scene: SceneFacts,
    rng: np.random.Generator,
    cfg: SynthConfig,
    image_id: str,
    source: str,
    landmarks: LandmarkCache,
) -> list[ReferringSample]:
    """``gres_per_image`` generalized expressions: no target (``no_target_fraction``), several, or one."""
    multi: Optional[list] = None
    negatives: Optional[tuple[list[Query], list[Query]]] = None
    used: set[str] = set()
    out: list[ReferringSample] = []
    for _ in range(cfg.gres_per_image):
        for _attempt in range(4):  # a few draws to avoid repeating an expression in one image
            q: Optional[Query] = None
            ids: list[str] = []
            if rng.random() < cfg.no_target_fraction:
                if negatives is None:
                    negatives = no_target_queries(scene, cfg)
                hard, easy = negatives
                pool = hard if hard and (not easy or rng.random() < 0.6) else easy
                if pool:
                    q = _pick(rng, pool)
                    if q.shape is not None and q.predicate is None and not q.plural and rng.random() < 0.3:
                        q = replace(q, plural=True)  # "all purple stars"
            else:
                if multi is None:
                    multi = multi_target_queries(scene, landmarks)
                if multi and rng.random() < cfg.multi_target_prob:
                    q, ids = _pick(rng, multi)
                    if len(ids) in world.COUNT_WORDS and rng.random() < 0.5:
                        q = replace(q, count=len(ids))
                else:
                    o = scene.objects[int(rng.integers(len(scene.objects)))]
                    q = referring_query(o, scene, rng, landmarks, cfg.overspecify_prob, cfg.relation_prob)
                    ids = [o.ann_id]
            if q is None:
                continue
            text = render(q)
            if text in used:
                continue
            used.add(text)
            out.append(
                ReferringSample(
                    source=source,
                    image_id=image_id,
                    sample_id=f"{image_id}_gres{len(out)}",
                    expression=text,
                    target_ids=list(ids),
                    generalized=True,
                )
            )
            break
    return out


# ------------------------------------------------------------------------------------------------
# grounded caption


def _plural_phrase(phrase: str) -> str:
    words = phrase.split()
    words[-1] = world.PLURALS[words[-1]]
    return " ".join(words)


def make_gcg(scene: SceneFacts, image_id: str, source: str) -> GroundedCaptionSample:
    """One caption listing the objects left to right; identical-looking objects share one phrase.

    "A large red star on the left, a blue ring in the center and two small green squares.
    The blue ring partly covers the red star."  Phrases (without the article) link to masks.
    """
    groups: dict[str, list[ObjectFacts]] = {}
    for o in scene.objects:
        groups.setdefault(noun_phrase(o, scene), []).append(o)
    ordered = sorted(groups.items(), key=lambda kv: (min(o.cx for o in kv[1]), min(o.depth for o in kv[1])))
    caption = ""
    phrases: list[Phrase] = []
    for k, (phrase, members) in enumerate(ordered):
        if k > 0:
            caption += " and " if k == len(ordered) - 1 else ", "
        if len(members) == 1:
            caption += world.article(phrase) + " "
            text, tail = phrase, " " + scene.location_phrase(members[0])
        else:
            text, tail = f"{world.COUNT_WORDS.get(len(members), 'several')} {_plural_phrase(phrase)}", ""
        start = len(caption)
        caption += text
        phrases.append(Phrase(start=start, end=len(caption), ann_ids=[o.ann_id for o in members]))
        caption += tail
    caption = caption[0].upper() + caption[1:] + "."
    labels = [object_label(o) for o in scene.objects]
    for back in scene.objects:  # one occlusion sentence, between objects a colour+shape names uniquely
        fronts = [f for f in scene.occluders(back) if labels.count(object_label(f)) == 1]
        if fronts and labels.count(object_label(back)) == 1:
            caption += f" The {object_label(fronts[0])} partly covers the {object_label(back)}."
            break
    return GroundedCaptionSample(source=source, image_id=image_id, sample_id=f"{image_id}_gcg0", caption=caption, phrases=phrases)


# ------------------------------------------------------------------------------------------------
# region understanding


def make_region_captions(
    scene: SceneFacts, rng: np.random.Generator, count: int, image_id: str, source: str
) -> list[RegionCaptionSample]:
    n = len(scene.objects) if count == 0 else min(count, len(scene.objects))
    picks = rng.permutation(len(scene.objects))[:n]
    return [
        RegionCaptionSample(
            source=source,
            image_id=image_id,
            sample_id=f"{image_id}_cap{k}",
            ann_id=scene.objects[int(i)].ann_id,
            caption=describe_region(scene.objects[int(i)], scene),
        )
        for k, i in enumerate(picks)
    ]


_VQA_QUESTIONS = {
    "color": ("What color is this object?", "What is the color of this region?"),
    "shape": ("What shape is this object?", "Which shape does this region have?"),
    "size": ("Is this object small, medium-sized or large?", "How big is this object: small, medium-sized or large?"),
    "location": ("Where is this object in the image?", "In which part of the image is this region?"),
}


def region_answer(kind: str, o: ObjectFacts, scene: SceneFacts) -> str:
    """The answer to a region question of ``kind`` about ``o`` ("red", "star", "large", "in the upper left")."""
    if kind == "color":
        return o.color
    if kind == "shape":
        return o.shape
    if kind == "size":
        return world.SIZE_WORDS[o.size]
    if kind == "location":
        return scene.location_phrase(o)
    raise ValueError(f"unknown question kind {kind!r}")


def make_region_vqa(
    scene: SceneFacts, rng: np.random.Generator, count: int, image_id: str, source: str
) -> list[RegionCaptionSample]:
    out = []
    for k in range(count):
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        kinds = [q for q in _VQA_QUESTIONS if not (q == "size" and scene.size_borderline(o))]
        kind = _pick(rng, kinds)
        out.append(
            RegionCaptionSample(
                source=source,
                image_id=image_id,
                sample_id=f"{image_id}_vqa{k}",
                ann_id=o.ann_id,
                question=_pick(rng, _VQA_QUESTIONS[kind]),
                caption=region_answer(kind, o, scene),
            )
        )
    return out


# ------------------------------------------------------------------------------------------------
# multi-round


def _relative_round(
    scene: SceneFacts, rng: np.random.Generator, done: list[ObjectFacts], fresh: list[ObjectFacts]
) -> Optional[tuple[Query, ObjectFacts, ObjectFacts]]:
    """The cheapest "the [colour] [shape|object] PRED <region0>" naming one fresh object, <region0>
    being an earlier target; heads are tried from "object" up, so the first level with any hit wins."""
    fresh_ids = {o.ann_id for o in fresh}
    levels: list[list[tuple[Query, Optional[ObjectFacts]]]] = [
        [(Query(), None)],
        [(Query(shape=t.shape), t) for t in fresh],
        [(Query(shape=t.shape, color=t.color), t) for t in fresh],
    ]
    for level in levels:
        options = []
        seen: set[Query] = set()
        for head, _t in level:
            if head in seen:
                continue
            seen.add(head)
            for ref in done:
                for p in world.PREDICATES:
                    q = Query(shape=head.shape, color=head.color, predicate=p, landmark=_REGION0)
                    ids = resolve_robust(q, scene, [ref.ann_id])
                    if ids is not None and len(ids) == 1 and ids[0] in fresh_ids:
                        options.append((q, scene.obj(ids[0]), ref))
        if options:
            return _pick(rng, options)
    return None


_REGION0 = Query(region=0)


_FIRST_REQUESTS = ("Please segment {x}.", "Segment {x}.", "Can you segment {x}?")
_NEXT_REQUESTS = ("Now segment {x}.", "Next, segment {x}.", "Now {x}, please.")


def request_expression(request: str) -> str:
    """The referring expression inside a multi-round request ("Now segment X." -> "X")."""
    for template in sorted(_FIRST_REQUESTS + _NEXT_REQUESTS, key=lambda t: -len(t.split("{x}")[0])):
        pre, post = template.split("{x}")
        if request.startswith(pre) and request.endswith(post) and len(request) > len(pre) + len(post):
            return request[len(pre) : len(request) - len(post)]
    raise ExpressionError(f"not a multi-round request of the synthetic world: {request!r}")


def make_multi_round(
    scene: SceneFacts,
    rng: np.random.Generator,
    rounds: int,
    image_id: str,
    source: str,
    landmarks: LandmarkCache,
    overspecify_prob: float = 0.0,
    relation_prob: float = 0.0,
) -> Optional[MultiRoundSample]:
    """A dialogue: round 1 names an object; later rounds name a new one relative to an earlier
    target shown as ``<region0>`` (falling back to a plain expression when no relation singles one out)."""
    done: list[ObjectFacts] = []
    out: list[Round] = []
    total = min(rounds, len(scene.objects))
    for r in range(total):
        fresh = [o for o in scene.objects if o not in done]
        choice: Optional[tuple[Query, ObjectFacts, Optional[ObjectFacts]]] = None
        if done:
            choice = _relative_round(scene, rng, done, fresh)
        if choice is None:
            plain = []
            for i in rng.permutation(len(fresh)):
                pq = referring_query(fresh[int(i)], scene, rng, landmarks, overspecify_prob, relation_prob)
                if pq is not None:
                    plain = [(pq, fresh[int(i)], None)]
                    break
            if not plain:
                break
            choice = plain[0]
        q, target, ref = choice
        template = _pick(rng, _NEXT_REQUESTS if out else _FIRST_REQUESTS)
        out.append(
            Round(
                request=template.format(x=render(q)),
                target_ids=[target.ann_id],
                refer_ids=[ref.ann_id] if ref is not None else [],
                answer_label=object_label(target),
            )
        )
        done.append(target)
    if not out:
        return None
    return MultiRoundSample(source=source, image_id=image_id, sample_id=f"{image_id}_mr0", rounds=out)


# ------------------------------------------------------------------------------------------------
# scene graph and instance segmentation


def make_scene_graph(
    scene: SceneFacts, rng: np.random.Generator, max_relations: int, image_id: str, source: str
) -> Optional[SceneGraphSample]:
    """Per pair of objects: "overlaps" (front subject) if one hides the other, the dominant spatial
    relation (random direction: "left of" or "right of", ...) if it clearly holds, and "larger than"
    (larger subject) if clear. Kept in that priority up to ``max_relations``."""
    objs = scene.objects
    if len(objs) < 2:
        return None
    overlaps, spatial, sizes = [], [], []
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            if relation_value("overlaps", a, b, scene):
                front, back = (a, b) if a.depth > b.depth else (b, a)
                overlaps.append(Relation(front.ann_id, "overlaps", back.ann_id))
            dx = abs(a.cx - b.cx) / scene.width
            dy = abs(a.cy - b.cy) / scene.height
            s, o = (a, b) if rng.random() < 0.5 else (b, a)
            pairs = ("left of", "right of") if dx >= dy else ("above", "below")
            for pred in pairs:
                if relation_value(pred, s, o, scene):
                    spatial.append(Relation(s.ann_id, pred, o.ann_id))
            for s2, o2 in ((a, b), (b, a)):
                if relation_value("larger than", s2, o2, scene):
                    sizes.append(Relation(s2.ann_id, "larger than", o2.ann_id))
    rels = (overlaps + spatial + sizes)[:max_relations]
    if not rels:
        return None
    return SceneGraphSample(
        source=source,
        image_id=image_id,
        sample_id=f"{image_id}_sg0",
        relations=rels,
        labels={o.ann_id: object_label(o) for o in objs},
    )


def make_ov_seg(
    scene: SceneFacts, rng: np.random.Generator, distractors: int, categories: Sequence[str], image_id: str, source: str
) -> InstanceSegSample:
    """Ask for every present category plus ``distractors`` absent ones, in random order."""
    present = sorted({o.shape for o in scene.objects})
    absent = [c for c in categories if c not in present]
    extra = [absent[int(i)] for i in rng.permutation(len(absent))[:distractors]]
    asked = present + extra
    asked = [asked[int(i)] for i in rng.permutation(len(asked))]
    targets = {c: [o.ann_id for o in scene.objects if o.shape == c] for c in present}
    return InstanceSegSample(source=source, image_id=image_id, sample_id=f"{image_id}_ov0", categories=asked, targets=targets)


# ------------------------------------------------------------------------------------------------


def build_samples(
    cfg: SynthConfig, scene: SceneFacts, image_id: str, source: str, task_rng: Callable[[str], np.random.Generator]
) -> list[TaskSample]:
    """Every enabled task's samples for one scene; ``task_rng(task)`` gives each task its own generator."""
    landmarks = LandmarkCache(scene)
    out: list[TaskSample] = []
    tasks = set(cfg.tasks)
    if "res" in tasks:
        out += make_res(
            scene, task_rng("res"), cfg.res_per_image, image_id, source, landmarks, cfg.overspecify_prob, cfg.relation_prob
        )
    if "gres" in tasks:
        out += make_gres(scene, task_rng("gres"), cfg, image_id, source, landmarks)
    if "gcg" in tasks:
        out.append(make_gcg(scene, image_id, source))
    if "region_caption" in tasks:
        out += make_region_captions(scene, task_rng("region_caption"), cfg.region_captions_per_image, image_id, source)
    if "region_vqa" in tasks:
        out += make_region_vqa(scene, task_rng("region_vqa"), cfg.region_vqa_per_image, image_id, source)
    if "mr_seg" in tasks and cfg.mr_rounds > 0:
        mr = make_multi_round(
            scene, task_rng("mr_seg"), cfg.mr_rounds, image_id, source, landmarks, cfg.overspecify_prob, cfg.relation_prob
        )
        if mr is not None:
            out.append(mr)
    if "scene_graph" in tasks:
        sg = make_scene_graph(scene, task_rng("scene_graph"), cfg.scene_graph_max_relations, image_id, source)
        if sg is not None:
            out.append(sg)
    if "ov_seg" in tasks:
        out.append(make_ov_seg(scene, task_rng("ov_seg"), cfg.ov_distractors, cfg.shapes, image_id, source))
    return out
