"""RefCOCO (refer pickles) and gRefCOCO readers/writers, and the restricted unpickler."""

import json
import os
import pickle

import numpy as np
import pytest

from samtok.core.masks import encode_rle
from samtok.data.formats import (
    UnsafePickleError,
    load_plain_pickle,
    open_source,
    read_grefcoco_samples,
    read_refer_samples,
    write_coco_instances,
    write_grefcoco_refs,
    write_refer_refs,
)
from samtok.data.records import ImageRecord, MaskAnn, RecordError, ReferringSample


def blob(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


MASKS = {1719310: blob(10, 12, 0, 0, 5, 5), 1719311: blob(10, 12, 4, 6, 9, 11), 2000: blob(8, 8, 2, 2, 6, 6)}
INSTANCES = {
    "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "height": 10, "width": 12},
               {"id": 581858, "file_name": "COCO_train2014_000000581858.jpg", "height": 8, "width": 8}],
    "annotations": [
        {"id": 1719310, "image_id": 581857, "category_id": 1, "segmentation": encode_rle(MASKS[1719310]),
         "area": 25.0, "bbox": [0, 0, 5, 5], "iscrowd": 0},
        {"id": 1719311, "image_id": 581857, "category_id": 1, "segmentation": encode_rle(MASKS[1719311]),
         "area": 25.0, "bbox": [6, 4, 5, 5], "iscrowd": 0},
        {"id": 2000, "image_id": 581858, "category_id": 3, "segmentation": encode_rle(MASKS[2000]),
         "area": 16.0, "bbox": [2, 2, 4, 4], "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
}
# refs(unc).p content as released by the refer toolkit (values made up, keys and types exact).
REFS = [
    {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_16.jpg", "ann_id": 1719310, "ref_id": 0,
     "image_id": 581857, "split": "train", "category_id": 1,
     "sentences": [{"tokens": ["the", "lady", "with", "the", "blue", "shirt"], "raw": "THE lady with the blue shirt",
                    "sent_id": 0, "sent": "the lady with the blue shirt"},
                   {"tokens": ["lady", "with", "back", "to", "us"], "raw": "lady w back to us", "sent_id": 1,
                    "sent": "lady with back to us"}]},
    {"sent_ids": [2], "file_name": "COCO_train2014_000000581858_1.jpg", "ann_id": 2000, "ref_id": 1,
     "image_id": 581858, "split": "val", "category_id": 3,
     "sentences": [{"tokens": ["red", "car"], "raw": "red car", "sent_id": 2, "sent": "red car"}]},
    {"sent_ids": [3], "file_name": "COCO_train2014_000000581857_17.jpg", "ann_id": 1719311, "ref_id": 2,
     "image_id": 581857, "split": "testA", "category_id": 1,
     "sentences": [{"tokens": ["right", "woman"], "raw": "right woman", "sent_id": 3, "sent": "right woman"}]},
]
GREFS = [
    {"sent_ids": [10], "file_name": "COCO_train2014_000000581857_0.jpg", "ann_id": [1719310, 1719311], "ref_id": 0,
     "image_id": 581857, "split": "train", "category_id": [1, 1], "no_target": False,
     "sentences": [{"tokens": ["two", "women"], "raw": "two women", "sent_id": 10, "sent": "two women"}]},
    {"sent_ids": [11], "file_name": "COCO_train2014_000000581857_1.jpg", "ann_id": [-1], "ref_id": 1,
     "image_id": 581857, "split": "train", "category_id": [-1], "no_target": True,
     "sentences": [{"tokens": ["the", "giraffe"], "raw": "the giraffe", "sent_id": 11, "sent": "the giraffe"}]},
    {"sent_ids": [12], "file_name": "COCO_train2014_000000581858_2.jpg", "ann_id": 2000, "ref_id": 2,
     "image_id": 581858, "split": "val", "category_id": 3, "no_target": False,
     "sentences": [{"tokens": ["the", "car"], "raw": "the car", "sent_id": 12, "sent": "the car"}]},
]


@pytest.fixture
def refer_root(tmp_path):
    """``<root>/refcoco/{refs(unc).p, instances.json}`` and ``<root>/grefcoco/{grefs(unc).json, instances.json}``."""
    for name in ("refcoco", "grefcoco"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "instances.json").write_text(json.dumps(INSTANCES))
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(REFS, f, protocol=2)
    (tmp_path / "grefcoco" / "grefs(unc).json").write_text(json.dumps(GREFS))
    return tmp_path


def test_refer_reads_one_sample_per_sentence_filtered_by_split(refer_root):
    refs, inst = refer_root / "refcoco" / "refs(unc).p", refer_root / "refcoco" / "instances.json"
    train = list(read_refer_samples(refs, inst, "train", "coco2014"))
    assert [(s.sample_id, s.image_id, s.target_ids, s.expression) for s in train] == [
        ("0", "581857", ["1719310"], "the lady with the blue shirt"),
        ("1", "581857", ["1719310"], "lady with back to us"),
    ]
    assert all(s.task == "res" and not s.generalized for s in train)
    assert [s.sample_id for s in read_refer_samples(refs, inst, "val,testA", "coco2014")] == ["2", "3"]
    assert len(list(read_refer_samples(refs, inst, None, "coco2014"))) == 4
    raw = list(read_refer_samples(refs, inst, "train", "coco2014", sentence_key="raw"))
    assert raw[0].expression == "THE lady with the blue shirt"


def test_refer_source_layout_images_are_the_split_images_with_exact_masks(refer_root):
    src = open_source("refer", data_root=str(refer_root), dataset="refcoco", split_by="unc", split="val")
    images = list(src.images())
    assert [r.image_id for r in images] == ["581858"]
    assert images[0].image_root == str(refer_root / "images" / "mscoco" / "images" / "train2014")
    np.testing.assert_array_equal(images[0].mask("2000"), MASKS[2000])
    assert [s.expression for s in src.samples()] == ["red car"]


def test_refer_writer_round_trip(tmp_path):
    record = ImageRecord(source="s", image_id="3", file_name="a.png", height=10, width=12, anns=[
        MaskAnn(ann_id="7", segmentation=encode_rle(MASKS[1719310]), category="star"),
        MaskAnn(ann_id="8", segmentation=encode_rle(MASKS[1719311]), category="disk")])
    samples = [ReferringSample(source="s", image_id="3", sample_id="20", expression="the star", target_ids=["7"]),
               ReferringSample(source="s", image_id="3", sample_id="21", expression="a star", target_ids=["7"]),
               ReferringSample(source="s", image_id="3", sample_id="q22", expression="the disk", target_ids=["8"])]
    write_coco_instances(tmp_path / "instances.json", [record], ["disk", "star"])
    path = write_refer_refs(tmp_path / "refs(x).p", samples, {"20": "train", "21": "train", "q22": "val"}, [record], ["disk", "star"])
    refs = load_plain_pickle(path)
    assert [(r["ref_id"], r["ann_id"], r["sent_ids"], r["split"], r["category_id"]) for r in refs] == [
        (0, 7, [20, 21], "train", 2), (1, 8, ["q22"], "val", 1)]
    assert list(read_refer_samples(path, tmp_path / "instances.json", None, "s")) == samples
    assert list(read_refer_samples(path, tmp_path / "instances.json", "val", "s")) == samples[2:]


def test_refer_writer_refuses_generalized_samples(tmp_path):
    s = ReferringSample(source="s", image_id="3", sample_id="1", expression="both", target_ids=["7", "8"], generalized=True)
    with pytest.raises(RecordError, match="exactly one target"):
        write_refer_refs(tmp_path / "refs.p", [s], "train")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda refs: refs[1].pop("ann_id"), r"refs\[1\] \(ref_id 1\): missing field 'ann_id'"),
        (lambda refs: refs[1].update(ann_id=999), r"refs\[1\] \(ref_id 1\): ann_id 999 is not in"),
        (lambda refs: refs[1].update(ann_id=1719310), r"ann_id 1719310 belongs to image 581857, not to image_id 581858"),
        (lambda refs: refs[0]["sentences"][1].pop("sent"), r"refs\[0\].*sentences\[1\] \(sent_id 1\): missing field 'sent'"),
        (lambda refs: refs[0].update(sentences="oops"), r"refs\[0\].*field 'sentences': expected a list"),
    ],
)
def test_refer_bad_refs(refer_root, mutate, message):
    refs = json.loads(json.dumps(REFS))
    if "raw" in refs[0]["sentences"][1]:
        del refs[0]["sentences"][1]["raw"]  # so a missing 'sent' has no fallback
    mutate(refs)
    path = refer_root / "refcoco" / "refs(bad).p"
    with open(path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(RecordError, match=message) as info:
        list(read_refer_samples(path, refer_root / "refcoco" / "instances.json", None, "coco2014"))
    assert "refs(bad).p" in str(info.value)


def test_refer_missing_files(refer_root):
    with pytest.raises(RecordError, match="pickle file not found"):
        list(read_refer_samples(refer_root / "refcoco" / "refs(umd).p", refer_root / "refcoco" / "instances.json", None, "c"))
    with pytest.raises(RecordError, match="COCO instances file not found"):
        list(read_refer_samples(refer_root / "refcoco" / "refs(unc).p", refer_root / "nowhere.json", None, "c"))


# --------------------------------------------------------------------------------------------
# restricted unpickler


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


class PlainObject:
    pass


def test_pickle_with_code_or_classes_is_refused_without_running_it(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "refs(evil).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "payload": Exploit(str(target))}], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(evil\).p: refused to load the global 'posix.mkdir'|'os.mkdir'"):
        load_plain_pickle(path)
    assert not target.exists()
    path.write_bytes(pickle.dumps([PlainObject()], protocol=4))
    with pytest.raises(UnsafePickleError, match="PlainObject"):
        load_plain_pickle(path)
    assert issubclass(UnsafePickleError, RecordError)


def test_python2_pickles_and_plain_containers_load(tmp_path):
    # Python 2 protocol-2 pickle of [set(['caf\xc3\xa9'])]: __builtin__.set and a byte string (UTF-8).
    path = tmp_path / "py2.p"
    path.write_bytes(b"\x80\x02]q\x00c__builtin__\nset\nq\x01]q\x02U\x05caf\xc3\xa9q\x03a\x85q\x04Rq\x05a.")
    assert load_plain_pickle(path) == [{"café"}]
    path.write_bytes(pickle.dumps({"a": [1, 2.5, None, True, (1, 2), b"x", frozenset({3})]}, protocol=2))
    assert load_plain_pickle(path) == {"a": [1, 2.5, None, True, (1, 2), b"x", frozenset({3})]}
    path.write_bytes(b"not a pickle")
    with pytest.raises(RecordError, match="not a readable pickle"):
        load_plain_pickle(path)


# --------------------------------------------------------------------------------------------
# gRefCOCO


def test_grefcoco_multi_and_no_target(refer_root):
    refs, inst = refer_root / "grefcoco" / "grefs(unc).json", refer_root / "grefcoco" / "instances.json"
    train = list(read_grefcoco_samples(refs, inst, "train", "coco2014"))
    assert [(s.sample_id, s.target_ids, s.no_target, s.task) for s in train] == [
        ("10", ["1719310", "1719311"], False, "gres"), ("11", [], True, "gres")]
    val = list(read_grefcoco_samples(refs, inst, "val", "coco2014"))
    assert [(s.sample_id, s.image_id, s.target_ids, s.expression) for s in val] == [("12", "581858", ["2000"], "the car")]


def test_grefcoco_source_layout(refer_root):
    src = open_source("grefcoco", data_root=str(refer_root), split="train")
    assert [s.sample_id for s in src.samples()] == ["10", "11"]
    images = list(src.images())
    assert [r.image_id for r in images] == ["581857"]
    assert images[0].image_root == str(refer_root / "images" / "train2014")
    np.testing.assert_array_equal(images[0].mask("1719311"), MASKS[1719311])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda refs: refs[1].update(no_target=False), r"refs\[1\] \(ref_id 1\): 'no_target' is False but 'ann_id' is \[-1\]"),
        (lambda refs: refs[0].update(ann_id=[1719310, -1]), r"refs\[0\].*mixes -1"),
        (lambda refs: refs[0].update(ann_id=[1719310, 2000]), r"ann_id 2000 belongs to image 581858"),
        (lambda refs: refs[0].update(image_id=5), r"image_id 5 is not in"),
        (lambda refs: refs[2].pop("split"), r"refs\[2\] \(ref_id 2\): missing field 'split'"),
    ],
)
def test_grefcoco_bad_refs(refer_root, mutate, message):
    refs = json.loads(json.dumps(GREFS))
    mutate(refs)
    path = refer_root / "grefcoco" / "grefs(bad).json"
    path.write_text(json.dumps(refs))
    with pytest.raises(RecordError, match=message):
        list(read_grefcoco_samples(path, refer_root / "grefcoco" / "instances.json", "train,val", "coco2014"))


def test_grefcoco_writer_round_trip(tmp_path):
    record = ImageRecord(source="s", image_id="3", file_name="a.png", height=10, width=12, anns=[
        MaskAnn(ann_id="7", segmentation=encode_rle(MASKS[1719310]), category="star"),
        MaskAnn(ann_id="8", segmentation=encode_rle(MASKS[1719311]), category="disk")])
    samples = [ReferringSample(source="s", image_id="3", sample_id="1", expression="all", target_ids=["7", "8"], generalized=True),
               ReferringSample(source="s", image_id="3", sample_id="2", expression="none", target_ids=[], generalized=True)]
    write_coco_instances(tmp_path / "instances.json", [record])
    path = write_grefcoco_refs(tmp_path / "grefs(unc).json", samples, "val", [record])
    doc = json.loads(path.read_text())
    assert [(r["ann_id"], r["category_id"], r["no_target"]) for r in doc] == [([7, 8], [1, 2], False), ([-1], [-1], True)]
    assert list(read_grefcoco_samples(path, tmp_path / "instances.json", "val", "s")) == samples
