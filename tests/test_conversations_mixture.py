"""Mixture configs: every shipped YAML loads; entries, tasks, repeats, subsets, distractors, crop requests."""

from pathlib import Path

import pytest

from samtok.core.config import ConfigError, repo_root
from samtok.data.conversations import TurnGroup, needs_crop, sample_task
from samtok.data.mixture import (
    MixtureConfig,
    MixtureEntry,
    crop_requests,
    load_mixture,
    load_mixture_config,
    merge_records,
)
from samtok.data.records import ImageRecord, InstanceSegSample, MaskAnn, RecordError

SHIPPED = sorted((repo_root() / "configs" / "data").glob("*.yaml"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from samtok.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=str(out), num_images=8, seed=0, progress=False))
    return out


def entry(root, name, tasks=(), repeat=1.0, split="train", kind="synthetic", **kw):
    args = {"root": str(root), "split": "train"} if kind == "synthetic" else {
        "instances": str(Path(root) / "instances_train.json"), "source": "synth"}
    return MixtureEntry(name=name, kind=kind, args=args, tasks=list(tasks), repeat=repeat, split=split, **kw)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_mixture_yaml_loads(path):
    cfg = load_mixture_config(path)
    assert cfg.entries and all(e.name for e in cfg.entries)
    assert {e.split for e in cfg.entries} <= {"train", "val", "test"}


def test_the_synthetic_mixture_covers_the_main_tasks():
    cfg = load_mixture_config(repo_root() / "configs" / "data" / "synth_mixture.yaml")
    train_tasks = {t for e in cfg.entries if e.split == "train" for t in e.tasks}
    assert {"res", "gres", "region_caption", "gcg", "mr_seg", "scene_graph", "ov_seg", "region_vqa"} <= train_tasks
    assert any(e.split == "val" for e in cfg.entries) and any(e.split == "test" for e in cfg.entries)


def test_unknown_keys_tasks_and_duplicate_names_are_errors(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("entries: [{name: a, kind: synthetic, args: {root: x}, taks: [res]}]\n")
    with pytest.raises(ConfigError, match="taks"):
        load_mixture_config(bad)
    with pytest.raises(ConfigError, match="unknown task"):
        MixtureConfig(entries=[MixtureEntry(name="a", tasks=["segment"])]).validate()
    with pytest.raises(ConfigError, match="unique"):
        MixtureConfig(entries=[MixtureEntry(name="a"), MixtureEntry(name="a")]).validate()
    with pytest.raises(ConfigError, match="unknown kind"):
        MixtureConfig(entries=[MixtureEntry(name="a", kind="imagenet")]).validate()


def test_load_mixture_filters_tasks_and_applies_repeats(synth):
    cfg = MixtureConfig(entries=[entry(synth, "res", ["res"], 2.0), entry(synth, "gcg", ["gcg"], 0.5),
                                 entry(synth, "all", [], 1.0, split="val")])
    data = load_mixture(cfg)
    res = [s for n, s in data.items(["train"]) if n == "res"]
    gcg = [s for n, s in data.items(["train"]) if n == "gcg"]
    assert {sample_task(s) for s in res} == {"res"} and {sample_task(s) for s in gcg} == {"gcg"}
    assert len(res) == 2 * len(data.entries[0].samples) and len(gcg) == round(0.5 * len(data.entries[1].samples))
    assert data.items(["train"]) == load_mixture(cfg).items(["train"])  # seeded
    assert {sample_task(s) for _, s in data.items(["val"])} >= {"res", "gres", "gcg", "region_caption", "mr_seg"}
    assert len(data.images()) == 8  # one record per image, shared by the entries


def test_turns_per_image_groups_an_images_requests_before_the_repeat(synth):
    cfg = MixtureConfig(entries=[entry(synth, "res", ["res"], 2.0, turns_per_image=2)])
    data = load_mixture(cfg)
    samples = data.entries[0].samples
    units = [s for _, s in data.items(["train"])]
    assert len(units) == 2 * len({(s.source, s.image_id) for s in samples})  # 2 requests per image, repeated twice
    assert all(isinstance(u, TurnGroup) and len(u.samples) == 2 and len({x.image_id for x in u.samples}) == 1
               for u in units)
    assert sorted(x.sample_id for u in units[: len(units) // 2] for x in u.samples) == sorted(s.sample_id for s in samples)
    assert {sample_task(u) for u in units} == {"res"}
    with pytest.raises(ConfigError, match="turns_per_image"):
        MixtureConfig(entries=[entry(synth, "a", ["res"], split="val", turns_per_image=2)]).validate()
    with pytest.raises(ConfigError, match="turns_per_image"):
        MixtureConfig(entries=[entry(synth, "a", ["res", "gcg"], turns_per_image=2)]).validate()
    with pytest.raises(ConfigError, match="turns_per_image"):
        MixtureConfig(entries=[entry(synth, "a", ["res"], turns_per_image=0)]).validate()


def test_max_samples_and_ov_distractors(synth):
    cfg = MixtureConfig(entries=[entry(synth, "ov", ["ov_seg"], kind="coco"), entry(synth, "reg", ["region_caption"],
                                                                                     max_samples=5)])
    cfg.conversation.ov_distractors = 2
    data = load_mixture(cfg)
    ov = data.entries[0].samples
    assert ov and all(isinstance(s, InstanceSegSample) for s in ov)
    for s in ov:
        absent = [c for c in s.categories if not s.targets.get(c)]
        present = [c for c in s.targets if s.targets[c]]
        assert len(absent) == 2 and set(present) <= set(s.categories)
    assert len(data.entries[1].samples) == 5


def test_crop_requests_list_small_regions_under_the_larger_threshold(synth):
    cfg = MixtureConfig(entries=[entry(synth, "reg", ["region_caption", "region_vqa"])])
    data = load_mixture(cfg)
    req = crop_requests(data)
    assert req
    for s in data.entries[0].samples:
        r = data.record(s)
        small = needs_crop(r.box(s.ann_id), r.width, r.height, 0.3)
        assert (s.ann_id in req.get((s.source, s.image_id), [])) == small


def test_merge_records_unites_masks_and_refuses_size_conflicts():
    a = ImageRecord("s", "1", "x.png", 10, 10, anns=[MaskAnn("1", None)])
    b = ImageRecord("s", "1", "x.png", 10, 10, anns=[MaskAnn("1", None), MaskAnn("2", None)])
    merged = merge_records([a, b])
    assert [m.ann_id for m in merged[("s", "1")].anns] == ["1", "2"] and len(a.anns) == 1
    with pytest.raises(RecordError, match="size"):
        merge_records([a, ImageRecord("s", "1", "x.png", 12, 10)])
