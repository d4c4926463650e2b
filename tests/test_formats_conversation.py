"""LLaVA / SAMTok conversation files whose answers already hold mask spans."""

import json

import pytest
from PIL import Image

from samtok.data.formats import open_source, read_conversations, write_conversations
from samtok.data.records import ConversationSample, RecordError

SPAN = "<|mt_start|><|mt_0012|><|mt_0300|><|mt_end|>"
LLAVA = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\nPlease segment the bus in this image."},
                       {"from": "gpt", "value": f"```json\n[{{\"mask_2d\": \"{SPAN}\", \"label\": \"bus\"}}]\n```"},
                       {"from": "human", "value": f"What is in {SPAN}?"},
                       {"from": "gpt", "value": "A bus."}]},
    {"id": 7, "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}]},
]


def test_llava_json_list(tmp_path):
    path = tmp_path / "samtok_sft.json"
    path.write_text(json.dumps(LLAVA))
    first, second = list(read_conversations(path, source="samtok_sft"))
    assert (first.source, first.image_id, first.sample_id) == ("samtok_sft", "coco/train2017/000000033471.jpg", "000000033471")
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert first.messages[0]["content"] == "<image>\nPlease segment the bus in this image."
    assert SPAN in first.messages[1]["content"] and first.task == "conversation"
    assert (second.image_id, second.sample_id, second.messages[0]) == ("", "7", {"role": "system", "content": "Be brief."})


def test_llava_json_lines_and_writer_round_trip(tmp_path):
    samples = list(read_conversations(_write(tmp_path / "a.json", LLAVA), source="x"))
    for name in ("b.json", "b.jsonl"):
        path = write_conversations(tmp_path / name, samples)
        assert list(read_conversations(path, source="x")) == samples
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "b.json").read_text())[0]["conversations"][1]["from"] == "gpt"


def test_conversation_source_images_read_the_header(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (20, 10)).save(tmp_path / "coco" / "train2017" / "000000033471.jpg")
    src = open_source("conversation", path=str(_write(tmp_path / "c.json", LLAVA)))
    (image,) = list(src.images())
    assert (image.image_id, image.height, image.width, image.anns) == ("coco/train2017/000000033471.jpg", 10, 20, [])
    (tmp_path / "coco" / "train2017" / "000000033471.jpg").unlink()
    with pytest.raises(RecordError, match="conversation image not found"):
        list(src.images())


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[0]["conversations"][1].update(value="<|mt_start|><|mt_0012|> bus"), r"\[0\] \(id 000000033471\): conversations\[1\]: mask span 0 is not closed"),
        (lambda d: d[0]["conversations"][1].update(value="<|mt_end|> bus"), r"conversations\[1\]: 1 stray mask token"),
        (lambda d: d[0]["conversations"][1].update(value="<|mt_start|><|mt_0300|><|mt_end|>"), r"first code outside \[0, 256\)"),
        (lambda d: d[0]["conversations"][0].update(**{"from": "bot"}), r"conversations\[0\]: unknown speaker 'bot'"),
        (lambda d: d[1].update(conversations=[{"from": "human", "value": "Hi"}]), r"\[1\] \(id 7\): the conversation has no assistant"),
        (lambda d: d[0].update(image=["a.jpg", "b.jpg"]), r"lists 2 images"),
        (lambda d: d[0]["conversations"][0].pop("value"), r"conversations\[0\]: missing field 'value'"),
        (lambda d: d[1].update(conversations=[]), r"field 'conversations' is empty"),
    ],
)
def test_conversation_bad_input(tmp_path, mutate, message):
    doc = json.loads(json.dumps(LLAVA))
    mutate(doc)
    with pytest.raises(RecordError, match=message):
        list(read_conversations(_write(tmp_path / "bad.json", doc)))


def test_conversation_span_check_can_be_disabled(tmp_path):
    doc = json.loads(json.dumps(LLAVA))
    doc[0]["conversations"][1]["value"] = "<|mt_start|><|mt_0012|> bus"
    (sample, _) = list(read_conversations(_write(tmp_path / "c.json", doc), check_spans=False))
    assert isinstance(sample, ConversationSample)
    with pytest.raises(RecordError, match="conversation file not found"):
        list(read_conversations(tmp_path / "missing.jsonl"))
