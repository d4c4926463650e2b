"""The small language of the synthetic world: structured queries, their text, and their meaning.

A :class:`Query` is what a referring expression says::

    the [size] [colour] (shape|object) [on the left|on the right|at the top|at the bottom]
        [(to the left of|to the right of|above|below|larger than|overlapping) LANDMARK]
    all [size] [colour] (shapes|objects) [PREDICATE LANDMARK]
    the (two|three|...) [size] [colour] (shapes|objects) [PREDICATE LANDMARK]

    LANDMARK = the [size] [colour] shape  |  <regionK>   (a mask shown in the user turn)

:func:`render` writes a query as text and :func:`parse` reads that text back, so expressions
stored on disk can be re-evaluated. :func:`evaluate` is the official meaning (exact attributes,
relations that clearly hold); :func:`resolve_robust` is the same meaning but gives up (``None``)
whenever any object's membership hinges on a borderline value, which is what the generator uses
to pick expressions that are right beyond doubt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from samtok.core.errors import SamtokError
from samtok.data.synth import world
from samtok.data.synth.facts import ObjectFacts, SceneFacts, relation_value, tri_and


class ExpressionError(SamtokError):
    """Text that is not an expression of the synthetic grammar."""


class AmbiguousExpression(SamtokError):
    """A singular expression (or a landmark) that does not pick exactly one object."""


@dataclass(frozen=True)
class Query:
    shape: Optional[str] = None  # None: the noun is "object"
    color: Optional[str] = None
    size: Optional[str] = None
    extreme: Optional[str] = None  # world.EXTREMES: the extreme one among the matches
    predicate: Optional[str] = None  # world.PREDICATES, with ``landmark``
    landmark: Optional["Query"] = None
    region: Optional[int] = None  # this query is "<region{k}>" (only used as a landmark)
    plural: bool = False
    count: Optional[int] = None  # plural with a number word ("the two circles")

    @property
    def cost(self) -> int:
        """Content words: what "shortest expression" minimises."""
        if self.region is not None:
            return 0
        c = 1 + (self.color is not None) + (self.size is not None) + (self.extreme is not None)
        if self.predicate is not None:
            c += 1 + (self.landmark.cost if self.landmark else 0)
        return c


# ------------------------------------------------------------------------------------------------
# text


def render(q: Query) -> str:
    """The expression text of ``q`` (lower case, no final punctuation)."""
    if q.region is not None:
        return f"<region{q.region}>"
    words: list[str] = []
    if q.plural:
        words += ["the", world.COUNT_WORDS[q.count]] if q.count else ["all"]
    else:
        words.append("the")
    if q.size:
        words.append(world.SIZE_WORDS[q.size])
    if q.color:
        words.append(q.color)
    noun = q.shape or "object"
    words.append(world.PLURALS[noun] if q.plural else noun)
    if q.extreme:
        words.append(world.EXTREME_PHRASES[q.extreme])
    if q.predicate:
        if q.landmark is None:
            raise ValueError("a query with a predicate needs a landmark")
        words += [world.PREDICATE_PHRASES[q.predicate], render(q.landmark)]
    return " ".join(words)


_SIZE_BY_WORD = {v: k for k, v in world.SIZE_WORDS.items()}
_COUNT_BY_WORD = {v: k for k, v in world.COUNT_WORDS.items()}
_SINGULAR_BY_PLURAL = {v: k for k, v in world.PLURALS.items()}
_NOUNS = set(world.SHAPES) | {"object"}
_REGION_RE = re.compile(r"<region(\d+)>")


def _strip_phrase(rest: str, phrases: dict[str, str]) -> tuple[Optional[str], str]:
    # longest phrase first so "to the left of" wins over any prefix
    for key, phrase in sorted(phrases.items(), key=lambda kv: -len(kv[1])):
        if rest == phrase or rest.startswith(phrase + " "):
            return key, rest[len(phrase) :].strip()
    return None, rest


def parse(text: str) -> Query:
    """Read an expression written by :func:`render` back into a :class:`Query`."""
    src = text
    text = " ".join(text.strip().rstrip(".").split()).lower()
    try:
        q, rest = _parse_noun_phrase(text, allow_extreme=True, allow_plural=True)
        if rest:
            pred, rest = _strip_phrase(rest, world.PREDICATE_PHRASES)
            if pred is None:
                raise ExpressionError(f"unexpected words {rest!r}")
            m = _REGION_RE.fullmatch(rest)
            if m:
                landmark = Query(region=int(m.group(1)))
            else:
                landmark, tail = _parse_noun_phrase(rest, allow_extreme=False, allow_plural=False)
                if tail:
                    raise ExpressionError(f"unexpected words after the landmark: {tail!r}")
            q = replace(q, predicate=pred, landmark=landmark)
    except ExpressionError as exc:
        raise ExpressionError(f"cannot parse expression {src!r}: {exc}") from None
    return q


def _parse_noun_phrase(text: str, allow_extreme: bool, allow_plural: bool) -> tuple[Query, str]:
    words = text.split()
    if not words:
        raise ExpressionError("empty expression")
    i = 0
    plural, count = False, None
    if words[0] == "all" and allow_plural:
        plural, i = True, 1
    elif words[0] == "the":
        i = 1
        if allow_plural and i < len(words) and words[i] in _COUNT_BY_WORD:
            plural, count, i = True, _COUNT_BY_WORD[words[i]], i + 1
    else:
        raise ExpressionError(f"expected 'the' or 'all', got {words[0]!r}")
    size = color = None
    if i < len(words) and words[i] in _SIZE_BY_WORD:
        size, i = _SIZE_BY_WORD[words[i]], i + 1
    if i < len(words) and words[i] in world.COLORS:
        color, i = words[i], i + 1
    if i >= len(words):
        raise ExpressionError("missing noun")
    noun = words[i]
    if plural:
        if noun not in _SINGULAR_BY_PLURAL:
            raise ExpressionError(f"expected a plural noun, got {noun!r}")
        noun = _SINGULAR_BY_PLURAL[noun]
    elif noun not in _NOUNS:
        raise ExpressionError(f"expected a shape or 'object', got {noun!r}")
    rest = " ".join(words[i + 1 :])
    extreme = None
    if allow_extreme and not plural:
        extreme, rest = _strip_phrase(rest, world.EXTREME_PHRASES)
    q = Query(
        shape=None if noun == "object" else noun,
        color=color,
        size=size,
        extreme=extreme,
        plural=plural,
        count=count,
    )
    return q, rest


# ------------------------------------------------------------------------------------------------
# meaning


def _attr_match(q: Query, o: ObjectFacts) -> bool:
    return (
        (q.shape is None or o.shape == q.shape)
        and (q.color is None or o.color == q.color)
        and (q.size is None or o.size == q.size)
    )


def _extreme_key(extreme: str, o: ObjectFacts) -> float:
    return {"left": o.cx, "right": -o.cx, "top": o.cy, "bottom": -o.cy}[extreme]


def _ordered(scene: SceneFacts, ids) -> list[str]:
    keep = set(ids)
    return [o.ann_id for o in scene.objects if o.ann_id in keep]


def evaluate(q: Query, scene: SceneFacts, regions: Sequence[str] = ()) -> list[str]:
    """Ann ids (scene order) of the objects ``q`` denotes.

    Raises :class:`AmbiguousExpression` when a singular query or a landmark does not pick exactly
    one object, or a counted plural matches a different (non-zero) number of objects.
    """
    if q.region is not None:
        if not 0 <= q.region < len(regions):
            raise AmbiguousExpression(f"<region{q.region}> is not among the {len(regions)} regions shown")
        return [regions[q.region]]
    cands = [o for o in scene.objects if _attr_match(q, o)]
    if q.predicate is not None:
        lm = evaluate(q.landmark, scene, regions)
        if len(lm) != 1:
            raise AmbiguousExpression(f"landmark {render(q.landmark)!r} matches {len(lm)} objects")
        land = scene.obj(lm[0])
        cands = [o for o in cands if relation_value(q.predicate, o, land, scene) is True]
    if q.extreme is not None and cands:
        ranked = sorted(cands, key=lambda o: _extreme_key(q.extreme, o))
        if len(ranked) > 1 and _extreme_key(q.extreme, ranked[0]) == _extreme_key(q.extreme, ranked[1]):
            raise AmbiguousExpression(f"{render(q)!r}: two candidates tie")
        cands = ranked[:1]
    if not q.plural and len(cands) > 1:
        raise AmbiguousExpression(f"{render(q)!r} matches {len(cands)} objects")
    if q.count is not None and len(cands) not in (0, q.count):
        raise AmbiguousExpression(f"{render(q)!r} matches {len(cands)} objects, not {q.count}")
    return _ordered(scene, (o.ann_id for o in cands))


def _attr_tri(q: Query, o: ObjectFacts, scene: SceneFacts) -> Optional[bool]:
    if (q.shape is not None and o.shape != q.shape) or (q.color is not None and o.color != q.color):
        return False
    if q.size is not None:
        if scene.size_borderline(o):
            return None
        return o.size == q.size
    return True


def resolve_robust(q: Query, scene: SceneFacts, regions: Sequence[str] = ()) -> Optional[list[str]]:
    """Like :func:`evaluate`, but ``None`` if the answer depends on any borderline value or is ill-formed.

    When it returns a list, :func:`evaluate` returns the same list.
    """
    key = (q, tuple(regions))
    memo = scene.memo
    if key in memo:
        return memo[key]
    result = _resolve_robust(q, scene, regions)
    memo[key] = result
    return result


def _resolve_robust(q: Query, scene: SceneFacts, regions: Sequence[str]) -> Optional[list[str]]:
    if q.region is not None:
        return [regions[q.region]] if 0 <= q.region < len(regions) else None
    vals = {o.ann_id: _attr_tri(q, o, scene) for o in scene.objects}
    if q.predicate is not None:
        lm = resolve_robust(q.landmark, scene, regions)
        if lm is None or len(lm) != 1:
            return None
        land = scene.obj(lm[0])
        for o in scene.objects:
            if vals[o.ann_id] is not False:
                vals[o.ann_id] = tri_and(vals[o.ann_id], relation_value(q.predicate, o, land, scene))
    if any(v is None for v in vals.values()):
        return None
    cands = [o for o in scene.objects if vals[o.ann_id]]
    if q.extreme is not None and len(cands) > 1:
        ranked = sorted(cands, key=lambda o: _extreme_key(q.extreme, o))
        side = scene.width if q.extreme in ("left", "right") else scene.height
        if _extreme_key(q.extreme, ranked[1]) - _extreme_key(q.extreme, ranked[0]) < world.EXTREME_MARGIN * side:
            return None
        cands = ranked[:1]
    if not q.plural and len(cands) > 1:
        return None
    if q.count is not None and len(cands) not in (0, q.count):
        return None
    return _ordered(scene, (o.ann_id for o in cands))


# ------------------------------------------------------------------------------------------------
# finding expressions


def attribute_queries(o: ObjectFacts, scene: SceneFacts, with_shape: bool = True) -> list[Query]:
    """Every attribute-only singular query that is true of ``o`` (shape always named if ``with_shape``)."""
    sizes = [None] if scene.size_borderline(o) else [None, o.size]
    shapes = [o.shape] if with_shape else [o.shape, None]
    return [Query(shape=s, color=c, size=z) for s in shapes for c in (None, o.color) for z in sizes]


def shortest_attribute_queries(o: ObjectFacts, scene: SceneFacts) -> list[Query]:
    """The attribute-only queries of least cost that pick ``o`` alone (empty if none does)."""
    good = [q for q in attribute_queries(o, scene) if resolve_robust(q, scene) == [o.ann_id]]
    if not good:
        return []
    best = min(q.cost for q in good)
    return [q for q in good if q.cost == best]


class LandmarkCache:
    """Shortest unique attribute descriptions of every object of a scene, computed once on demand."""

    def __init__(self, scene: SceneFacts):
        self.scene = scene
        self._names: Optional[dict[str, list[Query]]] = None

    def names(self) -> dict[str, list[Query]]:
        if self._names is None:
            self._names = {o.ann_id: shortest_attribute_queries(o, self.scene) for o in self.scene.objects}
        return self._names


def shortest_referring(
    target: ObjectFacts, scene: SceneFacts, landmarks: Optional[LandmarkCache] = None, relational: bool = False
) -> list[Query]:
    """The least-cost singular queries that pick ``target`` alone, beyond doubt.

    Candidates: the target's attributes (shape always named), + an extreme ("on the left"), or +
    a relation to another object named by its own shortest attribute description. Relations cost
    at least 3, so they are only built when nothing cheaper works. With ``relational`` only
    relation queries are considered (the shortest relational description). Empty list: no
    expression of the grammar singles the target out (e.g. two identical objects side by side).
    """
    heads = attribute_queries(target, scene)
    best: list[Query] = []
    if not relational:
        tier = heads + [replace(h, extreme=e) for h in heads for e in world.EXTREMES]
        best = shortest_unique(tier, scene, [target.ann_id])
    best_cost = best[0].cost if best else 1_000
    if best_cost < 3:  # no relation query is that short
        return best
    landmarks = landmarks or LandmarkCache(scene)
    rel = []
    for lid, lqs in landmarks.names().items():
        if lid == target.ann_id:
            continue
        for lq in lqs:
            for h in heads:
                if h.cost + 1 + lq.cost <= best_cost:
                    rel += [
                        Query(shape=h.shape, color=h.color, size=h.size, predicate=p, landmark=lq)
                        for p in world.PREDICATES
                    ]
    return shortest_unique(best + rel, scene, [target.ann_id]) if rel else best


def shortest_unique(queries: Sequence[Query], scene: SceneFacts, targets: Sequence[str], regions: Sequence[str] = ()) -> list[Query]:
    """Among ``queries``, those of least cost whose robust meaning is exactly ``targets``."""
    want = _ordered(scene, targets)
    by_cost: dict[int, list[Query]] = {}
    for q in queries:
        by_cost.setdefault(q.cost, []).append(q)
    for cost in sorted(by_cost):
        good = [q for q in by_cost[cost] if resolve_robust(q, scene, regions) == want]
        if good:
            return good
    return []


# ------------------------------------------------------------------------------------------------
# descriptions


def object_label(o: ObjectFacts) -> str:
    """Short label: "red star"."""
    return f"{o.color} {o.shape}"


def noun_phrase(o: ObjectFacts, scene: SceneFacts, with_size: bool = True) -> str:
    """ "large red star" (the size word is left out when the size is borderline)."""
    words = []
    if with_size and not scene.size_borderline(o):
        words.append(world.SIZE_WORDS[o.size])
    words += [o.color, o.shape]
    return " ".join(words)


def with_article(phrase: str) -> str:
    return f"{world.article(phrase)} {phrase}"


def describe_region(o: ObjectFacts, scene: SceneFacts) -> str:
    """ "A large red star in the upper left, partly covered by a blue ring." """
    text = f"{with_article(noun_phrase(o, scene))} {scene.location_phrase(o)}"
    covered = scene.occluders(o)
    if covered:
        text += ", partly covered by " + _join([with_article(object_label(b)) for b in covered])
    front_of = scene.occluded(o)
    if front_of:
        text += ", in front of " + _join([with_article(object_label(b)) for b in front_of])
    return text[0].upper() + text[1:] + "."


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
