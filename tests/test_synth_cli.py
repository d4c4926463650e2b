"""`samtok synth` end to end: files on disk, COCO loadable, DONE last, config plumbing."""

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samtok.core.config import load_config, resolve_config_path
from samtok.data.records import InstanceSegSample
from samtok.data.synth import SplitSizes, SynthConfig, generate, generate_split, read_done
from samtok.data.synth import dataset as dataset_module

from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    rc, stdout, err = run_cli(["synth", "--out", str(out), "--num-images", "6", "--seed", "3", "--preview", "--no-progress"])
    assert rc == 0, err
    return out, json.loads(stdout)


def test_cli_writes_a_complete_set(written):
    out, printed = written
    done = read_done(out)
    assert done is not None and done["seed"] == 3
    assert {s: c["images"] for s, c in done["counts"].items()} == {"train": 6, "val": 1, "test": 1}
    assert printed["counts"] == done["counts"]
    assert done["config"]["num_images"] == 6 and done["config"]["preview"] is True
    for split, n in (("train", 6), ("val", 1), ("test", 1)):
        pngs = sorted((out / "images" / split).glob("*.png"))
        assert len(pngs) == n
        assert Image.open(pngs[0]).size == (128, 128)
    assert not list(out.rglob(".*.tmp"))  # no temporary left behind
    preview = Image.open(out / "preview.png")
    assert preview.width > 256 and preview.height > 128
    # the written config reloads into the same settings
    again = load_config(SynthConfig, out / "config.yaml")
    assert again.seed == 3 and again.num_images == 6


def test_coco_file_loads_with_one_annotation_per_object(written):
    from pycocotools.coco import COCO

    out, _ = written
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "instances_train.json"))
    mem = generate_split(SynthConfig(seed=3, num_images=6), "train")
    assert len(coco.getImgIds()) == 6
    assert len(coco.getAnnIds()) == sum(len(r.anns) for r in mem.images) == read_done(out)["counts"]["train"]["objects"]
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for rec, pix in zip(mem.images, mem.pixels):
        img = coco.loadImgs([int(rec.image_id)])[0]
        on_disk = np.asarray(Image.open(out / img["file_name"]).convert("RGB"))
        assert np.array_equal(on_disk, pix)  # PNG is lossless and the generator deterministic
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(rec.image_id)]))
        assert len(anns) == len(rec.anns)
        by_id = {str(a["id"]): a for a in anns}
        for ann in rec.anns:
            raw = by_id[ann.ann_id]
            assert names[raw["category_id"]] == ann.category
            assert np.array_equal(coco.annToMask(raw).astype(bool), ann.to_mask(rec.height, rec.width))


def test_written_split_reads_back(written):
    from samtok.data.formats.synthetic_layout import read_synthetic_split
    from samtok.data.synth.facts import SceneFacts
    from samtok.data.synth.language import evaluate, parse

    out, _ = written
    images, samples = read_synthetic_split(out, "train")
    mem = generate_split(SynthConfig(seed=3, num_images=6), "train")
    assert sorted(r.image_id for r in images) == sorted(r.image_id for r in mem.images)

    def content(s):  # everything but the sample id, which formats may renumber
        d = dataclasses.asdict(s)
        d.pop("sample_id")
        return type(s).__name__, json.dumps(d, sort_keys=True)

    want = sorted(content(s) for s in mem.samples if not isinstance(s, InstanceSegSample))
    got = sorted(content(s) for s in samples if not isinstance(s, InstanceSegSample))
    assert got == want
    # the records on disk carry everything the language needs: expressions re-evaluate to their targets
    facts = {r.image_id: SceneFacts.from_record(r) for r in images}
    referring = [s for s in samples if hasattr(s, "expression")]
    assert referring
    for s in referring:
        assert sorted(evaluate(parse(s.expression), facts[s.image_id])) == sorted(s.target_ids)


def test_config_overrides_flags_and_print_config(tmp_path):
    rc, _, err = run_cli(["synth", "--config", "synth/default", f"out_dir={tmp_path}", "num_images=2", "seed=9",
                       "--seed", "4", "--print-config"])
    assert rc == 0
    assert "seed: 4" in err and "num_images: 2" in err and str(tmp_path) in err
    assert not (tmp_path / "DONE").exists()
    rc, _, err = run_cli(["synth", "no_such_key=1", "--print-config"])
    assert rc == 2 and "unknown key" in err
    rc, _, err = run_cli(["synth", "colors=[red,mauve]", "--print-config"])
    assert rc == 2 and "colors" in err


def test_shipped_yaml_is_the_documented_default():
    path = resolve_config_path("synth/default.yaml")
    assert path == REPO / "configs" / "synth" / "default.yaml"
    assert load_config(SynthConfig, path).validate() == SynthConfig()


def test_interrupted_run_leaves_no_done(tmp_path, monkeypatch):
    cfg = SynthConfig(out_dir=str(tmp_path), num_images=2, progress=False)
    generate(cfg)
    assert read_done(tmp_path) is not None
    real = dataset_module._writer()

    def failing_writer(out_dir, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real(out_dir, split, *args)

    monkeypatch.setattr(dataset_module, "_writer", lambda: failing_writer)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg)
    assert read_done(tmp_path) is None  # the old DONE went first; no new one was written
    monkeypatch.undo()
    smaller = SynthConfig(out_dir=str(tmp_path), splits=SplitSizes(1, 1, 1), progress=False)
    generate(smaller)
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 1  # stale PNGs removed
    assert read_done(tmp_path)["counts"]["train"]["images"] == 1
