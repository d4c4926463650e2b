"""SegLLM-style multi-round segmentation dialogues.

Layout (SegLLM's ``conversations_folder/*.json``, read by its ``LazySupervisedDataset``): a JSON
list of dialogues, each ``{"conversations": [turn, ...]}`` with alternating ``human``/``gpt``
turns ``{"from", "value"}``. Images and masks are not inlined; they are named by bracket tags::

    human: "[IMAGE256:coco/train2014/COCO_train2014_000000376848.jpg] Segment a person."
    gpt:   "[MASK-DECODE:coco/train2014/COCO_train2014_000000376848.jpg|refcoco|488615]."
    human: "[MASK-ENCODE:<image>|refcoco|488615][BOX-ENCODE:<image>|refcoco|488615] Segment the
            person next to instance 1.",  "ind": [1]
    gpt:   "[MASK-DECODE:relational:488615:484448:<image>:refcoco]."

``[IMAGE256:path]`` opens the first user turn; ``MASK-ENCODE`` (+ its ``BOX-ENCODE`` twin) shows
an earlier mask to the model; ``MASK-DECODE`` is an answer mask, written ``image|dataset|mask_id``
or ``task:ref_id[:ref_id2]:target_id:image:dataset``. ``dataset`` names the annotation file the
mask id comes from (SegLLM's "register": refcoco ``instances.json``, LVIS, PACO...); ``ind`` is
the 1-based round whose answer is re-shown. We read one COCO instances file as the register.

Mapping to :class:`MultiRoundSample`: each (human, gpt) pair is a :class:`Round`; every
``MASK-ENCODE`` tag becomes a ``<region{k}>`` marker (k from 0 in the round) with its mask id in
``refer_ids``; ``BOX-ENCODE`` tags are dropped; ``MASK-DECODE`` ids are ``target_ids``; the gpt
text without tags (and without the ``.`` that follows the last tag) is ``answer_label``.
``REF-DECODE`` tags (a MediRound extension) are ignored. samtok extension: ``"id"`` per dialogue
(default: its index in the file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from samtok.data.records import REGION_MARKER_RE, ImageRecord, MultiRoundSample, RecordError, Round, region_marker

from .coco import CocoIndex, relative_file_name
from .json_fields import describe, expect_type, id_text, load_json, optional, require, write_json

TAG_RE = re.compile(r"\[(IMAGE256|MASK-ENCODE|BOX-ENCODE|MASK-DECODE|REF-DECODE):([^\]]*)\]")
ROLES = ("human", "gpt")


def parse_encode_payload(payload: str, where: str) -> tuple[str, str, str]:
    """``image|dataset|mask_id`` -> ``(image, dataset, mask_id)``."""
    parts = payload.split("|")
    if len(parts) != 3 or not parts[2]:
        raise RecordError(f"{where}: expected 'image|dataset|mask_id' in a MASK-ENCODE tag, got {payload!r}")
    return parts[0], parts[1], parts[2]


def parse_decode_payload(payload: str, where: str) -> tuple[str, str, str]:
    """A MASK-DECODE payload (either form) -> ``(image, dataset, target mask id)``."""
    if "|" in payload:
        return parse_encode_payload(payload, where)
    parts = payload.split(":")
    if len(parts) == 5:
        _task, _ref, target, image, dataset = parts
    elif len(parts) == 6:
        _task, _ref, _ref2, target, image, dataset = parts
    else:
        raise RecordError(
            f"{where}: expected 'image|dataset|mask_id' or 'task:ref:target:image:dataset' in a MASK-DECODE tag, got {payload!r}"
        )
    return image, dataset, target


def _check_mask(image: str, mask_id: str, dialogue_image: str, where: str) -> None:
    if mask_id.lower() in ("", "none", "null"):
        raise RecordError(f"{where}: a mask tag names no mask id")
    if Path(image).name != Path(dialogue_image).name:
        raise RecordError(f"{where}: mask {mask_id} is tagged with image {image!r}, not the dialogue's {dialogue_image!r}")


def parse_request(value: str, dialogue_image: str, where: str) -> tuple[str, list[str], list[str]]:
    """A human turn -> ``(request with <region{k}> markers, refer ids, dataset names)``."""
    refer_ids: list[str] = []
    datasets: list[str] = []

    def replace(match: re.Match) -> str:
        kind, payload = match.group(1), match.group(2)
        if kind == "MASK-ENCODE":
            image, dataset, mask_id = parse_encode_payload(payload, where)
            _check_mask(image, mask_id, dialogue_image, where)
            refer_ids.append(mask_id)
            datasets.append(dataset)
            return region_marker(len(refer_ids) - 1)
        return ""  # IMAGE256 (handled by the caller), BOX-ENCODE twin, REF-DECODE

    text = TAG_RE.sub(replace, value)
    return text.strip(), refer_ids, datasets


def parse_answer(value: str, dialogue_image: str, where: str) -> tuple[str, list[str], list[str]]:
    """A gpt turn -> ``(answer label, target ids, dataset names)``."""
    targets: list[str] = []
    datasets: list[str] = []
    text = value.strip()
    if text.endswith("]."):
        text = text[:-1]  # the full stop SegLLM puts after the last mask tag
    for match in TAG_RE.finditer(text):
        if match.group(1) == "MASK-DECODE":
            image, dataset, mask_id = parse_decode_payload(match.group(2), where)
            _check_mask(image, mask_id, dialogue_image, where)
            targets.append(mask_id)
            datasets.append(dataset)
    label = TAG_RE.sub("", text).strip()
    return label, targets, datasets


def dialogue_image(turns: list, where: str) -> str:
    """The image of a dialogue: the ``[IMAGE256:...]`` tag of its first user turn."""
    first = turns[0].get("value", "") if turns and isinstance(turns[0], dict) else ""
    match = re.search(r"\[IMAGE256:([^\]]*)\]", first if isinstance(first, str) else "")
    if match is None or not match.group(1):
        raise RecordError(f"{where}: the first human turn has no [IMAGE256:<image path>] tag")
    return match.group(1)


def parse_dialogue(
    entry: Any, index: int, path: Path, source: Optional[str], instances: Optional[CocoIndex]
) -> MultiRoundSample:
    """One dialogue -> :class:`MultiRoundSample` (mask ids checked against ``instances`` if given)."""
    where = describe(path, f"[{index}]")
    sample_id = id_text(optional(entry, "id", (int, str), where, default=str(index)))
    where = describe(path, f"[{index}] (id {sample_id})")
    turns = require(entry, "conversations", list, where)
    if not turns or len(turns) % 2:
        raise RecordError(f"{where}: 'conversations' must hold (human, gpt) pairs, got {len(turns)} turns")
    image = id_text(optional(entry, "image", str, where, default="")) or dialogue_image(turns, where)
    rounds, datasets = [], []
    for r in range(0, len(turns), 2):
        values = []
        for k, role in zip((r, r + 1), ROLES):
            turn_where = f"{where}: conversations[{k}]"
            turn = expect_type(turns[k], dict, turn_where)
            if require(turn, "from", str, turn_where) != role:
                raise RecordError(f"{turn_where}: expected a '{role}' turn, got {turn['from']!r}")
            values.append(require(turn, "value", str, turn_where))
        request, refer_ids, ds_in = parse_request(values[0], image, f"{where}: conversations[{r}]")
        label, targets, ds_out = parse_answer(values[1], image, f"{where}: conversations[{r + 1}]")
        datasets += ds_in + ds_out
        rounds.append(Round(request=request, target_ids=targets, refer_ids=refer_ids, answer_label=label))
    image_id = Path(image).stem
    if instances is not None:
        found = instances.find_image_id(image)
        if found is None:
            raise RecordError(f"{where}: image {image!r} is not in {instances.path}")
        image_id = found
        for rnd in rounds:
            for mask_id in (*rnd.refer_ids, *rnd.target_ids):
                if instances.image_of_ann.get(mask_id) != image_id:
                    raise RecordError(f"{where}: mask id {mask_id} is not a mask of image {image!r} in {instances.path}")
    name = source or (datasets[0] if datasets else "segllm")
    return MultiRoundSample(source=name, image_id=image_id, sample_id=sample_id, rounds=rounds)


def read_segllm(
    path: str | Path, instances: CocoIndex | str | Path | None = None, source: Optional[str] = None
) -> Iterator[MultiRoundSample]:
    """Stream the dialogues of a SegLLM conversation file.

    ``instances`` (a COCO file, SegLLM's mask register) maps image paths to image ids and checks
    every mask id; without it the image id is the image file's stem and ids are not checked.
    ``source`` defaults to the dataset name in the tags.
    """
    p = Path(path)
    index = instances if isinstance(instances, CocoIndex) or instances is None else CocoIndex.load(instances)
    dialogues = expect_type(load_json(p, "SegLLM conversation file"), list, f"{p}: top level")
    for k, entry in enumerate(dialogues):
        yield parse_dialogue(entry, k, p, source, index)


# --------------------------------------------------------------------------------------------
# writing


def request_with_tags(rnd: Round, image: str, dataset: str, where: str) -> str:
    """Replace each ``<region{k}>`` marker by the MASK-ENCODE/BOX-ENCODE tags of ``refer_ids[k]``.

    Markers must appear once each, in order 0, 1, ...; a request without markers gets the tags
    in front (SegLLM's own placement).
    """
    def tags(mask_id: str) -> str:
        return f"[MASK-ENCODE:{image}|{dataset}|{mask_id}][BOX-ENCODE:{image}|{dataset}|{mask_id}]"

    numbers = [int(m.group(1)) for m in REGION_MARKER_RE.finditer(rnd.request)]
    if not numbers:
        prefix = "".join(tags(a) for a in rnd.refer_ids)
        return f"{prefix} {rnd.request}" if prefix else rnd.request
    if numbers != list(range(len(rnd.refer_ids))):
        raise RecordError(
            f"{where}: request markers {numbers} must be <region0>..<region{len(rnd.refer_ids) - 1}> in order "
            f"(one per refer id)"
        )
    return REGION_MARKER_RE.sub(lambda m: tags(rnd.refer_ids[int(m.group(1))]), rnd.request)


def answer_with_tags(rnd: Round, image: str, dataset: str) -> str:
    tags = "".join(f"[MASK-DECODE:{image}|{dataset}|{a}]" for a in rnd.target_ids)
    if not tags:
        return rnd.answer_label
    return f"{rnd.answer_label} {tags}." if rnd.answer_label else f"{tags}."


def referenced_rounds(rounds: Sequence[Round], r: int) -> list[int]:
    """SegLLM's ``ind``: for each refer id of round ``r``, the latest earlier round (1-based) answering it."""
    out = []
    for mask_id in rounds[r].refer_ids:
        earlier = [k + 1 for k in range(r) if mask_id in rounds[k].target_ids]
        if earlier:
            out.append(earlier[-1])
    return out


def segllm_dialogue(sample: MultiRoundSample, image_path: str, dataset: str) -> dict:
    """One :class:`MultiRoundSample` as a SegLLM dialogue."""
    turns = []
    for r, rnd in enumerate(sample.rounds):
        where = f"sample {sample.sample_id}: round {r}"
        request = request_with_tags(rnd, image_path, dataset, where)
        human: dict[str, Any] = {"from": "human", "value": f"[IMAGE256:{image_path}] {request}" if r == 0 else request}
        ind = referenced_rounds(sample.rounds, r)
        if ind:
            human["ind"] = ind
        turns.append(human)
        turns.append({"from": "gpt", "value": answer_with_tags(rnd, image_path, dataset)})
    return {"id": sample.sample_id, "conversations": turns}


def write_segllm(
    path: str | Path,
    samples: Sequence[MultiRoundSample],
    images: Sequence[ImageRecord],
    relative_to: str | Path | None = None,
    dataset: Optional[str] = None,
) -> Path:
    """Write a SegLLM conversation file; ``dataset`` (default: each sample's source) names the register."""
    images_by_id = {r.image_id: r for r in images}
    dialogues = []
    for s in samples:
        image = images_by_id.get(s.image_id)
        if image is None:
            raise RecordError(f"sample {s.sample_id}: image {s.image_id!r} is not among the images given")
        dialogues.append(segllm_dialogue(s, relative_file_name(image, relative_to), dataset or s.source))
    return write_json(path, dialogues)
