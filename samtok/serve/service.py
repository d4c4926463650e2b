"""What the web demo's tabs do, without any web framework: :class:`DemoService`.

Every input arrives as the page's components deliver it (images as arrays, a painted layer as an
RGBA array, a mask file as a path, spans and prompts as text) and is checked here; anything wrong
raises :class:`DemoInputError` with a message written for the person at the page (what is wrong,
what to do). Nothing a request sends can stop the service. Results are plain dicts of numbers,
text and numpy arrays; :mod:`samtok.serve.app` turns them into Gradio components.

* **Tokenize** — an image and a mask (painted, or a mask file) → the mask's two codes, its span,
  the decoded mask and the IoU between the mask and its reconstruction.
* **Detokenize** — an image and text holding spans → the decoded masks (the spec's repair rules:
  a missing start/end token is repaired, an out-of-range second code falls back to the first code
  alone, an out-of-range first code skips the span — each with a note).
* **Chat** — an image, a prompt, optionally a region painted on the image (it goes into the prompt
  as its span: at each ``<mask>``, or appended) and the earlier turns → the model's answer with
  every span decoded, labelled and drawn over the image.

Images larger than ``max_image_side`` are resized (aspect ratio kept) with a note, so a huge upload
costs a resize, not minutes of decoding; a mask painted on the full-size image follows it. The
tokenizer is loaded at start-up; the model in a background thread (the page works while it
loads; Chat says it is loading). Model calls are serialised by one lock, tokenizer calls by
another, so any number of concurrent requests queue up and are all answered.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from samtok.core.errors import SamtokError
from samtok.core.runtime import get_logger

log = get_logger("samtok.serve")

MASK_PLACEHOLDER = "<mask>"
SPAN_EXAMPLE = "<|mt_start|><|mt_0017|><|mt_0301|><|mt_end|>"
_MAX_PIXELS_OPENED = 100_000_000  # refuse anything bigger (decompression bombs)
_ASPECT_TOLERANCE = 0.02


class DemoInputError(SamtokError):
    """Bad input from the page; the message is shown to the person as is."""


class ModelUnavailable(SamtokError):
    """Chat (or any tab) was asked for but what it needs is not loaded: none given, still loading, or it failed."""


@dataclass
class DemoConfig:
    """Settings of ``samtok serve`` (see its ``--help``)."""

    tokenizer_dir: Optional[str] = None
    model_dir: Optional[str] = None
    device: str = "cpu"
    max_image_side: int = 1600
    max_upload_mb: float = 40.0
    max_spans: int = 32
    max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    max_history_messages: int = 40
    max_text_chars: int = 20_000


# ------------------------------------------------------------------------------------------ inputs
def _what_it_is(path: Path) -> str:
    """A guess at what a non-image upload is, for the error message."""
    try:
        raw = path.read_bytes()[:4096]
    except OSError:
        return "an unreadable file"
    if raw.startswith(b"%PDF"):
        return "a PDF document"
    if raw.startswith(b"PK\x03\x04"):
        return "a ZIP archive (or an Office document)"
    if not raw:
        return "an empty file"
    try:
        raw.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not an image format Pillow knows"


def open_image_file(path: Any, what: str) -> Image.Image:
    """A file as a decoded PIL image, or :class:`DemoInputError` saying why not."""
    p = Path(path)
    if not p.is_file():
        raise DemoInputError(f"The {what} {p.name} was not received; upload it again.")
    try:
        img = Image.open(p)
    except Image.DecompressionBombError as exc:
        raise DemoInputError(f"The {what} has too many pixels to open ({exc}).") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DemoInputError(f"The {what} {p.name} is not an image ({_what_it_is(p)}); use a PNG, JPEG, WebP, BMP "
                             f"or GIF file.") from exc
    _check_pixels(*img.size, what)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DemoInputError(f"The {what} could not be decoded ({exc}); the file may be truncated or corrupt.") from exc
    return img


def _check_pixels(w: int, h: int, what: str) -> None:
    if w * h > _MAX_PIXELS_OPENED:
        raise DemoInputError(f"The {what} is {w}x{h} pixels ({w * h / 1e6:.0f} Mpx); the demo opens images up to "
                             f"{_MAX_PIXELS_OPENED / 1e6:.0f} Mpx.")


def as_rgb(image: Any, what: str = "image") -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8 RGB.

    Accepts what the page's components deliver — an ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``
    array (transparent pixels are composited on white, as the page shows them), a PIL image, or a
    file path (EXIF rotation applied, as browsers show it).
    """
    from samtok.core.images import pil_to_rgb_array

    if image is None:
        raise DemoInputError(f"No {what}: upload a PNG, JPEG, WebP, BMP or GIF file first (files that are not "
                             f"images are not taken).")
    if isinstance(image, (str, Path)):
        img = open_image_file(image, what)
        try:
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, TypeError):  # a broken EXIF block is not worth refusing the image
            pass
        image = img
    if isinstance(image, Image.Image):
        _check_pixels(*image.size, what)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = np.asarray(image.convert("RGBA"))
        else:
            return pil_to_rgb_array(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DemoInputError(f"The {what} must be a colour or grey image; got an array of shape {arr.shape}.")
    _check_pixels(arr.shape[1], arr.shape[0], what)
    if arr.dtype != np.uint8:
        if arr.dtype == bool or not np.isfinite(arr).all():
            raise DemoInputError(f"The {what} has values that are not colours ({arr.dtype}).")
        arr = np.clip(np.rint(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        if alpha.min() < 1.0:
            arr = np.rint(arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        else:
            arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def fitted_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(W, H)`` scaled so that the longer side is at most ``max_side`` (aspect kept, halves round up)."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, int(np.floor(width * scale + 0.5))), max(1, int(np.floor(height * scale + 0.5)))


def fit_image(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, list[str]]:
    """``rgb`` resized so that its longer side is at most ``max_side``, and a note when it was."""
    h, w = rgb.shape[:2]
    new = fitted_size(w, h, max_side)
    if new == (w, h):
        return rgb, []
    out = np.asarray(Image.fromarray(rgb).resize(new, Image.Resampling.LANCZOS))
    return out, [f"The image is {w}x{h} pixels; it was resized to {new[0]}x{new[1]} (the demo works on images up "
                 f"to {max_side} pixels a side)."]


def read_image(image: Any, config: DemoConfig) -> tuple[np.ndarray, tuple[int, int], list[str]]:
    """``(rgb at the working size, (H, W) as uploaded, notes)``."""
    rgb = as_rgb(image)
    fitted, notes = fit_image(rgb, config.max_image_side)
    return fitted, rgb.shape[:2], notes


def layer_mask(layer: Any, what: str = "mask") -> np.ndarray:
    """A painted layer as a bool mask: painted = alpha >= 128 (grey >= 128 for a layer without alpha)."""
    arr = np.asarray(layer)
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        return arr[..., -1] >= 128
    if arr.ndim == 3 and arr.shape[2] in (1, 3):
        arr = arr.mean(axis=2)
    if arr.ndim != 2:
        raise DemoInputError(f"The {what} must be a 2-D layer; got an array of shape {arr.shape}.")
    return arr >= (0.5 if arr.dtype == bool or arr.max() <= 1 else 128)


def fit_mask(mask: np.ndarray, work: tuple[int, int], uploaded: tuple[int, int], what: str) -> tuple[np.ndarray, list[str]]:
    """``mask`` at the working size ``work = (H, W)``.

    A mask at the size the image was uploaded at follows the image's resize silently; one of
    another size but the same shape is resized with a note; any other shape is refused.
    """
    from samtok.core.masks import resize_mask

    h, w = work
    mh, mw = mask.shape
    if (mh, mw) == (h, w):
        return mask, []
    if (mh, mw) == tuple(uploaded):
        return resize_mask(mask, (h, w)), []
    uh, uw = uploaded
    if abs(mw / mh - uw / uh) > _ASPECT_TOLERANCE * (uw / uh):
        raise DemoInputError(f"The {what} is {mw}x{mh} pixels but the image is {uw}x{uh}: a mask must have the image's "
                             f"size (or at least its shape).")
    return resize_mask(mask, (h, w)), [f"The {what} ({mw}x{mh}) was resized to the image's {w}x{h} pixels."]


def read_mask_file(path: Any) -> np.ndarray:
    """A mask file, read with the rules of ``samtok encode --mask`` (:func:`samtok.core.images.load_mask`)."""
    from samtok.core.images import load_mask
    from samtok.core.masks import MaskFormatError

    open_image_file(path, "mask file")  # a clear message for non-images before load_mask's own
    try:
        return load_mask(path)
    except MaskFormatError as exc:
        detail = str(exc).split(": ", 1)[-1]
        raise DemoInputError(f"The mask file is not a binary mask ({detail}). Save masks as PNG with two values "
                             f"(0 = background, anything else = the region); JPEG noise makes more values.") from exc
    except SamtokError as exc:
        raise DemoInputError(f"The mask file could not be read: {exc}") from exc


def mask_coverage_notes(mask: np.ndarray, what: str = "mask") -> list[str]:
    """Refuse an empty mask; warn about one that covers the whole image."""
    area = int(mask.sum())
    if area == 0:
        raise DemoInputError(f"The {what} is empty: paint on the image (or upload a mask file) to mark a region first.")
    if area == mask.size:
        return [f"The {what} covers the whole image. That is rarely meant (an inverted mask?); it was encoded anyway."]
    return []


def _text(value: Any, what: str, limit: int, required: bool = True) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DemoInputError(f"The {what} must be text.")
    if required and not value.strip():
        raise DemoInputError(f"The {what} is empty.")
    if len(value) > limit:
        raise DemoInputError(f"The {what} is {len(value)} characters long; the demo takes at most {limit}.")
    return value


def _mask_rows(spans_codes, masks: np.ndarray, labels=None) -> list[dict]:
    h, w = masks.shape[1:] if masks.ndim == 3 else (1, 1)
    rows = []
    for k, (codes, m) in enumerate(zip(spans_codes, masks)):
        area = int(m.sum())
        row = {"index": k, "codes": [int(c) for c in codes], "area": area, "percent": round(100.0 * area / (h * w), 2)}
        if labels is not None:
            row["label"] = labels[k]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ service
class DemoService:
    """The three tabs of the demo over one SAMTokenizer and (optionally) one QwenVL-SAMTok model.

    Args:
        config: :class:`DemoConfig`.
        tokenizer: a ready :class:`~samtok.tokenizer.api.SAMTokenizer` (default: loaded from
            ``config.tokenizer_dir`` by :meth:`start`).
        predictor: a ready :class:`~samtok.mllm.inference.SamtokPredictor` (default: loaded from
            ``config.model_dir`` in a background thread by :meth:`start`).
    """

    def __init__(self, config: DemoConfig, tokenizer=None, predictor=None):
        self.config = config
        self.tokenizer = tokenizer
        self.tokenizer_error: Optional[str] = None
        self.predictor = predictor
        self.model_error: Optional[str] = None
        self._model_ready = threading.Event()
        if predictor is not None or not config.model_dir:
            self._model_ready.set()
        self._tok_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._loader: Optional[threading.Thread] = None

    # ---------------------------------------------------------------------------- loading
    def start(self, wait_for_model: bool = False) -> "DemoService":
        """Load the tokenizer now and the model in the background (or now, with ``wait_for_model``)."""
        if self.tokenizer is None and self.tokenizer_error is None:
            self._load_tokenizer()
        if not self._model_ready.is_set() and self._loader is None:
            self._loader = threading.Thread(target=self._load_model, name="samtok-model-loader", daemon=True)
            self._loader.start()
        if wait_for_model:
            self._model_ready.wait()
        return self

    def _load_tokenizer(self) -> None:
        path = self.config.tokenizer_dir
        if not path:
            self.tokenizer_error = "No mask tokenizer was given: start the demo with --tokenizer DIR."
            return
        p = Path(path)
        if p.is_file() and p.suffix in (".pth", ".pt"):
            self.tokenizer_error = (f"{p} is the release's checkpoint; convert it once with `samtok export "
                                    f"--from-official {p} --out DIR` and start the demo with --tokenizer DIR.")
            return
        if not (p / "config.json").is_file():
            self.tokenizer_error = (f"No mask tokenizer at {p} (no config.json). Train one with `make train-tokenizer`, "
                                    f"or start the demo with --tokenizer DIR.")
            return
        try:
            from samtok.tokenizer.api import SAMTokenizer

            self.tokenizer = SAMTokenizer.from_pretrained(p, device=self.config.device)
        except Exception as exc:  # shown on the page; the server keeps serving the rest
            log.exception("cannot load the mask tokenizer from %s", p)
            self.tokenizer_error = f"The mask tokenizer at {p} could not be loaded: {exc}"

    def _load_model(self) -> None:
        path = Path(self.config.model_dir or "")
        try:
            if self.tokenizer is None:
                raise SamtokError(f"the model needs the mask tokenizer, which is not loaded ({self.tokenizer_error})")
            if not (path / "config.json").is_file():
                raise SamtokError(f"no model at {path} (no config.json); train one with `make sft`, or pass --model DIR")
            from samtok.mllm.inference import SamtokPredictor
            from samtok.mllm.models import load_model_and_processor

            t0 = time.time()
            dtype = "float32" if str(self.config.device).startswith("cpu") else "auto"
            model, processor = load_model_and_processor(path, dtype=dtype, device=self.config.device)
            self.predictor = SamtokPredictor(model, processor, self.tokenizer, batch_size=1)
            log.info("model %s loaded in %.1f s", path, time.time() - t0)
        except Exception as exc:  # shown on the page's Chat tab
            log.exception("cannot load the model from %s", path)
            self.model_error = f"The model at {path} could not be used: {exc}"
        finally:
            self._model_ready.set()

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ModelUnavailable(self.tokenizer_error or "the mask tokenizer is not loaded")
        return self.tokenizer

    def info(self) -> dict:
        """What is loaded (shown in the page's header)."""
        if not self.config.model_dir and self.predictor is None:
            status = "none"
        elif not self._model_ready.is_set():
            status = "loading"
        else:
            status = "ready" if self.predictor is not None else "error"
        tok = self.tokenizer
        return {
            "tokenizer": self.config.tokenizer_dir,
            "tokenizer_ready": tok is not None,
            "tokenizer_error": self.tokenizer_error,
            "codebook": f"{tok.codec.depth} x {tok.codec.codebook_size}" if tok is not None else None,
            "model": self.config.model_dir,
            "model_status": status,
            "model_error": self.model_error,
            "max_image_side": self.config.max_image_side,
            "max_new_tokens": self.config.max_new_tokens,
        }

    # ---------------------------------------------------------------------------- tokenize
    def tokenize(self, image: Any, mask: Any = None, mask_file: Any = None) -> dict:
        """Image + mask → codes, span, decoded mask and IoU.

        Args:
            image: the image as uploaded (array, PIL image or path).
            mask: the region painted on it: an RGBA layer (painted = opaque) or a 2-D mask; may be empty
                when ``mask_file`` is given.
            mask_file: path of a mask file (``samtok encode --mask`` rules); used instead of the painting.

        Returns:
            ``span``, ``codes`` (two ints), ``iou``, ``area``, ``decoded_area``, ``width``, ``height``,
            ``image`` (the working RGB array), ``mask`` and ``decoded`` (``(H, W)`` bool), ``notes``,
            ``seconds``.
        """
        import torch

        from samtok.core.masks import mask_iou

        tok = self._need_tokenizer()
        rgb, uploaded, notes = read_image(image, self.config)
        h, w = rgb.shape[:2]
        painted = layer_mask(mask) if mask is not None else None
        if mask_file:
            m, more = fit_mask(read_mask_file(mask_file), (h, w), uploaded, "mask file")
            notes += more + mask_coverage_notes(m, "mask file")
            if painted is not None and painted.any():
                notes.append("The mask file was used; the painting was ignored (remove the file to use the painting).")
        elif painted is not None:
            m, more = fit_mask(painted, (h, w), uploaded, "painted mask")
            notes += more + mask_coverage_notes(m)
        else:
            raise DemoInputError("No mask: paint the region on the image, or upload a mask file.")
        t0 = time.time()
        with self._tok_lock, torch.no_grad():
            feats, _ = tok.image_features([rgb])
            codes = tok.encode_with_features(feats, 0, torch.from_numpy(np.ascontiguousarray(m))[None])
            decoded = tok.decode_with_features(feats, 0, codes, (h, w))[0].numpy()
        return {
            "span": tok.spans(codes)[0],
            "codes": [int(v) for v in codes[0].tolist()],
            "iou": round(float(mask_iou(decoded, m)), 4),
            "area": int(m.sum()),
            "decoded_area": int(decoded.sum()),
            "width": w,
            "height": h,
            "image": rgb,
            "mask": m,
            "decoded": decoded,
            "notes": notes,
            "seconds": round(time.time() - t0, 3),
        }

    # ---------------------------------------------------------------------------- detokenize
    def detokenize(self, image: Any, text: Any) -> dict:
        """Image + text with spans → every valid span decoded, with notes on what was repaired or skipped.

        Returns:
            ``masks`` (rows: ``index``, ``span``, ``codes``, ``area``, ``percent``), ``decoded``
            ``(N, H, W)`` bool, ``image``, ``width``, ``height``, ``notes``, ``seconds``.
        """
        import torch

        from samtok.mllm.inference import span_notes

        tok = self._need_tokenizer()
        text = _text(text, "span text", self.config.max_text_chars)
        parsed = tok.codec.parse(text)
        if not parsed.spans:
            raise DemoInputError(f"No mask span found in the text. A span looks like {SPAN_EXAMPLE}: a start word, "
                                 f"a first code (0000-0255), a second code (0256-0511) and an end word.")
        notes = span_notes(text, parsed.spans, parsed.ignored)
        valid = [s for s in parsed.spans if s.valid]
        if not valid:
            raise DemoInputError("None of the spans has a valid first code (<|mt_0000|> ... <|mt_0255|>), so there is "
                                 "nothing to decode. " + " ".join(notes))
        if len(valid) > self.config.max_spans:
            notes.append(f"{len(valid)} spans; only the first {self.config.max_spans} were decoded.")
            valid = valid[: self.config.max_spans]
        rgb, _, image_notes = read_image(image, self.config)
        h, w = rgb.shape[:2]
        codes = torch.tensor([s.codes for s in valid], dtype=torch.long)
        t0 = time.time()
        with self._tok_lock, torch.no_grad():
            feats, _ = tok.image_features([rgb])
            masks = tok.decode_with_features(feats, 0, codes, (h, w)).numpy()
        rows = _mask_rows([s.codes for s in valid], masks)
        for row, s in zip(rows, valid):
            row["span"] = tok.codec.format(*s.codes)
            if row["area"] == 0:
                notes.append(f"mask {row['index']} (codes {s.c0} {s.c1}) decodes to an empty mask on this image.")
        return {"masks": rows, "decoded": masks, "image": rgb, "width": w, "height": h,
                "notes": image_notes + notes, "seconds": round(time.time() - t0, 3)}

    # ---------------------------------------------------------------------------- chat
    def _need_predictor(self, wait_s: float = 0.0):
        if not self._model_ready.is_set():
            self._model_ready.wait(wait_s)
        if self.predictor is not None:
            return self.predictor
        if not self.config.model_dir:
            raise ModelUnavailable("No model was given: Chat needs a QwenVL-SAMTok model. Start the demo with "
                                   "--model DIR (e.g. runs/sft/final after `make sft`).")
        if not self._model_ready.is_set():
            raise ModelUnavailable("The model is still loading; try again in a moment.")
        raise ModelUnavailable(self.model_error or "the model is not loaded")

    def _history(self, history: Any) -> list[dict]:
        if history is None:
            return []
        if not isinstance(history, list):
            raise DemoInputError("The conversation history must be a list of turns.")
        if len(history) > self.config.max_history_messages:
            raise DemoInputError(f"The conversation has {len(history)} turns; start a new one "
                                 f"(at most {self.config.max_history_messages}).")
        out = []
        for k, turn in enumerate(history):
            if (not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant")
                    or not isinstance(turn.get("content"), str)):
                raise DemoInputError(f"Turn {k} of the conversation history is malformed; start a new conversation.")
            if MASK_PLACEHOLDER in turn["content"]:
                raise DemoInputError(f"Turn {k} of the history still holds {MASK_PLACEHOLDER}; start a new conversation.")
            out.append({"role": turn["role"], "content": turn["content"]})
        if out and out[-1]["role"] != "assistant":
            raise DemoInputError("The conversation history must end with an answer; start a new conversation.")
        return out

    def chat(self, image: Any, prompt: Any, region: Any = None, history: Any = None,
             max_new_tokens: Any = None, append_region: bool = True) -> dict:
        """One turn: the answer with its spans decoded and labelled; the updated history.

        Args:
            image: the image as uploaded (array, PIL image or path).
            prompt: the user's text; each ``<mask>`` becomes the span of ``region``.
            region: a region painted on the image (RGBA layer or 2-D mask); an empty one counts as none.
            history: the earlier turns (``{"role", "content"}``, ending with an answer).
            max_new_tokens: answer length limit (default ``config.max_new_tokens``).
            append_region: without ``<mask>`` in the prompt, append the region's span at the end.

        Returns:
            ``answer`` (raw), ``readable`` (spans as ``[mask k]``), ``user_turn`` (the prompt sent, spans
            inserted), ``masks`` (rows: ``index``, ``label``, ``codes``, ``area``, ``percent``),
            ``decoded`` ``(N, H, W)`` bool, ``region`` (the region sent, bool mask, or None), ``image``, ``notes``,
            ``history``, ``num_tokens``, ``seconds``, ``width``, ``height``.
        """
        from samtok.mllm.generation import SamplingConfig

        prompt = _text(prompt, "prompt", self.config.max_text_chars).strip()
        turns = self._history(history)
        limit = self.config.max_new_tokens_limit
        try:
            n_tokens = int(max_new_tokens) if max_new_tokens not in (None, "") else self.config.max_new_tokens
        except (TypeError, ValueError) as exc:
            raise DemoInputError("Max new tokens must be a whole number.") from exc
        if not 1 <= n_tokens <= limit:
            raise DemoInputError(f"Max new tokens must lie between 1 and {limit}.")
        predictor = self._need_predictor(wait_s=1.0)
        rgb, uploaded, notes = read_image(image, self.config)
        h, w = rgb.shape[:2]
        mask = None
        if region is not None:
            mask, more = fit_mask(layer_mask(region, "region"), (h, w), uploaded, "region")
            if not mask.any():
                mask = None  # nothing painted: no region
            else:
                notes += more + mask_coverage_notes(mask, "region")
        n = prompt.count(MASK_PLACEHOLDER)
        if mask is not None and n == 0 and append_region:
            prompt, n = f"{prompt} {MASK_PLACEHOLDER}", 1
            notes.append("The painted region was added at the end of the prompt as its span (write <mask> to place it).")
        if n and mask is None:
            raise DemoInputError(f"The prompt has {MASK_PLACEHOLDER} but no region is painted on the image: paint the "
                                 f"region first, or remove {MASK_PLACEHOLDER}.")
        if not n:
            mask = None  # painted but not sent (the caller said not to append it): not part of this turn
        conversation = turns + [{"role": "user", "content": prompt}]
        t0 = time.time()
        with self._model_lock:
            [pred] = predictor.predict([rgb], [conversation], SamplingConfig(max_new_tokens=n_tokens),
                                       prompt_masks=[[mask] * n] if n else None)
        seconds = time.time() - t0
        sent = pred.prompt[-1]["content"] if pred.prompt else prompt
        decoded = pred.masks.numpy() if pred.num_masks else np.zeros((0, h, w), bool)
        return {
            "answer": pred.text,
            "readable": pred.readable_text,
            "user_turn": sent,
            "masks": _mask_rows(pred.codes, decoded, list(pred.labels)),
            "decoded": decoded,
            "region": mask,
            "image": rgb,
            "notes": notes + pred.notes,
            "history": turns + [{"role": "user", "content": sent}, {"role": "assistant", "content": pred.text}],
            "num_tokens": pred.num_tokens,
            "seconds": round(seconds, 3),
            "width": w,
            "height": h,
        }
