"""`samtok sft` end to end on a tiny synthetic setup: the saved model, the summary with generation
metrics next to their baselines, the plumbing check on training examples, the printed table and
what reaches TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from llm_setup import build_llm_setup

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sft")
    paths = build_llm_setup(root, train_tasks=["res", "gres"], val_tasks=["res"])
    config = root / "sft.yaml"
    config.write_text(json.dumps({  # JSON is YAML; starts from the shipped embedded default
        "_base_": str(REPO / "configs" / "sft" / "tiny.yaml"),
        "out_dir": str(root / "run"),
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                           "vision_depth": 1, "vision_hidden_size": 32, "vision_intermediate_size": 64,
                           "bpe_vocab_size": 300}},
        "data": {"mixture": str(paths["mixture"]), "pretokenized": str(paths["pretok"]), "tokenizer": str(paths["tok"]),
                 "batch_size": 4, "val_samples": 4},
        "generation_val": {"max_samples": 3, "max_new_tokens": 24, "train_examples": 5, "every_validation": True,
                           "data": {"kind": "synthetic", "args": {"root": str(paths["synth"]), "split": "val"}}},
        "trainer": {"max_steps": 3, "max_minutes": None, "val_every_n_steps": 2, "checkpoint_every_n_steps": 0,
                    "log_every_n_steps": 1,
                    "threads": 1},
        "progress_bar": False,
    }))
    rc, out, err = run_cli(["sft", "--config", str(config)])
    return {"rc": rc, "stdout": out, "stderr": err, "run": root / "run", "paths": paths}


@pytest.mark.slow
def test_sft_writes_the_model_and_a_summary_with_baselines(run):
    assert run["rc"] == 0, run["stderr"][-3000:]
    final = run["run"] / "final"
    assert (final / "DONE").is_file() and (final / "model.safetensors").is_file()
    meta = json.loads((final / "samtok.json").read_text())
    assert Path(meta["mask_tokenizer"]) == run["paths"]["tok"].resolve()
    summary = json.loads((run["run"] / "summary.json").read_text())
    assert summary["steps"] == 3
    g = summary["generation"]
    for key in ("res/cIoU", "res/gIoU", "res/span_exact", "baseline/majority_span/res/cIoU",
                "baseline/no_target/res/gIoU"):
        assert 0.0 <= g[key] <= 1.0, key
    assert g["res/count"] == 3.0
    assert g["baseline/no_target/res/gIoU"] == 0.0  # every RES sample has a target
    t = summary["training_set"]
    assert t["train/examples"] == 5.0
    assert 0.0 <= t["train/spans_in_order_exact"] <= t["train/first_codes_in_order_exact"] <= 1.0


@pytest.mark.slow
def test_sft_prints_metrics_next_to_baselines(run):
    out = run["stdout"]
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert "majority span" in header and "No target." in header and "chance" in header
    row = next(line for line in out.splitlines() if line.startswith("teacher-forced acc_c0"))
    assert f"{1 / 256:.3f}" in row  # uniform chance over one codebook
    assert any(line.startswith("RES cIoU") for line in out.splitlines())
    assert "training set (5 examples" in out


@pytest.mark.slow
def test_sft_tensorboard_has_losses_generation_metrics_and_prediction_figures(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run["run"] / "tb").rglob("events.out.tfevents.*"))
    tags = {"scalars": set(), "images": set()}
    for f in events:
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        tags["scalars"] |= set(acc.Tags()["scalars"])
        tags["images"] |= set(acc.Tags()["images"])
    assert "train/loss" in tags["scalars"] and "generation/res/cIoU" in tags["scalars"]
    assert "generation/baseline/majority_span/res/cIoU" in tags["scalars"]  # written by the end-of-training pass only
    assert {"predictions/refcoco_best", "predictions/refcoco_worst"} <= tags["images"]


@pytest.mark.slow
def test_sft_scores_held_out_prompts_at_every_validation_for_a_curve(run):
    summary = json.loads((run["run"] / "summary.json").read_text())
    curve = summary["curve"]
    assert [p["step"] for p in curve] == [2, 3]  # the validation at step 2, then the final model
    assert 0 < curve[0]["minutes"] <= curve[1]["minutes"]
    for p in curve:
        for key in ("res/cIoU", "res/gIoU", "res/masks_per_answer"):
            assert 0.0 <= p[key] <= 1.0, key
    assert curve[1]["res/cIoU"] == summary["generation"]["res/cIoU"]
    mid = run["run"] / "curve" / "step_000002"
    assert (mid / "model" / "refcoco" / "predictions.jsonl").is_file()
    assert not (mid / "weights").exists() and not list(mid.rglob("*.safetensors"))
    assert not (mid / "baseline_majority_span").exists()  # the constant answers are scored once, at the end
    assert "held-out generation over training" in run["stdout"]


def test_the_curve_refuses_lora():
    from samtok.core.config import ConfigError
    from samtok.mllm.train_sft import GenerationCurve, SFTConfig

    cfg = SFTConfig()
    cfg.lora.enabled = True
    with pytest.raises(ConfigError, match="every_validation"):
        GenerationCurve(cfg, None, Path("."), 0.0, {})


@pytest.mark.slow
def test_sft_from_a_base_without_mask_training_gets_the_configured_mask_rows(run, tmp_path):
    # `samtok pretrain` writes a model whose mask words were never trained (no samtok.json): SFT from it
    # must give the first-code output rows the preset's geometry init and keep them frozen, exactly as
    # for a fresh tiny model; a QwenVL-SAMTok directory (samtok.json) keeps its trained rows
    from safetensors.torch import load_file

    from samtok.mllm.models import load_model_and_processor, save_model_and_processor
    from samtok.mllm.train_sft import base_has_trained_mask_words
    from samtok.mllm.vocab import code_token_ids_by_depth

    assert run["rc"] == 0, run["stderr"][-3000:]
    trained = run["run"] / "final"
    assert base_has_trained_mask_words(trained) and not base_has_trained_mask_words(tmp_path)
    model, processor = load_model_and_processor(trained)
    first, _ = code_token_ids_by_depth(processor.tokenizer)
    head = model.get_output_embeddings().weight
    geometry = head.detach()[first].clone()  # the geometry rows of the fixture's run (same data and seed)
    with torch.no_grad():
        head[first] = torch.randn_like(geometry)  # what an untrained base holds
    base = save_model_and_processor(model, processor, tmp_path / "base")
    assert not (base / "samtok.json").exists()

    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({
        "_base_": str(run["run"] / "config.yaml"), "init_from": str(base), "out_dir": str(tmp_path / "run"),
        "resume": "never", "generation_val": {"enabled": False}, "trainer": {"max_steps": 2, "val_every_n_steps": 0},
    }))
    rc, out, err = run_cli(["sft", "--config", str(config)])
    assert rc == 0, err[-3000:]
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    key = next(k for k in weights if k.endswith("lm_head.weight"))
    assert torch.allclose(weights[key][first].float(), geometry.float(), atol=1e-6)  # re-initialised and frozen
