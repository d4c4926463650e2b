"""Reading images and mask files from disk, with errors that name the file.

Every image becomes an ``(H, W, 3)`` uint8 RGB array whatever is on disk: grayscale is replicated,
alpha is dropped (the colour under it is kept), palette images are expanded, and 16-bit images are
scaled to 8 bits (value * 255 / 65535) instead of being clipped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from samtok.core.errors import SamtokError
from samtok.core.masks import MaskFormatError, as_bool_mask


class ImageReadError(SamtokError):
    """An image file exists but cannot be read as an image."""


def _open(path: str | Path, what: str) -> Image.Image:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_file():
        raise ImageReadError(f"{what} is not a file: {p}")
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot read {what} {p}: {exc}") from exc
    return img


def pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL image → ``(H, W, 3)`` uint8 (see the module docstring for the rules)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr * 255.0 / hi), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(np.rint(arr * 255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette transparency is resolved through RGBA, then dropped
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB."""
    return pil_to_rgb_array(_open(path, "image"))


def as_rgb_array(image: Any, where: str = "image") -> np.ndarray:
    """Accept a path, a PIL image, or an array ``(H, W)``/``(H, W, 1|3|4)`` and return uint8 RGB."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb_array(image)
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageReadError(f"{where}: expected (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return np.clip(np.rint(arr.astype(np.float64) * 255.0 / 65535.0), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{where}: image contains NaN or infinite values")
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    return np.clip(arr, 0, 255).astype(np.uint8)


def load_mask(path: str | Path, threshold: float | None = None) -> np.ndarray:
    """Read a mask image (0/1, 0/255, bool, palette index) as an ``(H, W)`` bool array.

    A mask with more than two distinct values is refused unless ``threshold`` is given
    (then ``value > threshold`` is foreground, on the file's own value scale).
    """
    img = _open(path, "mask file")
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img.convert("L"))
    elif img.mode == "P":
        arr = np.asarray(img)
    else:
        arr = np.asarray(img)
        if arr.ndim == 3:
            arr = arr[..., 0]
    if threshold is not None:
        return np.asarray(arr) > threshold
    try:
        return as_bool_mask(arr, where=str(path))
    except MaskFormatError as exc:
        raise MaskFormatError(f"{exc}; pass a threshold to binarise a soft mask") from exc


def save_mask_png(mask: Any, path: str | Path) -> Path:
    """Write a bool mask as a 0/255 8-bit PNG (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    m = as_bool_mask(mask)
    tmp = p.with_name(p.name + ".tmp")
    Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    tmp.replace(p)
    return p
