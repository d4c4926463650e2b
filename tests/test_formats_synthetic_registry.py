"""write_synthetic_split / read_synthetic_split round trip, and the open_source registry."""

import json

import numpy as np
import pytest

from samtok.core.config import ConfigError
from samtok.core.masks import encode_rle
from samtok.data.formats import KINDS, open_source, read_synthetic_split, synthetic_split_paths, write_synthetic_split
from samtok.data.records import (
    ConversationSample,
    GroundedCaptionSample,
    ImageRecord,
    InstanceSegSample,
    MaskAnn,
    MultiRoundSample,
    Phrase,
    RecordError,
    ReferringSample,
    RegionCaptionSample,
    Relation,
    Round,
    SceneGraphSample,
)

SHAPES = ["star", "circle", "square"]


def world(out_dir):
    """Two images with three shapes each, and samples of every task the layout holds."""
    rng = np.random.default_rng(3)
    images = []
    for i, image_id in enumerate(["100", "101"]):
        anns = []
        for k, shape in enumerate(SHAPES):
            mask = np.zeros((20, 24), bool)
            y, x = rng.integers(0, 12), 8 * k
            mask[y:y + 6, x:x + 6] = rng.random((6, 6)) < 0.8
            mask[y + 3, x + 3] = True
            anns.append(MaskAnn(ann_id=str(10 * (i + 1) + k), segmentation=encode_rle(mask), category=shape,
                                bbox=None, area=None,
                                attributes={"shape": shape, "color": ["red", "blue"][i], "size": "large"}))
        images.append(ImageRecord(source="synth", image_id=image_id, file_name=f"images/val/{image_id}.png",
                                  height=20, width=24, image_root=str(out_dir), anns=anns))
    s = "synth"
    samples = [
        ReferringSample(s, "100", "1", expression="the red star", target_ids=["10"]),
        ReferringSample(s, "100", "2", expression="a red star", target_ids=["10"]),
        ReferringSample(s, "101", "3", expression="the blue square", target_ids=["22"]),
        ReferringSample(s, "100", "4", expression="all red shapes", target_ids=["10", "11", "12"], generalized=True),
        ReferringSample(s, "101", "5", expression="the green hexagon", target_ids=[], generalized=True),
        GroundedCaptionSample(s, "100", "6", caption="A red star beside a red circle.",
                              phrases=[Phrase(0, 10, ["10"]), Phrase(18, 30, ["11"])]),
        RegionCaptionSample(s, "101", "7", ann_id="21", caption="A large blue circle."),
        RegionCaptionSample(s, "101", "8", ann_id="21", caption="Blue.", question="What colour is it?"),
        MultiRoundSample(s, "100", "9", rounds=[Round("Segment the star.", ["10"], answer_label="star"),
                                                 Round("Segment the shape right of <region0>.", ["11"], ["10"])]),
        SceneGraphSample(s, "101", "101", relations=[Relation("20", "left of", "21"), Relation("21", "left of", "22")],
                         labels={"20": "star", "21": "circle", "22": "square"}),
        InstanceSegSample(s, "100", "100_ov0", categories=["hexagon", "circle", "star", "square"],
                          targets={"circle": ["11"], "square": ["12"], "star": ["10"]}),
    ]
    return images, samples


def key(sample):
    return type(sample).__name__, sample.sample_id


def test_synthetic_round_trip_through_the_real_readers(tmp_path):
    images, samples = world(tmp_path)
    paths = write_synthetic_split(tmp_path, "val", images, samples, SHAPES)
    assert {k: p.name for k, p in paths.items()} == {
        "coco": "instances_val.json", "refer": "refs(synth)_val.p", "grefcoco": "grefs(synth)_val.json",
        "gcg": "gcg_val.json", "region_caption": "region_captions_val.json", "multiround": "multiround_val.json",
        "scene_graph": "scene_graphs_val.json"}
    back_images, back_samples = read_synthetic_split(tmp_path, "val")
    assert sorted(back_samples, key=key) == sorted(samples, key=key)
    assert len(back_images) == 2
    for original, back in zip(images, back_images):
        assert (back.image_id, back.file_name, back.path, back.height, back.width) == (
            original.image_id, original.file_name, original.path, 20, 24)
        for a, b in zip(original.anns, back.anns):
            assert (b.ann_id, b.category, b.attributes, b.segmentation) == (a.ann_id, a.category, a.attributes, a.segmentation)
            np.testing.assert_array_equal(back.mask(b.ann_id), original.mask(a.ann_id))
            assert b.area == float(original.mask(a.ann_id).sum())
    doc = json.loads(paths["coco"].read_text())
    assert [c["name"] for c in doc["categories"]] == SHAPES + ["hexagon"]
    assert (doc["images"][0]["neg_category_ids"], doc["images"][0]["ov_seg"]) == ([4], [{"sample_id": "100_ov0", "category_ids": [4, 2, 1, 3]}])
    assert "ov_seg" not in doc["images"][1]
    assert doc["annotations"][0]["attributes"] == {"shape": "star", "color": "red", "size": "large"}
    via_registry = open_source("synthetic", root=str(tmp_path), split="val")
    assert sorted(via_registry.samples(), key=key) == sorted(samples, key=key)


def test_synthetic_split_with_conversations_and_stale_files(tmp_path):
    images, samples = world(tmp_path)
    chat = ConversationSample("synth", "100", "c1", messages=[{"role": "user", "content": "<image>Hi"},
                                                              {"role": "assistant", "content": "Hello"}])
    paths = write_synthetic_split(tmp_path, "train", images, samples + [chat], SHAPES)
    assert paths["conversation"].name == "conversations_train.json"
    assert chat in read_synthetic_split(tmp_path, "train")[1]
    write_synthetic_split(tmp_path, "train", images, samples, SHAPES)
    assert not synthetic_split_paths(tmp_path, "train")["conversation"].exists()


def test_synthetic_writer_refuses_what_the_layouts_cannot_hold(tmp_path):
    images, samples = world(tmp_path)
    partial = InstanceSegSample("synth", "100", "x", categories=["star", "circle"], targets={"star": ["10"]})
    with pytest.raises(RecordError, match="InstanceSegSample x: targets .* are not all the masks of the asked categories"):
        write_synthetic_split(tmp_path, "train", images, samples + [partial], SHAPES)
    bad = ReferringSample("synth", "100", "y", expression="two", target_ids=["10", "11"])
    with pytest.raises(RecordError, match="exactly one target"):
        write_synthetic_split(tmp_path, "train", images, [bad], SHAPES)


def test_read_synthetic_split_checks_masks_exist(tmp_path):
    images, samples = world(tmp_path)
    write_synthetic_split(tmp_path, "val", images, samples, SHAPES)
    doc = json.loads((tmp_path / "instances_val.json").read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["id"] != 21]
    (tmp_path / "instances_val.json").write_text(json.dumps(doc))
    with pytest.raises(RecordError, match=r"masks \['21'\] are not masks of image synth/101"):
        read_synthetic_split(tmp_path, "val")


def test_registry_errors():
    assert set(KINDS) == {"coco", "sa1b", "refer", "grefcoco", "gcg", "region_caption", "multiround", "scene_graph",
                          "conversation", "synthetic"}
    with pytest.raises(ConfigError, match="unknown data format kind 'voc'"):
        open_source("voc")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['instance'\]; accepted: \['instances', 'source'"):
        open_source("coco", instance="x.json")
    with pytest.raises(ConfigError, match=r"missing option\(s\) \['psg'\]"):
        open_source("scene_graph")
    with pytest.raises(ConfigError, match="give data_root, or both refs and instances"):
        open_source("refer", split="val")
    with pytest.raises(ConfigError, match="either annotations, or caption_gt and mask_gt"):
        open_source("gcg", annotations="a.json", caption_gt="b.json", mask_gt="c.json")
