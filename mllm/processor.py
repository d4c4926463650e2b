"""An image+text processor for Qwen2.5-VL / Qwen3-VL that needs no torchvision.

transformers' ``Qwen2_5_VLProcessor`` and ``Qwen3VLProcessor`` insist on a video processor, and the
video processors need torchvision, which cannot be imported beside the CPU build of torch. For
images their behaviour is the same and simple: each ``<|image_pad|>`` of the text is replaced by
``grid_t·grid_h·grid_w / merge_size²`` copies (one per merged patch) and the image processor's
``pixel_values`` (flattened patches) and ``image_grid_thw`` are returned. :class:`QwenVLImageTextProcessor`
keeps exactly that, through transformers' own ``ProcessorMixin.__call__`` (so the expansion is the
library's, not a re-implementation), with ``Qwen2VLImageProcessorPil`` (PIL backend) for images.

Qwen2.5-VL uses 14-pixel patches (28-pixel merged cells) and CLIP's mean/std; Qwen3-VL uses 16-pixel
patches (32-pixel cells) and mean = std = 0.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from transformers.processing_utils import ProcessorMixin

from samtok.core.errors import SamtokError

# Per family: patch size and normalisation of the released image processors.
IMAGE_DEFAULTS = {
    "qwen2_5_vl": {
        "patch_size": 14,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    },
    "qwen3_vl": {"patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"


class QwenVLImageTextProcessor(ProcessorMixin):
    """``processor(text=..., images=...)`` for Qwen-VL models, images only (no video processor).

    Args:
        image_processor: a ``Qwen2VLImageProcessorPil`` (or any Qwen2-VL-style image processor).
        tokenizer: the text tokenizer (holding ``<|image_pad|>``).
        chat_template: Jinja chat template; default: the tokenizer's.

    Calling it returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (0 text, 1 image:
    transformers 5 needs it for M-RoPE positions), and, with images, ``pixel_values``
    ``(sum of patches, 3·2·patch²)`` and ``image_grid_thw`` ``(num_images, 3)``.
    """

    return_mm_token_type_ids = True

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.vision_start_token = "<|vision_start|>"
        self.vision_end_token = "<|vision_end|>"
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    # Used by ProcessorMixin.__call__ for every image, in order.
    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        merge_length = self.image_processor.merge_size**2
        num_image_tokens = int(image_inputs["image_grid_thw"][image_idx].prod()) // merge_length
        return self.image_token * num_image_tokens

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None or audio is not None:
            raise SamtokError("QwenVLImageTextProcessor handles text and images only")
        return super().__call__(images=images, text=text, **kwargs)

    def num_image_tokens(self, image_grid_thw) -> list[int]:
        """Placeholder tokens per image for a ``(N, 3)`` grid tensor (``t·h·w / merge²``)."""
        merge = self.image_processor.merge_size**2
        return [int(g.prod()) // merge for g in image_grid_thw]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]


def build_image_processor(
    family: str = "qwen2_5_vl",
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 2048 * 28 * 28,
    patch_size: Optional[int] = None,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
):
    """A PIL-backend Qwen-VL image processor.

    Args:
        family: "qwen2_5_vl" (patch 14, CLIP mean/std) or "qwen3_vl" (patch 16, mean = std = 0.5).
        min_pixels: smallest resized area in pixels (release: 4·28·28).
        max_pixels: largest resized area in pixels (release: 2048·28·28).
        patch_size: override the family's patch size.
        merge_size: spatial merge of the vision tower (2 × 2 patches → one LLM token).
        temporal_patch_size: frames per temporal patch (a still image is repeated).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family not in IMAGE_DEFAULTS:
        raise SamtokError(f"unknown model family {family!r}; expected one of {sorted(IMAGE_DEFAULTS)}")
    d = IMAGE_DEFAULTS[family]
    return Qwen2VLImageProcessorPil(
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
        patch_size=int(patch_size or d["patch_size"]),
        merge_size=int(merge_size),
        temporal_patch_size=int(temporal_patch_size),
        image_mean=list(d["image_mean"]),
        image_std=list(d["image_std"]),
    )


def _read_chat_template(path: Path) -> Optional[str]:
    import json

    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    if js.is_file():
        data = json.loads(js.read_text())
        return data.get("chat_template") if isinstance(data, dict) else None
    return None


def load_processor(
    path: str | Path,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
    tokenizer: Any = None,
) -> QwenVLImageTextProcessor:
    """Load a processor from a local directory (ours, or a hub snapshot of Qwen2.5-VL / Qwen3-VL).

    The image processor is always the PIL backend, built from ``preprocessor_config.json`` (or the
    ``image_processor`` entry of ``processor_config.json``); the tokenizer comes from
    ``AutoTokenizer`` (local files only). ``min_pixels`` / ``max_pixels`` override the saved ones.
    """
    import json

    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"processor directory not found: {p}")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    ip_kwargs: dict[str, Any] = {}
    if min_pixels is not None:
        ip_kwargs["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        ip_kwargs["max_pixels"] = int(max_pixels)
    if (p / PREPROCESSOR_CONFIG).is_file():
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(p), local_files_only=True, **ip_kwargs)
    elif (p / PROCESSOR_CONFIG).is_file():
        cfg = json.loads((p / PROCESSOR_CONFIG).read_text()).get("image_processor")
        if not isinstance(cfg, dict):
            raise SamtokError(f"{p / PROCESSOR_CONFIG}: no image_processor entry")
        cfg = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
        if "size" in cfg and ip_kwargs:
            size = dict(cfg.pop("size"))
            size["shortest_edge"] = ip_kwargs.pop("min_pixels", size.get("shortest_edge"))
            size["longest_edge"] = ip_kwargs.pop("max_pixels", size.get("longest_edge"))
            cfg["size"] = size
        image_processor = Qwen2VLImageProcessorPil(**cfg, **ip_kwargs)
    else:
        raise SamtokError(f"{p}: neither {PREPROCESSOR_CONFIG} nor {PROCESSOR_CONFIG} found")
    chat_template = _read_chat_template(p) or getattr(tokenizer, "chat_template", None)
    return QwenVLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def save_processor(processor: QwenVLImageTextProcessor, path: str | Path) -> Path:
    """Write tokenizer files, ``preprocessor_config.json`` and the chat template into ``path``.

    The layout is the hub's (what :func:`load_processor` and plain ``AutoTokenizer`` read).
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tok = processor.tokenizer
    if processor.chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = processor.chat_template
    tok.save_pretrained(str(p))
    processor.image_processor.save_pretrained(str(p))
    if processor.chat_template:
        (p / "chat_template.jinja").write_text(processor.chat_template)
    return p
