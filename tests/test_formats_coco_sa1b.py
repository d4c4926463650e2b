"""COCO instances and SA-1B readers/writers: literal upstream fixtures, round trips, bad input."""

import json

import numpy as np
import pytest

from samtok.core.masks import encode_rle, encode_uncompressed_rle
from samtok.data.formats import open_source, read_coco_instances, read_sa1b, write_coco_instances, write_sa1b
from samtok.data.records import ImageRecord, InstanceSegSample, MaskAnn, RecordError


def blob(h, w, y0, x0, y1, x1, hole=False):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    if hole:
        m[(y0 + y1) // 2, (x0 + x1) // 2] = False
    return m


# A literal COCO instances file: one compressed RLE, one crowd region in uncompressed RLE,
# one polygon (a 4x4 square), one image without annotation.
M1 = blob(6, 8, 1, 1, 4, 5, hole=True)
M2 = blob(6, 8, 3, 5, 6, 8)
COCO_LITERAL = {
    "info": {"description": "tiny"},
    "images": [
        {"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 6, "width": 8},
        {"id": 43, "file_name": "COCO_train2014_000000000043.jpg", "height": 6, "width": 8},
    ],
    "annotations": [
        {"id": 1001, "image_id": 42, "category_id": 18, "segmentation": encode_rle(M1), "area": 11.0,
         "bbox": [1.0, 1.0, 4.0, 3.0], "iscrowd": 0},
        {"id": 1002, "image_id": 42, "category_id": 1, "segmentation": encode_uncompressed_rle(M2), "area": 9.0,
         "bbox": [5.0, 3.0, 3.0, 3.0], "iscrowd": 1},
        {"id": 1003, "image_id": 42, "category_id": 18, "segmentation": [[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0]],
         "area": 16.0, "bbox": [0.0, 0.0, 4.0, 4.0], "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 18, "name": "dog", "supercategory": "animal"}],
}


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_coco_literal_fixture_reads_every_segmentation_kind(tmp_path):
    path = write(tmp_path / "instances_train2014.json", COCO_LITERAL)
    images = list(read_coco_instances(path, source="coco2014"))
    assert [r.image_id for r in images] == ["42", "43"]
    first = images[0]
    assert (first.height, first.width, first.path) == (6, 8, tmp_path / "COCO_train2014_000000000042.jpg")
    assert [a.ann_id for a in first.anns] == ["1001", "1002", "1003"]
    assert [a.category for a in first.anns] == ["dog", "person", "dog"]
    np.testing.assert_array_equal(first.mask("1001"), M1)
    np.testing.assert_array_equal(first.mask("1002"), M2)
    assert first.mask("1003").sum() > 0 and first.mask("1003")[5, 7] == 0
    assert first.ann("1002").attributes == {"iscrowd": 1}
    assert first.ann("1001").bbox == [1.0, 1.0, 4.0, 3.0] and first.ann("1001").area == 11.0
    assert images[1].anns == []
    no_crowd = list(read_coco_instances(path, source="coco2014", include_crowd=False))[0]
    assert [a.ann_id for a in no_crowd.anns] == ["1001", "1003"]


def test_coco_writer_round_trip_keeps_masks_ids_and_attributes(tmp_path):
    rng = np.random.default_rng(0)
    masks = [rng.random((9, 13)) < 0.4 for _ in range(3)]
    record = ImageRecord(source="synth", image_id="5", file_name="images/5.png", height=9, width=13, anns=[
        MaskAnn(ann_id=str(10 + k), segmentation=encode_rle(m), category=["star", "disk", "star"][k],
                attributes={"shape": "star", "color": "red", "size": "large"} if k == 0 else {})
        for k, m in enumerate(masks)
    ])
    path = write_coco_instances(tmp_path / "instances_val.json", [record], categories=["disk", "star"])
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["categories"]] == ["disk", "star"]
    assert doc["annotations"][0]["category_id"] == 2 and doc["annotations"][0]["id"] == 10
    back = next(read_coco_instances(path, source="synth"))
    assert [a.ann_id for a in back.anns] == ["10", "11", "12"]
    assert back.anns[0].attributes == {"shape": "star", "color": "red", "size": "large"}
    for k, m in enumerate(masks):
        np.testing.assert_array_equal(back.mask(str(10 + k)), m)
        assert back.anns[k].area == float(m.sum())


def test_coco_source_samples_are_instance_segmentation(tmp_path):
    path = write(tmp_path / "instances.json", COCO_LITERAL)
    samples = list(open_source("coco", instances=str(path)).samples())
    assert len(samples) == 1 and samples[0].targets == {"dog": ["1001", "1003"]}  # crowd region left out
    assert samples[0].categories == ["dog"]
    lvis = json.loads(json.dumps(COCO_LITERAL))  # LVIS marks categories verified absent per image
    lvis["images"][0]["neg_category_ids"] = [1, 18]
    lvis["categories"].append({"id": 2, "name": "bicycle"})
    lvis["images"][1]["neg_category_ids"] = [2]
    samples = list(open_source("coco", instances=str(write(tmp_path / "lvis.json", lvis))).samples())
    assert [(s.image_id, s.categories, s.targets) for s in samples] == [
        ("42", ["dog", "person"], {"dog": ["1001", "1003"]}), ("43", ["bicycle"], {})]


def test_coco_writer_keeps_open_vocabulary_samples(tmp_path):
    m = encode_rle(blob(4, 4, 0, 0, 2, 2))
    record = ImageRecord(source="s", image_id="1", file_name="1.png", height=4, width=4,
                         anns=[MaskAnn(ann_id="5", segmentation=m, category="star")])
    sample = InstanceSegSample("s", "1", "ov", categories=["disk", "star"], targets={"star": ["5"]})
    path = write_coco_instances(tmp_path / "instances.json", [record], ["star"], ov_samples=[sample])
    src = open_source("coco", instances=str(path), source="s")
    assert list(src.samples()) == [sample]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"][0].pop("segmentation"), r"annotations\[0\] \(id 1001\): missing field 'segmentation'"),
        (lambda d: d["annotations"][0]["segmentation"].update(counts="0:1"), r"annotations\[0\].*RLE run lengths add up to"),
        (lambda d: d["annotations"][0]["segmentation"].update(counts="\x7f\x7f"), r"annotations\[0\].*invalid character"),
        (lambda d: d["annotations"][0].update(segmentation=encode_rle(np.ones((5, 8), bool))),
         r"annotations\[0\].*mask size \[5, 8\] does not match the image size \[6, 8\]"),
        (lambda d: d["annotations"][0].update(segmentation=encode_rle(np.zeros((6, 8), bool))), r"annotations\[0\].*mask is empty"),
        (lambda d: d["annotations"][2].update(segmentation=[]), r"annotations\[2\].*mask is empty"),
        (lambda d: d["annotations"][0].update(image_id=99), r"image_id '99' is not in 'images'"),
        (lambda d: d["annotations"][0].update(category_id=7), r"category_id 7 is not in 'categories'"),
        (lambda d: d["images"][0].pop("height"), r"images\[0\]: missing field 'height'"),
        (lambda d: d["images"][0].update(width="8"), r"images\[0\]: field 'width': expected an integer"),
    ],
)
def test_coco_bad_input_names_file_record_and_field(tmp_path, mutate, message):
    doc = json.loads(json.dumps(COCO_LITERAL))
    mutate(doc)
    path = write(tmp_path / "instances_bad.json", doc)
    with pytest.raises(RecordError, match=message) as info:
        list(read_coco_instances(path, source="coco"))
    assert "instances_bad.json" in str(info.value)


def test_coco_missing_file_and_bad_json(tmp_path):
    with pytest.raises(RecordError, match="COCO instances file not found"):
        list(read_coco_instances(tmp_path / "nope.json", source="coco"))
    (tmp_path / "broken.json").write_text("{\"images\": [")
    with pytest.raises(RecordError, match="broken.json: not valid JSON"):
        list(read_coco_instances(tmp_path / "broken.json", source="coco"))


def test_coco_empty_masks_can_be_skipped(tmp_path):
    doc = json.loads(json.dumps(COCO_LITERAL))
    doc["annotations"][0]["segmentation"] = encode_rle(np.zeros((6, 8), bool))
    path = write(tmp_path / "instances.json", doc)
    record = next(read_coco_instances(path, source="coco", skip_empty_masks=True))
    assert [a.ann_id for a in record.anns] == ["1002", "1003"]


# --------------------------------------------------------------------------------------------
# SA-1B

SA1B_MASK = blob(5, 7, 0, 2, 4, 6)


def sa1b_literal():
    return {
        "image": {"image_id": 1, "width": 7, "height": 5, "file_name": "sa_1.jpg"},
        "annotations": [
            {"id": 555, "segmentation": encode_rle(SA1B_MASK), "bbox": [2.0, 0.0, 4.0, 4.0], "area": 16,
             "predicted_iou": 0.93, "point_coords": [[3.0, 2.0]], "crop_box": [0, 0, 7, 5], "stability_score": 0.97},
        ],
    }


def test_sa1b_literal_folder_is_streamed_per_file(tmp_path):
    write(tmp_path / "sa_1.json", sa1b_literal())
    second = sa1b_literal()
    second["image"].update(image_id=2, file_name="sa_2.jpg")
    second["annotations"][0]["id"] = 556
    write(tmp_path / "sa_2.json", second)
    images = list(read_sa1b(tmp_path, source="sa1b"))
    assert [(r.image_id, r.anns[0].ann_id) for r in images] == [("1", "555"), ("2", "556")]
    assert images[0].path == tmp_path / "sa_1.jpg"
    np.testing.assert_array_equal(images[0].mask("555"), SA1B_MASK)
    assert images[0].anns[0].attributes == {}  # quality fields are ignored
    assert list(open_source("sa1b", path=str(tmp_path)).samples()) == []


def test_sa1b_writer_round_trip(tmp_path):
    (tmp_path / "in").mkdir()
    record = next(read_sa1b(write(tmp_path / "in" / "sa_1.json", sa1b_literal()), source="sa1b"))
    written = write_sa1b(tmp_path / "out", [record])
    assert [p.name for p in written] == ["sa_1.json"]
    doc = json.loads(written[0].read_text())
    assert doc["image"] == {"image_id": 1, "width": 7, "height": 5, "file_name": "../in/sa_1.jpg"}
    back = next(read_sa1b(written[0], source="sa1b"))
    np.testing.assert_array_equal(back.mask("555"), SA1B_MASK)


def test_sa1b_bad_input(tmp_path):
    with pytest.raises(RecordError, match="SA-1B annotations not found"):
        list(read_sa1b(tmp_path / "missing", source="sa1b"))
    doc = sa1b_literal()
    doc["annotations"][0]["segmentation"]["counts"] = doc["annotations"][0]["segmentation"]["counts"][:-2]
    write(tmp_path / "sa_9.json", doc)
    with pytest.raises(RecordError, match=r"sa_9.json: annotations\[0\] \(id 555\)"):
        list(read_sa1b(tmp_path / "sa_9.json", source="sa1b"))
    doc = sa1b_literal()
    del doc["image"]["file_name"]
    write(tmp_path / "sa_9.json", doc)
    with pytest.raises(RecordError, match=r"sa_9.json: image: missing field 'file_name'"):
        list(read_sa1b(tmp_path / "sa_9.json", source="sa1b"))


def test_coco_writer_refuses_ids_repeated_across_images(tmp_path):
    m = encode_rle(blob(4, 4, 0, 0, 2, 2))
    images = [ImageRecord(source="s", image_id=str(i), file_name=f"{i}.png", height=4, width=4,
                          anns=[MaskAnn(ann_id="0", segmentation=m)]) for i in range(2)]
    with pytest.raises(RecordError, match="annotation id '0' is used by image '0' and image '1'"):
        write_coco_instances(tmp_path / "instances.json", images)
