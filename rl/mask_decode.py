"""The ``decode(image_key, codes)`` function the IoU reward needs, backed by a SAMTok tokenizer.

``samtok rl`` passes each completion's prompt images as the reward column ``images`` (a list of PIL
images, the main image first); the SAM 2 features of an image are computed once and kept for the
next completions of its group (a bounded cache keyed by the image object).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch


class TokenizerMaskDecoder:
    """``decoder(images, (c0, c1)) -> (H, W) bool array`` at the main image's size.

    Args:
        tokenizer: a :class:`samtok.tokenizer.SAMTokenizer`.
        max_images: how many images' features are kept (least recently used dropped first).
    """

    def __init__(self, tokenizer, max_images: int = 64):
        self.tokenizer = tokenizer
        self.max_images = max(1, int(max_images))
        self._cache: "OrderedDict[int, tuple[Any, Any, tuple[int, int]]]" = OrderedDict()
        self.images_encoded = 0

    def _features(self, image: Any):
        key = id(image)
        entry = self._cache.get(key)
        if entry is None or entry[0] is not image:  # the entry holds the image: its id cannot be reused
            feats, sizes = self.tokenizer.image_features([image])
            entry = (image, feats, sizes[0])
            self._cache[key] = entry
            self.images_encoded += 1
            while len(self._cache) > self.max_images:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return entry[1], entry[2]

    def __call__(self, images: Any, codes: Sequence[int]) -> np.ndarray:
        if isinstance(images, (list, tuple)):
            if not images:
                from samtok.core.errors import SamtokError

                raise SamtokError("the iou reward needs the prompt's image, but this prompt has none "
                                  "(a text-only prompt cannot be scored by decoded-mask IoU)")
            images = images[0]
        image = images
        feats, size = self._features(image)
        mask = self.tokenizer.decode_with_features(feats, 0, torch.as_tensor([list(codes)], dtype=torch.long), size)
        return mask[0].numpy()
