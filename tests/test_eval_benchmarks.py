"""Benchmarks end to end on a small synthetic set: oracle plumbing, reports of tiny random models, runners."""

import json
import math
import re

import pytest
import torch

from samtok.core.errors import SamtokError
from samtok.eval.config import (
    BaselineConfig,
    BenchmarkConfig,
    DataSpec,
    EvalConfig,
    GenerationConfig,
    MaxNewTokens,
    ModelSpec,
    ReportConfig,
    RunnerConfig,
)
from samtok.eval.evaluate import EngineSpec, evaluate_benchmark
from samtok.eval.oracle import OraclePredictor, OracleTokenizer
from samtok.eval.runner import collect_results

LANGUAGE = ["refcoco", "gres", "gcg", "region_caption", "mr_seg"]
REPORT_KEYS = {"benchmark", "name", "model", "tokenizer", "data", "num_samples", "num_items", "metrics", "score",
               "generation", "timing", "runner", "figures", "config", "created"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from samtok.data.synth import SplitSizes, SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=str(out), seed=1, splits=SplitSizes(train=0, val=0, test=6), progress=False),
             splits=["test"])
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from samtok.tokenizer.checkpoints import save_tokenizer_dir
    from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
    from samtok.tokenizer.sam2_parts import SAM2Config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tok")
    micro = SAM2Config(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
                       trunk_global_att_blocks=[3])
    save_tokenizer_dir(SAMTokModel(TokenizerModelConfig(sam2=micro)), out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from samtok.mllm.models import TinyModelConfig, build_tiny, save_model_and_processor

    torch.set_num_threads(1)
    model, proc = build_tiny(TinyModelConfig(), corpus=["Please segment the red blob in this image.", "No target."])
    return save_model_and_processor(model, proc, tmp_path_factory.mktemp("model"))


def config(synth, lightning=False, **kw):
    kw.setdefault("baselines", BaselineConfig(enabled=False))
    return EvalConfig(runner=RunnerConfig(lightning=lightning, accelerator="cpu", devices="1"),
                      generation=GenerationConfig(max_new_tokens=MaxNewTokens(6, 6, 6, 6, 6), batch_size=4),
                      report=ReportConfig(num_examples=2), **kw)


def bench(synth, kind, **kw):
    return BenchmarkConfig(benchmark=kind, data=DataSpec("synthetic", {"root": str(synth), "split": "test"}), **kw)


def oracle_factory(kind):
    return (lambda device: OracleTokenizer()) if kind == "tokenizer" else (lambda device: OraclePredictor())


# ------------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("kind", LANGUAGE + ["tokenizer"])
def test_a_perfect_oracle_scores_perfectly(synth, tmp_path, kind):
    cfg = config(synth)
    report = evaluate_benchmark(cfg, bench(synth, kind), ModelSpec(name="oracle", model="(oracle)", tokenizer="(oracle)"),
                                tmp_path / kind, engine_factory=oracle_factory(kind))
    m = report["metrics"]
    assert report["num_samples"] > 0
    if kind == "gres":
        assert m["gIoU"] == m["cIoU"] == m["N-acc"] == m["T-acc"] == 1.0
        assert m["Pr@0.9"] == 1.0 and m["count"] == report["num_samples"]
        assert 0 < m["count_no_target"] < m["count"] and m["TP"] == m["count_no_target"] and m["FN"] == m["FP"] == 0
        assert m["span_exact"] == m["first_code_exact"] == 1.0
    elif kind == "refcoco":
        assert m["cIoU"] == m["gIoU"] == m["Pr@0.9"] == 1.0 and m["count"] == report["num_samples"]
        assert m["span_exact"] == m["first_code_exact"] == m["label_echo"] == 1.0
        assert m["on_an_object"] == m["right_object"] == 1.0 and 0.0 < m["right_object_chance"] < 1.0
    elif kind == "gcg":
        assert m["AP50"] == m["mIoU"] == m["recall"] == 1.0
        assert m["num_pred_masks"] == m["num_gt_masks"] > 0 and m["num_images"] == report["num_samples"]
        assert m["ROUGE-L"] == 1.0
    elif kind == "region_caption":
        assert m["ROUGE-L"] == m["METEOR (exact-match only)"] == 1.0
        assert m["BLEU-4"] == pytest.approx(1.0, abs=1e-9)  # pycocoevalcap's 1e-15 / 1e-9 smoothing
        assert m["zoomed_regions"] > 0  # small regions get the zoom-in crop with its own span
    elif kind == "mr_seg":
        rounds = [k for k in m if k.startswith("gIoU@round")]
        assert len(rounds) >= 2 and all(m[k] == 1.0 for k in rounds) and m["cIoU"] == 1.0
        assert m["count"] == report["num_items"] > report["num_samples"]
    else:
        assert m["rMaskIoU"] == m["rMaskIoU_first_code"] == 1.0 and m["count"] > report["num_samples"]
    assert report["score"]["mean"] == 1.0


def test_span_match_counts_sets_of_code_pairs_and_first_codes():
    from samtok.eval.benchmarks import ReferringBenchmark

    def result(gt, codes, num_spans=None, no_target=False):
        return {"answer_codes": gt, "codes": codes, "num_spans": len(codes) if num_spans is None else num_spans,
                "no_target_answer": no_target}

    results = [
        result([[1, 2]], [[1, 2]]),                            # exact
        result([[1, 2]], [[1, 3]]),                            # first code only
        result([[1, 2], [4, 5]], [[4, 5], [1, 2], [4, 5]]),    # same set, any order, repeats
        result([], [], no_target=True),                        # the no-target answer
        result([], [], no_target=False),                       # garbage without spans: not "No target."
        result([], [[7, 7]]),                                  # a mask where none is
        result([[1, 2]], []),                                  # no mask where one is
        result([[1, 2]], [[1, 2]], num_spans=2),               # right span plus an invalid one
    ]
    stats = ReferringBenchmark.span_match_stats(results)
    assert stats == {"span_exact": 3 / 8, "first_code_exact": 4 / 8}


def test_which_object_tells_the_referred_object_from_another_and_from_no_object(synth):
    import numpy as np

    from samtok.eval.benchmarks import make_benchmark

    b = make_benchmark(bench(synth, "refcoco"), config(synth)).load()
    k, item = next((k, it) for k, it in enumerate(b.items) if len(b.record_of(it.sample).anns) >= 2)
    record = b.record_of(item.sample)
    target = item.sample.target_ids[0]
    other = next(a.ann_id for a in record.anns if a.ann_id != target)
    r = {"index": k, "targets": [target]}
    n = len(record.anns)
    assert b.which_object(r, record.mask(target)) == (True, n)
    assert b.which_object(r, record.mask(other)) == (False, n)
    assert b.which_object(r, np.zeros((record.height, record.width), bool)) is None
    assert b.which_object(r, ~record.mask(target)) is None  # the background is no object
    hits = [(True, 2), (False, 4), None, None]
    assert b.object_choice(hits) == {"on_an_object": 0.5, "right_object": 0.5, "right_object_chance": 0.375}
    assert b.object_choice([None]) == {"on_an_object": 0.0}


def test_label_echo_counts_answers_that_repeat_the_expression():
    from samtok.eval.benchmarks import ReferringBenchmark

    def result(expression, labels, num_spans=1):
        return {"meta": {"expression": expression}, "labels": labels, "num_spans": num_spans}

    results = [
        result("the red  circle", ["The red circle"]),      # case and spaces ignored
        result("the red circle", ["the red star"]),         # the wrong noun
        result("the bar", []),                              # a span without a label
        result("the bar", [], num_spans=0),                 # no span (e.g. No target.): not counted
    ]
    assert ReferringBenchmark.label_echo(results) == {"label_echo": 1 / 3}
    assert ReferringBenchmark.label_echo([{"meta": {}, "labels": ["x"], "num_spans": 1}]) == {}


# ------------------------------------------------------------------------------------------ tiny random model
@pytest.mark.parametrize("kind", LANGUAGE + ["tokenizer"])
def test_report_of_a_tiny_random_model(synth, tokenizer_dir, model_dir, tmp_path, kind):
    from samtok.tokenizer.api import SAMTokenizer

    cfg = config(synth, baselines=BaselineConfig(enabled=kind == "tokenizer", max_masks=12, text_tokenizer=str(model_dir)))
    out = tmp_path / kind
    report = evaluate_benchmark(cfg, bench(synth, kind, max_samples=3),
                                ModelSpec(name="tiny", model=str(model_dir), tokenizer=str(tokenizer_dir)), out)
    assert REPORT_KEYS <= set(report)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["num_samples"] == report["num_samples"] == 3
    assert on_disk["tokenizer"]["fingerprint"] == SAMTokenizer.from_pretrained(tokenizer_dir).fingerprint
    expected_keys = {"refcoco": {"cIoU", "gIoU", "Pr@0.5", "count"},
                     "gres": {"gIoU", "cIoU", "N-acc", "T-acc", "N-acc_rela", "T-acc_rela", "Pr@0.7", "count"},
                     "gcg": {"AP50", "mIoU", "recall", "METEOR (exact-match only)", "CIDEr-D", "num_images"},
                     "region_caption": {"BLEU-4", "METEOR (exact-match only)", "ROUGE-L", "CIDEr-D", "count"},
                     "mr_seg": {"cIoU@round1", "gIoU@round1", "cIoU", "gIoU", "count"},
                     "tokenizer": {"rMaskIoU", "rMaskIoU_first_code", "rMaskIoU[3-10%]", "count", "codes_used@depth0"}}
    assert expected_keys[kind] <= set(report["metrics"])
    if kind == "tokenizer":
        assert report["model"]["path"] is None and report["generation"] is None
        reps = report["baselines"]["representations"]
        assert {"samtok", "samtok_first_code", "polygon@0", "rle", "grid16"} <= set(reps)
        assert reps["samtok"]["tokens_mean"] == 4 and reps["rle"]["iou_mean"] == 1.0
    else:
        assert re.fullmatch(r"[0-9a-f]{16}", report["model"]["fingerprint"])
        assert report["generation"]["max_new_tokens"] == 6 and report["generation"]["do_sample"] is False
        assert "answers_unfinished" in report["metrics"]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == report["num_items"]
    assert sorted(json.loads(x)["index"] for x in lines) == list(range(report["num_items"]))
    for name in report["figures"].values():
        assert (out / name).is_file()
    assert {"score_histogram", "best", "worst"} <= set(report["figures"])
    md = (out / "report.md").read_text()
    assert "| metric | value |" in md and "![best](best.png)" in md
    assert report["timing"]["predict_seconds"] > 0 and report["config"]["benchmark"]["benchmark"] == kind


# ------------------------------------------------------------------------------------------ runners
def test_lightning_predict_loop_gives_the_plain_loop_results(synth, tmp_path):
    model = ModelSpec(name="oracle", model="(oracle)", tokenizer="(oracle)")
    plain = evaluate_benchmark(config(synth), bench(synth, "gres"), model, tmp_path / "plain",
                               engine_factory=oracle_factory("gres"))
    lit = evaluate_benchmark(config(synth, lightning=True), bench(synth, "gres"), model, tmp_path / "lightning",
                             engine_factory=oracle_factory("gres"))
    assert lit["metrics"] == plain["metrics"] and lit["num_items"] == plain["num_items"]
    assert not (tmp_path / "lightning" / ".predict_parts").exists()


def test_results_are_merged_by_index_and_each_counted_once():
    parts = [[{"index": 2}, {"index": 0}], [{"index": 1}]]
    assert [r["index"] for r in collect_results(parts, 3)] == [0, 1, 2]
    with pytest.raises(SamtokError, match="twice"):
        collect_results([[{"index": 0}], [{"index": 0}, {"index": 1}]], 2)
    with pytest.raises(SamtokError, match="missing"):
        collect_results([[{"index": 0}]], 2)
    with pytest.raises(SamtokError, match="unknown"):
        collect_results([[{"index": 0}, {"index": 5}]], 1)


@pytest.mark.slow
def test_two_processes_split_the_items_and_count_each_once(synth, tokenizer_dir, tmp_path):
    """ddp_spawn on two CPU processes (gloo): the merged report equals the one-process report."""
    model = ModelSpec(name="tok", tokenizer=str(tokenizer_dir))
    factory = EngineSpec(model=None, tokenizer=str(tokenizer_dir))
    one = evaluate_benchmark(config(synth), bench(synth, "tokenizer"), model, tmp_path / "one", engine_factory=factory)
    cfg = config(synth)
    cfg.runner = RunnerConfig(lightning=True, accelerator="cpu", devices="2", strategy="ddp_spawn")
    cfg.generation.batch_size = 2  # 6 images: 3 per rank, in batches of 2 and 1
    two = evaluate_benchmark(cfg, bench(synth, "tokenizer"), model, tmp_path / "two", engine_factory=factory)
    assert two["num_items"] == one["num_items"] == 6
    assert two["metrics"]["count"] == one["metrics"]["count"]
    for k, v in one["metrics"].items():
        assert (math.isnan(v) and math.isnan(two["metrics"][k])) or two["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_engine_spec_loads_the_predictor_or_only_the_tokenizer(tokenizer_dir, model_dir):
    from samtok.mllm.inference import SamtokPredictor
    from samtok.tokenizer.api import SAMTokenizer

    assert isinstance(EngineSpec(None, str(tokenizer_dir))(torch.device("cpu")), SAMTokenizer)
    pred = EngineSpec(str(model_dir), str(tokenizer_dir), batch_size=3, max_masks=2)(torch.device("cpu"))
    assert isinstance(pred, SamtokPredictor) and pred.batch_size == 3 and pred.max_masks == 2
    assert next(pred.model.parameters()).dtype == torch.float32


def test_prompts_are_the_training_prompts(synth, tmp_path):
    """The first referring template (the release's evaluation prompt) and the answer format of
    samtok.data.conversations: the oracle's GT answer is what a trained model is asked to write."""
    model = ModelSpec(name="oracle", model="(oracle)", tokenizer="(oracle)")
    evaluate_benchmark(config(synth), bench(synth, "gres"), model, tmp_path, engine_factory=oracle_factory("gres"))
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("<image>\nPlease segment ") and r["prompt"].endswith(" in this image.")
               for r in rows)
    answers = {r["answer"] for r in rows}
    assert "No target." in answers and any(a.startswith('```json\n[{"mask_2d": "<|mt_start|>') for a in answers)
    assert all(r["text"] == r["answer"] for r in rows)
