"""SegLLM-style multi-round dialogues: the upstream tag syntax, the mask register, round trips."""

import json

import numpy as np
import pytest

from samtok.core.masks import encode_rle
from samtok.data.formats import open_source, read_segllm, write_coco_instances, write_segllm
from samtok.data.records import ImageRecord, MaskAnn, MultiRoundSample, RecordError, Round


def blob(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


IMG = "coco/train2014/COCO_train2014_000000376848.jpg"
PERSON, NEIGHBOUR, CAT = blob(6, 8, 0, 0, 5, 3), blob(6, 8, 0, 4, 5, 7), blob(5, 5, 1, 1, 4, 4)
INSTANCES = {
    "images": [{"id": 376848, "file_name": "COCO_train2014_000000376848.jpg", "height": 6, "width": 8},
               {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 5, "width": 5}],
    "annotations": [{"id": 488615, "image_id": 376848, "category_id": 1, "segmentation": encode_rle(PERSON)},
                    {"id": 484448, "image_id": 376848, "category_id": 1, "segmentation": encode_rle(NEIGHBOUR)},
                    {"id": 77, "image_id": 9, "category_id": 2, "segmentation": encode_rle(CAT)}],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cat"}],
}
# The two MASK-DECODE spellings SegLLM uses, the MASK-ENCODE/BOX-ENCODE pair and "ind".
DIALOGUES = [
    {"conversations": [
        {"from": "human", "value": f"[IMAGE256:{IMG}] Segment a person."},
        {"from": "gpt", "value": f"[MASK-DECODE:none:none:488615:{IMG}:refcoco]."},
        {"from": "human", "value": f"[MASK-ENCODE:{IMG}|refcoco|488615][BOX-ENCODE:{IMG}|refcoco|488615] "
                                    "Segment the person next to instance 1.", "ind": [1]},
        {"from": "gpt", "value": f"[MASK-DECODE:relational:488615:484448:{IMG}:refcoco]."},
    ]},
    {"conversations": [
        {"from": "human", "value": "[IMAGE256:coco/train2014/COCO_train2014_000000000009.jpg] Can you segment the cat?"},
        {"from": "gpt", "value": "[MASK-DECODE:coco/train2014/COCO_train2014_000000000009.jpg|refcoco|77]"},
    ]},
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    (tmp_path / "mr_refcoco_train.json").write_text(json.dumps(DIALOGUES))
    return tmp_path / "mr_refcoco_train.json", tmp_path / "instances.json"


def test_segllm_upstream_dialogues(files):
    conversations, instances = files
    first, second = list(read_segllm(conversations, instances))
    assert (first.source, first.image_id, first.sample_id) == ("refcoco", "376848", "0")
    assert first.rounds == [
        Round(request="Segment a person.", target_ids=["488615"], refer_ids=[], answer_label=""),
        Round(request="<region0> Segment the person next to instance 1.", target_ids=["484448"], refer_ids=["488615"],
              answer_label=""),
    ]
    assert second.image_id == "9" and second.rounds[0].target_ids == ["77"]
    assert first.ann_ids == ["488615", "488615", "484448"]
    without_register = list(read_segllm(conversations, source="mr"))
    assert (without_register[0].image_id, without_register[0].source) == ("COCO_train2014_000000376848", "mr")


def test_segllm_source_images_hold_the_masks(files):
    conversations, instances = files
    src = open_source("multiround", conversations=str(conversations), instances=str(instances))
    images = {r.image_id: r for r in src.images()}
    assert set(images) == {"376848", "9"} and images["9"].source == "refcoco"
    np.testing.assert_array_equal(images["376848"].mask("484448"), NEIGHBOUR)
    with pytest.raises(RecordError, match="needs 'instances'"):
        list(open_source("multiround", conversations=str(conversations)).images())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[0]["conversations"][0].update(value="Segment a person."), r"\[0\] \(id 0\): the first human turn has no \[IMAGE256"),
        (lambda d: d[0]["conversations"][1].update(**{"from": "human"}), r"conversations\[1\]: expected a 'gpt' turn"),
        (lambda d: d[0]["conversations"].pop(), r"must hold \(human, gpt\) pairs, got 3 turns"),
        (lambda d: d[0]["conversations"][1].update(value=f"[MASK-DECODE:{IMG}:refcoco]"), r"conversations\[1\]: expected 'image\|dataset\|mask_id'"),
        (lambda d: d[0]["conversations"][1].update(value=f"[MASK-DECODE:{IMG}|refcoco|77]"), r"mask id 77 is not a mask of image"),
        (lambda d: d[0]["conversations"][1].update(value="[MASK-DECODE:other.jpg|refcoco|488615]"), r"tagged with image 'other.jpg'"),
        (lambda d: d[1].update(conversations=[{"from": "human", "value": "[IMAGE256:COCO_missing.jpg] x"},
                                              {"from": "gpt", "value": "[MASK-DECODE:COCO_missing.jpg|refcoco|77]"}]),
         r"\[1\] \(id 1\): image 'COCO_missing.jpg' is not in"),
        (lambda d: d[1].pop("conversations"), r"\[1\] \(id 1\): missing field 'conversations'"),
    ],
)
def test_segllm_bad_dialogues(files, mutate, message):
    conversations, instances = files
    doc = json.loads(json.dumps(DIALOGUES))
    mutate(doc)
    conversations.write_text(json.dumps(doc))
    with pytest.raises(RecordError, match=message):
        list(read_segllm(conversations, instances))


def synthetic_image():
    return ImageRecord(source="synth", image_id="12", file_name="images/12.png", height=6, width=8, anns=[
        MaskAnn(ann_id="1", segmentation=encode_rle(PERSON), category="star"),
        MaskAnn(ann_id="2", segmentation=encode_rle(NEIGHBOUR), category="disk")])


def test_segllm_writer_round_trip(tmp_path):
    image = synthetic_image()
    sample = MultiRoundSample(source="synth", image_id="12", sample_id="d1", rounds=[
        Round(request="Segment the star.", target_ids=["1"], answer_label="the star"),
        Round(request="Segment the shape right of <region0>.", target_ids=["2"], refer_ids=["1"]),
        Round(request="Segment <region0> and <region1> together.", target_ids=["1", "2"], refer_ids=["2", "1"],
              answer_label="Both."),
        Round(request="Segment a purple hexagon.", target_ids=[], answer_label="No target."),
    ])
    write_coco_instances(tmp_path / "instances.json", [image])
    path = write_segllm(tmp_path / "mr.json", [sample], [image])
    turns = json.loads(path.read_text())[0]["conversations"]
    assert turns[0]["value"] == "[IMAGE256:images/12.png] Segment the star."
    assert turns[1]["value"] == "the star [MASK-DECODE:images/12.png|synth|1]."
    assert turns[2]["value"] == ("Segment the shape right of [MASK-ENCODE:images/12.png|synth|1]"
                                 "[BOX-ENCODE:images/12.png|synth|1].") and turns[2]["ind"] == [1]
    assert turns[4]["ind"] == [2, 1] and turns[7]["value"] == "No target."
    assert list(read_segllm(path, tmp_path / "instances.json", source="synth")) == [sample]


def test_segllm_writer_checks_region_markers(tmp_path):
    sample = MultiRoundSample(source="synth", image_id="12", sample_id="d1", rounds=[
        Round(request="Segment <region1> then <region0>.", target_ids=["1"], refer_ids=["1", "2"])])
    with pytest.raises(RecordError, match=r"markers \[1, 0\] must be <region0>..<region1> in order"):
        write_segllm(tmp_path / "mr.json", [sample], [synthetic_image()])
