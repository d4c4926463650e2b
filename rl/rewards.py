"""Rewards for GRPO on mask answers (spec §4): pure functions of the generated text.

Every ``*_reward`` function has the reward-function signature of TRL's ``GRPOTrainer`` (1.16): it is
called with keyword arguments ``prompts``, ``completions``, ``completion_ids``, one list per dataset
column (the reference answer text in ``ground_truth``) and trainer extras (``trainer_state``,
``log_extra``, ``log_metric``), and returns one float per completion. Extra keywords are ignored, so
each function can be handed to ``GRPOTrainer(reward_funcs=[...])`` as is; options are bound with
``functools.partial`` (TRL names a partial after the wrapped function).

A completion is either a string or a conversation (a list of messages, as TRL passes it for
conversational prompts); the text scored is then the content of the last assistant message (string
content, or the ``text`` parts of a list content). See :func:`completion_text`.

The per-sample ``*_score`` functions hold the rules and are what the tests pin down. Text that is
not well formed never raises: spans are extracted with :meth:`MaskCodec.parse` and its repair rules.

Span identity throughout is the code pair ``(c0, c1)`` of a parsed span (``c1 = -1`` for a one-code
span). Spans whose first code is out of range are *invalid*: they count as predictions (they are
something the model wrote) but never match anything. Ground-truth spans are parsed the same way;
invalid ones are dropped (authored data, not a prediction) and repeats collapse to one, so that a
copy of the reference answer always scores 1.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from samtok.core.errors import SamtokError
from samtok.core.masks import MaskFormatError, as_bool_mask, decode_rle
from samtok.tokenizer.codec import DEFAULT_CODEC, MaskCodec, MaskSpan

Codes = tuple[int, int]
MaskDecodeFn = Callable[[Any, Codes], Any]
"""``decode(image_key, (c0, c1)) -> (H, W) bool mask``: the tokenizer's decoder for one image."""

OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"

_THINK_ANSWER_RE = re.compile(
    r"\A\s*<think>((?:(?!</?think>|</?answer>).)*)</think>\s*"
    r"<answer>((?:(?!</?think>|</?answer>).)*)</answer>\s*\Z",
    re.DOTALL,
)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PHRASE_RE = re.compile(
    re.escape(OBJECT_REF_START)
    + r"((?:(?!" + re.escape(OBJECT_REF_START) + r").)*?)"
    + re.escape(OBJECT_REF_END) + r"\s*",
    re.DOTALL,
)
_WORD_RE = re.compile(r"[^\W_]+")


# ------------------------------------------------------------------------------ completion text


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal content: [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def completion_text(completion: Any) -> str:
    """The text to score of one completion, never raising.

    * a string is returned as is;
    * a message ``{"role": ..., "content": ...}`` gives its content;
    * a conversation (list of messages) gives the content of its LAST assistant message (the final
      answer when a tool loop appended several), or ``""`` when it has none;
    * list contents (multimodal messages) are the concatenation of their text parts;
    * anything else (``None``, numbers...) gives ``""``.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence):
        for message in reversed(completion):
            if isinstance(message, Mapping) and message.get("role", "assistant") == "assistant":
                return _content_text(message.get("content"))
    return ""


def answer_block(text: str) -> str:
    """The content of the last ``<answer>…</answer>`` block of ``text``, or ``text`` itself if none."""
    blocks = _ANSWER_RE.findall(text)
    return blocks[-1] if blocks else text


def _texts(completions: Sequence[Any], from_answer_tag: bool) -> list[str]:
    texts = [completion_text(c) for c in completions]
    return [answer_block(t) for t in texts] if from_answer_tag else texts


def _references(ground_truth: Any, n: int, column: str = "ground_truth") -> list[str]:
    if ground_truth is None:
        raise SamtokError(f"this reward needs a '{column}' dataset column with the reference answer text")
    if isinstance(ground_truth, str) or not isinstance(ground_truth, Sequence):
        raise SamtokError(f"'{column}' must be a list with one reference answer per completion, "
                          f"got {type(ground_truth).__name__}")
    if len(ground_truth) != n:
        raise SamtokError(f"'{column}' has {len(ground_truth)} entries for {n} completions")
    return [g if isinstance(g, str) else "" for g in ground_truth]


def _codec(codec: Optional[MaskCodec]) -> MaskCodec:
    return DEFAULT_CODEC if codec is None else codec


def _gt_codes(codec: MaskCodec, text: str) -> list[Codes]:
    """Distinct valid ground-truth code pairs, in order of first appearance."""
    return list(dict.fromkeys(codec.parse(text).codes))


# ------------------------------------------------------------------------------ answer matching


def answer_matching_score(prediction: str, ground_truth: str, partial_credit: float = 0.0,
                          codec: Optional[MaskCodec] = None) -> float:
    """The paper's textual answer-matching reward, optionally with partial credit.

    ``N_pred`` = number of spans in ``prediction`` before de-duplication (invalid spans included);
    ``N_gt`` = number of distinct valid ground-truth spans; the unique valid predicted spans are
    matched to ground-truth spans:

    1. exact matches first: a unique predicted code pair equal to a GT pair scores 1 (``N_TP``);
    2. then, only if ``partial_credit > 0``, the remaining unique predicted spans in order of first
       appearance each take the first still-unmatched GT span (in GT order) with the same ``c0``
       and score ``partial_credit``. Each GT span is matched at most once, and exact matches are
       settled before any partial one so that a partial match never takes a GT span that some
       prediction matches exactly.

    ``R = (N_TP + partial_credit · N_partial) / max(N_pred, N_gt)``; both empty → 1.0 (a correct
    "No target."); exactly one of them empty → 0.0.
    """
    c = _codec(codec)
    spans = c.parse(prediction).spans
    gt = _gt_codes(c, ground_truth)
    n_pred, n_gt = len(spans), len(gt)
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    unique_pred = list(dict.fromkeys(s.codes for s in spans if s.valid))
    gt_set = set(gt)
    score = float(sum(1 for p in unique_pred if p in gt_set))
    if partial_credit > 0:
        exact = gt_set.intersection(unique_pred)
        free_gt = [g for g in gt if g not in exact]  # GT spans not matched exactly, in GT order
        for p in unique_pred:
            if p in gt_set:
                continue
            for k, g in enumerate(free_gt):
                if g[0] == p[0]:
                    score += partial_credit
                    del free_gt[k]
                    break
    return score / max(n_pred, n_gt)


def answer_matching_reward(completions: Sequence[Any], ground_truth: Sequence[str] | None = None, *,
                           codec: Optional[MaskCodec] = None, from_answer_tag: bool = False,
                           **kwargs: Any) -> list[float]:
    """TRL reward: :func:`answer_matching_score` of each completion against its ``ground_truth``.

    ``from_answer_tag``: score only the last ``<answer>…</answer>`` block when there is one.
    """
    refs = _references(ground_truth, len(completions))
    return [answer_matching_score(t, g, 0.0, codec) for t, g in zip(_texts(completions, from_answer_tag), refs)]


def partial_credit_reward(completions: Sequence[Any], ground_truth: Sequence[str] | None = None, *,
                          credit: float = 0.4, codec: Optional[MaskCodec] = None,
                          from_answer_tag: bool = False, **kwargs: Any) -> list[float]:
    """TRL reward: answer matching where a first-code-only match earns ``credit`` (default 0.4).

    Matching order: see :func:`answer_matching_score`.
    """
    if not 0.0 <= credit <= 1.0:
        raise SamtokError(f"partial credit must lie in [0, 1], got {credit}")
    refs = _references(ground_truth, len(completions))
    return [answer_matching_score(t, g, credit, codec) for t, g in zip(_texts(completions, from_answer_tag), refs)]


# ------------------------------------------------------------------------------ format, repetition


def format_score(text: str) -> float:
    """1.0 iff ``text`` is exactly ``<think>…</think><answer>…</answer>``, else 0.0.

    Whitespace is allowed before, between and after the two blocks; nothing else is, and neither
    block may contain another ``think``/``answer`` tag.
    """
    return 1.0 if isinstance(text, str) and _THINK_ANSWER_RE.match(text) else 0.0


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL reward: :func:`format_score` of each completion."""
    return [format_score(completion_text(c)) for c in completions]


def no_repeat_score(text: str, max_repeats: int = 3, codec: Optional[MaskCodec] = None) -> float:
    """0.0 if any span occurs more than ``max_repeats`` times in ``text``, else 1.0.

    Spans are identified by their code pair; all invalid spans count as one and the same span.
    """
    counts = Counter((s.codes, s.valid) for s in _codec(codec).parse(text).spans)
    return 0.0 if counts and max(counts.values()) > max_repeats else 1.0


def no_repeat_reward(completions: Sequence[Any], *, max_repeats: int = 3, codec: Optional[MaskCodec] = None,
                     **kwargs: Any) -> list[float]:
    """TRL reward: :func:`no_repeat_score` of each completion (the SFT data filter's rule, §3)."""
    if max_repeats < 1:
        raise SamtokError(f"max_repeats must be >= 1, got {max_repeats}")
    return [no_repeat_score(completion_text(c), max_repeats, codec) for c in completions]


# ------------------------------------------------------------------------------ grounded captions


@dataclass(frozen=True)
class Grounding:
    """One span of a grounded caption and the phrase right before it (``None``: no phrase)."""

    codes: Codes
    valid: bool
    phrase: Optional[str]


_ARTICLES = frozenset({"a", "an", "the"})


def normalize_phrase(phrase: str) -> tuple[str, ...]:
    """Word tuple of a phrase, SQuAD-style: lower case, punctuation and articles (a, an, the) dropped."""
    return tuple(w for w in _WORD_RE.findall(phrase.lower()) if w not in _ARTICLES)


def phrase_similarity(a: Optional[str], b: Optional[str]) -> float:
    """Word-level F1 (multiset overlap) of two phrases; 1.0 for two missing phrases, 0.0 if one is.

    Equal after :func:`normalize_phrase` (up to word order) ⇔ 1.0.
    """
    if a is None or b is None:
        return 1.0 if a is None and b is None else 0.0
    wa, wb = Counter(normalize_phrase(a)), Counter(normalize_phrase(b))
    if not wa or not wb:
        return 1.0 if not wa and not wb else 0.0
    common = sum((wa & wb).values())
    return 2.0 * common / (sum(wa.values()) + sum(wb.values()))


def parse_groundings(text: str, codec: Optional[MaskCodec] = None) -> list[Grounding]:
    """Every span of ``text`` with its phrase.

    A phrase is ``<|object_ref_start|>phrase<|object_ref_end|>`` followed by the span with at most
    whitespace in between; a span with no such phrase right before it gets ``phrase=None``.
    """
    c = _codec(codec)
    if not isinstance(text, str):
        return []
    phrase_at = {m.end(): m.group(1) for m in _PHRASE_RE.finditer(text)}
    return [Grounding(s.codes, s.valid, phrase_at.get(s.start)) for s in c.parse(text).spans]


def gcg_phrase_score(prediction: str, ground_truth: str, phrase_threshold: float = 1.0,
                     codec: Optional[MaskCodec] = None) -> float:
    """F1 over matched (phrase, span) pairs of a grounded caption: ``2·M / (N_pred + N_gt)``.

    Predicted groundings: every span of ``prediction`` (invalid and repeated ones included), each
    with its phrase (:func:`parse_groundings`). GT groundings: the valid spans of ``ground_truth``,
    exact repeats (same codes and phrase) collapsed. A predicted grounding matches a GT grounding
    when it is valid, its code pair equals the GT pair, and :func:`phrase_similarity` of the two
    phrases is ≥ ``phrase_threshold`` (1.0: same words). Matching is greedy in prediction order,
    each prediction taking the unmatched GT grounding of highest phrase similarity (first on ties),
    each GT grounding at most once. ``M`` = number of matches. Both empty → 1.0; one empty → 0.0.
    """
    c = _codec(codec)
    pred = parse_groundings(prediction, c)
    gt = list(dict.fromkeys(g for g in parse_groundings(ground_truth, c) if g.valid))
    if not pred and not gt:
        return 1.0
    if not pred or not gt:
        return 0.0
    free = list(range(len(gt)))
    matched = 0
    for p in pred:
        if not p.valid:
            continue
        best, best_sim = None, -1.0
        for k in free:
            if gt[k].codes != p.codes:
                continue
            sim = phrase_similarity(p.phrase, gt[k].phrase)
            if sim >= phrase_threshold and sim > best_sim:
                best, best_sim = k, sim
        if best is not None:
            free.remove(best)
            matched += 1
    return 2.0 * matched / (len(pred) + len(gt))


def gcg_phrase_reward(completions: Sequence[Any], ground_truth: Sequence[str] | None = None, *,
                      phrase_threshold: float = 1.0, codec: Optional[MaskCodec] = None,
                      tokenizer: Any = None, completion_ids: Sequence[Sequence[int]] | None = None,
                      from_answer_tag: bool = False, **kwargs: Any) -> list[float]:
    """TRL reward: :func:`gcg_phrase_score` of each completion.

    Qwen's ``<|object_ref_start|>``/``<|object_ref_end|>`` are *special* tokens, and TRL decodes
    completions with ``skip_special_tokens=True``: the phrase markers vanish from ``completions``.
    Pass ``tokenizer`` (bind it with ``functools.partial``) to score ``completion_ids`` decoded with
    special tokens kept instead.
    """
    if not 0.0 < phrase_threshold <= 1.0:
        raise SamtokError(f"phrase_threshold must lie in (0, 1], got {phrase_threshold}")
    refs = _references(ground_truth, len(completions))
    if tokenizer is not None and completion_ids is not None:
        texts = [tokenizer.decode(list(ids), skip_special_tokens=False) for ids in completion_ids]
    else:
        texts = [completion_text(c) for c in completions]
    if from_answer_tag:
        texts = [answer_block(t) for t in texts]
    return [gcg_phrase_score(t, g, phrase_threshold, codec) for t, g in zip(texts, refs)]


# ------------------------------------------------------------------------------ mask IoU (costly)

IOU_MODES = ("matched", "mean_best", "union")


def _iou_matrix(pred: list[Optional[np.ndarray]], gt: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(pred), len(gt)), dtype=np.float64)
    for i, p in enumerate(pred):
        if p is None:
            continue
        for j, g in enumerate(gt):
            if p.shape != g.shape:
                raise MaskFormatError(f"decoded mask shape {p.shape} does not match ground-truth shape {g.shape}")
            union = np.logical_or(p, g).sum()
            out[i, j] = np.logical_and(p, g).sum() / union if union else 1.0
    return out


def mask_set_score(pred: list[Optional[np.ndarray]], gt: list[np.ndarray], mode: str = "matched") -> float:
    """Compare predicted masks (``None``: an invalid span, an empty prediction) with GT masks.

    * ``"matched"``: greedy one-to-one pairing by decreasing IoU (the GCG mIoU protocol), then
      ``Σ paired IoU / max(N_pred, N_gt)`` — the answer-matching rule with IoU as soft TP;
    * ``"mean_best"``: mean over GT masks of the best IoU of any prediction (extra predictions are
      not penalised);
    * ``"union"``: IoU of the union of predictions with the union of GT masks (the GRES gIoU term;
      an empty GT scores 1 iff every predicted mask is empty).

    ``"matched"``/``"mean_best"``: both lists empty → 1.0, exactly one empty → 0.0.
    """
    if mode not in IOU_MODES:
        raise SamtokError(f"unknown IoU reward mode {mode!r}; expected one of {IOU_MODES}")
    if mode == "union":
        masks = [p for p in pred if p is not None]
        if not gt:
            return 0.0 if any(m.any() for m in masks) else 1.0
        g = np.logical_or.reduce(gt)
        if not masks:
            return 0.0 if g.any() else 1.0
        return float(_iou_matrix([np.logical_or.reduce(masks)], [g])[0, 0])
    if not pred and not gt:
        return 1.0
    if not pred or not gt:
        return 0.0
    iou = _iou_matrix(pred, gt)
    if mode == "mean_best":
        return float(iou.max(axis=0).mean())
    order = sorted(((iou[i, j], i, j) for i in range(len(pred)) for j in range(len(gt))),
                   key=lambda t: (-t[0], t[1], t[2]))
    used_p, used_g, total = set(), set(), 0.0
    for v, i, j in order:
        if v <= 0.0:
            break
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        total += v
    return total / max(len(pred), len(gt))


def _as_mask_list(entry: Any, where: str) -> list[np.ndarray]:
    if entry is None:
        return []
    if isinstance(entry, np.ndarray) and entry.ndim == 3:
        return [as_bool_mask(m, where) for m in entry]
    if isinstance(entry, (Mapping, np.ndarray)):
        entry = [entry]
    out = []
    for k, m in enumerate(entry):
        if isinstance(m, Mapping):
            out.append(decode_rle(dict(m), f"{where}[{k}]"))
        else:
            out.append(as_bool_mask(m, f"{where}[{k}]"))
    return out


def _cache_key(image_key: Any) -> Hashable:
    try:
        hash(image_key)
        return ("key", image_key)
    except TypeError:
        return ("id", id(image_key))


def iou_reward(completions: Sequence[Any], ground_truth: Sequence[str] | None = None, *,
               decode: MaskDecodeFn | None = None, mode: str = "matched", image_column: str = "image_key",
               gt_mask_column: str | None = None, codec: Optional[MaskCodec] = None,
               from_answer_tag: bool = False, **kwargs: Any) -> list[float]:
    """TRL reward: decode spans into masks and compare with GT masks (:func:`mask_set_score`).

    The costly alternative the paper avoids: one decoder call per distinct (image, codes) per call.
    ``decode(image_key, (c0, c1))`` returns an (H, W) bool mask; ``image_key`` is the value of the
    dataset column ``image_column`` for that completion. GT masks come from the dataset column
    ``gt_mask_column`` (per completion: a list of (H, W) masks or COCO RLE dicts, or an (N, H, W)
    array) or, when it is ``None``, by decoding the GT spans (code-space IoU). Invalid predicted
    spans are not decoded: they count as empty predictions.
    """
    if decode is None:
        raise SamtokError("iou_reward needs a decode function: decode(image_key, (c0, c1)) -> bool mask")
    c = _codec(codec)
    n = len(completions)
    keys = kwargs.get(image_column)
    if keys is None or len(keys) != n:
        raise SamtokError(f"iou_reward needs a '{image_column}' dataset column with one entry per completion")
    if gt_mask_column is not None:
        gt_entries = kwargs.get(gt_mask_column)
        if gt_entries is None or len(gt_entries) != n:
            raise SamtokError(f"iou_reward needs a '{gt_mask_column}' dataset column with one entry per completion")
        refs = None
    else:
        refs = _references(ground_truth, n)
    cache: dict[tuple[Hashable, Codes], np.ndarray] = {}

    def masks_of(image_key: Any, codes: Sequence[Codes]) -> list[np.ndarray]:
        out = []
        for cp in codes:
            k = (_cache_key(image_key), cp)
            if k not in cache:
                cache[k] = as_bool_mask(decode(image_key, cp), "decoded mask")
            out.append(cache[k])
        return out

    rewards = []
    for i, text in enumerate(_texts(completions, from_answer_tag)):
        spans: list[MaskSpan] = c.parse(text).spans
        decoded = iter(masks_of(keys[i], [s.codes for s in spans if s.valid]))
        pred = [next(decoded) if s.valid else None for s in spans]
        if refs is None:
            gt = _as_mask_list(gt_entries[i], f"{gt_mask_column}[{i}]")
        else:
            gt = masks_of(keys[i], _gt_codes(c, refs[i]))
        rewards.append(mask_set_score(pred, gt, mode))
    return rewards


# ------------------------------------------------------------------------------ combination


@dataclass
class RewardWeights:
    """Weight of each reward component in the sum; 0 switches a component off (not computed)."""

    answer_matching: float = 1.0  # the paper's reward (§4)
    partial_credit: float = 0.0  # answer matching with first-code credit; use instead of answer_matching
    format: float = 0.0  # <think>…</think><answer>…</answer> structure
    no_repeat: float = 0.0  # 0 when a span repeats more than max_repeats times
    gcg_phrase: float = 0.0  # F1 of (phrase, span) pairs for grounded captions
    iou: float = 0.0  # decoded-mask IoU; needs a decode function (costly)


@dataclass
class RewardSpec:
    """Which rewards GRPO optimises, with their weights and options (every default documented)."""

    weights: RewardWeights = field(default_factory=RewardWeights)
    partial_credit: float = 0.4  # credit for a span whose first code alone matches a GT span
    max_repeats: int = 3  # no_repeat: a span may occur at most this many times
    phrase_threshold: float = 1.0  # gcg_phrase: min word-F1 of two phrases to match (1.0: same words)
    iou_mode: str = "matched"  # iou: "matched", "mean_best" or "union" (see mask_set_score)
    image_column: str = "image_key"  # iou: dataset column passed to decode() as the image key
    gt_mask_column: Optional[str] = None  # iou: dataset column of GT masks; None decodes the GT spans
    ground_truth_column: str = "ground_truth"  # dataset column holding the reference answer text
    from_answer_tag: bool = False  # score only the last <answer>…</answer> block when present
    codebook_size: int = 256  # codes per depth of the mask tokenizer (token numbering, §2)
    log_components: bool = True  # report component means through TRL's log_metric when available


COMPONENTS = ("answer_matching", "partial_credit", "format", "no_repeat", "gcg_phrase", "iou")


@dataclass
class RewardBreakdown:
    """Weighted total per completion and the unweighted value of each active component."""

    total: list[float]
    components: dict[str, list[float]]


class WeightedReward:
    """The weighted sum of the active reward components, callable as one TRL reward function.

    ``reward(completions=..., ground_truth=..., ...)`` returns the totals; :meth:`breakdown` also
    returns every component; after each call :attr:`last` holds the latest breakdown. Inside TRL the
    component means are logged as ``reward_components/<name>`` (through ``log_metric``).
    """

    __name__ = "samtok_reward"  # TRL names reward functions by __name__

    def __init__(self, spec: RewardSpec, decode: MaskDecodeFn | None = None, tokenizer: Any = None):
        check_reward_spec(spec, decode)
        self.spec = spec
        self.decode = decode
        self.tokenizer = tokenizer
        self.codec = MaskCodec(codebook_size=spec.codebook_size)
        self.last: RewardBreakdown | None = None
        self._fns = {name: fn for name, fn in _component_fns(spec, self.codec, decode, tokenizer).items()
                     if getattr(spec.weights, name) != 0.0}

    def breakdown(self, completions: Sequence[Any], **kwargs: Any) -> RewardBreakdown:
        comps = {name: [float(v) for v in fn(completions, **kwargs)] for name, fn in self._fns.items()}
        total = [0.0] * len(completions)
        for name, values in comps.items():
            w = float(getattr(self.spec.weights, name))
            total = [t + w * v for t, v in zip(total, values)]
        return RewardBreakdown(total, comps)

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float]:
        self.last = out = self.breakdown(completions, **kwargs)
        log_metric = kwargs.get("log_metric")
        if self.spec.log_components and callable(log_metric) and out.total:
            for name, values in out.components.items():
                log_metric(f"reward_components/{name}", sum(values) / len(values))
        return out.total


def check_reward_spec(spec: RewardSpec, decode: MaskDecodeFn | None = None) -> None:
    """Raise :class:`SamtokError` for a spec that cannot work."""
    w = spec.weights
    values = {name: getattr(w, name) for name in COMPONENTS}
    bad = [n for n, v in values.items() if not math.isfinite(float(v))]
    if bad:
        raise SamtokError(f"reward weights must be finite: {bad}")
    if all(v == 0.0 for v in values.values()):
        raise SamtokError("every reward weight is 0: nothing to optimise")
    if not 0.0 <= spec.partial_credit <= 1.0:
        raise SamtokError(f"partial_credit must lie in [0, 1], got {spec.partial_credit}")
    if spec.max_repeats < 1:
        raise SamtokError(f"max_repeats must be >= 1, got {spec.max_repeats}")
    if not 0.0 < spec.phrase_threshold <= 1.0:
        raise SamtokError(f"phrase_threshold must lie in (0, 1], got {spec.phrase_threshold}")
    if spec.iou_mode not in IOU_MODES:
        raise SamtokError(f"unknown iou_mode {spec.iou_mode!r}; expected one of {IOU_MODES}")
    if w.iou != 0.0 and decode is None:
        raise SamtokError("the iou reward has a non-zero weight but no decode function was given")


def _component_fns(spec: RewardSpec, codec: MaskCodec, decode: MaskDecodeFn | None,
                   tokenizer: Any) -> dict[str, Callable[..., list[float]]]:
    """One TRL-style function per component, reading GT from ``spec.ground_truth_column``."""
    col, tag = spec.ground_truth_column, spec.from_answer_tag

    def gt(kwargs: dict) -> Any:
        if col not in kwargs:
            raise SamtokError(f"the reward needs a '{col}' dataset column with the reference answer text")
        return _references(kwargs[col], len(kwargs["completions"]), col)

    def answer_matching(completions, **kw):
        return answer_matching_reward(completions, gt({**kw, "completions": completions}), codec=codec,
                                      from_answer_tag=tag)

    def partial_credit(completions, **kw):
        return partial_credit_reward(completions, gt({**kw, "completions": completions}),
                                     credit=spec.partial_credit, codec=codec, from_answer_tag=tag)

    def format_(completions, **kw):
        return format_reward(completions)

    def no_repeat(completions, **kw):
        return no_repeat_reward(completions, max_repeats=spec.max_repeats, codec=codec)

    def gcg_phrase(completions, **kw):
        return gcg_phrase_reward(completions, gt({**kw, "completions": completions}),
                                 phrase_threshold=spec.phrase_threshold, codec=codec, tokenizer=tokenizer,
                                 completion_ids=kw.get("completion_ids"), from_answer_tag=tag)

    def iou(completions, **kw):
        refs = None if spec.gt_mask_column is not None else gt({**kw, "completions": completions})
        extra = {k: v for k, v in kw.items() if k in (spec.image_column, spec.gt_mask_column)}
        return iou_reward(completions, refs, decode=decode, mode=spec.iou_mode, image_column=spec.image_column,
                          gt_mask_column=spec.gt_mask_column, codec=codec, from_answer_tag=tag, **extra)

    fns = {"answer_matching": answer_matching, "partial_credit": partial_credit, "format": format_,
           "no_repeat": no_repeat, "gcg_phrase": gcg_phrase, "iou": iou}
    for name, fn in fns.items():
        fn.__name__ = name
    return fns


def build_reward_fn(spec: RewardSpec | None = None, decode: MaskDecodeFn | None = None,
                    tokenizer: Any = None) -> WeightedReward:
    """The weighted-sum reward of ``spec`` (default: the paper's answer matching alone).

    ``decode`` is required when the iou weight is non-zero; ``tokenizer`` lets the GCG reward read
    the phrase markers from ``completion_ids`` (see :func:`gcg_phrase_reward`).
    """
    return WeightedReward(spec or RewardSpec(), decode=decode, tokenizer=tokenizer)


def trl_reward_funcs(spec: RewardSpec | None = None, decode: MaskDecodeFn | None = None,
                     tokenizer: Any = None) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """The active components as separate functions plus their weights, for TRL's ``reward_funcs``
    and ``GRPOConfig.reward_weights`` (TRL then logs each as ``rewards/<name>/mean``)."""
    spec = spec or RewardSpec()
    check_reward_spec(spec, decode)
    fns = _component_fns(spec, MaskCodec(codebook_size=spec.codebook_size), decode, tokenizer)
    active = [n for n in COMPONENTS if getattr(spec.weights, n) != 0.0]
    return [fns[n] for n in active], [float(getattr(spec.weights, n)) for n in active]
