"""GranDf grounded captions (training and evaluation layouts) and DAM region captions."""

import json

import numpy as np
import pytest

from samtok.core.masks import encode_rle
from samtok.data.formats import (
    open_source,
    read_grandf,
    read_grandf_eval,
    read_region_captions,
    write_grandf,
    write_region_captions,
)
from samtok.data.records import GroundedCaptionSample, ImageRecord, MaskAnn, Phrase, RecordError, RegionCaptionSample


def blob(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


MAN, DOG, DOG2, GRASS = blob(6, 8, 0, 0, 4, 2), blob(6, 8, 3, 3, 5, 5), blob(6, 8, 1, 6, 2, 8), blob(6, 8, 5, 0, 6, 8)
CAPTION = "A man walks a dog on the grass."
GRANDF = [
    {"file_name": "sa_10013.jpg", "height": 6, "width": 8, "caption": CAPTION,
     "groundings": {"A man": {"token_positives": [0, 5], "rle_masks": [encode_rle(MAN)]},
                    "a dog": {"token_positives": [12, 17], "rle_masks": [encode_rle(DOG), encode_rle(DOG2)]},
                    "the grass": {"token_positives": [21, 30], "rle_masks": [encode_rle(GRASS)]}}},
    {"file_name": "sa_10014.jpg", "height": 6, "width": 8, "caption": "Nothing grounded.", "groundings": {}},
]


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_grandf_training_layout(tmp_path):
    path = write(tmp_path / "GranDf_HA_GCG_train.json", GRANDF)
    pairs = list(read_grandf(path, source="grandf", image_root=tmp_path / "images"))
    assert len(pairs) == 1  # the ungrounded entry is skipped, as GLaMM does
    image, sample = pairs[0]
    assert (sample.image_id, sample.sample_id, sample.caption) == ("sa_10013", "sa_10013", CAPTION)
    assert [(p.start, p.end, p.ann_ids) for p in sample.phrases] == [
        (0, 5, ["sa_10013:0:0"]), (12, 17, ["sa_10013:1:0", "sa_10013:1:1"]), (21, 30, ["sa_10013:2:0"])]
    assert [CAPTION[p.start:p.end] for p in sample.phrases] == ["A man", "a dog", "the grass"]
    assert image.path == tmp_path / "images" / "sa_10013.jpg"
    for ann_id, mask in [("sa_10013:0:0", MAN), ("sa_10013:1:1", DOG2), ("sa_10013:2:0", GRASS)]:
        np.testing.assert_array_equal(image.mask(ann_id), mask)
    assert image.ann("sa_10013:1:0").category == "a dog"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e["groundings"]["a dog"].update(token_positives=[12, 99]), r"\[0\] \(sa_10013.jpg\): groundings\['a dog'\]: token_positives \[12, 99\] outside"),
        (lambda e: e["groundings"]["a dog"].update(rle_masks=[]), r"groundings\['a dog'\]: field 'rle_masks' is empty"),
        (lambda e: e.update(height=7), r"groundings\['A man'\]: rle_masks\[0\]: mask size \[6, 8\] does not match the image size \[7, 8\]"),
        (lambda e: e["groundings"]["A man"]["rle_masks"][0].update(counts="PP"), r"groundings\['A man'\]: rle_masks\[0\]"),
        (lambda e: e.pop("caption"), r"GranDf_bad.json: \[0\]: missing field 'caption'"),
        (lambda e: e["groundings"]["A man"].pop("token_positives"), r"missing field 'token_positives'"),
    ],
)
def test_grandf_bad_entries(tmp_path, mutate, message):
    doc = json.loads(json.dumps(GRANDF))
    mutate(doc[0])
    with pytest.raises(RecordError, match=message):
        list(read_grandf(write(tmp_path / "GranDf_bad.json", doc)))


def synthetic_image():
    return ImageRecord(source="s", image_id="4", file_name="img/4.png", height=6, width=8, anns=[
        MaskAnn(ann_id="1", segmentation=encode_rle(MAN), category="man"),
        MaskAnn(ann_id="2", segmentation=encode_rle(DOG), category="dog"),
        MaskAnn(ann_id="3", segmentation=encode_rle(DOG2), category="dog")])


def test_grandf_writer_round_trip_keeps_ids(tmp_path):
    image = synthetic_image()
    sample = GroundedCaptionSample(source="s", image_id="4", sample_id="cap9", caption=CAPTION,
                                   phrases=[Phrase(0, 5, ["1"]), Phrase(12, 17, ["2", "3"])])
    path = write_grandf(tmp_path / "gcg.json", [sample], [image])
    entry = json.loads(path.read_text())[0]
    assert entry["groundings"]["a dog"]["token_positives"] == [12, 17] and len(entry["groundings"]["a dog"]["rle_masks"]) == 2
    (back_image, back), = read_grandf(path, source="s")
    assert back == sample
    np.testing.assert_array_equal(back_image.mask("3"), DOG2)


def test_grandf_writer_refuses_repeated_phrase_text(tmp_path):
    sample = GroundedCaptionSample(source="s", image_id="4", sample_id="x", caption="dog and dog",
                                   phrases=[Phrase(0, 3, ["2"]), Phrase(8, 11, ["3"])])
    with pytest.raises(RecordError, match="repeats an earlier phrase"):
        write_grandf(tmp_path / "gcg.json", [sample], [synthetic_image()])


def test_grandf_evaluation_layout(tmp_path):
    caption_gt = {"images": [{"id": "sa_77", "file_name": "sa_77.jpg", "height": 6, "width": 8}],
                  "annotations": [{"id": 1, "image_id": "sa_77", "caption": "A Man walks a dog.", "labels": ["a man", "a dog"]}]}
    mask_gt = {"images": [{"id": "sa_77", "file_name": "sa_77.jpg", "height": 6, "width": 8}],
               "annotations": [{"id": 1, "image_id": "sa_77", "category_id": 1, "segmentation": encode_rle(MAN), "iscrowd": 0,
                                "bbox": [0, 0, 2, 4], "area": 8},
                               {"id": 2, "image_id": "sa_77", "category_id": 1, "segmentation": encode_rle(DOG), "iscrowd": 0,
                                "bbox": [3, 3, 2, 2], "area": 4}],
               "categories": [{"id": 1, "name": "object"}]}
    src = open_source("gcg", caption_gt=str(write(tmp_path / "val_gcg_coco_caption_gt.json", caption_gt)),
                      mask_gt=str(write(tmp_path / "val_gcg_coco_mask_gt.json", mask_gt)))
    (sample,) = list(src.samples())
    assert [(p.start, p.end, p.ann_ids) for p in sample.phrases] == [(0, 5, ["1"]), (12, 17, ["2"])]
    (image,) = list(src.images())
    np.testing.assert_array_equal(image.mask("2"), DOG)
    caption_gt["annotations"][0]["labels"] = ["a man", "a cat"]
    write(tmp_path / "val_gcg_coco_caption_gt.json", caption_gt)
    with pytest.raises(RecordError, match=r"label 1 'a cat' does not occur in the caption"):
        list(read_grandf_eval(tmp_path / "val_gcg_coco_caption_gt.json", tmp_path / "val_gcg_coco_mask_gt.json"))


# --------------------------------------------------------------------------------------------
# DAM region captions

DAM = {
    "1": [{"ann_id": 11, "img_id": 1, "image": "000000000001.jpg", "tar_file": "000.tar", "mask_rle": encode_rle(MAN),
           "caption": "A man in a red coat, seen from behind."},
          {"ann_id": 12, "img_id": 1, "image": "000000000001.jpg", "tar_file": "000.tar", "mask_rle": encode_rle(DOG),
           "caption": "A small brown dog."}],
    "2": [{"ann_id": 21, "img_id": 2, "image": "000000000002.jpg", "tar_file": "000.tar",
           "mask_rle": encode_rle(blob(3, 4, 0, 0, 2, 2)), "caption": "A corner."}],
}


def test_dam_layout(tmp_path):
    path = write(tmp_path / "annotations.json", DAM)
    pairs = list(read_region_captions(path, source="dam"))
    assert [(img.image_id, [s.sample_id for s in group]) for img, group in pairs] == [("1", ["1_11", "1_12"]), ("2", ["2_21"])]
    image, group = pairs[0]
    assert (image.height, image.width, image.path) == (6, 8, tmp_path / "000000000001.jpg")
    assert group[1] == RegionCaptionSample(source="dam", image_id="1", sample_id="1_12", ann_id="12", caption="A small brown dog.")
    np.testing.assert_array_equal(image.mask("12"), DOG)
    assert (pairs[1][0].height, pairs[1][0].width) == (3, 4)
    flat = write(tmp_path / "flat.json", [r for regions in DAM.values() for r in regions])
    assert [s.sample_id for s in open_source("region_caption", annotations=str(flat)).samples()] == ["1_11", "1_12", "2_21"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["1"][1].update(mask_rle=encode_rle(np.ones((5, 8), bool))), r"\['1'\]\[1\] \(ann_id 12\): mask size \[5, 8\] differs"),
        (lambda d: d["1"][0]["mask_rle"].update(counts="0"), r"\['1'\]\[0\] \(ann_id 11\): field 'mask_rle'"),
        (lambda d: d["1"][0].update(mask_rle=encode_rle(np.zeros((6, 8), bool))), r"mask is empty"),
        (lambda d: d["2"][0].pop("caption"), r"\['2'\]\[0\] \(ann_id 21\): missing field 'caption'"),
        (lambda d: d["2"][0].update(img_id=3), r"img_id 3 differs from the image key '2'"),
    ],
)
def test_dam_bad_regions(tmp_path, mutate, message):
    doc = json.loads(json.dumps(DAM))
    mutate(doc)
    with pytest.raises(RecordError, match=message):
        list(read_region_captions(write(tmp_path / "annotations.json", doc)))


def test_dam_writer_round_trip_with_questions(tmp_path):
    image = synthetic_image()
    samples = [RegionCaptionSample(source="s", image_id="4", sample_id="4_1", ann_id="1", caption="A man."),
               RegionCaptionSample(source="s", image_id="4", sample_id="4_1_1", ann_id="1", caption="Red.",
                                   question="What colour is the coat?"),
               RegionCaptionSample(source="s", image_id="4", sample_id="custom", ann_id="3", caption="A dog.")]
    path = write_region_captions(tmp_path / "annotations.json", samples, [image], relative_to=tmp_path)
    regions = json.loads(path.read_text())["4"]
    assert [("sample_id" in r, r.get("question")) for r in regions] == [(False, None), (False, "What colour is the coat?"), (True, None)]
    ((back_image, back),) = read_region_captions(path, source="s")
    assert back == samples
    np.testing.assert_array_equal(back_image.mask("3"), DOG2)
