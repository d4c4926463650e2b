"""Conversations → model inputs for Qwen-VL, shared by SFT, RL and evaluation.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}`` whose text may
hold ``<image>`` placeholders, one per image, in the order of the ``images`` list (a conversation
without any placeholder gets them at the start of its first user turn, the LLaVA convention). It is rendered with
the BASE MODEL'S OWN chat template (``processor.chat_template``), then tokenised by the processor, which
expands each ``<|image_pad|>`` into ``t·h·w / merge²`` copies (transformers' own expansion).

Training examples (:func:`build_training_example`) carry ``labels``: -100 everywhere except the content
of assistant turns and the ``<|im_end|>`` that closes each of them (the standard Qwen-VL SFT masking;
the role header ``<|im_start|>assistant\\n`` and the newline after ``<|im_end|>`` are not learned).
Assistant spans are found template-independently: the text rendered up to turn *i* with
``add_generation_prompt=True`` is a prefix of the text rendered through turn *i*; what the latter adds,
up to its last ``<|im_end|>``, is the target. Character spans become token labels through the
tokenizer's offset mapping and the processor's placeholder-replacement offsets.

Prompt-only examples (:func:`build_prompt_example`) end with the generation prompt
(``<|im_start|>assistant\\n``) and are exactly the prefix a training example of the same conversation
has before its last answer. :class:`VLCollator` pads a batch (right for training, left for generation)
and concatenates the images' patches in batch order.

Every example holds ``mm_token_type_ids`` (0 text, 1 image): transformers 5 needs it to compute
Qwen-VL's 3-D (M-RoPE) positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from PIL import Image

from samtok.core.errors import SamtokError
from samtok.core.images import as_rgb_array

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
END_OF_TURN = "<|im_end|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
ROLES = ("system", "user", "assistant")
_PADDED_KEYS = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
_IMAGE_KEYS = ("pixel_values", "image_grid_thw")


class ConversationError(SamtokError):
    """A conversation that cannot be built (roles, placeholders vs images, missing assistant turn...)."""


class SequenceTooLongError(SamtokError):
    """The tokenised example exceeds ``max_length`` (callers usually drop the sample)."""


# ---------------------------------------------------------------- conversation → template messages
def _check_conversation(conversation: Sequence[Mapping[str, Any]]) -> None:
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ConversationError("a conversation must be a non-empty list of {'role', 'content'} messages")
    for k, m in enumerate(conversation):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ConversationError(f"message {k}: expected a mapping with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ConversationError(f"message {k}: role must be one of {ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ConversationError(f"message {k}: content must be a string (with {IMAGE_PLACEHOLDER} placeholders)")


def to_template_messages(conversation: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for ``apply_chat_template``: ``<image>`` placeholders become ``{"type": "image"}`` items.

    A message without placeholders keeps its plain-string content.
    """
    _check_conversation(conversation)
    out = []
    for m in conversation:
        text = m["content"]
        if IMAGE_PLACEHOLDER not in text:
            out.append({"role": m["role"], "content": text})
            continue
        items: list[dict[str, Any]] = []
        for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                items.append({"type": "image"})
            if piece:
                items.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": items})
    return out


def count_images(conversation: Sequence[Mapping[str, Any]]) -> int:
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in conversation)


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _template(processor) -> Optional[str]:
    return getattr(processor, "chat_template", None) or getattr(_tokenizer(processor), "chat_template", None)


def _render(processor, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    template = _template(processor)
    if template is None:
        raise ConversationError("the processor/tokenizer has no chat template")
    return _tokenizer(processor).apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_conversation(processor, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as text in the model's chat template (one ``<|image_pad|>`` per image)."""
    return _render(processor, to_template_messages(conversation), add_generation_prompt)


def assistant_char_spans(processor, conversation: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character spans to learn (content + ``<|im_end|>``).

    Uses the prefix property of chat templates (see the module docstring); falls back to scanning
    for ``<|im_start|>assistant\\n … <|im_end|>`` when a template is not prefix-stable.
    """
    messages = to_template_messages(conversation)
    full = _render(processor, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    prefix_ok = True
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(processor, messages[:i], add_generation_prompt=True) if i else None
        upto = _render(processor, messages[: i + 1], add_generation_prompt=False)
        if prefix is None or not upto.startswith(prefix) or not full.startswith(upto) or len(upto) <= len(prefix):
            prefix_ok = False
            break
        segment = upto[len(prefix):]
        k = segment.rfind(END_OF_TURN)
        end = len(prefix) + (k + len(END_OF_TURN) if k >= 0 else len(segment))
        spans.append((len(prefix), end))
    if prefix_ok:
        return full, spans
    spans = []
    for match in re.finditer(re.escape(ASSISTANT_HEADER), full):
        start = match.end()
        k = full.find(END_OF_TURN, start)
        spans.append((start, k + len(END_OF_TURN) if k >= 0 else len(full)))
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    if len(spans) != n_assistant:
        raise ConversationError(
            f"cannot locate the {n_assistant} assistant turns in the rendered conversation (found {len(spans)})"
        )
    return full, spans


# ---------------------------------------------------------------- images
def _as_pil(image: Any, k: int) -> Image.Image:
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image
    return Image.fromarray(as_rgb_array(image, where=f"image {k}"))


def with_image_placeholders(conversation: Sequence[Mapping[str, Any]], num_images: int) -> list[dict[str, Any]]:
    """The conversation with ``num_images`` placeholders at the start of the first user turn when it has none.

    That is where LLaVA-style data puts an image without an explicit ``<image>`` (and where Qwen's own
    content lists put it). A conversation that already has placeholders is returned unchanged.
    """
    _check_conversation(conversation)
    out = [dict(m) for m in conversation]
    if num_images and count_images(out) == 0:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise ConversationError("images were given but the conversation has no user turn to hold them")
        first_user["content"] = IMAGE_PLACEHOLDER * num_images + first_user["content"]
    return out


def _prepare_images(conversation, images: Sequence[Any]) -> Optional[list[Image.Image]]:
    n = count_images(conversation)
    images = list(images or [])
    if n != len(images):
        raise ConversationError(f"the conversation has {n} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images were given")
    return [_as_pil(im, k) for k, im in enumerate(images)] or None


# ---------------------------------------------------------------- tokenisation
def _tokenize(processor, text: str, images: Optional[list[Image.Image]], offsets: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if offsets:
        kwargs.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
    out = processor(text=[text], images=images, **kwargs)
    example: dict[str, Any] = {
        "input_ids": out["input_ids"][0].long(),
        "attention_mask": out["attention_mask"][0].long(),
    }
    if "mm_token_type_ids" in out:
        example["mm_token_type_ids"] = torch.as_tensor(out["mm_token_type_ids"][0]).long()
    else:  # a processor without it: derive from the image token id
        image_id = getattr(processor, "image_token_id", None)
        example["mm_token_type_ids"] = (example["input_ids"] == image_id).long() if image_id is not None else torch.zeros_like(example["input_ids"])
    if images:
        example["pixel_values"] = out["pixel_values"]
        example["image_grid_thw"] = out["image_grid_thw"].long()
    if offsets:
        example["_offsets"] = out["offset_mapping"][0]
        example["_replacements"] = (out.get("text_replacement_offsets") or [[]])[0]
    return example


def _to_expanded(pos: int, replacements: Sequence[Mapping[str, Any]]) -> int:
    """Character position in the rendered text → position in the placeholder-expanded text."""
    shift = 0
    for r in replacements:
        start, end = r["span"]
        if end <= pos:
            shift += (r["new_span"][1] - r["new_span"][0]) - (end - start)
    return pos + shift


def _labels_from_spans(input_ids: torch.Tensor, offsets: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for s, e in spans:
        inside = (ends > s) & (starts < e)
        labels[inside] = input_ids[inside]
    return labels


def build_training_example(
    processor,
    conversation: Sequence[Mapping[str, Any]],
    images: Sequence[Any] = (),
    max_length: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """One supervised example: ids, mask, M-RoPE token types, labels and image tensors.

    Args:
        processor: a Qwen-VL processor (``samtok.mllm.processor.QwenVLImageTextProcessor``).
        conversation: messages with ``<image>`` placeholders; at least one assistant turn.
        images: one image per placeholder (path, PIL image or array), in order.
        max_length: raise :class:`SequenceTooLongError` when the sequence is longer.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids`` of shape ``(L,)``; with
        images also ``pixel_values`` ``(patches, 3·temporal·patch²)`` and ``image_grid_thw`` ``(N, 3)``.
    """
    if not any(m.get("role") == "assistant" for m in conversation):
        raise ConversationError("a training conversation needs at least one assistant turn")
    if any(m.get("role") == "assistant" and IMAGE_PLACEHOLDER in str(m.get("content")) for m in conversation):
        raise ConversationError(f"{IMAGE_PLACEHOLDER} placeholders belong in user or system turns, not in answers")
    conversation = with_image_placeholders(conversation, len(images or []))
    pil = _prepare_images(conversation, images)
    text, spans = assistant_char_spans(processor, conversation)
    example = _tokenize(processor, text, pil, offsets=True)
    offsets = example.pop("_offsets")
    replacements = example.pop("_replacements")
    expanded = [(_to_expanded(s, replacements), _to_expanded(e, replacements)) for s, e in spans]
    example["labels"] = _labels_from_spans(example["input_ids"], offsets, expanded)
    _check_length(example, max_length)
    return example


def build_prompt_example(
    processor,
    conversation: Sequence[Mapping[str, Any]],
    images: Sequence[Any] = (),
    max_length: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """A generation prompt: the conversation (ending with a user turn) + ``<|im_start|>assistant\\n``.

    Returns the same keys as :func:`build_training_example` except ``labels``.
    """
    _check_conversation(conversation)
    if conversation[-1]["role"] == "assistant":
        raise ConversationError("a prompt must not end with an assistant turn (drop the answer first)")
    conversation = with_image_placeholders(conversation, len(images or []))
    pil = _prepare_images(conversation, images)
    text = render_conversation(processor, conversation, add_generation_prompt=True)
    example = _tokenize(processor, text, pil, offsets=False)
    _check_length(example, max_length)
    return example


def _check_length(example: Mapping[str, torch.Tensor], max_length: Optional[int]) -> None:
    n = int(example["input_ids"].shape[0])
    if max_length is not None and n > max_length:
        raise SequenceTooLongError(f"sequence of {n} tokens exceeds max_length={max_length}")


# ---------------------------------------------------------------- batching
@dataclass
class VLCollator:
    """Pads examples into a batch and concatenates their images (in batch order).

    Args:
        pad_token_id: id written into padded ``input_ids`` positions.
        padding_side: "right" for training, "left" for generation.
        pad_to_multiple_of: round the padded length up to this multiple (None: no rounding).

    ``labels`` pad with -100, ``attention_mask`` and ``mm_token_type_ids`` with 0. Keys that are not
    tensors of the model (e.g. metadata) are returned as lists.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        length = max(int(e["input_ids"].shape[0]) for e in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch: dict[str, Any] = {}
        for key, fill in _PADDED_KEYS.items():
            if key not in examples[0]:
                continue
            value = self.pad_token_id if fill is None else fill
            out = torch.full((len(examples), length), value, dtype=torch.long)
            for row, e in enumerate(examples):
                seq = e[key]
                n = int(seq.shape[0])
                if self.padding_side == "right":
                    out[row, :n] = seq
                else:
                    out[row, length - n:] = seq
            batch[key] = out
        with_images = [e for e in examples if "pixel_values" in e]
        if with_images:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images], dim=0)
            batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images], dim=0)
        extra = {k for e in examples for k in e} - set(_PADDED_KEYS) - set(_IMAGE_KEYS)
        for key in sorted(extra):
            batch[key] = [e.get(key) for e in examples]
        return batch


def training_collator(processor, pad_to_multiple_of: Optional[int] = None) -> VLCollator:
    """Right-padding collator with the tokenizer's pad id."""
    return VLCollator(_pad_id(processor), "right", pad_to_multiple_of)


def generation_collator(processor, pad_to_multiple_of: Optional[int] = None) -> VLCollator:
    """Left-padding collator with the tokenizer's pad id (prompts end at the same column)."""
    return VLCollator(_pad_id(processor), "left", pad_to_multiple_of)


def _pad_id(processor) -> int:
    tok = _tokenizer(processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise SamtokError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def model_inputs(batch: Mapping[str, Any], with_labels: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` a Qwen-VL forward takes (drops metadata, optionally labels)."""
    keys = ["input_ids", "attention_mask", "mm_token_type_ids", *_IMAGE_KEYS] + (["labels"] if with_labels else [])
    return {k: batch[k] for k in keys if k in batch}
