"""A perfect oracle: checks the evaluation plumbing (data → prompts → parsing → decoding → metrics).

``samtok eval --benchmark B --oracle --data ...`` answers every prompt with its ground-truth answer
and decodes spans with a lossless lookup tokenizer, so every segmentation metric must come out
perfect (gIoU = cIoU = N-acc = T-acc = 1, AP50 = mIoU = recall = 1, rMaskIoU = 1, caption
metrics of identical text). Anything less points at the data layout, the prompt/answer formats,
the parser or the metric wiring — not at a model.

* :class:`OracleTokenizer` — the :class:`~samtok.tokenizer.api.SAMTokenizer` interface
  (``codec``, ``image_features``, ``encode_with_features``, ``decode_with_features``) backed by a
  table: encoding gives each distinct mask of an image its own code pair (the n-th mask gets
  ``(n mod 256, n div 256)``, so the first code alone is unique up to 256 masks per image),
  decoding returns the very mask. Tables live in the instance (one per process).
* :class:`OraclePredictor` — a :class:`~samtok.mllm.inference.SamtokPredictor` without a language
  model: :meth:`set_references` receives the ground-truth answers of the next :meth:`predict` call
  (benchmarks call it on engines that have it), which become the "generated" texts; everything
  after generation (parsing, labels, decoding at image size) is the real predictor code.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np
import torch

from samtok.core.images import as_rgb_array
from samtok.mllm.inference import Completion, SamtokPredictor
from samtok.tokenizer.codec import MaskCodec


def _digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    return hashlib.sha1(a.tobytes() + repr((a.shape, str(a.dtype))).encode()).hexdigest()


class OracleTokenizer:
    """Lossless mask tokenizer by lookup (see the module docstring)."""

    def __init__(self, codebook_size: int = 256, depth: int = 2):
        self.codec = MaskCodec(codebook_size, depth)
        self.codebook_size = codebook_size
        self.depth = depth
        self.mask_batch_size = 64
        self._codes: dict[str, dict[str, tuple[int, int]]] = {}  # image digest -> mask digest -> codes
        self._masks: dict[str, dict[tuple[int, int], np.ndarray]] = {}  # image digest -> codes -> mask

    def image_features(self, images: Sequence[Any]) -> tuple[list[str], list[tuple[int, int]]]:
        rgbs = [as_rgb_array(im) for im in images]
        return [_digest(r) for r in rgbs], [(int(r.shape[0]), int(r.shape[1])) for r in rgbs]

    def encode_with_features(self, feats: list[str], image_index: int, masks: torch.Tensor) -> torch.Tensor:
        key = feats[image_index]
        codes = self._codes.setdefault(key, {})
        table = self._masks.setdefault(key, {})
        out = []
        for m in torch.as_tensor(masks).bool().cpu().numpy():
            d = _digest(m)
            if d not in codes:
                n = len(codes)
                if n >= self.codebook_size**2:
                    raise ValueError("the oracle tokenizer ran out of code pairs for this image")
                codes[d] = (n % self.codebook_size, n // self.codebook_size)
                table[codes[d]] = m.copy()
            out.append(codes[d])
        return torch.tensor(out, dtype=torch.long).reshape(-1, 2)

    def decode_with_features(self, feats: list[str], image_index: int, codes: torch.Tensor,
                             size: tuple[int, int]) -> torch.Tensor:
        table = self._masks.get(feats[image_index], {})
        out = []
        for c0, c1 in torch.as_tensor(codes).reshape(-1, 2).tolist():
            if c1 < 0:  # first code alone: the first mask given that first code (exact below 256 masks per image)
                m = next((v for (a, _), v in table.items() if a == c0), None)
            else:
                m = table.get((int(c0), int(c1)))
            out.append(m if m is not None and m.shape == tuple(size) else np.zeros(size, dtype=bool))
        if not out:
            return torch.zeros((0, *size), dtype=torch.bool)
        return torch.from_numpy(np.stack(out))


class OraclePredictor(SamtokPredictor):
    """Answers with the references given to :meth:`set_references` (the rest is the real predictor)."""

    def __init__(self, tokenizer: Optional[OracleTokenizer] = None, **kwargs: Any):
        super().__init__(None, None, tokenizer or OracleTokenizer(), **kwargs)
        self._references: list[str] = []

    def set_references(self, answers: Sequence[str]) -> None:
        """The ground-truth answers of the next :meth:`predict` call, in prompt order."""
        self._references = list(answers)

    def generate_texts(self, requests, sampling) -> list[Completion]:
        if len(self._references) < len(requests):
            raise ValueError(f"the oracle got {len(self._references)} reference answers for {len(requests)} prompts")
        texts, self._references = self._references[: len(requests)], self._references[len(requests):]
        return [Completion(text=t, finished=True, num_tokens=0) for t in texts]


def oracle_engine(device: torch.device, tokenizer_only: bool = False):
    """Engine factory of ``--oracle`` runs (the device is irrelevant: nothing runs on it)."""
    return OracleTokenizer() if tokenizer_only else OraclePredictor()
