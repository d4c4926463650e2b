"""The benchmarks of ``samtok eval``: samples → prompts → predictions → metrics (spec §5).

Every benchmark reads its samples through the data readers (:func:`samtok.data.formats.open_source`)
and builds its prompts through :mod:`samtok.data.conversations` — the very templates and answer
formats SFT and RL train on — with the evaluated tokenizer's own codes for every mask a prompt or
a ground-truth answer shows. Decoding is greedy with per-benchmark ``max_new_tokens``
(:class:`~samtok.eval.config.MaxNewTokens`); masks are decoded at each image's original size.

A benchmark object has

* ``items``: what is predicted, numbered ``0..N-1`` (one per sample; one per assistant turn for
  multi-round segmentation);
* ``step(engine, items) -> list[dict]``: runs on any rank (:mod:`samtok.eval.runner`); the engine
  is a :class:`~samtok.mllm.inference.SamtokPredictor` (a :class:`SAMTokenizer` for the tokenizer
  benchmark); results are plain data (masks as compressed RLE);
* ``score(results) -> Scores``: on rank 0, the metrics of :mod:`samtok.eval.metrics` fed with the
  decoded predictions and the ground truth, plus one score per item for the report's figures.

Benchmarks and their metrics:

==============  ==========================================  ==============================================
benchmark       samples                                     metrics
==============  ==========================================  ==============================================
refcoco         ReferringSample (one target)                RESMetric: cIoU, gIoU, Pr@0.5…0.9
gres            ReferringSample(generalized=True)           GRESMetric: gIoU, cIoU, N-acc, T-acc, Pr@0.7…0.9
gcg             GroundedCaptionSample                       GCGMetric: AP50, mIoU, recall, caption metrics
region_caption  RegionCaptionSample                         caption metrics (BLEU, METEOR*, ROUGE-L, CIDEr-D)
mr_seg          MultiRoundSample (teacher-forced history)   MultiRoundMetric: cIoU / gIoU per round
tokenizer       every mask of the images                    MaskReconstructionMetric: rMaskIoU (+ area bins),
                                                            first code only; mask-as-text baselines
==============  ==========================================  ==============================================
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from samtok.core.errors import SamtokError
from samtok.core.masks import encode_rle, mask_iou, union_masks
from samtok.core.runtime import get_logger
from samtok.data.records import (
    GroundedCaptionSample,
    ImageRecord,
    MultiRoundSample,
    ReferringSample,
    RegionCaptionSample,
    TaskSample,
)
from samtok.eval.config import BenchmarkConfig, EvalConfig, max_new_tokens_for

log = get_logger("samtok.eval.benchmarks")


# ------------------------------------------------------------------------------------------ helpers
@dataclass
class EvalItem:
    """One prediction to make: a sample (and, for multi-round dialogues, the assistant turn)."""

    index: int
    sample: Any  # a TaskSample, or an ImageRecord for the tokenizer benchmark
    turn: int = -1


@dataclass
class Scores:
    """What a benchmark measured: metrics, one score per item (for figures), extra report sections."""

    metrics: dict[str, Any]
    per_item: list[float]  # the score the report ranks items by (IoU, mIoU, ROUGE-L...), NaN if none
    score_name: str = "IoU"
    extra: dict[str, Any] = field(default_factory=dict)


def rle_of(mask: Any) -> dict:
    """Compressed RLE with a ``str`` counts string (picklable, JSON-able)."""
    m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return encode_rle(m.astype(bool))


def mask_of(rle: dict) -> np.ndarray:
    from samtok.core.masks import decode_rle

    return decode_rle(rle)


def stack(masks: Sequence[np.ndarray], size: Sequence[int]) -> np.ndarray:
    """``(K, H, W)`` bool stack (``(0, H, W)`` when empty)."""
    h, w = int(size[0]), int(size[1])
    return np.stack([np.asarray(m, dtype=bool) for m in masks]) if masks else np.zeros((0, h, w), dtype=bool)


def _clip(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _first_only(templates: list[str]) -> list[str]:
    return list(templates[:1])


def eval_conversation_config(cfg: EvalConfig, bench: BenchmarkConfig):
    """The conversation options of evaluation (:func:`~samtok.eval.config.conversation_config`) with
    the evaluation zoom-in threshold, no sample dropped for repeated spans, and
    (``prompt_templates: first``) the first template of each list."""
    from samtok.eval.config import conversation_config

    conv = conversation_config(cfg).for_eval()
    conv = replace(conv, max_span_repeats=10**9)
    if bench.prompt_templates == "first":
        conv = replace(conv, referring_templates=_first_only(conv.referring_templates),
                       gcg_templates=_first_only(conv.gcg_templates),
                       region_caption_templates=_first_only(conv.region_caption_templates),
                       ov_templates=_first_only(conv.ov_templates),
                       scene_graph_templates=_first_only(conv.scene_graph_templates))
    return conv


# ------------------------------------------------------------------------------------------ base
class Benchmark:
    """Common data loading; subclasses define which samples, how to predict and how to score."""

    kind = ""
    uses_model = True

    def __init__(self, bench: BenchmarkConfig, cfg: EvalConfig):
        self.bench = bench
        self.cfg = cfg
        self.records: dict[tuple[str, str], ImageRecord] = {}
        self.items: list[EvalItem] = []
        self.num_samples = 0
        self.conv = eval_conversation_config(cfg, bench) if self.uses_model else None

    # ---------------------------------------------------------------------------- data
    def open(self):
        from samtok.data.formats.registry import open_source

        return open_source(self.bench.data.kind, **dict(self.bench.data.args))

    def wants(self, sample: TaskSample) -> bool:
        raise NotImplementedError

    def load(self) -> "Benchmark":
        t0 = time.perf_counter()
        source = self.open()
        samples = [s for s in source.samples() if self.wants(s)]
        if self.bench.max_samples is not None:
            samples = samples[: self.bench.max_samples]
        needed = {(s.source, s.image_id) for s in samples}
        for record in source.images():
            key = (record.source, record.image_id)
            if key in needed:
                self.records[key] = record
        missing = sorted(needed - set(self.records))
        if missing:
            raise SamtokError(f"{self.bench.title}: {len(missing)} sample image(s) have no image record, e.g. {missing[:3]}")
        self.num_samples = len(samples)
        self.items = self.make_items(samples)
        log.info("%s: %d samples, %d items, %d images (%.1f s)", self.bench.title, len(samples), len(self.items),
                 len(self.records), time.perf_counter() - t0)
        return self

    def make_items(self, samples: list) -> list[EvalItem]:
        return [EvalItem(index=k, sample=s) for k, s in enumerate(samples)]

    def record_of(self, sample: TaskSample) -> ImageRecord:
        return self.records[(sample.source, sample.image_id)]

    def gt_masks(self, sample: TaskSample, ann_ids: Sequence[str]) -> list[np.ndarray]:
        record = self.record_of(sample)
        return [record.mask(a) for a in ann_ids]

    # ---------------------------------------------------------------------------- prediction
    def step(self, engine, items: list) -> list[dict]:
        raise NotImplementedError

    def score(self, results: list[dict]) -> Scores:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ LLM benchmarks
class LanguageBenchmark(Benchmark):
    """Benchmarks answered by the language model: prompts through :mod:`samtok.data.conversations`."""

    def sampling(self):
        from samtok.mllm.generation import SamplingConfig

        return SamplingConfig(max_new_tokens=max_new_tokens_for(self.cfg, self.kind), do_sample=False,
                              span_grammar=self.cfg.generation.span_grammar)

    def needed_masks(self, sample: TaskSample) -> list[str]:
        """Masks whose codes the conversation needs (targets of the GT answer, masks in the prompt)."""
        return list(dict.fromkeys(sample.ann_ids))

    def encode_needed(self, predictor, items: Sequence[EvalItem], conv, cache):
        """A :class:`~samtok.data.pretokenize.CodeTable` of every mask the batch's conversations show
        (zoom-in crops under ``ann_id@crop``), encoded by the evaluated tokenizer, one image-encoder
        pass per image (the same images, crops and masks as ``samtok pretokenize`` encodes)."""
        from samtok.data.conversations import ImageRef, crop_key, crop_mask, needs_crop, region_crop_box
        from samtok.data.pretokenize import CodeTable

        codes: dict[tuple[str, str, str], tuple[int, int]] = {}
        per_image: dict[tuple[str, str], list[str]] = {}
        crops: list[tuple[ImageRecord, str]] = []
        for it in items:
            s = it.sample
            ids = per_image.setdefault((s.source, s.image_id), [])
            ids.extend(a for a in self.needed_masks(s) if a not in ids)
            if isinstance(s, RegionCaptionSample):
                rec = self.record_of(s)
                if needs_crop(rec.box(s.ann_id), rec.width, rec.height, conv.region_crop_ratio):
                    crops.append((rec, s.ann_id))
        for key, ids in per_image.items():
            rec = self.records[key]
            if not ids:
                continue
            ref = ImageRef(path=str(rec.path), size=(int(rec.height), int(rec.width)))
            for a, c in zip(ids, predictor.encode_masks(ref, [rec.mask(a) for a in ids], cache)):
                codes[(rec.source, rec.image_id, a)] = c
        for rec, ann_id in crops:
            crop = region_crop_box(rec.box(ann_id), rec.width, rec.height, conv.crop_min_side, conv.crop_context)
            ref = ImageRef(path=str(rec.path), crop=crop, min_short_side=conv.crop_min_short_side,
                           size=(int(rec.height), int(rec.width)))
            (c,) = predictor.encode_masks(ref, [crop_mask(rec.mask(ann_id), crop, conv.crop_min_short_side)], cache)
            codes[(rec.source, rec.image_id, crop_key(ann_id))] = c
        return CodeTable.from_dict(codes, crop_spec=conv.crop_spec(), codebook_size=predictor.codec.codebook_size,
                                   where="the codes of the evaluated tokenizer")

    def prompt_of(self, example, item: EvalItem):
        from samtok.data.conversations import prompt_only

        return prompt_only(example)

    def step(self, predictor, items: list) -> list[dict]:
        from samtok.data.conversations import build_example
        from samtok.mllm.inference import ImageCache

        conv = self.conv
        cache = ImageCache()
        table = self.encode_needed(predictor, items, conv, cache)
        prompts = []
        for it in items:
            rng = np.random.default_rng([int(self.bench.prompt_seed), int(it.index)])
            example = build_example(it.sample, self.record_of(it.sample), table, conv, rng)
            if example is None:  # pragma: no cover - max_span_repeats is disabled for evaluation
                raise SamtokError(f"sample {it.sample.sample_id}: no conversation could be built")
            prompts.append(self.prompt_of(example, it))
        if hasattr(predictor, "set_references"):  # the oracle (samtok.eval.oracle) answers with the ground truth
            predictor.set_references([p.answer for p in prompts])
        preds = predictor.predict([p.images for p in prompts], [p.messages for p in prompts], self.sampling(),
                                  cache=cache)
        return [self.result(it, p, pred, predictor.codec) for it, p, pred in zip(items, prompts, preds)]

    def result(self, item: EvalItem, prompt, pred, codec) -> dict:
        from samtok.mllm.inference import readable

        s = item.sample
        user = "\n".join(m["content"] for m in prompt.messages if m["role"] == "user")
        return {
            "index": item.index,
            "turn": item.turn,
            "sample_id": s.sample_id,
            "image_id": s.image_id,
            "source": s.source,
            "task": prompt.task,
            "image": str(prompt.images[0].path),
            "image_size": list(pred.image_size),
            "prompt": readable(user, codec.parse(user).spans),
            "answer": prompt.answer,
            "answer_codes": [list(c) for c in codec.parse_codes(prompt.answer)],
            "targets": list(prompt.targets[-1]) if prompt.targets else [],
            "text": pred.text,
            "readable": pred.readable_text,
            "pred_rles": [rle_of(m) for m in pred.masks],
            "labels": pred.labels,
            "codes": [list(c) for c in pred.codes],
            "num_spans": len(pred.spans),
            "num_invalid": sum(1 for sp in pred.spans if not sp.valid),
            "notes": pred.notes,
            "finished": pred.finished,
            "num_tokens": pred.num_tokens,
            "no_target_answer": pred.no_target,
            "meta": {k: v for k, v in prompt.meta.items() if isinstance(v, (str, int, float, bool, list))},
        }

    def pred_masks(self, r: dict) -> list[np.ndarray]:
        return [mask_of(rle) for rle in r["pred_rles"]]

    def panel(self, r: dict, score: float, score_name: str):
        """The report figure of one result: prediction vs ground truth, prompt and answers below."""
        from samtok.eval.report import example_panel
        from samtok.mllm.inference import readable
        from samtok.tokenizer.codec import MaskCodec

        gt_text = readable(r["answer"], MaskCodec().parse(r["answer"]).spans)
        text = (f"[{r['sample_id']}] {score_name} {score:.3f}\nprompt: {_clip(r['prompt'])}\n"
                f"prediction: {_clip(r['readable'])}\nground truth: {_clip(gt_text)}")
        gts = self.gt_masks(self.items[r["index"]].sample, r["targets"])
        return example_panel(r["image"], self.pred_masks(r), gts, text,
                             [f"{k}: {lab}" if lab else str(k) for k, lab in enumerate(r["labels"])])

    def generation_stats(self, results: list[dict]) -> dict[str, float]:
        n = max(1, len(results))
        return {
            "answers_unfinished": sum(1 for r in results if not r["finished"]) / n,
            "answers_with_notes": sum(1 for r in results if r["notes"]) / n,
            "invalid_spans": float(sum(r["num_invalid"] for r in results)),
            "masks_per_answer": sum(len(r["pred_rles"]) for r in results) / n,
            "tokens_per_answer": sum(r["num_tokens"] for r in results) / n,
        }


class ReferringBenchmark(LanguageBenchmark):
    """RefCOCO/+/g (RES): one prediction per referring sentence, exactly one target."""

    kind = "refcoco"

    @staticmethod
    def span_match_stats(results: list[dict]) -> dict[str, float]:
        """How often the answer's mask words are exactly the reference answer's, before any decoding.

        ``span_exact``: every span of the answer is valid (and was decoded) and the set of its code
        pairs equals the reference's; a no-target reference needs the ``No target.`` answer itself
        (garbage without spans does not count). ``first_code_exact``: the same on first codes.
        Reference codes are parsed with the evaluated tokenizer's codec (``answer_codes``).
        """
        n = max(1, len(results))
        exact = first = 0
        for r in results:
            gt = {tuple(c) for c in r["answer_codes"]}
            if not gt:
                ok = ok_first = bool(r["no_target_answer"]) and r["num_spans"] == 0
            else:
                complete = r["num_spans"] == len(r["codes"])  # no invalid span, none left undecoded
                pred = {tuple(c) for c in r["codes"]}
                ok = complete and pred == gt
                ok_first = complete and {c[0] for c in pred} == {c[0] for c in gt}
            exact += int(ok)
            first += int(ok_first)
        return {"span_exact": exact / n, "first_code_exact": first / n}

    @staticmethod
    def label_echo(results: list[dict]) -> dict[str, float]:
        """``label_echo`` (RES): share of answers with spans whose first label repeats the referring
        expression (case and spaces ignored). The one-target answer format labels the mask with the
        expression, so a model that cannot do it is not reading its prompt — the cheapest sign of that,
        before any mask is decoded. Absent when no result carries an expression."""
        def norm(t) -> str:
            return " ".join(str(t).lower().split())

        rows = [r for r in results if r.get("meta", {}).get("expression") and r["num_spans"] > 0]
        if not rows:
            return {}
        same = sum(1 for r in rows if r["labels"] and norm(r["labels"][0]) == norm(r["meta"]["expression"]))
        return {"label_echo": same / len(rows)}

    def wants(self, s) -> bool:
        return isinstance(s, ReferringSample) and not s.generalized

    def which_object(self, r: dict, pred: np.ndarray) -> Optional[tuple[bool, int]]:
        """``(is the referred one, number of annotated masks)`` when the predicted mask has IoU >= 0.5
        with some annotated mask of the image (the best-matching one); ``None`` when it has none."""
        from samtok.eval.gcg import iou_matrix

        record = self.record_of(self.items[r["index"]].sample)
        if not pred.any() or not record.anns:
            return None
        ids, masks = self.image_masks(record)
        ious = iou_matrix([pred], masks)[0]
        best = int(np.argmax(ious))
        if ious[best] < 0.5:
            return None
        return ids[best] in set(r["targets"]), len(ids)

    def image_masks(self, record) -> tuple[list[str], list[np.ndarray]]:
        """Every annotated mask of an image. The last image's are kept: the sentences of an image come one
        after another, and keeping every image's would hold a whole split's masks in memory."""
        key = (record.source, record.image_id)
        last = getattr(self, "_image_masks", None)
        if last is None or last[0] != key:
            last = self._image_masks = (key, [a.ann_id for a in record.anns], [record.mask(a.ann_id) for a in record.anns])
        return last[1], last[2]

    def object_choice(self, hits: list[Optional[tuple[bool, int]]]) -> dict[str, float]:
        """Does the model localise, and does it find THE object the phrase names?

        ``on_an_object``: share of answers whose mask has IoU >= 0.5 with some annotated mask of the image;
        ``right_object``: of those, the share where it is the referred one; ``right_object_chance``: the
        same for a model that picks one of the image's annotated masks at random (mean 1 / count). A model
        that segments objects but does not bind the phrase to one scores ``right_object`` near the chance."""
        found = [h for h in hits if h is not None]
        out = {"on_an_object": len(found) / max(1, len(hits))}
        if found:
            out["right_object"] = sum(1 for right, _ in found if right) / len(found)
            out["right_object_chance"] = float(np.mean([1.0 / n for _, n in found]))
        return out

    def score(self, results: list[dict]) -> Scores:
        from samtok.eval.metrics import RESMetric

        metric = RESMetric()
        per_item, hits = [], []
        for r in results:
            size = r["image_size"]
            preds = self.pred_masks(r)
            if self.cfg.generation.res_mask == "first":
                pred = preds[0] if preds else np.zeros(size, dtype=bool)
            else:
                pred = union_masks(preds, tuple(size))
            gt = union_masks(self.gt_masks(self.items[r["index"]].sample, r["targets"]), tuple(size))
            metric.update([pred], [gt])
            per_item.append(mask_iou(pred, gt))
            hits.append(self.which_object(r, pred))
        return Scores({**metric.compute(), **self.span_match_stats(results), **self.label_echo(results),
                       **self.object_choice(hits), **self.generation_stats(results)}, per_item)


class GeneralizedReferringBenchmark(ReferringBenchmark):
    """gRefCOCO (GRES): predicted masks unioned; no-target samples expect an empty prediction."""

    kind = "gres"

    def wants(self, s) -> bool:
        return isinstance(s, ReferringSample) and s.generalized

    def score(self, results: list[dict]) -> Scores:
        from samtok.eval.metrics import GRESMetric

        metric = GRESMetric()
        per_item = []
        for r in results:
            size = r["image_size"]
            pred = union_masks(self.pred_masks(r), tuple(size))
            gt = union_masks(self.gt_masks(self.items[r["index"]].sample, r["targets"]), tuple(size))
            metric.update([pred], [gt])
            per_item.append(mask_iou(pred, gt) if gt.any() else float(not pred.any()))
        stats = {**self.span_match_stats(results), **self.generation_stats(results)}
        stats["no_target_answers"] = float(sum(1 for r in results if r["no_target_answer"]))
        return Scores({**metric.compute(), **stats}, per_item)


class GroundedCaptionBenchmark(LanguageBenchmark):
    """GCG (GLaMM protocol): AP50, mIoU, recall and caption metrics per image."""

    kind = "gcg"

    def wants(self, s) -> bool:
        return isinstance(s, GroundedCaptionSample)

    def score(self, results: list[dict]) -> Scores:
        from samtok.eval.gcg import greedy_pairing_miou, iou_matrix
        from samtok.eval.metrics import GCGMetric

        metric = GCGMetric(phrase_similarity=self.bench.phrase_similarity)
        per_item = []
        for r in results:
            sample: GroundedCaptionSample = self.items[r["index"]].sample
            size = r["image_size"]
            preds = self.pred_masks(r)
            record = self.record_of(sample)
            phrases = sorted(sample.phrases, key=lambda p: (p.start, p.end))
            gts = [union_masks([record.mask(a) for a in p.ann_ids], tuple(size)) for p in phrases]
            metric.update(
                [stack(preds, size)], [stack(gts, size)],
                pred_phrases=[[lab or "" for lab in r["labels"]]],
                target_phrases=[[sample.caption[p.start:p.end] for p in phrases]],
                pred_captions=[r["text"]], target_captions=[sample.caption],
                image_ids=[r["index"] + 1],
            )
            per_item.append(greedy_pairing_miou(iou_matrix(preds, gts)))
        return Scores({**metric.compute(), **self.generation_stats(results)}, per_item, "mIoU")


class RegionCaptionBenchmark(LanguageBenchmark):
    """Region captioning (DAM-style): a reference-based stand-in for the LLM-judge protocols."""

    kind = "region_caption"

    def wants(self, s) -> bool:
        return isinstance(s, RegionCaptionSample) and (self.bench.include_vqa or not s.question)

    def score(self, results: list[dict]) -> Scores:
        from samtok.eval.captions import caption_scores, rouge_l, strip_grounding_markup, tokenize_caption

        hyps = [strip_grounding_markup(r["text"]) for r in results]
        refs = [[self.items[r["index"]].sample.caption] for r in results]
        metrics = caption_scores(hyps, refs) if results else {}
        per_item = [rouge_l(tokenize_caption(h), [tokenize_caption(x) for x in ref]) for h, ref in zip(hyps, refs)]
        metrics["count"] = float(len(results))
        metrics["zoomed_regions"] = float(sum(1 for r in results if r["meta"].get("zoom")))
        return Scores({**metrics, **self.generation_stats(results)}, per_item, "ROUGE-L")

    def result(self, item, prompt, pred, codec) -> dict:
        out = super().result(item, prompt, pred, codec)
        out["targets"] = [item.sample.ann_id]  # the region shown (for figures)
        return out


class MultiRoundBenchmark(LanguageBenchmark):
    """Multi-round interactive segmentation: one item per assistant turn, GT history teacher-forced."""

    kind = "mr_seg"

    def wants(self, s) -> bool:
        return isinstance(s, MultiRoundSample) and bool(s.rounds)

    def make_items(self, samples: list) -> list[EvalItem]:
        items = []
        for s in samples:
            for turn in range(len(s.rounds)):
                items.append(EvalItem(index=len(items), sample=s, turn=turn))
        return items

    def prompt_of(self, example, item: EvalItem):
        from samtok.data.conversations import prompts_per_turn

        return prompts_per_turn(example)[item.turn]

    def score(self, results: list[dict]) -> Scores:
        from samtok.eval.metrics import MultiRoundMetric

        rounds = max((r["turn"] + 1 for r in results), default=1)
        metric = MultiRoundMetric(num_rounds=max(10, rounds))
        per_item = []
        for r in results:
            size = r["image_size"]
            pred = union_masks(self.pred_masks(r), tuple(size))
            gt = union_masks(self.gt_masks(self.items[r["index"]].sample, r["targets"]), tuple(size))
            metric.update([pred], [gt], [r["turn"] + 1])
            per_item.append(mask_iou(pred, gt))
        metrics = metric.compute()
        metrics = {k: v for k, v in metrics.items() if not (k.startswith("count@round") and v == 0.0)
                   and not (k.split("@round")[-1].isdigit() and int(k.split("@round")[-1]) > rounds)}
        metrics["dialogues"] = float(self.num_samples)
        return Scores({**metrics, **self.generation_stats(results)}, per_item)


# ------------------------------------------------------------------------------------------ tokenizer
class TokenizerBenchmark(Benchmark):
    """Reconstruction of every mask of the images through the tokenizer (encode → decode)."""

    kind = "tokenizer"
    uses_model = False

    def load(self) -> "TokenizerBenchmark":
        t0 = time.perf_counter()
        records = []
        for record in self.open().images():
            if record.anns:
                records.append(record)
            if self.bench.max_samples is not None and len(records) >= self.bench.max_samples:
                break
        self.records = {(r.source, r.image_id): r for r in records}
        self.items = [EvalItem(index=k, sample=r) for k, r in enumerate(records)]
        self.num_samples = len(records)
        log.info("%s: %d images (%.1f s)", self.bench.title, len(records), time.perf_counter() - t0)
        return self

    def masks_of(self, record: ImageRecord) -> tuple[list[str], list[np.ndarray]]:
        anns = record.anns[: self.bench.max_masks_per_image] if self.bench.max_masks_per_image else record.anns
        ids, masks = [], []
        for a in anns:
            m = record.mask(a.ann_id)
            if m.any():
                ids.append(a.ann_id)
                masks.append(m)
        return ids, masks

    def step(self, tokenizer, items: list) -> list[dict]:
        from samtok.core.images import load_image
        from samtok.tokenizer.api import masks_as_tensor

        images = [load_image(it.sample.path) for it in items]
        feats, sizes = tokenizer.image_features(images)
        out = []
        for j, (it, size) in enumerate(zip(items, sizes)):
            record: ImageRecord = it.sample
            ids, masks = self.masks_of(record)
            h, w = size
            m = masks_as_tensor(masks, h, w, where=f"{record.image_id} masks")
            codes = tokenizer.encode_with_features(feats, j, m)
            full = tokenizer.decode_with_features(feats, j, codes, (h, w))
            first_codes = codes.clone()
            first_codes[:, 1:] = -1
            first = tokenizer.decode_with_features(feats, j, first_codes, (h, w))
            out.append({
                "index": it.index,
                "image_id": record.image_id,
                "source": record.source,
                "image": str(record.path),
                "image_size": [int(h), int(w)],
                "ann_ids": ids,
                "codes": codes.tolist(),
                "pred_rles": [rle_of(x) for x in full],
                "first_rles": [rle_of(x) for x in first],
            })
        return out

    def score(self, results: list[dict]) -> Scores:
        from samtok.eval.metrics import MaskReconstructionMetric

        full, first = MaskReconstructionMetric(), MaskReconstructionMetric()
        per_item, gts_all, codes_all, mask_ious = [], [], [], []
        for r in results:
            record = self.items[r["index"]].sample
            gts = [record.mask(a) for a in r["ann_ids"]]
            preds = [mask_of(x) for x in r["pred_rles"]]
            firsts = [mask_of(x) for x in r["first_rles"]]
            if gts:
                full.update(preds, gts)
                first.update(firsts, gts)
            ious = [mask_iou(p, g) for p, g in zip(preds, gts)]
            mask_ious.extend(ious)
            per_item.append(float(np.mean(ious)) if ious else math.nan)
            gts_all.extend(gts)
            codes_all.extend(r["codes"])
        metrics = full.compute()
        f = first.compute()
        metrics["rMaskIoU_first_code"] = f["rMaskIoU"]
        for k, v in f.items():
            if k.startswith("rMaskIoU["):
                metrics[f"rMaskIoU_first_code{k[len('rMaskIoU'):]}"] = v
        metrics["images"] = float(len(results))
        metrics.update(code_usage(codes_all))
        extra: dict[str, Any] = {"mask_ious": mask_ious}
        if self.cfg.baselines.enabled:
            extra["baselines"] = self.baselines(gts_all[: self.cfg.baselines.max_masks], codes_all, metrics)
        return Scores(metrics, per_item, "mean IoU", extra)

    def panel(self, r: dict, score: float, score_name: str):
        from samtok.eval.report import example_panel

        record = self.items[r["index"]].sample
        text = f"[{r['image_id']}] {len(r['ann_ids'])} masks, {score_name} {score:.3f}"
        return example_panel(r["image"], [mask_of(x) for x in r["pred_rles"]],
                             [record.mask(a) for a in r["ann_ids"]], text)

    def baselines(self, masks: list[np.ndarray], codes: list, metrics: dict) -> dict:
        from samtok.eval.baselines import measure_representations, representations, token_counter

        b = self.cfg.baselines
        t0 = time.perf_counter()
        tok = text_tokenizer(b.text_tokenizer)
        reps = representations(b.polygon_tolerances, b.grid_cells)
        table = measure_representations(masks, token_counter(tok), reps)
        depth = len(codes[0]) if codes else 2
        table = {
            "samtok": {"tokens_mean": float(depth + 2), "tokens_median": float(depth + 2), "tokens_max": float(depth + 2),
                       "iou_mean": metrics.get("rMaskIoU", math.nan), "count": metrics.get("count", 0.0),
                       "description": f"<|mt_start|> + {depth} code words + <|mt_end|> (all masks of the benchmark)"},
            "samtok_first_code": {"tokens_mean": 3.0, "tokens_median": 3.0, "tokens_max": 3.0,
                                  "iou_mean": metrics.get("rMaskIoU_first_code", math.nan),
                                  "count": metrics.get("count", 0.0),
                                  "description": "<|mt_start|> + first code word + <|mt_end|>"},
            **table,
        }
        return {"text_tokenizer": b.text_tokenizer, "masks": len(masks), "seconds": time.perf_counter() - t0,
                "representations": table}


def text_tokenizer(spec: str):
    """The tokenizer that counts baseline tokens: ``qwen2_5`` (built offline) or a local directory."""
    if spec == "qwen2_5":
        from samtok.mllm.text_tokenizers import build_qwen2_5_tokenizer

        return build_qwen2_5_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec, local_files_only=True, trust_remote_code=False)


def code_usage(codes: Sequence[Sequence[int]]) -> dict[str, float]:
    """Distinct codes and code perplexity (exp of the entropy of the code frequencies) per depth."""
    out: dict[str, float] = {}
    if not codes:
        return out
    arr = np.asarray(codes, dtype=np.int64)
    for d in range(arr.shape[1]):
        col = arr[:, d][arr[:, d] >= 0]
        _, counts = np.unique(col, return_counts=True)
        p = counts / max(1, counts.sum())
        out[f"codes_used@depth{d}"] = float(len(counts))
        out[f"code_perplexity@depth{d}"] = float(np.exp(-(p * np.log(p)).sum())) if len(p) else math.nan
    out["distinct_code_pairs"] = float(len({tuple(c) for c in arr.tolist()}))
    return out


BENCHMARK_CLASSES: dict[str, type[Benchmark]] = {
    "refcoco": ReferringBenchmark,
    "gres": GeneralizedReferringBenchmark,
    "gcg": GroundedCaptionBenchmark,
    "region_caption": RegionCaptionBenchmark,
    "mr_seg": MultiRoundBenchmark,
    "tokenizer": TokenizerBenchmark,
}


def make_benchmark(bench: BenchmarkConfig, cfg: EvalConfig) -> Benchmark:
    """The benchmark object of ``bench`` with its data loaded."""
    if bench.benchmark not in BENCHMARK_CLASSES:
        raise SamtokError(f"unknown benchmark {bench.benchmark!r}; known: {', '.join(BENCHMARK_CLASSES)}")
    return BENCHMARK_CLASSES[bench.benchmark](bench, cfg).load()
