"""`samtok rl` end to end on a tiny synthetic setup (tmp dirs), resuming, TensorBoard content,
and every shipped RL YAML (presets, mixtures) loading and building."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from samtok.core.config import ConfigError, load_config
from samtok.core.errors import SamtokError
from samtok.rl.config import GRPOConfig, check_grpo_config

from cli_helpers import run_cli
from llm_setup import build_llm_setup

REPO = Path(__file__).resolve().parents[1]
HEADLINE = ("gIoU", "cIoU", "N-acc", "T-acc", "mean_reward")




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic data, a micro mask tokenizer, a pre-tokenized table (made-up codes under the
    tokenizer's fingerprint) and a tiny "SFT" model directory recording that tokenizer."""
    from samtok.mllm.export import save_trained_model
    from samtok.mllm.models import TinyModelConfig, build_tiny

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("rl")
    paths = build_llm_setup(root, train_tasks=["gres", "gcg"], val_tasks=["gres"])
    synth, mixture = paths["synth"], paths["mixture"]
    model, proc = build_tiny(TinyModelConfig(), corpus=["Please segment the red circle in this image.", "No target."])
    save_trained_model(model, proc, root / "sft", root / "tok", {"stage": "sft", "note": "random stand-in"})
    config = root / "rl.yaml"
    config.write_text(json.dumps({  # JSON is YAML; starts from the shipped embedded default
        "_base_": str(REPO / "configs" / "rl" / "tiny.yaml"),
        "model_dir": str(root / "sft"), "out_dir": str(root / "run"),
        "data": {"mixture": str(mixture), "pretokenized": str(root / "pretok")},
        "grpo": {"prompts_per_step": 2, "micro_batch_size": 3, "log_completions_every_n_steps": 1},
        "sampling": {"max_new_tokens": 8},
        "loss": {"num_generations": 3},
        "reward": {"weights": {"answer_matching": 0.5, "partial_credit": 0.5}},  # two components, both logged
        "eval": {"benchmarks": [{"benchmark": "gres", "max_samples": 6,
                                 "data": {"kind": "synthetic", "args": {"root": str(synth), "split": "val"}}}],
                 "generation": {"batch_size": 4, "max_new_tokens": {"gres": 8}}},
        "trainer": {"max_steps": 2, "checkpoint_every_n_steps": 1, "threads": 1, "max_minutes": None},
        "progress_bar": False,
    }))
    return {"root": root, "config": config, "run": root / "run"}


@pytest.mark.slow
def test_recipe_end_to_end_writes_final_summary_and_resumes(setup):
    run = setup["run"]
    rc, out, err = run_cli(["rl", "--config", str(setup["config"])])
    assert rc == 0, err[-3000:]
    final = run / "final"
    assert (final / "DONE").is_file() and (final / "config.json").is_file()
    meta = json.loads((final / "samtok.json").read_text())
    assert meta["info"]["stage"] == "rl" and Path(meta["mask_tokenizer"]) == (setup["root"] / "tok").resolve()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    for when in ("before", "after"):
        for key in HEADLINE:  # None: undefined on these few samples (e.g. N-acc without a no-target one)
            assert key in summary[when] and isinstance(summary[when][key], (float, type(None))), (when, key)
        assert isinstance(summary[when]["gIoU"], float) and isinstance(summary[when]["mean_reward"], float)
        assert summary[when]["gres/count"] == 6.0
    assert "gIoU_before" in summary["generation"] and "mean_reward_after" in summary["generation"]
    for key in ("metric", "gIoU", "N-acc", "mean_reward"):
        assert key in out
    assert (run / "eval" / "before" / "gres" / "report.json").is_file()
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()

    # TensorBoard: the stage's scalars and sample completions
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in ("train/reward/mean", "train/reward/std", "train/reward/answer_matching/mean",
                "train/reward/partial_credit/mean", "train/reward/task_gres/mean", "train/advantage/std",
                "train/kl", "train/clip_ratio/region_mean", "train/completion/length_mean",
                "train/completion/spans_mean", "train/completion/no_target_fraction", "train/grad_norm",
                "train/loss"):
        assert tag in scalars, tag
    assert len(ea.Scalars("train/reward/mean")) == 2
    texts = ea.Tags()["tensors"]
    assert any("completions" in t for t in texts)
    sample = ea.Tensors(next(t for t in texts if "completions" in t))[0].tensor_proto.string_val[0].decode()
    assert "COMPLETION:" in sample and "REFERENCE:" in sample

    # resume: two more steps from last.ckpt; the "before" report of the same model is reused
    before_report = run / "eval" / "before" / "gres" / "report.json"
    stamp = before_report.stat().st_mtime_ns
    rc, out, err = run_cli(["rl", "--config", str(setup["config"]), "trainer.max_steps=4"])
    assert rc == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train"]["batches"] == 2.0, "resumed at step 2, two more batches"
    assert before_report.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_iou_reward_decodes_spans_with_the_mask_tokenizer(setup, tmp_path):
    """The costly alternative reward runs inside `samtok rl`: every completion's spans are decoded
    on its prompt image and scored against the decoded reference spans; evaluations keep the
    textual reward."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "iou"
    rc, out, err = run_cli(["rl", "--config", str(setup["config"]), f"out_dir={run}", "trainer.max_steps=1",
                         "reward.weights.answer_matching=0.0", "reward.weights.partial_credit=0.0",
                         "reward.weights.iou=1.0", "reward.image_column=images", "eval.enabled=false"])
    assert rc == 0, err[-3000:]
    events = sorted((run / "tb").rglob("events.out.tfevents.*"))
    values = {}
    for f in events:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values[tag] = [e.value for e in acc.Scalars(tag)]
    assert "train/reward/iou/mean" in values
    assert all(0.0 <= v <= 1.0 for v in values["train/reward/iou/mean"])


def test_tokenizer_mask_decoder_matches_decode_and_encodes_each_image_once(setup):
    from PIL import Image

    from samtok.rl.mask_decode import TokenizerMaskDecoder
    from samtok.tokenizer.api import SAMTokenizer

    tok = SAMTokenizer.from_pretrained(setup["root"] / "tok")
    paths = sorted((setup["root"] / "synth" / "images" / "train").glob("*.png"))[:2]
    images = [[Image.open(p).convert("RGB")] for p in paths]
    decoder = TokenizerMaskDecoder(tok, max_images=1)
    for codes in ((3, 260 - 256), (7, -1)):
        for imgs in images:
            mask = decoder(imgs, codes)
            expected = tok.decode(imgs[0], [list(codes)])[0].numpy()
            assert mask.dtype == bool and mask.shape == expected.shape and (mask == expected).all()
    assert decoder.images_encoded == 4  # a cache of one image: alternating images are encoded again
    decoder = TokenizerMaskDecoder(tok, max_images=4)
    for codes in ((3, 4), (5, 6), (7, 8)):
        for imgs in images:
            decoder(imgs, codes)
    assert decoder.images_encoded == 2
    with pytest.raises(SamtokError, match="has none"):
        decoder([], (3, 4))


def test_print_config_and_config_errors(setup, tmp_path):
    rc, out, err = run_cli(["rl", "--config", str(setup["config"]), "--print-config", "loss.beta=0.0"])
    assert rc == 0 and "beta: 0.0" in err and not (tmp_path / "run").exists()
    rc, _, err = run_cli(["rl", "--config", str(setup["config"]), "loss.betta=1"])
    assert rc == 2 and "unknown key" in err
    rc, _, err = run_cli(["rl", "--config", str(setup["config"]), f"model_dir={tmp_path / 'missing'}",
                       f"out_dir={tmp_path / 'run'}"])
    assert rc == 2 and "not a model directory" in err


@pytest.mark.parametrize("override, message", [
    ("trainer.accumulate_grad_batches=2", "micro_batch_size"),
    ("trainer.zero_stage=3", None),
    ("trainer.max_steps=5", "multiple"),
    ("trainer.precision=16-mixed", "bf16"),
    ("reward.weights.iou=1.0", "image_column"),
    ("reference=adapters_disabled", "adapters_disabled"),
    ("loss.num_generations=1", "num_generations"),
    ("reference=frozen", "reference"),
])
def test_settings_the_stage_cannot_run_are_refused(override, message):
    extra = ["grpo.num_iterations=2"] if "max_steps" in override else []
    if "zero_stage" in override:
        extra, message = ["trainer.strategy=deepspeed"], "ZeRO"
    cfg = load_config(GRPOConfig, REPO / "configs" / "rl" / "tiny.yaml", [override, *extra])
    with pytest.raises(ConfigError, match=message):
        check_grpo_config(cfg)


def test_every_shipped_rl_yaml_loads_and_builds():
    from samtok.core.trainer import TrainerConfig
    from samtok.data.mixture import load_mixture_config
    from samtok.rl.rewards import build_reward_fn
    from samtok.rl.train_rl import build_strategy, completions_per_step, micro_batches_per_step, sampling_config

    presets = sorted((REPO / "configs" / "rl").glob("*.yaml"))
    assert {p.name for p in presets} >= {"tiny.yaml", "gres_grpo.yaml"}
    for path in presets:
        cfg = load_config(GRPOConfig, path)
        check_grpo_config(cfg)
        decode = (lambda images, codes: None) if cfg.reward.weights.iou else None  # never called here
        build_reward_fn(cfg.reward, decode=decode)
        sampling_config(cfg)
        load_mixture_config(REPO / cfg.data.mixture)
        assert cfg.eval.benchmarks and isinstance(cfg.trainer, TrainerConfig)
    mixtures = sorted((REPO / "configs" / "rl" / "mixtures").glob("*.yaml")) + [
        REPO / "configs" / "data" / "synth_rl_mixture.yaml"]
    for path in mixtures:
        mix = load_mixture_config(path)
        tasks = {t for e in mix.entries if e.split == "train" for t in e.tasks}
        assert tasks == {"gres", "gcg"}, path

    tiny = load_config(GRPOConfig, REPO / "configs" / "rl" / "tiny.yaml")
    assert tiny.model_dir == "runs/sft/final" and tiny.data.mixture == "configs/data/synth_rl_mixture.yaml"
    assert tiny.trainer.accelerator == "cpu" and tiny.eval.benchmarks[0].data.args["split"] == "val"

    release = load_config(GRPOConfig, REPO / "configs" / "rl" / "gres_grpo.yaml")
    assert (release.loss.num_generations, release.sampling.temperature, release.loss.beta) == (8, 1.0, 0.01)
    assert (release.optim.lr, release.optim.weight_decay, release.trainer.gradient_clip_val) == (1e-6, 0.01, 1.0)
    assert release.model.freeze_vision and release.trainer.strategy == "deepspeed" and release.trainer.zero_stage == 2
    strategy = build_strategy(release)  # DeepSpeed: the micro-batches of a step accumulate in the engine
    ds = strategy.config
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == release.grpo.micro_batch_size == 8
    assert strategy.engine_accumulation == micro_batches_per_step(release) == completions_per_step(release) // 8 == 8
