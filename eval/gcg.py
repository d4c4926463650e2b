"""Grounded conversation generation (GCG) scoring, GLaMM protocol: pure functions.

Follows ``eval/gcg/evaluate.py`` of GLaMM (github.com/mbzuai-oryx/groundingLMM, commit dd7ad1a),
the protocol of spec §5:

* **AP50**: pycocotools ``COCOeval(iouType="segm")``, every mask of category 1, every prediction
  with score 1.0, ``params.catIds = [1]``, default area ranges and ``maxDets`` (100), AP at IoU 0.5
  (``stats[1]``). With equal scores, ties between detections are broken by pycocotools' stable
  sort, i.e. by image id and by the order of predictions within an image.
* **mIoU** (:func:`greedy_pairing_miou`): per image, the IoU matrix (predictions × GT); repeatedly
  take the largest entry while it is > 0, record it, delete its row and column; the image scores
  the mean of the recorded IoUs, or 0 when nothing could be paired. Unmatched predictions and
  unmatched GT masks do not lower the score (GLaMM ignores them); an image without predictions,
  or whose predictions touch no GT mask, scores 0. mIoU = mean over images.
* **recall** (:func:`greedy_phrase_matches`): per image, IoU matrix (GT × predictions) and phrase
  similarity matrix (GT phrases × predicted phrases); repeatedly take the largest IoU; if it is
  < 0.5 **or its phrase similarity is < 0.5, stop** (GLaMM ``break``s — the image gets no further
  matches even if a lower-IoU pair would pass both tests); else count a match and zero its row
  and column. recall = Σ matches / Σ GT phrases over all images. ``mode="admissible"`` instead
  skips a failing pair and goes on with the next-largest IoU (reported as ``recall_admissible``),
  which shows how much the early stop costs.

Phrase similarity is pluggable: any callable ``(list[str], list[str]) -> array (len(a), len(b))``
with a ``name`` attribute. GLaMM uses ``bert-base-uncased``, mean of the last hidden states over all
tokens ([CLS] and [SEP] included), cosine; :class:`EmbeddingPhraseSimilarity` does that for any
encoder on a LOCAL path. The offline default, :class:`CharNgramSimilarity` ("char3-tf-cosine"), is
the cosine of character-trigram count vectors. The two are not interchangeable: mean-pooled BERT
embeddings are anisotropic (cosines between unrelated phrases tend to be high), so with BERT the
0.5 threshold is expected to reject few pairs (not measured here: no BERT weights offline), while
character trigrams reject paraphrases ("a man" vs "the person"). Compare recall only between runs
that used the same similarity; ``compute()`` reports its name.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections import Counter
from typing import Protocol, Sequence

import numpy as np

from samtok.core.errors import SamtokError

IOU_THRESHOLD = 0.5
TEXT_SIM_THRESHOLD = 0.5


class PhraseSimilarity(Protocol):
    """``sim(a, b)`` → ``(len(a), len(b))`` array of similarities; ``name`` is reported."""

    name: str

    def __call__(self, a: list[str], b: list[str]) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------------
# phrase similarity


class CharNgramSimilarity:
    """Cosine of character n-gram count vectors (offline, deterministic, no corpus statistics).

    Text is lower-cased, whitespace collapsed and padded with one space on each side, so word
    boundaries count (``" a man "`` → ``" a ", "a m", " ma", "man", "an "``). Strings shorter
    than ``n`` after padding use the whole padded string as their only gram. Two empty strings
    have similarity 0.
    """

    def __init__(self, n: int = 3):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self.name = f"char{n}-tf-cosine"

    def _grams(self, text: str) -> Counter:
        t = " ".join(text.lower().split())
        if not t:
            return Counter()
        t = f" {t} "
        if len(t) < self.n:
            return Counter([t])
        return Counter(t[i : i + self.n] for i in range(len(t) - self.n + 1))

    def __call__(self, a: list[str], b: list[str]) -> np.ndarray:
        ga = [self._grams(x) for x in a]
        gb = [self._grams(x) for x in b]
        na = [math.sqrt(sum(v * v for v in g.values())) for g in ga]
        nb = [math.sqrt(sum(v * v for v in g.values())) for g in gb]
        out = np.zeros((len(a), len(b)), dtype=np.float64)
        for i, (g1, n1) in enumerate(zip(ga, na)):
            for j, (g2, n2) in enumerate(zip(gb, nb)):
                if n1 == 0 or n2 == 0:
                    continue
                small, large = (g1, g2) if len(g1) <= len(g2) else (g2, g1)
                dot = sum(v * large.get(k, 0) for k, v in small.items())
                out[i, j] = dot / (n1 * n2)
        return out


class EmbeddingPhraseSimilarity:
    """Cosine of mean-pooled last hidden states of a transformers encoder loaded from a LOCAL path.

    GLaMM's choice is ``bert-base-uncased``: give the path of a local copy. Nothing is ever
    downloaded (``local_files_only=True``); a missing path raises :class:`SamtokError`. The mean is
    taken over all non-padding tokens (special tokens included, as GLaMM does with one phrase per
    forward pass), so batching does not change the result beyond float rounding.
    """

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 64, max_length: int = 512):
        if not os.path.isdir(model_path):
            raise SamtokError(
                f"phrase-similarity model: {model_path!r} is not a local directory (models are never "
                "downloaded; save one with save_pretrained() and pass its path)"
            )
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
            self.model = AutoModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise SamtokError(f"phrase-similarity model: cannot load {model_path!r}: {exc}") from exc
        self._torch = torch
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"embedding-mean:{os.path.basename(os.path.normpath(model_path))}"

    def embed(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), hidden)`` float64 mean-pooled embeddings."""
        torch = self._torch
        out = []
        with torch.no_grad():
            for k in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[k : k + self.batch_size], return_tensors="pt", padding=True,
                    truncation=True, max_length=self.max_length,
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * m).sum(1) / m.sum(1).clamp_min(1.0)).double().cpu().numpy())
        if not out:
            return np.zeros((0, 0))
        return np.concatenate(out)

    def __call__(self, a: list[str], b: list[str]) -> np.ndarray:
        if not a or not b:
            return np.zeros((len(a), len(b)))
        ea, eb = self.embed(list(a)), self.embed(list(b))
        ea = ea / np.maximum(np.linalg.norm(ea, axis=1, keepdims=True), 1e-12)
        eb = eb / np.maximum(np.linalg.norm(eb, axis=1, keepdims=True), 1e-12)
        return ea @ eb.T


def resolve_phrase_similarity(spec: PhraseSimilarity | str | None) -> PhraseSimilarity:
    """``None`` / ``"char3"`` → :class:`CharNgramSimilarity`; a directory path → embedding model."""
    if spec is None or spec in ("char3", "char3-tf-cosine"):
        return CharNgramSimilarity(3)
    if isinstance(spec, str):
        return EmbeddingPhraseSimilarity(spec)
    if not callable(spec):
        raise SamtokError(f"phrase similarity must be a callable or a local model path, got {type(spec).__name__}")
    if not hasattr(spec, "name"):
        name = getattr(spec, "__name__", type(spec).__name__)
        fn = spec

        class _Named:
            def __init__(self):
                self.name = name

            def __call__(self, a, b):
                return fn(a, b)

        return _Named()
    return spec


# ------------------------------------------------------------------------------------------------
# pairing


def iou_matrix(masks_a: Sequence[np.ndarray], masks_b: Sequence[np.ndarray]) -> np.ndarray:
    """``(len(a), len(b))`` IoUs of boolean masks of one image (0 where the union is empty)."""
    if len(masks_a) == 0 or len(masks_b) == 0:
        return np.zeros((len(masks_a), len(masks_b)), dtype=np.float64)
    # float64 matrix product: exact pixel counts (integers far below 2^53)
    a = np.stack([np.asarray(m, dtype=bool).reshape(-1) for m in masks_a]).astype(np.float64)
    b = np.stack([np.asarray(m, dtype=bool).reshape(-1) for m in masks_b]).astype(np.float64)
    inter = a @ b.T
    area_a = a.sum(1)[:, None]
    area_b = b.sum(1)[None, :]
    union = area_a + area_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return out


def greedy_pairing_miou(ious: np.ndarray) -> float:
    """GLaMM's per-image mIoU from a (pred × GT) IoU matrix (see the module docstring)."""
    m = np.array(ious, dtype=np.float64)
    paired = []
    while m.size > 0 and m.max() > 0:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        paired.append(float(m[i, j]))
        m = np.delete(np.delete(m, i, axis=0), j, axis=1)
    return math.fsum(paired) / len(paired) if paired else 0.0


def greedy_phrase_matches(
    ious: np.ndarray,
    text_sims: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
    text_sim_threshold: float = TEXT_SIM_THRESHOLD,
    mode: str = "glamm",
) -> list[tuple[int, int]]:
    """One-to-one (GT index, pred index) matches for the GCG recall, largest IoU first.

    ``ious`` and ``text_sims`` are both (GT × predictions). ``mode="glamm"`` stops at the first
    largest-IoU pair that fails a threshold (GLaMM's behaviour); ``mode="admissible"`` skips it.
    """
    if mode not in ("glamm", "admissible"):
        raise ValueError(f"mode must be 'glamm' or 'admissible', got {mode!r}")
    ious = np.array(ious, dtype=np.float64)
    sims = np.asarray(text_sims, dtype=np.float64)
    if ious.shape != sims.shape:
        raise SamtokError(f"IoU matrix {ious.shape} and phrase-similarity matrix {sims.shape} differ in shape")
    matches = []
    while ious.size > 0:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[i, j] < iou_threshold:
            break
        if sims[i, j] < text_sim_threshold:
            if mode == "glamm":
                break
            ious[i, j] = -1.0  # never again a candidate
            continue
        matches.append((int(i), int(j)))
        ious[i, :] = -1.0
        ious[:, j] = -1.0
    return matches


# ------------------------------------------------------------------------------------------------
# AP50 through pycocotools


def coco_ap50(
    images: Sequence[tuple[int, int, int]],
    gt_rles: Sequence[tuple[int, dict]],
    pred_rles: Sequence[tuple[int, dict]],
) -> float:
    """Mask AP at IoU 0.5 with pycocotools, GLaMM style (one category, every score 1.0).

    Args:
        images: ``(image_id, height, width)`` of every evaluated image (images without GT masks
            or without predictions included: their predictions are false positives, their GT
            masks misses).
        gt_rles: ``(image_id, rle)`` ground-truth masks, compressed COCO RLE with bytes counts.
        pred_rles: ``(image_id, rle)`` predicted masks.

    Returns:
        AP50 in [0, 1]; ``0.0`` when there are GT masks but no prediction at all; NaN when there
        is no GT mask (COCOeval reports -1).
    """
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not gt_rles:
        return float("nan")
    if not pred_rles:
        return 0.0
    gt = COCO()
    annotations = []
    for k, (image_id, rle) in enumerate(gt_rles):
        annotations.append({
            "id": k + 1, "image_id": int(image_id), "category_id": 1, "segmentation": rle,
            "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)], "iscrowd": 0,
        })
    gt.dataset = {
        "images": [{"id": int(i), "height": int(h), "width": int(w)} for i, h, w in images],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([
            {"image_id": int(image_id), "category_id": 1, "segmentation": rle, "score": 1.0}
            for image_id, rle in pred_rles
        ])
        ev = COCOeval(gt, dt, "segm")
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap50 = float(ev.stats[1])
    return float("nan") if ap50 < 0 else ap50

