"""Task samples → chat conversations with mask spans (spec §2), shared by SFT, RL and evaluation.

:func:`build_example` turns one task sample (:mod:`samtok.data.records`) plus its image record and
the pre-tokenized codes (:class:`~samtok.data.pretokenize.CodeTable`) into a :class:`ChatExample`:
messages with ``<image>`` placeholders, the images they refer to (:class:`ImageRef`: a path, and
for zoom-in views a crop box and an upscale target), the ground-truth answer and the mask ids of
every assistant turn. Answer formats, exactly (``<span>`` = ``<|mt_start|><|mt_AAAA|><|mt_BBBB|><|mt_end|>``):

* referring / generalized referring / multi-round / instance segmentation — a fenced JSON list::

      ```json
      [{"mask_2d": "<span>", "label": "front black chair"},
      {"mask_2d": "<span>", "label": "..."}]
      ```

  items joined by ``",\\n"``, targets sorted by box-centre x, then box-centre y (then ann id);
  several targets of one expression are labelled ``"one of the {X}"``; no target → exactly
  ``No target.``;
* grounded captions (GCG) — the caption with each grounded phrase written
  ``<|object_ref_start|>phrase<|object_ref_end|><span>`` (several masks: spans back to back);
* region captions / region VQA — the span sits in the USER turn ("... this region <span>.");
  a region whose box covers less than ``region_crop_ratio`` of the image (0.2 in training,
  ``eval_region_crop_ratio`` = 0.3 in evaluation) also gets a zoom-in view: a second image, a crop
  around the box (:func:`region_crop_box`, a pure function of the box and the image size),
  upscaled so its short side is at least ``crop_min_short_side``, shown with the CROP's own mask
  span (pre-tokenized under the key ``ann_id + "@crop"``, :func:`crop_key`);
* scene graphs — a fenced JSON list of
  ``{"subject": {"mask_2d", "label"}, "predicate", "object": {"mask_2d", "label"}}``;
* ready-made conversations (:class:`~samtok.data.records.ConversationSample`) — used as they are.

Samples whose assistant turns repeat one mask span more than ``max_span_repeats`` (3) times are
dropped (``build_example`` returns ``None``). Every random choice (templates, distractors) comes
from the ``rng`` passed in, so a seed reproduces the same conversation.

This module is light: no torch, no Lightning.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from samtok.core.errors import SamtokError
from samtok.data.records import (
    REGION_MARKER_RE,
    ConversationSample,
    GroundedCaptionSample,
    ImageRecord,
    InstanceSegSample,
    MultiRoundSample,
    RecordError,
    ReferringSample,
    RegionCaptionSample,
    SceneGraphSample,
    TaskSample,
)
from samtok.tokenizer.codec import MaskCodec

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from samtok.data.pretokenize import CodeTable

IMAGE = "<image>"
OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"
CROP_SUFFIX = "@crop"
TASK_NAMES = ("res", "gres", "gcg", "region_caption", "region_vqa", "mr_seg", "scene_graph", "ov_seg", "conversation")


class ConversationBuildError(SamtokError):
    """A sample cannot become a conversation (inconsistent phrases, placeholders, crop settings...)."""


# ------------------------------------------------------------------------------------------------
# config


@dataclass
class ConversationConfig:
    """How task samples become conversations. Template placeholders: ``{X}`` (an expression),
    ``{region}`` (a mask span), ``{categories}`` (category names joined by ", ")."""

    referring_templates: list[str] = field(default_factory=lambda: [
        "Please segment {X} in this image.",
        "Can you segment the {X} in this image?",
        "Where is the {X} in this picture? Please respond with a segmentation mask.",
        "Segment {X}.",
        "What is {X} in this image? Please output the segmentation mask.",
    ])  # RES and GRES prompts; "the {X}" with an expression starting "the " keeps one "the"
    multi_target_label: str = "one of the {X}"  # label of each target when an expression has several
    no_target_answer: str = "No target."  # the whole answer when an expression matches nothing
    gcg_templates: list[str] = field(default_factory=lambda: [
        "Can you provide a brief description of this image? Please output with interleaved segmentation masks for the corresponding phrases.",
        "Please describe the image and ground each object you mention with a segmentation mask.",
    ])
    region_caption_templates: list[str] = field(default_factory=lambda: [
        "Give a detailed description of this region {region}.",
        "Describe the region {region} in this image.",
        "What is in the region {region}? Please describe it.",
    ])
    region_vqa_template: str = "Regarding the region {region}: {question}"  # used when the question has no "this region"
    region_zoom_template: str = "Zoomed-in view of the region: <image> {region}"  # second image + the crop's span
    region_crop_ratio: float = 0.2  # box area / image area below which a region gets a zoom-in view (training)
    eval_region_crop_ratio: float = 0.3  # the same threshold in evaluation (for_eval())
    crop_min_side: int = 140  # zoom-in crop: at least this many pixels per side (clamped to the image)
    crop_context: float = 1.5  # crop side = box side x this (>= 1), before min_side and clamping
    crop_min_short_side: int = 280  # the crop is upscaled (bicubic) so its short side reaches this
    ov_templates: list[str] = field(default_factory=lambda: [
        "Please segment every instance of these categories in this image: {categories}.",
        "Segment all instances of the following categories: {categories}.",
    ])
    ov_distractors: int = 0  # absent categories added to each open-vocabulary sample (by the mixture loader)
    scene_graph_templates: list[str] = field(default_factory=lambda: [
        "Generate the scene graph of this image: list the relations between objects, each object with its segmentation mask.",
    ])
    scene_graph_fit_repeats: bool = True  # keep relations greedily so that no span repeats > max_span_repeats
    scene_graph_max_relations: int = 0  # 0: no cap
    max_span_repeats: int = 3  # a sample whose answers repeat a span more often is dropped
    codebook_size: int = 256  # of the mask codec (spans)

    def validate(self) -> "ConversationConfig":
        for name in ("referring_templates", "gcg_templates", "region_caption_templates", "ov_templates",
                     "scene_graph_templates"):
            if not getattr(self, name):
                raise ConversationBuildError(f"conversation.{name} must list at least one template")
        for t in self.referring_templates:
            if "{X}" not in t:
                raise ConversationBuildError(f"conversation.referring_templates: {t!r} has no {{X}}")
        for t in self.region_caption_templates:
            if "{region}" not in t:
                raise ConversationBuildError(f"conversation.region_caption_templates: {t!r} has no {{region}}")
        for t in self.ov_templates:
            if "{categories}" not in t:
                raise ConversationBuildError(f"conversation.ov_templates: {t!r} has no {{categories}}")
        if "{region}" not in self.region_zoom_template or self.region_zoom_template.count(IMAGE) != 1:
            raise ConversationBuildError("conversation.region_zoom_template needs {region} and exactly one <image>")
        if self.crop_context < 1.0:
            raise ConversationBuildError(f"conversation.crop_context must be >= 1, got {self.crop_context}")
        if self.crop_min_side < 1 or self.crop_min_short_side < 0:
            raise ConversationBuildError("conversation.crop_min_side must be >= 1 and crop_min_short_side >= 0")
        if self.max_span_repeats < 1:
            raise ConversationBuildError("conversation.max_span_repeats must be >= 1")
        return self

    def for_eval(self) -> "ConversationConfig":
        """The same options with the evaluation zoom-in threshold."""
        return replace(self, region_crop_ratio=self.eval_region_crop_ratio)

    def crop_spec(self) -> dict:
        """What determines a crop's pixels (and so its codes): stored with pre-tokenized tables."""
        return {"min_side": int(self.crop_min_side), "context": float(self.crop_context),
                "min_short_side": int(self.crop_min_short_side)}

    @property
    def max_crop_ratio(self) -> float:
        """Regions below this ratio may need a zoom-in view in some stage (what pre-tokenization covers)."""
        return max(self.region_crop_ratio, self.eval_region_crop_ratio)


# ------------------------------------------------------------------------------------------------
# the conversation API


@dataclass
class ImageRef:
    """An image of a conversation: a file, optionally cropped (zoom-in view) and upscaled.

    ``crop`` is an inclusive ``(x0, y0, x1, y1)`` box in the original image's pixels;
    ``min_short_side`` upscales the (cropped) image so its short side reaches it (0: never);
    ``size`` is the original ``(H, W)`` when known (lets lengths be computed without reading pixels).
    """

    path: str
    crop: Optional[tuple[int, int, int, int]] = None
    min_short_side: int = 0
    size: Optional[tuple[int, int]] = None

    def output_size(self) -> tuple[int, int]:
        """``(H, W)`` of the image :func:`load_image_ref` returns (needs ``size`` or a crop)."""
        if self.crop is not None:
            x0, y0, x1, y1 = self.crop
            w, h = x1 - x0 + 1, y1 - y0 + 1
        elif self.size is not None:
            h, w = self.size
        else:
            raise ConversationBuildError(f"ImageRef {self.path}: size unknown (read the image instead)")
        nw, nh = upscaled_size(w, h, self.min_short_side)
        return nh, nw


@dataclass
class ChatExample:
    """One conversation ready for :func:`samtok.mllm.sequences.build_training_example`.

    ``targets`` has one list per assistant turn: the ann ids of that turn's masks in answer order.
    A prompt-only example (:func:`prompt_only`) has one assistant turn fewer in ``messages`` but
    keeps ``targets`` whole: ``targets[-1]`` are the masks the model must produce, ``answer`` its
    ground-truth text.
    """

    messages: list[dict]
    images: list[ImageRef]
    task: str
    source: str
    image_id: str
    sample_id: str
    targets: list[list[str]]
    answer: str
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TurnGroup:
    """Referring samples of one image asked one after another in a single conversation (SFT):
    one image, several requests, each answered in its own assistant turn (:func:`group_turns`)."""

    samples: tuple[ReferringSample, ...]

    @property
    def source(self) -> str:
        return self.samples[0].source

    @property
    def image_id(self) -> str:
        return self.samples[0].image_id

    @property
    def sample_id(self) -> str:
        return "+".join(s.sample_id for s in self.samples)

    @property
    def task(self) -> str:
        return self.samples[0].task

    @property
    def ann_ids(self) -> list[str]:
        return [a for s in self.samples for a in s.ann_ids]


def group_turns(samples: Sequence[TaskSample], turns: int) -> list[TaskSample | TurnGroup]:
    """Referring samples of the same image, in their order, as conversations of up to ``turns`` requests.

    An image's samples are cut into consecutive groups of ``turns`` (the last may be shorter; a group
    of one stays a plain sample). Groups are placed where their image's first sample was.
    """
    if turns < 1:
        raise ConversationBuildError(f"turns per image must be >= 1, got {turns}")
    other = [s for s in samples if not isinstance(s, ReferringSample)]
    if other:
        raise ConversationBuildError(
            f"only referring samples (res, gres) can share a conversation; got {type(other[0]).__name__} "
            f"{other[0].sample_id}")
    by_image: dict[tuple[str, str], list[ReferringSample]] = {}
    for s in samples:
        by_image.setdefault((s.source, s.image_id), []).append(s)  # type: ignore[arg-type]
    out: list[TaskSample | TurnGroup] = []
    for group in by_image.values():
        for i in range(0, len(group), turns):
            chunk = tuple(group[i:i + turns])
            out.append(chunk[0] if len(chunk) == 1 else TurnGroup(chunk))
    return out


# ------------------------------------------------------------------------------------------------
# pure helpers: geometry


def crop_key(ann_id: str) -> str:
    """The pre-tokenization key of a mask's zoom-in crop variant."""
    return f"{ann_id}{CROP_SUFFIX}"


def box_area_ratio(box: Sequence[int], width: int, height: int) -> float:
    """Area of an inclusive pixel box over the image area."""
    x0, y0, x1, y1 = box
    return (x1 - x0 + 1) * (y1 - y0 + 1) / float(width * height)


def needs_crop(box: Sequence[int], width: int, height: int, ratio: float) -> bool:
    """Whether a region gets a zoom-in view (box area ratio strictly below ``ratio``)."""
    return box_area_ratio(box, width, height) < ratio


def region_crop_box(box: Sequence[int], width: int, height: int, min_side: int = 140,
                    context: float = 1.5) -> tuple[int, int, int, int]:
    """The zoom-in crop of an inclusive box: inclusive ``(x0, y0, x1, y1)``, inside the image.

    Each side is ``max(min_side, ceil(box side × context))`` clamped to the image side; the crop is
    centred on the box and shifted to stay inside the image, so it always contains the box.
    Integer arithmetic only: the same box and image size always give the same crop.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
        raise ConversationBuildError(f"box {tuple(box)} is not inside a {width}x{height} image")
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    cw = min(width, max(int(min_side), math.ceil(round(bw * context, 6))))
    ch = min(height, max(int(min_side), math.ceil(round(bh * context, 6))))
    left = min(max((x0 + x1 + 1 - cw) // 2, 0), width - cw)
    top = min(max((y0 + y1 + 1 - ch) // 2, 0), height - ch)
    return left, top, left + cw - 1, top + ch - 1


def upscaled_size(width: int, height: int, min_short_side: int) -> tuple[int, int]:
    """``(W, H)`` after upscaling so the short side is at least ``min_short_side`` (never downscales)."""
    short = min(width, height)
    if min_short_side <= 0 or short >= min_short_side:
        return width, height
    if width <= height:
        return min_short_side, max(min_short_side, (height * min_short_side + width // 2) // width)
    return max(min_short_side, (width * min_short_side + height // 2) // height), min_short_side


def crop_mask(mask: np.ndarray, crop: Sequence[int], min_short_side: int) -> np.ndarray:
    """A full-image bool mask → the crop's mask at the zoom-in image's size (nearest neighbour)."""
    from samtok.core.masks import resize_mask

    x0, y0, x1, y1 = crop
    part = np.asarray(mask, dtype=bool)[y0:y1 + 1, x0:x1 + 1]
    w, h = upscaled_size(x1 - x0 + 1, y1 - y0 + 1, min_short_side)
    return resize_mask(part, (h, w))


def load_image_ref(ref: ImageRef) -> "Image.Image":
    """The RGB PIL image of ``ref``: read, cropped (``crop``), upscaled (bicubic, ``min_short_side``)."""
    from PIL import Image

    from samtok.core.images import load_image

    img = Image.fromarray(load_image(ref.path))
    if ref.crop is not None:
        x0, y0, x1, y1 = (int(v) for v in ref.crop)
        if not (0 <= x0 <= x1 < img.width and 0 <= y0 <= y1 < img.height):
            raise ConversationBuildError(f"crop {ref.crop} is outside {ref.path} ({img.width}x{img.height})")
        img = img.crop((x0, y0, x1 + 1, y1 + 1))
    size = upscaled_size(img.width, img.height, ref.min_short_side)
    if size != img.size:
        img = img.resize(size, resample=Image.BICUBIC)
    return img


def order_by_position(ann_ids: Sequence[str], boxes: dict[str, tuple[int, int, int, int]]) -> list[str]:
    """Ann ids sorted left to right by box-centre x, then top to bottom by box-centre y (then id)."""

    def key(a: str):
        x0, y0, x1, y1 = boxes[a]
        return (x0 + x1, y0 + y1, a)  # twice the centre: exact integers

    return sorted(dict.fromkeys(ann_ids), key=key)


# ------------------------------------------------------------------------------------------------
# pure helpers: text


_DETERMINER_RE = re.compile(
    r"(the|a|an|all|every|each|both|any|some|this|that|these|those)\s",
    flags=re.IGNORECASE)


def fill_expression(template: str, expression: str) -> str:
    """``template`` with ``{X}`` = ``expression``. When the template says "the {X}" and the expression
    already starts with a determiner ("the", "all", "these"...), the template's "the" is dropped:
    "Can you segment the {X}?" + "the red blob" → "Can you segment the red blob?";
    "one of the {X}" + "all circles" → "one of all circles"."""
    expression = expression.strip()
    if _DETERMINER_RE.match(expression) and re.search(r"\b[Tt]he \{X\}", template):
        template = re.sub(r"\b([Tt]he) \{X\}", "{X}", template, count=1)
        if template.startswith("{X}") and expression:
            expression = expression[0].upper() + expression[1:]
    return template.replace("{X}", expression)


def mask_item(span: str, label: str) -> str:
    return "{" + f'"mask_2d": {json.dumps(span)}, "label": {json.dumps(label, ensure_ascii=False)}' + "}"


def fenced_json_list(items: Sequence[str]) -> str:
    """``` ```json\\n[item,\\nitem]\\n``` ```."""
    return "```json\n[" + ",\n".join(items) + "]\n```"


def mask_answer(items: Sequence[tuple[str, str]], no_target: str = "No target.") -> str:
    """The mask-generation answer for ``(span, label)`` pairs (already in answer order)."""
    if not items:
        return no_target
    return fenced_json_list([mask_item(span, label) for span, label in items])


def scene_graph_answer(triplets: Sequence[tuple[tuple[str, str], str, tuple[str, str]]]) -> str:
    """``((subject span, label), predicate, (object span, label))`` triplets → fenced JSON list."""
    items = []
    for (s_span, s_label), pred, (o_span, o_label) in triplets:
        items.append("{" + f'"subject": {mask_item(s_span, s_label)}, "predicate": {json.dumps(pred, ensure_ascii=False)}, '
                     f'"object": {mask_item(o_span, o_label)}' + "}")
    return fenced_json_list(items)


def grounded_caption(caption: str, phrases: Sequence[tuple[int, int, str]]) -> str:
    """The caption with each ``(start, end, spans)`` phrase wrapped in Qwen's object-ref tokens."""
    out, pos = [], 0
    for start, end, spans in sorted(phrases, key=lambda p: (p[0], p[1])):
        if start < pos or end <= start or end > len(caption):
            raise ConversationBuildError(f"phrase [{start}, {end}) overlaps another or lies outside the caption")
        out += [caption[pos:start], OBJECT_REF_START, caption[start:end], OBJECT_REF_END, spans]
        pos = end
    out.append(caption[pos:])
    return "".join(out)


def insert_region(question: str, span: str, fallback: str) -> str:
    """Put the span after the question's first "this region", else use ``fallback``."""
    m = re.search(r"\bthis region\b", question, flags=re.IGNORECASE)
    if m:
        return question[:m.end()] + " " + span + question[m.end():]
    return fallback.replace("{region}", span).replace("{question}", question)


def span_repeats(texts: Sequence[str], codec: Optional[MaskCodec] = None) -> int:
    """The largest number of times one mask span (its codes) occurs across ``texts``."""
    codec = codec or MaskCodec()
    counts = Counter(c for t in texts for c in codec.parse(t).codes)
    return max(counts.values(), default=0)


def sample_task(sample: TaskSample | TurnGroup) -> str:
    """The task name of a sample (region captions with a question are ``region_vqa``; a
    :class:`TurnGroup` has its first request's task)."""
    if isinstance(sample, RegionCaptionSample) and sample.question:
        return "region_vqa"
    return sample.task


def add_distractor_categories(sample: InstanceSegSample, pool: Sequence[str], count: int,
                              rng: np.random.Generator) -> InstanceSegSample:
    """A copy of ``sample`` asking also for ``count`` categories of ``pool`` it does not contain,
    all asked categories in a random order. Categories already absent count towards ``count``."""
    asked = list(dict.fromkeys(sample.categories))
    present = {c for c, ids in sample.targets.items() if ids}
    have = sum(1 for c in asked if c not in present)
    candidates = sorted({c for c in pool if c not in asked})
    need = max(0, count - have)
    if need and candidates:
        pick = rng.permutation(len(candidates))[:need]
        asked += [candidates[int(i)] for i in pick]
    asked = [asked[int(i)] for i in rng.permutation(len(asked))]
    return replace(sample, categories=asked)


# ------------------------------------------------------------------------------------------------
# building


class _Ctx:
    """Per-call lookups: boxes (decoded once) and spans."""

    def __init__(self, sample: TaskSample, record: ImageRecord, codes: "CodeTable", cfg: ConversationConfig):
        self.sample, self.record, self.codes, self.cfg = sample, record, codes, cfg
        self._boxes: dict[str, tuple[int, int, int, int]] = {}

    def box(self, ann_id: str) -> tuple[int, int, int, int]:
        if ann_id not in self._boxes:
            self._boxes[ann_id] = self.record.box(ann_id)
        return self._boxes[ann_id]

    def boxes(self, ann_ids: Sequence[str]) -> dict[str, tuple[int, int, int, int]]:
        return {a: self.box(a) for a in ann_ids}

    def span(self, ann_id: str) -> str:
        return self.codes.span(self.record.source, self.record.image_id, ann_id)

    def label(self, ann_id: str) -> str:
        try:
            return self.record.ann(ann_id).category
        except RecordError:
            return ""

    def image(self) -> ImageRef:
        return ImageRef(path=str(self.record.path), size=(int(self.record.height), int(self.record.width)))


def _choice(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _labels_for(targets: Sequence[str], expression: str, cfg: ConversationConfig) -> list[str]:
    if len(targets) > 1:
        return [fill_expression(cfg.multi_target_label, expression)] * len(targets)
    return [expression.strip()] * len(targets)


def _mask_turn(ctx: _Ctx, target_ids: Sequence[str], labels: Sequence[str]) -> tuple[str, list[str]]:
    """Answer text and answer-ordered ids for targets with per-target labels (same order as ids)."""
    by_id = dict(zip(target_ids, labels))
    ordered = order_by_position(target_ids, ctx.boxes(target_ids))
    answer = mask_answer([(ctx.span(a), by_id[a]) for a in ordered], ctx.cfg.no_target_answer)
    return answer, ordered


def _referring(ctx: _Ctx, s: ReferringSample, rng) -> tuple[list[dict], list[list[str]], dict]:
    prompt = fill_expression(_choice(rng, ctx.cfg.referring_templates), s.expression)
    answer, ordered = _mask_turn(ctx, s.target_ids, _labels_for(s.target_ids, s.expression, ctx.cfg))
    messages = [{"role": "user", "content": f"{IMAGE}\n{prompt}"}, {"role": "assistant", "content": answer}]
    return messages, [ordered], {"expression": s.expression, "no_target": not s.target_ids}


def _gcg(ctx: _Ctx, s: GroundedCaptionSample, rng) -> tuple[list[dict], list[list[str]], dict]:
    pieces, ordered_all = [], []
    for p in sorted(s.phrases, key=lambda p: (p.start, p.end)):
        ordered = order_by_position(p.ann_ids, ctx.boxes(p.ann_ids))
        pieces.append((p.start, p.end, "".join(ctx.span(a) for a in ordered)))
        ordered_all += ordered
    answer = grounded_caption(s.caption, pieces)
    prompt = _choice(rng, ctx.cfg.gcg_templates)
    messages = [{"role": "user", "content": f"{IMAGE}\n{prompt}"}, {"role": "assistant", "content": answer}]
    phrases = [{"text": s.caption[p.start:p.end], "ann_ids": order_by_position(p.ann_ids, ctx.boxes(p.ann_ids))}
               for p in sorted(s.phrases, key=lambda p: (p.start, p.end))]
    return messages, [ordered_all], {"caption": s.caption, "phrases": phrases}


def _region(ctx: _Ctx, s: RegionCaptionSample, rng) -> tuple[list[dict], list[ImageRef], list[list[str]], dict]:
    cfg = ctx.cfg
    span = ctx.span(s.ann_id)
    if s.question:
        prompt = insert_region(s.question, span, cfg.region_vqa_template)
    else:
        prompt = _choice(rng, cfg.region_caption_templates).replace("{region}", span)
    images = [ctx.image()]
    box = ctx.box(s.ann_id)
    zoom = needs_crop(box, ctx.record.width, ctx.record.height, cfg.region_crop_ratio)
    meta: dict[str, Any] = {"region": s.ann_id, "zoom": zoom}
    if s.question:
        meta["question"] = s.question
    if zoom:
        table_spec = getattr(ctx.codes, "crop_spec", None)
        if table_spec is not None and table_spec != cfg.crop_spec():
            raise ConversationBuildError(
                f"the pre-tokenized crops were made with {table_spec} but the conversation config asks for "
                f"{cfg.crop_spec()}: re-run samtok pretokenize with this mixture")
        crop = region_crop_box(box, ctx.record.width, ctx.record.height, cfg.crop_min_side, cfg.crop_context)
        crop_span = ctx.span(crop_key(s.ann_id))
        images.append(ImageRef(path=str(ctx.record.path), crop=crop, min_short_side=cfg.crop_min_short_side,
                               size=(int(ctx.record.height), int(ctx.record.width))))
        content = f"{IMAGE}\n" + cfg.region_zoom_template.replace("{region}", crop_span) + "\n" + prompt
        meta["crop"] = list(crop)
    else:
        content = f"{IMAGE}\n{prompt}"
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": s.caption}]
    return messages, images, [[]], meta


def _multi_round(ctx: _Ctx, s: MultiRoundSample, rng) -> tuple[list[dict], list[list[str]], dict]:
    messages, targets = [], []
    for k, r in enumerate(s.rounds):
        def sub(m: re.Match) -> str:
            idx = int(m.group(1))
            if idx >= len(r.refer_ids):
                raise ConversationBuildError(f"{s.sample_id} round {k}: {m.group(0)} but only {len(r.refer_ids)} refer ids")
            return ctx.span(r.refer_ids[idx])

        request = REGION_MARKER_RE.sub(sub, r.request)
        labels_src = r.answer_label or ""
        labels = ([fill_expression(ctx.cfg.multi_target_label, labels_src)] * len(r.target_ids)
                  if len(r.target_ids) > 1 and labels_src else
                  [labels_src or ctx.label(a) for a in r.target_ids])
        answer, ordered = _mask_turn(ctx, r.target_ids, labels)
        messages.append({"role": "user", "content": (f"{IMAGE}\n" if k == 0 else "") + request})
        messages.append({"role": "assistant", "content": answer})
        targets.append(ordered)
    return messages, targets, {"rounds": len(s.rounds)}


def _fit_relations(relations, span_of, max_repeats: int, max_relations: int):
    """Relations kept in order while no span (text: two masks may share codes) exceeds ``max_repeats``."""
    counts: Counter = Counter()
    kept = []
    for r in relations:
        need = Counter([span_of(r.subject_id), span_of(r.object_id)])
        if all(counts[a] + n <= max_repeats for a, n in need.items()):
            kept.append(r)
            counts.update(need)
        if max_relations and len(kept) >= max_relations:
            break
    return kept


def _scene_graph(ctx: _Ctx, s: SceneGraphSample, rng) -> tuple[list[dict], list[list[str]], dict]:
    cfg = ctx.cfg
    relations = list(s.relations)
    if cfg.scene_graph_fit_repeats:
        relations = _fit_relations(relations, ctx.span, cfg.max_span_repeats, cfg.scene_graph_max_relations)
    elif cfg.scene_graph_max_relations:
        relations = relations[:cfg.scene_graph_max_relations]

    def label(a: str) -> str:
        return str(s.labels.get(a) or ctx.label(a))

    triplets = [((ctx.span(r.subject_id), label(r.subject_id)), r.predicate, (ctx.span(r.object_id), label(r.object_id)))
                for r in relations]
    answer = scene_graph_answer(triplets) if triplets else cfg.no_target_answer
    prompt = _choice(rng, cfg.scene_graph_templates)
    messages = [{"role": "user", "content": f"{IMAGE}\n{prompt}"}, {"role": "assistant", "content": answer}]
    ids = [a for r in relations for a in (r.subject_id, r.object_id)]
    meta = {"relations": [[r.subject_id, r.predicate, r.object_id] for r in relations],
            "relations_dropped": len(s.relations) - len(relations)}
    return messages, [ids], meta


def _ov_seg(ctx: _Ctx, s: InstanceSegSample, rng) -> tuple[list[dict], list[list[str]], dict]:
    categories = list(dict.fromkeys(s.categories))
    label_of: dict[str, str] = {}
    for c in categories:
        for a in s.targets.get(c, []) or []:
            label_of.setdefault(a, c)
    ids = list(label_of)
    answer, ordered = _mask_turn(ctx, ids, [label_of[a] for a in ids])
    prompt = _choice(rng, ctx.cfg.ov_templates).replace("{categories}", ", ".join(categories))
    messages = [{"role": "user", "content": f"{IMAGE}\n{prompt}"}, {"role": "assistant", "content": answer}]
    absent = [c for c in categories if not s.targets.get(c)]
    return messages, [ordered], {"categories": categories, "absent": absent}


def _conversation(ctx: _Ctx, s: ConversationSample) -> tuple[list[dict], list[ImageRef], list[list[str]], dict]:
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in s.messages]
    images = [ctx.image()] if s.image_id else []
    n_placeholders = sum(m["content"].count(IMAGE) for m in messages)
    if images and n_placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ConversationBuildError(f"conversation {s.sample_id}: no user turn to hold the image")
        first_user["content"] = f"{IMAGE}\n" + first_user["content"]
    elif n_placeholders != len(images):
        raise ConversationBuildError(
            f"conversation {s.sample_id}: {n_placeholders} {IMAGE} placeholders for {len(images)} image(s)")
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    return messages, images, [[] for _ in range(n_assistant)], {}


def build_example(sample: TaskSample, record: ImageRecord, codes: "CodeTable", cfg: ConversationConfig,
                  rng: np.random.Generator) -> Optional[ChatExample]:
    """The conversation of one task sample (see the module docstring), or ``None`` when dropped.

    Args:
        sample: any task sample of :mod:`samtok.data.records`.
        record: the image record of ``(sample.source, sample.image_id)`` (masks give boxes; its
            path is the image).
        codes: the pre-tokenized codes (:class:`~samtok.data.pretokenize.CodeTable`).
        cfg: conversation options.
        rng: the source of every random choice (templates).

    Raises:
        MissingCodeError: a mask the conversation needs was not pre-tokenized.
        ConversationBuildError / RecordError: the sample does not fit its record.
    """
    if isinstance(sample, TurnGroup):
        return _turn_group(sample, record, codes, cfg, rng)
    if (record.source, record.image_id) != (sample.source, sample.image_id) and not isinstance(sample, ConversationSample):
        raise ConversationBuildError(
            f"sample {sample.sample_id} is of image {sample.source}/{sample.image_id}, record is {record.source}/{record.image_id}")
    ctx = _Ctx(sample, record, codes, cfg)
    images = [ctx.image()]
    if isinstance(sample, ReferringSample):
        messages, targets, meta = _referring(ctx, sample, rng)
    elif isinstance(sample, GroundedCaptionSample):
        messages, targets, meta = _gcg(ctx, sample, rng)
    elif isinstance(sample, RegionCaptionSample):
        messages, images, targets, meta = _region(ctx, sample, rng)
    elif isinstance(sample, MultiRoundSample):
        messages, targets, meta = _multi_round(ctx, sample, rng)
    elif isinstance(sample, SceneGraphSample):
        messages, targets, meta = _scene_graph(ctx, sample, rng)
    elif isinstance(sample, InstanceSegSample):
        messages, targets, meta = _ov_seg(ctx, sample, rng)
    elif isinstance(sample, ConversationSample):
        messages, images, targets, meta = _conversation(ctx, sample)
    else:
        raise ConversationBuildError(f"no conversation builder for {type(sample).__name__}")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        raise ConversationBuildError(f"sample {sample.sample_id}: the conversation has no assistant turn")
    codec = getattr(codes, "codec", None) or MaskCodec(cfg.codebook_size)
    if span_repeats(answers, codec) > cfg.max_span_repeats:
        return None
    return ChatExample(messages=messages, images=images, task=sample_task(sample), source=sample.source,
                       image_id=sample.image_id, sample_id=sample.sample_id, targets=targets,
                       answer=answers[-1], meta=meta)


def _turn_group(group: TurnGroup, record: ImageRecord, codes: "CodeTable", cfg: ConversationConfig,
                rng: np.random.Generator) -> Optional[ChatExample]:
    """One conversation of a group's requests: the image in the first user turn only."""
    built = [build_example(s, record, codes, cfg, rng) for s in group.samples]
    parts = [p for p in built if p is not None]
    if len(parts) < len(built):
        return None
    messages: list[dict] = []
    targets: list[list[str]] = []
    for k, ex in enumerate(parts):
        for m in ex.messages:
            content = m["content"]
            if k > 0 and m["role"] == "user":
                content = content.replace(IMAGE, "").strip()  # the image is shown once, in the first turn
            messages.append({"role": m["role"], "content": content})
        targets += ex.targets
    answers = [m["content"] for m in messages if m["role"] == "assistant"]  # max_span_repeats: per request (above)
    return ChatExample(messages=messages, images=parts[0].images, task=parts[0].task, source=group.source,
                       image_id=group.image_id, sample_id=group.sample_id, targets=targets, answer=answers[-1],
                       meta={"turns": [p.meta for p in parts]})


def _last_assistant(messages: Sequence[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    raise ConversationBuildError("the conversation has no assistant turn")


def prompt_only(example: ChatExample) -> ChatExample:
    """The example without its last assistant turn (and anything after it): a generation prompt.

    ``answer`` (the removed turn's text) and ``targets`` (whole: ``targets[-1]`` are the removed
    turn's masks) stay as the ground truth.
    """
    cut = _last_assistant(example.messages)
    return replace(example, messages=[dict(m) for m in example.messages[:cut]],
                   targets=[list(t) for t in example.targets], meta={**example.meta, "prompt_only": True})


def prompts_per_turn(example: ChatExample) -> list[ChatExample]:
    """One prompt-only example per assistant turn, the history teacher-forced with the ground truth
    (multi-round evaluation): the k-th ends just before assistant turn k, its ``answer`` is that
    turn's text and its ``targets`` are ``targets[:k + 1]``."""
    out = []
    turn = 0
    for i, m in enumerate(example.messages):
        if m["role"] != "assistant":
            continue
        out.append(replace(example, messages=[dict(x) for x in example.messages[:i]],
                           targets=[list(t) for t in example.targets[:turn + 1]], answer=m["content"],
                           meta={**example.meta, "prompt_only": True, "turn": turn}))
        turn += 1
    return out


def example_images(example: ChatExample) -> list["Image.Image"]:
    """The PIL images of an example, crops and upscales applied, in placeholder order."""
    return [load_image_ref(ref) for ref in example.images]
