"""PSG scene graphs: COCO-panoptic PNG segments, inline-RLE segments, splits, bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from samtok.core.masks import encode_rle
from samtok.data.formats import open_source, read_psg, write_psg
from samtok.data.records import ImageRecord, MaskAnn, RecordError, Relation, SceneGraphSample


def blob(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


PERSON, DOG, GRASS = blob(6, 8, 0, 0, 4, 3), blob(6, 8, 1, 4, 4, 8), blob(6, 8, 4, 0, 6, 8)
PERSON_ID, DOG_ID, GRASS_ID = 3, 263, 5 * 256**2 + 1  # ids that use the G and B channels too


def panoptic_png(path, segments):
    """Literal COCO-panoptic encoding: RGB = (id % 256, id // 256 % 256, id // 256**2)."""
    rgb = np.zeros((6, 8, 3), np.uint8)
    for seg_id, mask in segments:
        rgb[mask] = (seg_id % 256, seg_id // 256 % 256, seg_id // 256**2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def psg_literal():
    return {
        "thing_classes": ["person", "dog"], "stuff_classes": ["grass"], "predicate_classes": ["over", "walking"],
        "test_image_ids": ["2"],
        "data": [
            {"file_name": "train2017/000000000001.jpg", "height": 6, "width": 8, "image_id": "1", "coco_image_id": "1",
             "pan_seg_file_name": "panoptic_train2017/000000000001.png",
             "segments_info": [{"id": PERSON_ID, "category_id": 0, "iscrowd": 0, "isthing": 1, "area": 12},
                               {"id": DOG_ID, "category_id": 1, "iscrowd": 0, "isthing": 1, "area": 12},
                               {"id": GRASS_ID, "category_id": 2, "iscrowd": 0, "isthing": 0, "area": 16}],
             "annotations": [{"bbox": [0, 0, 3, 4], "bbox_mode": 0, "category_id": 0},
                             {"bbox": [4, 1, 8, 4], "bbox_mode": 0, "category_id": 1},
                             {"bbox": [0, 4, 8, 6], "bbox_mode": 0, "category_id": 2}],
             "relations": [[0, 1, 1], [1, 2, 0]]},
            {"file_name": "val2017/000000000002.jpg", "height": 6, "width": 8, "image_id": "2", "coco_image_id": "2",
             "pan_seg_file_name": "panoptic_val2017/000000000002.png",
             "segments_info": [{"id": 9, "category_id": 1, "iscrowd": 0, "isthing": 1, "area": 12}],
             "annotations": [{"bbox": [4, 1, 8, 4], "bbox_mode": 0, "category_id": 1}], "relations": []},
        ],
    }


@pytest.fixture
def psg_root(tmp_path):
    panoptic_png(tmp_path / "coco" / "panoptic_train2017" / "000000000001.png",
                 [(PERSON_ID, PERSON), (DOG_ID, DOG), (GRASS_ID, GRASS)])
    panoptic_png(tmp_path / "coco" / "panoptic_val2017" / "000000000002.png", [(9, DOG)])
    (tmp_path / "psg").mkdir()
    (tmp_path / "psg" / "psg.json").write_text(json.dumps(psg_literal()))
    return tmp_path


def test_psg_panoptic_layout(psg_root):
    src = open_source("scene_graph", psg=str(psg_root / "psg" / "psg.json"), split="train",
                      image_root=str(psg_root / "coco"), seg_root=str(psg_root / "coco"))
    (sample,) = list(src.samples())
    assert (sample.image_id, sample.sample_id) == ("1", "1")
    assert sample.relations == [Relation(str(PERSON_ID), "walking", str(DOG_ID)), Relation(str(DOG_ID), "over", str(GRASS_ID))]
    assert sample.labels == {str(PERSON_ID): "person", str(DOG_ID): "dog", str(GRASS_ID): "grass"}
    (image,) = list(src.images())
    assert image.path == psg_root / "coco" / "train2017" / "000000000001.jpg"
    for seg_id, mask in [(PERSON_ID, PERSON), (DOG_ID, DOG), (GRASS_ID, GRASS)]:
        np.testing.assert_array_equal(image.mask(str(seg_id)), mask)
    assert image.ann(str(GRASS_ID)).category == "grass"


def test_psg_test_split_and_images_without_relations(psg_root):
    pairs = list(read_psg(psg_root / "psg" / "psg.json", "test", seg_root=psg_root / "coco"))
    assert [(img.image_id, sample) for img, sample in pairs] == [("2", None)]  # no relation: no sample
    np.testing.assert_array_equal(pairs[0][0].mask("9"), DOG)
    assert len(list(read_psg(psg_root / "psg" / "psg.json", None, with_masks=False))) == 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["data"][0]["relations"].append([0, 3, 0]), r"data\[0\] \(image_id 1\): relations\[2\]: segment index out of range"),
        (lambda d: d["data"][0]["relations"].append([0, 1, 2]), r"relations\[2\]: predicate index 2 outside predicate_classes"),
        (lambda d: d["data"][0]["relations"].append([0, 1]), r"relations\[2\]: expected \[subject_index, object_index, predicate_index\]"),
        (lambda d: d["data"][0]["segments_info"][1].update(category_id=3), r"segments_info\[1\]: category_id 3 outside"),
        (lambda d: d["data"][0]["segments_info"][2].update(id=77), r"segments_info\[2\] \(id 77\): segment id 77 has no pixel"),
        (lambda d: d["data"][0].update(height=5), r"data\[0\] \(image_id 1\): panoptic PNG .* is 8x6, the image is 8x5"),
        (lambda d: d["data"][0].update(pan_seg_file_name="nope.png"), r"panoptic PNG not found"),
        (lambda d: d["data"][0].pop("segments_info"), r"missing field 'segments_info'"),
    ],
)
def test_psg_bad_input(psg_root, mutate, message):
    doc = psg_literal()
    mutate(doc)
    path = psg_root / "psg" / "psg_bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(RecordError, match=message) as info:
        list(read_psg(path, None, seg_root=psg_root / "coco"))
    assert "psg_bad.json" in str(info.value)


def scene():
    image = ImageRecord(source="s", image_id="4", file_name="img/4.png", height=6, width=8, anns=[
        MaskAnn(ann_id="1", segmentation=encode_rle(PERSON), category="star"),
        MaskAnn(ann_id="2", segmentation=encode_rle(DOG), category="disk"),
        MaskAnn(ann_id="3", segmentation=encode_rle(GRASS), category="square")])
    sample = SceneGraphSample(source="s", image_id="4", sample_id="4",
                              relations=[Relation("1", "left of", "2"), Relation("3", "below", "2")],
                              labels={"1": "red star", "2": "disk", "3": "square"})
    return image, sample


@pytest.mark.parametrize("panoptic", [False, True])
def test_psg_writer_round_trip(tmp_path, panoptic):
    image, sample = scene()
    path = write_psg(tmp_path / "psg.json", [sample], [image], categories=["star", "disk", "square"],
                     panoptic_dir=tmp_path / "panoptic" if panoptic else None)
    doc = json.loads(path.read_text())
    assert doc["thing_classes"] == ["star", "disk", "square", "red star"]
    assert doc["data"][0]["relations"] == [[0, 1, 0], [2, 1, 1]]
    assert ("pan_seg_file_name" in doc["data"][0]) == panoptic
    ((back_image, back),) = list(read_psg(path, "train", source="s"))
    assert back == sample
    for ann_id, mask in [("1", PERSON), ("2", DOG), ("3", GRASS)]:
        np.testing.assert_array_equal(back_image.mask(ann_id), mask)
