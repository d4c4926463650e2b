"""LLaVA-style conversation files whose turns already contain SAMTok mask spans as text.

Layout (LLaVA's ``llava_v1_5_mix665k.json``; the SAMTok release's SFT files follow it): a JSON
list (or JSON lines, one object per line) of::

    {"id": "...", "image": "coco/train2017/000000000009.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nPlease segment the cat."},
                       {"from": "gpt", "value": "```json\\n[{\\"mask_2d\\": \\"<|mt_start|>...\\"}]\\n```"}]}

``from`` is ``human``/``gpt`` (``user``/``assistant`` and ``system`` are accepted too). The
``<image>`` placeholder is kept where it is. Mapping: one :class:`ConversationSample` per entry,
``image_id`` = the ``image`` path as written (relative to ``image_root``), ``sample_id`` = ``id``
(default: the index). Mask spans are checked to be well formed (no repaired span, no stray mask
token, first code in range) unless ``check_spans=False``. Entries with several images are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from PIL import Image

from samtok.data.records import ConversationSample, ImageRecord, RecordError
from samtok.tokenizer.codec import MaskCodec

from .json_fields import describe, expect_type, id_text, iter_json_lines, load_json, optional, require, write_json, write_json_lines

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FROM_OF = {"user": "human", "assistant": "gpt", "system": "system"}


def _entries(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".jsonl":
        yield from iter_json_lines(path, "conversation file")
        return
    doc = expect_type(load_json(path, "conversation file"), list, f"{path}: top level")
    yield from enumerate(doc)


def check_mask_spans(text: str, codec: MaskCodec, where: str) -> None:
    """Refuse text whose mask spans would need repair or hold out-of-range codes."""
    parsed = codec.parse(text)
    if parsed.ignored:
        raise RecordError(f"{where}: {parsed.ignored} stray mask token(s) outside a <|mt_start|>...<|mt_end|> span")
    for k, span in enumerate(parsed.spans):
        if span.repaired:
            raise RecordError(f"{where}: mask span {k} is not closed properly: {text[span.start:span.end]!r}")
        if not span.valid:
            raise RecordError(f"{where}: mask span {k} has a first code outside [0, {codec.codebook_size})")


def entry_image(entry: dict, where: str) -> str:
    image = optional(entry, "image", (str, list), where, default="")
    if isinstance(image, list):
        if len(image) > 1:
            raise RecordError(f"{where}: field 'image' lists {len(image)} images; multi-image conversations are not supported")
        image = expect_type(image[0], str, f"{where}: field 'image'") if image else ""
    return image


def parse_conversation(entry: Any, index: int, path: Path, source: str, codec: Optional[MaskCodec]) -> ConversationSample:
    where = describe(path, f"[{index}]")
    sample_id = id_text(optional(entry, "id", (int, str), where, default=str(index)))
    where = describe(path, f"[{index}] (id {sample_id})")
    image = entry_image(entry, where)
    turns = require(entry, "conversations", list, where)
    if not turns:
        raise RecordError(f"{where}: field 'conversations' is empty")
    messages = []
    for k, turn in enumerate(turns):
        t_where = f"{where}: conversations[{k}]"
        speaker = require(turn, "from", str, t_where)
        if speaker not in ROLE_OF:
            raise RecordError(f"{t_where}: unknown speaker {speaker!r} (expected one of {sorted(ROLE_OF)})")
        value = require(turn, "value", str, t_where)
        if codec is not None:
            check_mask_spans(value, codec, t_where)
        messages.append({"role": ROLE_OF[speaker], "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"{where}: the conversation has no assistant ('gpt') turn")
    return ConversationSample(source=source, image_id=image, sample_id=sample_id, messages=messages)


def read_conversations(
    path: str | Path, source: str = "llava", check_spans: bool = True, codebook_size: int = 256
) -> Iterator[ConversationSample]:
    """Stream :class:`ConversationSample` from a LLaVA JSON list or a ``.jsonl`` file."""
    p = Path(path)
    codec = MaskCodec(codebook_size=codebook_size) if check_spans else None
    for index, entry in _entries(p):
        yield parse_conversation(entry, index, p, source, codec)


def conversation_image_record(image: str, source: str, image_root: str | Path) -> ImageRecord:
    """An :class:`ImageRecord` without masks for a conversation image (size read from the file header)."""
    path = Path(image) if Path(image).is_absolute() else Path(image_root) / image
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError as exc:
        raise RecordError(f"conversation image not found: {path}") from exc
    except OSError as exc:
        raise RecordError(f"cannot read conversation image {path}: {exc}") from exc
    return ImageRecord(source=source, image_id=image, file_name=image, height=height, width=width,
                       image_root=str(image_root))


def conversation_entry(sample: ConversationSample) -> dict:
    """One sample as a LLaVA entry."""
    entry: dict[str, Any] = {"id": sample.sample_id}
    if sample.image_id:
        entry["image"] = sample.image_id
    turns = []
    for k, m in enumerate(sample.messages):
        if m.get("role") not in FROM_OF:
            raise RecordError(f"sample {sample.sample_id}: message {k} has unknown role {m.get('role')!r}")
        turns.append({"from": FROM_OF[m["role"]], "value": m["content"]})
    entry["conversations"] = turns
    return entry


def write_conversations(path: str | Path, samples: Sequence[ConversationSample]) -> Path:
    """Write samples as a LLaVA JSON list, or JSON lines when ``path`` ends in ``.jsonl``."""
    entries = [conversation_entry(s) for s in samples]
    return write_json_lines(path, entries) if str(path).endswith(".jsonl") else write_json(path, entries)
