"""`samtok eval`: data-path recognition, one-benchmark runs, config runs with summary.md, the shipped config."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from samtok.core.config import ConfigError, load_config
from samtok.eval.cli import data_spec_from_cli
from samtok.eval.config import EvalConfig, check_config, conversation_config

from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from samtok.data.synth import SplitSizes, SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=str(out), seed=2, splits=SplitSizes(train=0, val=0, test=5), progress=False),
             splits=["test"])
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from samtok.mllm.models import TinyModelConfig, build_tiny, save_model_and_processor
    from samtok.tokenizer.checkpoints import save_tokenizer_dir
    from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
    from samtok.tokenizer.sam2_parts import SAM2Config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    micro = SAM2Config(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
                       trunk_global_att_blocks=[3])
    save_tokenizer_dir(SAMTokModel(TokenizerModelConfig(sam2=micro)), root / "tok")
    model, proc = build_tiny(TinyModelConfig(), corpus=["Please segment the blob in this image."])
    save_model_and_processor(model, proc, root / "sft")
    save_model_and_processor(model, proc, root / "rl")
    return root


def table_rows(section: str) -> list[str]:
    """First cells of a markdown table's body rows."""
    lines = [x for x in section.splitlines() if x.startswith("| ") and not x.startswith("|---")]
    return [x.split(" | ")[0][2:] for x in lines[1:]]


def test_data_paths_and_source_arguments_are_recognised(synth, tmp_path):
    spec = data_spec_from_cli("gres", [str(synth)], "test")
    assert (spec.kind, spec.args) == ("synthetic", {"root": str(synth), "split": "test"})
    (tmp_path / "refcoco").mkdir()
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as fh:
        pickle.dump([], fh)
    spec = data_spec_from_cli("refcoco", [str(tmp_path), "dataset=refcoco", "split_by=unc"], "testA")
    assert spec.kind == "refer" and spec.args == {"data_root": str(tmp_path), "dataset": "refcoco",
                                                  "split_by": "unc", "split": "testA"}
    (tmp_path / "val_gcg_coco_caption_gt.json").write_text("{}")
    spec = data_spec_from_cli("gcg", [str(tmp_path), "image_root=/images"], "val")
    assert spec.kind == "gcg" and spec.args["mask_gt"].endswith("val_gcg_coco_mask_gt.json")
    assert spec.args["image_root"] == "/images" and "split" not in spec.args
    spec = data_spec_from_cli("tokenizer", ["kind=sa1b", "path=/sa1b", "check_masks=false"], None)
    assert (spec.kind, spec.args) == ("sa1b", {"path": "/sa1b", "check_masks": False})
    with pytest.raises(ConfigError, match="not recognised"):
        data_spec_from_cli("gres", [str(tmp_path)], None)
    with pytest.raises(ConfigError, match="no such"):
        data_spec_from_cli("gres", [str(tmp_path / "missing")], None)


def test_one_benchmark_with_the_oracle_scores_perfectly(synth, tmp_path):
    rc, out, err = run_cli(["eval", "--benchmark", "gres", "--oracle", "--data", str(synth), "--split", "test",
                         "--out", str(tmp_path / "gres"), "runner.lightning=false", "report.num_examples=1"])
    assert rc == 0, err
    assert "gIoU: 1.0000" in out and "N-acc: 1.0000" in out
    report = json.loads((tmp_path / "gres" / "report.json").read_text())
    assert report["model"]["name"] == "oracle" and report["metrics"]["T-acc"] == 1.0


def test_one_benchmark_of_a_tokenizer(synth, dirs, tmp_path):
    rc, out, err = run_cli(["eval", "--benchmark", "tokenizer", "--tokenizer", str(dirs / "tok"), "--data", str(synth),
                         "--split", "test", "--max-samples", "2", "--out", str(tmp_path / "tok"),
                         "runner.lightning=false", "baselines.enabled=false"])
    assert rc == 0, err
    report = json.loads((tmp_path / "tok" / "report.json").read_text())
    assert report["num_samples"] == 2 and report["benchmark"] == "tokenizer" and "rMaskIoU" in report["metrics"]
    rc, _, err = run_cli(["eval", "--benchmark", "gres", "--tokenizer", str(dirs / "tok"), "--data", str(synth)])
    assert rc == 2 and "--model is required" in err


def test_config_run_compares_models_in_summary_md(synth, dirs, tmp_path):
    def bench(kind, n):
        return {"benchmark": kind, "max_samples": n, "data": {"kind": "synthetic", "args": {"root": str(synth), "split": "test"}}}

    cfg = {
        "out_dir": str(tmp_path / "eval"),
        "models": [{"name": "tokenizer", "model": None, "tokenizer": str(dirs / "tok")},
                   {"name": "sft", "model": str(dirs / "sft"), "tokenizer": str(dirs / "tok")},
                   {"name": "rl", "model": str(dirs / "rl"), "tokenizer": str(dirs / "tok")}],
        "benchmarks": [bench("gres", 3), bench("tokenizer", 2)],
        "generation": {"max_new_tokens": {"gres": 4}, "batch_size": 2},
        "runner": {"lightning": False},
        "baselines": {"enabled": False},
        "report": {"num_examples": 1},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    rc, out, err = run_cli(["eval", "--config", str(path)])
    assert rc == 0, err
    summary = (tmp_path / "eval" / "summary.md").read_text()
    sections = {part.split(" ", 1)[0]: part for part in summary.split("\n## ")[1:]}
    assert list(sections) == ["gres", "tokenizer"]  # config order
    assert table_rows(sections["gres"]) == ["sft", "rl"]
    assert table_rows(sections["tokenizer"]) == ["tokenizer"]  # one run per distinct tokenizer
    for model, b in (("sft", "gres"), ("rl", "gres"), ("tokenizer", "tokenizer")):
        assert (tmp_path / "eval" / model / b / "report.json").is_file()
    runs = json.loads((tmp_path / "eval" / "summary.json").read_text())["runs"]
    assert len(runs) == 3
    rc, _, err = run_cli(["eval", "--config", str(path), "--model", str(dirs / "sft")])
    assert rc == 2 and "need --benchmark" in err


def test_constant_answer_baselines_run_beside_models_and_score_as_defined(synth, dirs, tmp_path):
    cfg = {
        "out_dir": str(tmp_path / "eval"),
        "models": [{"name": "never", "baseline": "no_target", "tokenizer": str(dirs / "tok")}],
        "benchmarks": [{"benchmark": b, "max_samples": 6, "data": {"kind": "synthetic",
                                                                   "args": {"root": str(synth), "split": "test"}}}
                       for b in ("gres", "refcoco", "tokenizer")],
        "runner": {"lightning": False}, "baselines": {"enabled": False}, "report": {"num_examples": 1},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(cfg))
    rc, out, err = run_cli(["eval", "--config", str(path)])
    assert rc == 0, err
    runs = {r["benchmark"]: r for r in json.loads((tmp_path / "eval" / "summary.json").read_text())["runs"]}
    assert set(runs) == {"gres", "refcoco"}  # a baseline has no tokenizer benchmark
    gres, res = runs["gres"]["metrics"], runs["refcoco"]["metrics"]
    assert 0 < gres["count_no_target"] < gres["count"]
    assert gres["N-acc"] == 1.0 and gres["T-acc"] == 0.0 and gres["no_target_answers"] == gres["count"]
    assert gres["gIoU"] == pytest.approx(gres["count_no_target"] / gres["count"])
    assert res["cIoU"] == res["gIoU"] == 0.0 and res["masks_per_answer"] == 0.0
    report = json.loads((tmp_path / "eval" / "never" / "gres" / "report.json").read_text())
    assert report["model"]["baseline"] == "no_target"


@pytest.mark.parametrize("entry, message", [
    ({"name": "b", "baseline": "always_yes"}, "baseline must be one of"),
    ({"name": "b", "baseline": "majority_span"}, "needs 'pretokenized'"),
    ({"name": "b", "baseline": "no_target", "model": "runs/sft/final"}, "either 'model' or 'baseline'"),
    ({"name": "b", "model": "runs/sft/final", "pretokenized": "runs/pretok"}, "only read by 'baseline: majority_span'"),
])
def test_bad_baseline_entries_are_config_errors(entry, message):
    cfg = load_config(EvalConfig)
    cfg.models = [load_config(type(cfg.models[0]), None, [f"{k}={v}" for k, v in entry.items()])]
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_the_shipped_config_loads_and_uses_the_training_conversation():
    from samtok.data.mixture import load_mixture_config

    cfg = load_config(EvalConfig, REPO / "configs" / "eval" / "tiny.yaml")
    check_config(cfg)
    assert [m.name for m in cfg.models] == ["tokenizer", "sft", "rl", "baseline_no_target", "baseline_majority_span"]
    assert [m.baseline for m in cfg.models][3:] == ["no_target", "majority_span"]
    assert {b.benchmark for b in cfg.benchmarks} == {"refcoco", "gres", "gcg", "region_caption", "mr_seg", "tokenizer"}
    assert cfg.generation.max_new_tokens.gcg == 512 and cfg.generation.max_new_tokens.gres == 128
    assert conversation_config(cfg) == load_mixture_config(cfg.conversation_from).conversation
    rc, out, err = run_cli(["eval", "--print-config"])
    assert rc == 0 and "conversation_from: configs/data/synth_mixture.yaml" in err
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(EvalConfig, REPO / "configs" / "eval" / "tiny.yaml", ["generation.max_new_token=3"])


def test_gcg_reads_the_grandf_evaluation_layout(synth, tmp_path):
    """{split}_gcg_coco_caption_gt.json + {split}_gcg_coco_mask_gt.json (GLaMM's evaluation files), written
    from the synthetic grounded captions: the oracle must score perfectly through that layout too."""
    from samtok.core.masks import encode_rle
    from samtok.data.formats.coco import write_coco_instances
    from samtok.data.formats.registry import open_source
    from samtok.data.records import GroundedCaptionSample, ImageRecord, MaskAnn

    src = open_source("synthetic", root=str(synth), split="test")
    records = {r.image_id: r for r in src.images()}
    samples = [s for s in src.samples() if isinstance(s, GroundedCaptionSample)]
    images, captions, next_id = [], [], 1
    for s in samples:
        rec = records[s.image_id]
        phrases = sorted(s.phrases, key=lambda p: p.start)
        anns = []
        for p in phrases:
            union = np.logical_or.reduce([rec.mask(a) for a in p.ann_ids])
            anns.append(MaskAnn(ann_id=str(next_id), segmentation=encode_rle(union), category="object"))
            next_id += 1
        images.append(ImageRecord(source="grandf", image_id=rec.image_id, file_name=str(rec.path),
                                  height=rec.height, width=rec.width, anns=anns))
        captions.append({"id": len(captions) + 1, "image_id": int(rec.image_id), "caption": s.caption,
                         "labels": [s.caption[p.start:p.end] for p in phrases]})
    folder = tmp_path / "val_test"
    write_coco_instances(folder / "val_gcg_coco_mask_gt.json", images, ["object"])
    (folder / "val_gcg_coco_caption_gt.json").write_text(json.dumps(
        {"images": [{"id": int(r.image_id), "file_name": r.file_name} for r in images], "annotations": captions}))
    rc, out, err = run_cli(["eval", "--benchmark", "gcg", "--oracle", "--data", str(folder), "--split", "val",
                         "--out", str(tmp_path / "gcg"), "runner.lightning=false", "report.num_examples=1"])
    assert rc == 0, err
    report = json.loads((tmp_path / "gcg" / "report.json").read_text())
    assert report["data"]["args"]["caption_gt"].endswith("val_gcg_coco_caption_gt.json")
    assert report["num_samples"] == len(samples) > 0
    m = report["metrics"]
    assert m["AP50"] == m["mIoU"] == m["recall"] == 1.0 and m["num_gt_phrases"] == next_id - 1


def test_histogram_image_draws_tiny_bins_and_many_bins():
    """A bin of 1 beside a bin of 1,000 (bar under a pixel tall) and 400 bins (bars under 2 px wide):
    every non-empty bin is drawn, none raises (Pillow rejects inverted rectangles)."""
    from samtok.eval.report import histogram, histogram_image

    hist = histogram([0.05] + [0.95] * 1000)
    img = np.asarray(histogram_image(hist, "t", "IoU"))
    assert img.shape == (320, 520, 3)
    bg = img[5, -5]
    column = img[:, 48 + int(0.5 * (520 - 16 - 48) / 10)]  # middle of the first bin
    assert (column != bg).any(axis=1).sum() >= 2  # the 1-count bar (plus the axis) is visible
    wide = histogram(list(np.linspace(0, 1, 2000)), bins=400)
    assert np.asarray(histogram_image(wide, "t", "IoU")).shape == (320, 520, 3)
