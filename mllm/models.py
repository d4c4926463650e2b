"""Qwen2.5-VL and Qwen3-VL through transformers: load a local checkpoint, or build a tiny random one.

* :func:`load_model_and_processor` — a local pretrained directory (hub snapshot or one saved by us);
  never downloads (``local_files_only``), never runs remote code.
* :func:`build_tiny` — a tiny random model for CPU tests and the embedded demo: a small BPE text
  tokenizer trained on a given corpus (Qwen special tokens, Qwen-VL chat template, then the 514 mask
  words added exactly as for a real model), a PIL image processor, and a model a few hundred
  thousand parameters big. Forward/backward/generate take tens of milliseconds.
* :func:`save_model_and_processor` — the hub layout; the directory reloads with plain transformers
  (``AutoModelForImageTextToText``, ``AutoTokenizer``) and with :func:`load_model_and_processor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from samtok.core.errors import SamtokError
from samtok.core.runtime import get_logger
from samtok.mllm.processor import QwenVLImageTextProcessor, build_image_processor, load_processor, save_processor

log = get_logger("samtok.mllm.models")

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TinyModelConfig:
    r"""A tiny random Qwen-VL for CPU tests and the embedded demo (defaults build in ~50 ms, step ~20 ms).

    Parameters:
        family (`str`, defaults to `"qwen2_5_vl"`):
            `"qwen2_5_vl"` (patch 14, windowed vision attention, CLIP mean/std) or `"qwen3_vl"` (patch 16,
            deepstack, interleaved M-RoPE, mean = std = 0.5).
        hidden_size (`int`, defaults to `64`):
            Width of the language model (also the vision merger's output width).
        intermediate_size (`int`, defaults to `128`):
            MLP width of the language model.
        num_hidden_layers (`int`, defaults to `2`):
            Decoder layers of the language model.
        num_attention_heads (`int`, defaults to `4`):
            Attention heads of the language model.
        num_key_value_heads (`int`, defaults to `2`):
            Key/value heads (grouped-query attention); must divide `num_attention_heads`.
        head_dim (`int` or `None`, defaults to `None`):
            Per-head width; `None` = `hidden_size // num_attention_heads`.
        mrope_section (`list[int]` or `None`, defaults to `None`):
            M-RoPE split of `head_dim / 2` into (temporal, height, width); must sum to `head_dim / 2`.
            `None` = Qwen's proportions 1/4, 3/8, 3/8 (`[2, 3, 3]` for head_dim 16).
        rope_theta (`float`, defaults to `10000.0`):
            RoPE base of the language model.
        max_position_embeddings (`int`, defaults to `4096`):
            Longest sequence the rotary tables are sized for.
        vision_depth (`int`, defaults to `2`):
            Blocks of the vision tower (Qwen2.5-VL: the last one uses full attention, the others windows).
        vision_hidden_size (`int`, defaults to `32`):
            Width of the vision tower.
        vision_intermediate_size (`int`, defaults to `64`):
            MLP width of the vision tower.
        vision_num_heads (`int`, defaults to `2`):
            Attention heads of the vision tower; must divide `vision_hidden_size`.
        patch_size (`int` or `None`, defaults to `None`):
            Vision patch size in pixels; `None` = the family's (14 for Qwen2.5-VL, 16 for Qwen3-VL).
        spatial_merge_size (`int`, defaults to `2`):
            Patches merged per side into one LLM token (2 x 2 patches → one `<|image_pad|>`).
        temporal_patch_size (`int`, defaults to `2`):
            Frames per temporal patch (a still image is repeated).
        min_pixels (`int` or `None`, defaults to `None`):
            Smallest resized image area; `None` = 4 merged cells of (patch·merge)² pixels.
        max_pixels (`int` or `None`, defaults to `None`):
            Largest resized image area; `None` = 64 merged cells (at most 64 image tokens per image).
        tie_word_embeddings (`bool`, defaults to `True`):
            Share input embeddings and lm_head (as Qwen2.5-VL-3B and Qwen3-VL-4B do).
        text_tokenizer (`str`, defaults to `"bpe"`):
            `"bpe"`: a small BPE trained on the corpus given to :func:`build_tiny`; `"qwen2_5"`: the real
            151,665-token Qwen2.5 vocabulary (~10 M parameters of embeddings, ~0.5 s per step).
        bpe_vocab_size (`int`, defaults to `1024`):
            BPE vocabulary size including the 256 byte symbols (`text_tokenizer="bpe"`); a small corpus
            yields fewer tokens.
        vocab_multiple (`int`, defaults to `64`):
            The model is first built with len(tokenizer without mask words) rounded up to this many rows
            (spare rows, as in Qwen checkpoints); the mask words are then added exactly as for a real
            checkpoint (:func:`samtok.mllm.vocab.add_mask_vocabulary`).
        dtype (`str`, defaults to `"float32"`):
            Parameter dtype: `"float32"`, `"bfloat16"` or `"float16"`.
        attn_implementation (`str`, defaults to `"sdpa"`):
            Attention kernel: `"sdpa"` or `"eager"`.
        weight_init (`str`, defaults to `"qwen"`):
            `"qwen"`: transformers' initialisation (normal, std `initializer_range` = 0.02 for every
            linear layer, as for the released widths of 2,048+). `"fan_in"`: std = 1/sqrt(fan-in) for
            every linear layer and the patch embedding (embedding rows keep 0.02). At widths of
            128-256, std 0.02 leaves attention uniform and the image unread for hundreds of steps
            (docs/sft.md, "What makes the miniature learn").
        vision_pos_init (`str`, defaults to `"random"`):
            Qwen3-VL's learned absolute position table of the vision tower: `"random"` (transformers'
            init) or `"sincos"` (2-D sine/cosine features of the grid cell, unit amplitude; still
            trained), so that image tokens carry their place from the first step.
        embedding_init_std (`float` or `None`, defaults to `None`):
            Std of the input embedding rows (`None`: `initializer_range`, 0.02). Untie the head with it:
            with rows at 0.02 a text token's own embedding is ~1% of the image tokens' norm after training
            and the first layer washes it out: the tiny model then cannot copy a word from the prompt
            into its answer (docs/sft.md, "What makes the miniature learn"). 1.0 with an untied head
            (which keeps 0.02) is the embedded preset.
        seed (`int`, defaults to `0`):
            Seed of the random weights and of the mask-row initialisation.
    """

    family: str = "qwen2_5_vl"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    mrope_section: Optional[List[int]] = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_heads: int = 2
    patch_size: Optional[int] = None
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    tie_word_embeddings: bool = True
    text_tokenizer: str = "bpe"
    bpe_vocab_size: int = 1024
    vocab_multiple: int = 64
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    weight_init: str = "qwen"
    vision_pos_init: str = "random"
    embedding_init_std: Optional[float] = None
    seed: int = 0

    def resolved_patch_size(self) -> int:
        return int(self.patch_size or (14 if self.family == "qwen2_5_vl" else 16))

    def resolved_head_dim(self) -> int:
        return int(self.head_dim or self.hidden_size // self.num_attention_heads)

    def resolved_mrope_section(self) -> list[int]:
        if self.mrope_section:
            return [int(x) for x in self.mrope_section]
        half = self.resolved_head_dim() // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]

    def cell_pixels(self) -> int:
        return (self.resolved_patch_size() * self.spatial_merge_size) ** 2

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise SamtokError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.text_tokenizer not in ("bpe", "qwen2_5"):
            raise SamtokError(f"text_tokenizer must be 'bpe' or 'qwen2_5', got {self.text_tokenizer!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SamtokError("num_key_value_heads must divide num_attention_heads")
        hd = self.resolved_head_dim()
        if hd % 2:
            raise SamtokError(f"head_dim must be even, got {hd}")
        if sum(self.resolved_mrope_section()) != hd // 2:
            raise SamtokError(f"mrope_section {self.resolved_mrope_section()} must sum to head_dim/2 = {hd // 2}")
        if self.vision_hidden_size % self.vision_num_heads:
            raise SamtokError("vision_num_heads must divide vision_hidden_size")
        if self.weight_init not in ("qwen", "fan_in"):
            raise SamtokError(f"weight_init must be 'qwen' or 'fan_in', got {self.weight_init!r}")
        if self.vision_pos_init not in ("random", "sincos"):
            raise SamtokError(f"vision_pos_init must be 'random' or 'sincos', got {self.vision_pos_init!r}")
        if self.vision_pos_init == "sincos" and self.family != "qwen3_vl":
            raise SamtokError("vision_pos_init='sincos' needs family 'qwen3_vl' (Qwen2.5-VL's vision tower has no position table)")
        if self.embedding_init_std is not None and not float(self.embedding_init_std) > 0:
            raise SamtokError(f"embedding_init_std must be > 0 (or null), got {self.embedding_init_std!r}")
        if self.dtype not in _DTYPES:
            raise SamtokError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


def _token_ids(tokenizer) -> dict[str, int]:
    conv = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": conv("<|image_pad|>"),
        "video_token_id": conv("<|video_pad|>"),
        "vision_start_token_id": conv("<|vision_start|>"),
        "vision_end_token_id": conv("<|vision_end|>"),
        "eos_token_id": conv("<|im_end|>"),
        "pad_token_id": conv("<|endoftext|>"),
    }


def tiny_model_config(config: TinyModelConfig, vocab_size: int, tokenizer):
    """The transformers config (``Qwen2_5_VLConfig`` or ``Qwen3VLConfig``) of a tiny model."""
    config.validate()
    ids = _token_ids(tokenizer)
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta), "mrope_section": config.resolved_mrope_section()}
    text = dict(
        vocab_size=int(vocab_size),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=ids["pad_token_id"],
    )
    patch = config.resolved_patch_size()
    vision = dict(
        depth=config.vision_depth,
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_heads=config.vision_num_heads,
        patch_size=patch,
        spatial_merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size,
        out_hidden_size=config.hidden_size,
    )
    top = dict(
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=config.tie_word_embeddings,
    )
    if config.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text.update(rope_parameters=rope, bos_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"])
        # Windowed attention in all but the last block, as the release alternates window/full blocks.
        vision.update(window_size=patch * config.spatial_merge_size * 4, fullatt_block_indexes=[config.vision_depth - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)
    from transformers import Qwen3VLConfig

    rope["mrope_interleaved"] = True
    text.update(rope_parameters=rope, head_dim=config.resolved_head_dim())
    # Deepstack: features of the first vision block are added to the first decoder layer.
    vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **top)


def _set_generation_defaults(model, tokenizer) -> None:
    from transformers import GenerationConfig

    ids = _token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["pad_token_id"],
        eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
        pad_token_id=ids["pad_token_id"],
    )


def build_tiny(
    config: Optional[TinyModelConfig] = None, corpus: Sequence[str] = ()
) -> tuple[Any, QwenVLImageTextProcessor]:
    """A tiny random Qwen-VL model and its processor (tokenizer with mask words + PIL image processor).

    Args:
        config: sizes and family (:class:`TinyModelConfig`).
        corpus: texts the BPE tokenizer is trained on (e.g. the synthetic data's prompts and answers).

    Returns:
        ``(model, processor)``; ``processor.tokenizer`` holds the 514 mask words, whose embedding rows
        were made by :func:`samtok.mllm.vocab.add_mask_vocabulary` as for a real checkpoint.
    """
    from samtok.mllm.text_tokenizers import CHAT_TEMPLATES, build_qwen2_5_tokenizer, train_bpe_tokenizer
    from samtok.mllm.vocab import add_mask_vocabulary

    config = config or TinyModelConfig()
    config.validate()
    template = CHAT_TEMPLATES[config.family]
    if config.text_tokenizer == "bpe":
        tokenizer = train_bpe_tokenizer(corpus, vocab_size=config.bpe_vocab_size, chat_template=template)
    else:
        tokenizer = build_qwen2_5_tokenizer(chat_template=template)
    rows = int(math.ceil(len(tokenizer) / config.vocab_multiple) * config.vocab_multiple)
    hf_config = tiny_model_config(config, rows, tokenizer)
    hf_config._attn_implementation = config.attn_implementation  # noqa: SLF001 - the documented way for configs
    torch.manual_seed(config.seed)
    model = _model_class(config.family)(hf_config)
    if config.weight_init == "fan_in":
        fan_in_init_(model)
    if config.vision_pos_init == "sincos":
        sincos_position_table_(model)
    if config.embedding_init_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, float(config.embedding_init_std))
    model.to(_DTYPES[config.dtype])
    add_mask_vocabulary(model, tokenizer, seed=config.seed)
    _set_generation_defaults(model, tokenizer)
    image_processor = build_image_processor(
        config.family,
        min_pixels=config.min_pixels or 4 * config.cell_pixels(),
        max_pixels=config.max_pixels or 64 * config.cell_pixels(),
        patch_size=config.resolved_patch_size(),
        merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size,
    )
    processor = QwenVLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.eval()
    return model, processor


@torch.no_grad()
def fan_in_init_(model) -> int:
    """Re-draw every linear layer (and the vision patch embedding) with std = 1/sqrt(fan-in), biases 0.

    The output head is left alone (tied to the input embeddings in the tiny models, whose rows keep
    their own init). Draws from torch's global generator (seed it first). Returns the layers changed.
    """
    head = model.get_output_embeddings()
    changed = 0
    for module in model.modules():
        if module is head or not isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            continue
        fan_in = module.weight[0].numel()
        module.weight.normal_(0.0, fan_in ** -0.5)
        if module.bias is not None:
            module.bias.zero_()
        changed += 1
    return changed


@torch.no_grad()
def sincos_position_table_(model) -> None:
    """Fill Qwen3-VL's learned vision position table (a G x G grid, row-major) with 2-D sine/cosine
    features: half of the channels encode the row, half the column, at D/4 frequencies spaced
    geometrically from pi/G to pi radians per cell (one half-period across the grid up to one per cell)."""
    visual = model.model.visual
    table = visual.pos_embed.weight
    g, d = int(visual.num_grid_per_side), int(table.shape[1])
    if d % 4:
        raise SamtokError(f"vision_hidden_size must be a multiple of 4 for vision_pos_init='sincos', got {d}")
    rows, cols = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    omega = torch.logspace(math.log10(math.pi / g), math.log10(math.pi), d // 4)

    def features(p: torch.Tensor) -> torch.Tensor:
        angle = p.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    table.copy_(torch.cat([features(rows), features(cols)], dim=1).to(table.dtype))


def _model_class(family: str):
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration


def model_family(model) -> str:
    """"qwen2_5_vl" or "qwen3_vl" from the model's config (SamtokError for anything else)."""
    kind = getattr(model.config, "model_type", None)
    if kind not in FAMILIES:
        raise SamtokError(f"unsupported model type {kind!r}; expected one of {FAMILIES}")
    return kind


def load_model_and_processor(
    path: str | Path,
    dtype: str = "auto",
    device: Optional[str] = None,
    attn_implementation: Optional[str] = None,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
) -> tuple[Any, QwenVLImageTextProcessor]:
    """Load a Qwen2.5-VL / Qwen3-VL checkpoint and its processor from a local directory.

    Args:
        path: directory with ``config.json``, weights, tokenizer files and ``preprocessor_config.json``.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        device: move the model there (default: stay on CPU).
        attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None = transformers' default.
        min_pixels, max_pixels: override the image processor's resize bounds.

    Never downloads and never trusts remote code.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {p}: expected a local pretrained model directory")
    cfg = AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    if cfg.model_type not in FAMILIES:
        raise SamtokError(f"{p}: unsupported model type {cfg.model_type!r}; expected one of {FAMILIES}")
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    kwargs["dtype"] = "auto" if dtype == "auto" else _DTYPES[dtype]
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(str(p), **kwargs)
    if device:
        model.to(device)
    model.eval()
    processor = load_processor(p, min_pixels=min_pixels, max_pixels=max_pixels)
    return model, processor


def save_model_and_processor(model, processor: QwenVLImageTextProcessor, path: str | Path) -> Path:
    """Save model weights/config/generation config and the processor in the hub layout."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(p))
    save_processor(processor, p)
    return p


class PatchLinearConv3d(torch.nn.Conv3d):
    """A ``Conv3d`` whose input is exactly one patch (kernel = stride = input size), computed as
    the linear map it is. Same parameters and state-dict names as the convolution it replaces;
    on CPU its backward is an order of magnitude faster than mkldnn's conv3d backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if tuple(x.shape[2:]) != tuple(self.kernel_size):
            return super().forward(x)
        y = torch.nn.functional.linear(x.reshape(n, -1), self.weight.reshape(self.out_channels, -1), self.bias)
        return y.view(n, self.out_channels, 1, 1, 1)


def use_linear_patch_embedding(model) -> int:
    """Replace the vision patch embedding's ``Conv3d`` by :class:`PatchLinearConv3d` (in place).

    Qwen2.5-VL / Qwen3-VL feed the patch embedding pre-cut patches ``(N, C, T, P, P)``, so the
    convolution is one matrix product. Returns how many convolutions were replaced.
    """
    replaced = 0
    for module in model.modules():
        conv = getattr(module, "proj", None)
        if type(conv) is torch.nn.Conv3d and tuple(conv.kernel_size) == tuple(conv.stride) and conv.groups == 1:
            fast = PatchLinearConv3d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                     bias=conv.bias is not None, device="meta")
            fast.weight = conv.weight
            fast.bias = conv.bias
            module.proj = fast
            replaced += 1
    return replaced
