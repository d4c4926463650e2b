"""Run a QwenVL-SAMTok model: prompts (with optional masks) in, answers with decoded masks out.

    predictor = SamtokPredictor.from_pretrained("runs/sft/final", "runs/tokenizer/final")
    [pred] = predictor.predict([image], ["Please segment the red car in this image."])
    pred.readable_text      # '```json\\n[{"mask_2d": "[mask 0]", "label": "red car"}]\\n```'
    pred.masks              # BoolTensor (N, H, W) at the image's original size
    pred.labels             # ["red car"]

The pipeline, per call:

1. **Images**: each prompt has one image or a list of images (the first is the *main* image: the one
   mask spans in the prompt and in the answer refer to; further images, e.g. a zoomed crop, are only
   shown to the model). SAM 2 features of every distinct main image are computed ONCE per call
   (:meth:`SAMTokenizer.image_features`) and shared by prompt-mask encoding and answer decoding.
2. **Prompt masks**: each ``<mask>`` placeholder of a prompt (in reading order, across the turns of
   a conversation) is replaced by the span of the matching entry of ``prompt_masks`` — a binary
   mask (encoded with the SAMTokenizer on the main image, or on another image with
   :class:`PromptMask`), a code pair ``(c0, c1)``, or a ready span string.
3. **Generation**: prompts are rendered with the model's own chat template and tokenised
   (:func:`samtok.mllm.sequences.build_prompt_example`), left-padded
   (:func:`~samtok.mllm.sequences.generation_collator`) and decoded greedily or by sampling
   (:func:`samtok.mllm.generation.generate`, :class:`~samtok.mllm.generation.SamplingConfig`).
4. **Parsing**: spans are read with :meth:`MaskCodec.parse` and its repair rules (spec §2); every
   parsed span with a valid first code is decoded into a mask at the main image's original size.

Malformed generations have defined outcomes and never raise:

* a span whose first code is not a depth-0 code is skipped, with a note (its marker in
  :attr:`Prediction.readable_text` is ``[invalid mask]``); a second code out of range becomes -1
  (decoded from the first code alone); spans with a missing start or end token are repaired;
  stray code tokens are ignored (noted);
* no span → no mask (an empty ``(0, H, W)`` tensor; :attr:`Prediction.union_mask` is all False);
* labels come from the answer's JSON (``"label"`` of the object holding the span) or, in grounded
  captions, from the ``<|object_ref_start|>phrase<|object_ref_end|>`` right before the span; JSON
  that does not parse is searched with a tolerant pattern, and a span without a label gets ``None``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from samtok.core.errors import SamtokError
from samtok.core.images import as_rgb_array
from samtok.core.runtime import get_logger
from samtok.data.conversations import ImageRef, load_image_ref
from samtok.mllm.generation import SamplingConfig
from samtok.tokenizer.codec import MaskCodec, MaskSpan

log = get_logger("samtok.mllm.inference")

MASK_PLACEHOLDER = "<mask>"
OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"
NO_TARGET_ANSWER = "No target."
INVALID_MARKER = "[invalid mask]"

_PHRASE_BEFORE_SPAN_RE = re.compile(
    re.escape(OBJECT_REF_START) + r"((?:(?!" + re.escape(OBJECT_REF_START) + r").)*?)"
    + re.escape(OBJECT_REF_END) + r"\s*\Z",
    re.DOTALL,
)
_LABEL_FIELD_RE = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"', re.DOTALL)
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)(?:```|\Z)", re.DOTALL)


# ------------------------------------------------------------------------------------------ results
@dataclass
class Completion:
    """What the language model wrote for one prompt."""

    text: str  # decoded completion without the stop token; mask words and special tokens kept
    finished: bool = True  # False when cut by max_new_tokens
    num_tokens: int = 0


@dataclass
class Prediction:
    """One answer, parsed and decoded.

    ``masks[k]`` belongs to ``spans[span_index[k]]``; spans that could not be decoded (invalid first
    code) have no mask. Masks are at the main image's original size ``image_size = (H, W)``.
    """

    text: str  # the raw completion (mask words kept)
    readable_text: str  # spans replaced by "[mask k]" (k = index into masks) or "[invalid mask]"
    masks: torch.Tensor  # (N, H, W) bool, CPU
    codes: list[tuple[int, int]]  # per mask: (c0, c1), c1 = -1 for a one-code span
    labels: list[Optional[str]]  # per mask: JSON "label" / GCG phrase, None when absent
    span_index: list[int]  # per mask: index into ``spans``
    spans: list[MaskSpan]  # every parsed span, valid or not, in text order
    image_size: tuple[int, int]
    finished: bool = True
    num_tokens: int = 0
    notes: list[str] = field(default_factory=list)  # what was repaired, skipped or ignored
    prompt: list[dict] = field(default_factory=list)  # the conversation sent (mask spans inserted)

    @property
    def num_masks(self) -> int:
        return int(self.masks.shape[0])

    @property
    def union_mask(self) -> torch.Tensor:
        """``(H, W)`` union of all masks (all False without masks): the GRES prediction."""
        if self.masks.shape[0] == 0:
            return torch.zeros(self.image_size, dtype=torch.bool)
        return self.masks.any(dim=0)

    @property
    def no_target(self) -> bool:
        """The model answered the no-target sentence ("No target.")."""
        return self.text.strip() == NO_TARGET_ANSWER

    def areas(self) -> list[int]:
        """Pixel count of each mask."""
        return [int(v) for v in self.masks.flatten(1).sum(1).tolist()] if self.num_masks else []


@dataclass
class PromptMask:
    """A mask to insert at a ``<mask>`` placeholder, given as pixels of one of the prompt's images.

    ``mask`` is an ``(H, W)`` binary mask of ``images[image_index]`` (0 = the main image).
    """

    mask: Any
    image_index: int = 0


# ------------------------------------------------------------------------------------------ parsing
def _json_payload(text: str) -> Any:
    """The JSON value of an answer (fenced or bare), or None when it does not parse."""
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] or [text]
    for c in candidates:
        c = c.strip()
        start = min((i for i in (c.find("["), c.find("{")) if i >= 0), default=-1)
        if start < 0:
            continue
        try:
            return json.loads(c[start:])
        except ValueError:
            end = max(c.rfind("]"), c.rfind("}"))
            if end > start:
                try:
                    return json.loads(c[start : end + 1])
                except ValueError:
                    continue
    return None


def _labels_from_json(text: str, spans: Sequence[MaskSpan], codec: MaskCodec) -> Optional[list[Optional[str]]]:
    """Labels when the answer is a JSON list of ``{"mask_2d", "label"}`` covering every span in order."""
    data = _json_payload(text)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return None
    labels: list[Optional[str]] = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("mask_2d"), str):
            return None
        n = len(codec.parse(item["mask_2d"]).spans)
        label = item.get("label")
        labels.extend([label if isinstance(label, str) else None] * n)
    return labels if len(labels) == len(spans) else None


def _unescape(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw


def _label_near(text: str, span: MaskSpan, lo: int, hi: int) -> Optional[str]:
    """A ``"label": "..."`` of the JSON object around ``span`` (text between neighbouring spans)."""
    after = text[span.end : hi]
    cut = after.find("{")  # the next object starts there
    m = _LABEL_FIELD_RE.search(after if cut < 0 else after[:cut])
    if m:
        return _unescape(m.group(1))
    before = text[lo : span.start]
    opened = before.rfind("{")
    if opened >= 0:
        found = list(_LABEL_FIELD_RE.finditer(before[opened:]))
        if found:
            return _unescape(found[-1].group(1))
    return None


def answer_labels(text: str, spans: Sequence[MaskSpan], codec: Optional[MaskCodec] = None) -> list[Optional[str]]:
    """One label per span of ``text`` (``None`` where there is none). Never raises.

    In order of preference: the grounded-caption phrase ``<|object_ref_start|>p<|object_ref_end|>``
    directly before the span (whitespace allowed); the ``"label"`` of the JSON object whose
    ``"mask_2d"`` holds the span (when the answer parses as a JSON list covering every span); the
    ``"label"`` field found next to the span within its object (malformed JSON).
    """
    codec = codec or MaskCodec()
    if not spans or not isinstance(text, str):
        return [None] * len(spans)
    from_json = _labels_from_json(text, spans, codec) if '"mask_2d"' in text else None
    labels: list[Optional[str]] = []
    for k, span in enumerate(spans):
        lo = spans[k - 1].end if k > 0 else 0
        hi = spans[k + 1].start if k + 1 < len(spans) else len(text)
        m = _PHRASE_BEFORE_SPAN_RE.search(text[lo : span.start])
        if m:
            labels.append(m.group(1).strip())
        elif from_json is not None:
            labels.append(from_json[k])
        else:
            labels.append(_label_near(text, span, lo, hi))
    return labels


def readable(text: str, spans: Sequence[MaskSpan], mask_number: Optional[dict[int, int]] = None) -> str:
    """``text`` with span ``k`` replaced by ``[mask mask_number[k]]`` (``[invalid mask]`` if absent;
    default numbering: every span in order) and Qwen's object-ref tokens removed (a phrase keeps a
    space before its marker)."""
    if mask_number is None:
        mask_number = {k: k for k in range(len(spans))}
    out, pos = [], 0
    for k, span in enumerate(spans):
        out.append(text[pos : span.start])
        out.append(f"[mask {mask_number[k]}]" if k in mask_number else INVALID_MARKER)
        pos = span.end
    out.append(text[pos:])
    s = "".join(out)
    s = re.sub(re.escape(OBJECT_REF_END) + r"(?=\[(?:mask \d+|invalid mask)\])", " ", s)
    return s.replace(OBJECT_REF_START, "").replace(OBJECT_REF_END, "")


_CODE_WORD_RE = re.compile(r"<\|mt_\d{4}\|>")


def span_notes(text: str, spans: Sequence[MaskSpan], ignored: int) -> list[str]:
    """Human-readable notes on what parsing repaired, skipped or ignored."""
    notes = []
    for k, s in enumerate(spans):
        raw = text[s.start : s.end]
        shown = raw if len(raw) <= 80 else raw[:77] + "..."
        if not s.valid:
            notes.append(f"span {k} {shown!r}: first code is not a depth-0 mask word; skipped")
            continue
        if s.repaired:
            notes.append(f"span {k} {shown!r}: missing start or end token; repaired")
        n_codes = len(_CODE_WORD_RE.findall(raw))
        if n_codes > 2:
            notes.append(f"span {k} {shown!r}: {n_codes} code words; the first two kept")
        if s.c1 < 0:
            notes.append(f"span {k} {shown!r}: no valid second code; decoded from the first code alone")
    if ignored:
        notes.append(f"{ignored} stray mask token(s) outside any span ignored")
    return notes


# ------------------------------------------------------------------------------------------ images
def image_key(image: Any) -> Any:
    """Identity of an image for caching: paths (and ``ImageRef`` crops) by value, other objects by id."""
    if isinstance(image, (str, Path)):
        return ("path", str(Path(image).resolve()))
    if isinstance(image, ImageRef):
        crop = None if image.crop is None else tuple(int(v) for v in image.crop)
        return ("ref", str(Path(image.path).resolve()), crop, int(image.min_short_side))
    return ("obj", id(image))


def load_any_image(image: Any) -> np.ndarray:
    """``(H, W, 3)`` uint8 of a path, PIL image, array, tensor, or :class:`~samtok.data.conversations.ImageRef`
    (cropped and upscaled as the conversation shows it)."""
    if isinstance(image, ImageRef):
        return as_rgb_array(load_image_ref(image), where=str(image.path))
    return as_rgb_array(image)


class ImageCache:
    """Images read and SAM 2 features computed once per distinct image (see :func:`image_key`).

    One cache may serve several calls (e.g. encoding the masks a prompt shows, then decoding the
    answer's masks); objects given by identity (arrays, PIL images) must stay alive meanwhile.
    """

    def __init__(self) -> None:
        self.rgb: dict[Any, np.ndarray] = {}
        self.features: dict[Any, tuple[Any, int, tuple[int, int]]] = {}  # key -> (batched features, row, (H, W))

    def load(self, image: Any) -> tuple[Any, np.ndarray]:
        key = image_key(image)
        if key not in self.rgb:
            self.rgb[key] = load_any_image(image)
        return key, self.rgb[key]

    def size(self, image: Any) -> tuple[int, int]:
        h, w = self.load(image)[1].shape[:2]
        return int(h), int(w)


# ------------------------------------------------------------------------------------------ predictor
@dataclass
class _Request:
    conversation: list[dict]
    sources: list[Any]  # the images as given (main image first)
    images: list[np.ndarray]  # loaded RGB arrays, same order


class SamtokPredictor:
    """A Qwen-VL SAMTok model + its processor + the :class:`SAMTokenizer` that decodes its masks.

    Args:
        model: a Qwen2.5-VL / Qwen3-VL model whose vocabulary holds the 514 mask words.
        processor: its :class:`~samtok.mllm.processor.QwenVLImageTextProcessor`.
        tokenizer: the mask tokenizer (``SAMTokenizer``, or any object with ``codec``,
            ``image_features``, ``encode_with_features`` and ``decode_with_features``).
        batch_size: prompts per generation batch (a longer list is processed in chunks).
        max_prompt_length: refuse prompts longer than this many tokens (None: no limit).
        max_masks: decode at most this many masks per answer (None: all).
        system_prompt: a system turn put before every prompt given as a string (None: none).
        feature_batch_size: images per SAM 2 image-encoder pass.
    """

    def __init__(self, model, processor, tokenizer, batch_size: int = 8, max_prompt_length: Optional[int] = None,
                 max_masks: Optional[int] = None, system_prompt: Optional[str] = None, feature_batch_size: int = 4):
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.codec: MaskCodec = getattr(tokenizer, "codec", None) or MaskCodec()
        self.batch_size = max(1, int(batch_size))
        self.max_prompt_length = max_prompt_length
        self.max_masks = max_masks
        self.system_prompt = system_prompt
        self.feature_batch_size = max(1, int(feature_batch_size))
        if model is not None and processor is not None:
            self._check_vocabulary()

    # -------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        tokenizer_dir: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        attn_implementation: Optional[str] = None,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        **kwargs: Any,
    ) -> "SamtokPredictor":
        """Load a model directory (ours, or a hub snapshot such as the released Qwen2.5-VL-3B-SAMTok,
        whose tokenizer already holds the mask words) and a SAMTokenizer directory.

        ``dtype``: "auto" (the checkpoint's dtype on GPU, float32 on CPU),
        "float32", "bfloat16" or "float16". Extra keyword arguments go to the constructor.
        """
        from samtok.mllm.models import load_model_and_processor
        from samtok.tokenizer.api import SAMTokenizer

        tok_path = Path(tokenizer_dir)
        if tok_path.is_file() and tok_path.suffix in (".pth", ".pt"):
            raise SamtokError(
                f"{tok_path} looks like the release's tokenizer checkpoint; convert it once with "
                f"`samtok export --from-official {tok_path} --out DIR` and pass DIR"
            )
        if dtype == "auto" and str(device).startswith("cpu"):
            dtype = "float32"  # bf16 matmuls on CPU are slow and not what tests compare against
        model, processor = load_model_and_processor(model_dir, dtype=dtype, device=device,
                                                    attn_implementation=attn_implementation,
                                                    min_pixels=min_pixels, max_pixels=max_pixels)
        tokenizer = SAMTokenizer.from_pretrained(tok_path, device=device)
        return cls(model, processor, tokenizer, **kwargs)

    def _check_vocabulary(self) -> None:
        from samtok.mllm.vocab import mask_vocabulary_status

        status = mask_vocabulary_status(self.processor, self.codec)
        if status is None:
            raise SamtokError("the model's tokenizer has no mask words (<|mt_start|> ... <|mt_end|>); "
                              "is this a SAMTok model?")
        if status.special:
            log.warning("mask words are special tokens in this tokenizer; they are kept when decoding anyway")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -------------------------------------------------------------------------------- features
    def ensure_features(self, images: Sequence[Any], cache: ImageCache) -> list[Any]:
        """Compute the SAM 2 features of images not in ``cache`` yet; returns their keys."""
        keys, todo = [], {}
        for image in images:
            key, rgb = cache.load(image)
            keys.append(key)
            if key not in cache.features and key not in todo:
                todo[key] = rgb
        items = list(todo.items())
        for i in range(0, len(items), self.feature_batch_size):
            chunk = items[i : i + self.feature_batch_size]
            feats, sizes = self.tokenizer.image_features([rgb for _, rgb in chunk])
            for j, ((key, _), size) in enumerate(zip(chunk, sizes)):
                cache.features[key] = (feats, j, (int(size[0]), int(size[1])))
        return keys

    def encode_masks(self, image: Any, masks: Sequence[Any], cache: Optional[ImageCache] = None) -> list[tuple[int, int]]:
        """Codes ``(c0, c1)`` of binary masks ``(H, W)`` of ``image`` (one image-encoder pass per image)."""
        from samtok.tokenizer.api import masks_as_tensor

        cache = cache if cache is not None else ImageCache()
        key, = self.ensure_features([image], cache)
        feats, j, (h, w) = cache.features[key]
        if len(masks) == 0:
            return []
        codes = self.tokenizer.encode_with_features(feats, j, masks_as_tensor(masks, h, w, where="masks"))
        return [(int(c[0]), int(c[1]) if len(c) > 1 else -1) for c in codes.tolist()]

    def decode_codes(self, image: Any, codes: Sequence[tuple[int, int]], cache: Optional[ImageCache] = None) -> torch.Tensor:
        """``(N, H, W)`` bool masks of ``codes`` on ``image``, at its original size."""
        cache = cache if cache is not None else ImageCache()
        key, = self.ensure_features([image], cache)
        feats, j, size = cache.features[key]
        if not codes:
            return torch.zeros((0, *size), dtype=torch.bool)
        out = self.tokenizer.decode_with_features(feats, j, torch.tensor(list(codes), dtype=torch.long), size)
        return torch.as_tensor(out).bool().cpu()

    # -------------------------------------------------------------------------------- prompts
    def _conversation(self, prompt: Any) -> list[dict]:
        if isinstance(prompt, str):
            conv = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                conv.insert(0, {"role": "system", "content": self.system_prompt})
            return conv
        if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            return [dict(m) for m in prompt]
        raise SamtokError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}")

    def _span_of(self, entry: Any, images: Sequence[Any], cache: ImageCache, k: int) -> str:
        if isinstance(entry, str):
            spans = self.codec.parse(entry).valid_spans
            if len(spans) != 1:
                raise SamtokError(f"prompt mask {k}: expected exactly one valid span, got {entry!r}")
            return self.codec.format(*spans[0].codes)
        if isinstance(entry, tuple) and len(entry) in (1, 2) and all(isinstance(v, (int, np.integer)) for v in entry):
            return self.codec.format(int(entry[0]), int(entry[1]) if len(entry) > 1 else -1)
        image_index, mask = (entry.image_index, entry.mask) if isinstance(entry, PromptMask) else (0, entry)
        if not 0 <= image_index < len(images):
            raise SamtokError(f"prompt mask {k}: image_index {image_index} but the prompt has {len(images)} image(s)")
        (c0, c1), = self.encode_masks(images[image_index], [mask], cache)
        return self.codec.format(c0, c1)

    def _insert_masks(self, req: _Request, masks: Sequence[Any], cache: ImageCache, row: int) -> None:
        total = sum(str(m.get("content", "")).count(MASK_PLACEHOLDER) for m in req.conversation)
        if total != len(masks):
            raise SamtokError(f"prompt {row}: {total} {MASK_PLACEHOLDER} placeholder(s) but {len(masks)} mask(s) given")
        k = 0
        for m in req.conversation:
            content = str(m.get("content", ""))
            if MASK_PLACEHOLDER in content:
                pieces = content.split(MASK_PLACEHOLDER)
                out = [pieces[0]]
                for piece in pieces[1:]:
                    out += [self._span_of(masks[k], req.sources, cache, k), piece]
                    k += 1
                m["content"] = "".join(out)

    # -------------------------------------------------------------------------------- generation
    def generate_texts(self, requests: Sequence[_Request], sampling: SamplingConfig) -> list[Completion]:
        """Completions of prompt conversations (override in tests to force an answer)."""
        from samtok.mllm.generation import generate
        from samtok.mllm.sequences import build_prompt_example, generation_collator

        examples = [build_prompt_example(self.processor, r.conversation, r.images, self.max_prompt_length)
                    for r in requests]
        batch = generation_collator(self.processor)(examples)
        out = generate(self.model, self.processor, batch, sampling)
        lengths = out.lengths.tolist()
        return [Completion(text=t, finished=bool(f), num_tokens=int(n))
                for t, f, n in zip(out.texts, out.finished.tolist(), lengths)]

    # -------------------------------------------------------------------------------- parsing
    def parse(self, completion: Completion, image: Any, cache: Optional[ImageCache] = None,
              conversation: Optional[list[dict]] = None) -> Prediction:
        """Parse one completion and decode its spans on ``image`` (the main image)."""
        cache = cache if cache is not None else ImageCache()
        text = completion.text if isinstance(completion.text, str) else ""
        parsed = self.codec.parse(text)
        spans = parsed.spans
        notes = span_notes(text, spans, parsed.ignored)
        if not completion.finished:
            notes.append("generation stopped at max_new_tokens")
        valid = [k for k, s in enumerate(spans) if s.valid]
        if self.max_masks is not None and len(valid) > self.max_masks:
            notes.append(f"{len(valid)} masks; only the first {self.max_masks} decoded (max_masks)")
            valid = valid[: self.max_masks]
        codes = [spans[k].codes for k in valid]
        masks = self.decode_codes(image, codes, cache)
        all_labels = answer_labels(text, spans, self.codec)
        number = {k: i for i, k in enumerate(valid)}
        return Prediction(
            text=text,
            readable_text=readable(text, spans, number),
            masks=masks,
            codes=[(int(a), int(b)) for a, b in codes],
            labels=[all_labels[k] for k in valid],
            span_index=valid,
            spans=list(spans),
            image_size=cache.size(image),
            finished=completion.finished,
            num_tokens=completion.num_tokens,
            notes=notes,
            prompt=conversation or [],
        )

    # -------------------------------------------------------------------------------- main entry
    @torch.no_grad()
    def predict(
        self,
        images: Sequence[Any],
        prompts: Sequence[Any],
        sampling: Optional[SamplingConfig] = None,
        prompt_masks: Optional[Sequence[Optional[Sequence[Any]]]] = None,
        cache: Optional[ImageCache] = None,
        on_batch: Optional[Callable[[int, list[Prediction]], None]] = None,
    ) -> list[Prediction]:
        """Answer ``prompts`` about ``images`` (one entry each; an entry may be a list of images).

        Args:
            images: per prompt, an image (path, PIL, array, ``ImageRef``) or a list of them; the
                first is the main image (masks refer to it).
            prompts: per prompt, a string (one user turn) or a conversation (list of
                ``{"role", "content"}`` ending with a user turn); ``<image>`` placeholders are
                optional (images go to the start of the first user turn otherwise).
            sampling: :class:`SamplingConfig` (default greedy, 256 new tokens).
            prompt_masks: per prompt, the masks for its ``<mask>`` placeholders in order: binary
                masks of the main image, :class:`PromptMask`, ``(c0, c1)`` codes or span strings.
            cache: an :class:`ImageCache` shared with other calls (default: one per batch), so that
                images already read and encoded (e.g. to make prompt spans) are not processed again.
            on_batch: called with ``(first index, predictions)`` after each generation batch.

        Returns:
            One :class:`Prediction` per prompt, in order.
        """
        if len(images) != len(prompts):
            raise SamtokError(f"{len(images)} images for {len(prompts)} prompts")
        if prompt_masks is not None and len(prompt_masks) != len(prompts):
            raise SamtokError(f"prompt_masks has {len(prompt_masks)} entries for {len(prompts)} prompts")
        sampling = sampling or SamplingConfig()
        results: list[Prediction] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = min(len(prompts), start + self.batch_size)
            batch = self._predict_batch(images[start:stop], prompts[start:stop], sampling,
                                        None if prompt_masks is None else prompt_masks[start:stop], start,
                                        cache if cache is not None else ImageCache())
            if on_batch is not None:
                on_batch(start, batch)
            results.extend(batch)
        return results

    def _predict_batch(self, images, prompts, sampling, prompt_masks, offset: int, cache: ImageCache) -> list[Prediction]:
        requests = []
        for row, (imgs, prompt) in enumerate(zip(images, prompts)):
            imgs = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
            if not imgs:
                raise SamtokError(f"prompt {offset + row}: no image")
            requests.append(_Request(self._conversation(prompt), imgs, [cache.load(im)[1] for im in imgs]))
        self.ensure_features([r.sources[0] for r in requests], cache)
        for row, req in enumerate(requests):
            masks = prompt_masks[row] if prompt_masks is not None else None
            if masks or any(MASK_PLACEHOLDER in str(m.get("content", "")) for m in req.conversation):
                self._insert_masks(req, list(masks or []), cache, offset + row)
        completions = self.generate_texts(requests, sampling)
        if len(completions) != len(requests):
            raise SamtokError(f"generation returned {len(completions)} completions for {len(requests)} prompts")
        return [self.parse(c, r.sources[0], cache, r.conversation) for c, r in zip(completions, requests)]
