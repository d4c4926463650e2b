"""The ``rl`` recipe: SFT model → evaluate (before) → GRPO → save ``final/`` → evaluate (after) → summary.

    cfg = load_config(GRPOConfig, "configs/rl/tiny.yaml")
    summary = train_rl(cfg)        # runs/rl/final/ (+ DONE), runs/rl/summary.json

``runs/rl/final/`` is a plain Hugging Face model + processor directory (LoRA merged) with
``samtok.json`` naming the mask tokenizer, like ``runs/sft/final/``; ``samtok chat`` / ``samtok
eval`` load it directly. ``summary.json`` holds ``before`` and ``after`` metrics (gIoU, cIoU,
N-acc, T-acc and the mean reward of greedy answers, plus every metric of every evaluation
benchmark as ``<benchmark>/<metric>``) and training statistics.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from samtok.core.errors import SamtokError
from samtok.core.runtime import get_logger, seed_everything
from samtok.rl.config import GRPOConfig, check_grpo_config, loss_config, reference_kind

log = get_logger("samtok.rl.train_rl")

HEADLINE = ("gIoU", "cIoU", "N-acc", "T-acc", "mean_reward")


def _global_rank() -> int:
    """This process's global rank before any Trainer exists (from the launcher's environment)."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


# ------------------------------------------------------------------------------------------ pieces


def sampling_config(cfg: GRPOConfig):
    from samtok.mllm.generation import SamplingConfig

    s = cfg.sampling
    return SamplingConfig(max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k, repetition_penalty=s.repetition_penalty)


def completions_per_step(cfg: GRPOConfig) -> int:
    """Completions per device per batch (prompts × G)."""
    return cfg.grpo.prompts_per_step * cfg.loss.num_generations


def micro_batches_per_step(cfg: GRPOConfig) -> int:
    n = completions_per_step(cfg)
    size = cfg.grpo.micro_batch_size or n
    return math.ceil(n / size)


def build_strategy(cfg: GRPOConfig) -> Any:
    """The Lightning strategy of ``cfg.trainer``. DeepSpeed: micro-batch = ``grpo.micro_batch_size``
    completions, and its engine accumulates the micro-batches of one optimiser step
    (``engine_accumulation`` of :func:`samtok.core.trainer.deepspeed_strategy_class`, while the
    Trainer itself keeps ``accumulate_grad_batches=1`` as manual optimisation requires)."""
    from samtok.core.trainer import build_strategy as core_strategy

    micro = cfg.grpo.micro_batch_size or completions_per_step(cfg)
    if cfg.trainer.strategy == "deepspeed":
        return core_strategy(replace(cfg.trainer, accumulate_grad_batches=micro_batches_per_step(cfg)), micro)
    return core_strategy(cfg.trainer, micro)


def load_policy(cfg: GRPOConfig):
    """(policy, processor, reference, description): the model of ``model_dir`` prepared for GRPO.

    The reference (``loss.beta > 0`` only) is built from the untouched starting model, before LoRA.
    """
    from samtok.mllm.models import load_model_and_processor
    from samtok.mllm.sft import prepare_model_for_training
    from samtok.mllm.vocab import mask_vocabulary_status
    from samtok.rl.algorithm import ReferencePolicy, disable_dropout

    m = cfg.model
    model, processor = load_model_and_processor(cfg.model_dir, dtype=m.dtype, attn_implementation=m.attn_implementation,
                                                min_pixels=m.min_pixels, max_pixels=m.max_pixels)
    if mask_vocabulary_status(processor.tokenizer) is None:
        raise SamtokError(f"{cfg.model_dir}: the tokenizer has no mask words; GRPO starts from a QwenVL-SAMTok "
                          "model (the SFT result)")
    kind = reference_kind(cfg)
    reference = ReferencePolicy.build(kind, model)
    model = prepare_model_for_training(model, cfg.lora, m.freeze_vision, m.gradient_checkpointing)
    if cfg.grpo.disable_dropout:
        disable_dropout(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    desc = (f"{cfg.model_dir}: {total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable "
            f"({'LoRA r=%d' % cfg.lora.r if cfg.lora.enabled else 'full fine-tuning'}), reference: {kind or 'none (beta=0)'}")
    return model, processor, reference, desc


def textual_reward_spec(spec):
    """``spec`` without the decoded-mask IoU component (what evaluations score greedy answers with;
    answer matching alone when IoU was the only component)."""
    from dataclasses import replace

    from samtok.rl.rewards import COMPONENTS

    if spec.weights.iou == 0.0:
        return spec
    weights = replace(spec.weights, iou=0.0)
    if not any(getattr(weights, k) for k in COMPONENTS):
        weights = replace(weights, answer_matching=1.0)
    return replace(spec, weights=weights)


def build_module(cfg: GRPOConfig, model, processor, reference, reward_fn=None, tokenizer_dir=None):
    """The :class:`GRPOLightningModule` of ``cfg`` around a prepared policy."""
    from samtok.data.mixture import load_mixture_config
    from samtok.rl.algorithm import GRPOAlgorithm
    from samtok.rl.lightning import GRPOLightningModule
    from samtok.rl.rewards import build_reward_fn

    decode = None
    if reward_fn is None and cfg.reward.weights.iou != 0.0:
        from samtok.rl.mask_decode import TokenizerMaskDecoder
        from samtok.tokenizer.api import SAMTokenizer

        if tokenizer_dir is None:
            raise SamtokError("the iou reward needs the mask tokenizer directory")
        device = next(model.parameters()).device
        decode = TokenizerMaskDecoder(SAMTokenizer.from_pretrained(tokenizer_dir, device=device))
    reward_fn = reward_fn or build_reward_fn(cfg.reward, decode=decode, tokenizer=processor.tokenizer)
    no_target = load_mixture_config(cfg.data.mixture).conversation.no_target_answer
    algo = GRPOAlgorithm(model, processor, reward_fn, loss_config(cfg), sampling_config(cfg),
                         num_iterations=cfg.grpo.num_iterations, micro_batch_size=cfg.grpo.micro_batch_size,
                         generation_batch_size=cfg.grpo.generation_batch_size, reference=reference,
                         no_target_answer=no_target)
    return GRPOLightningModule(algo, cfg.optim, total_steps=cfg.trainer.max_steps,
                               gradient_clip_val=cfg.trainer.gradient_clip_val,
                               log_completions_every_n_steps=cfg.grpo.log_completions_every_n_steps,
                               num_logged_completions=cfg.grpo.num_logged_completions)


def build_datamodule(cfg: GRPOConfig, processor, tokenizer_dir):
    from samtok.data.datamodule import RLDataModule

    return RLDataModule(cfg.data.mixture, cfg.data.pretokenized, processor, batch_size=cfg.grpo.prompts_per_step,
                        num_workers=cfg.trainer.num_workers, seed=cfg.trainer.seed, tasks=cfg.data.tasks,
                        split=cfg.data.split, tokenizer=str(tokenizer_dir), max_prompt_length=cfg.data.max_prompt_length)


# ------------------------------------------------------------------------------------------ evaluation


def _eval_config(cfg: GRPOConfig, name: str, model_dir: Path, tokenizer_dir: Path, out_dir: Path):
    from samtok.eval.config import BaselineConfig, EvalConfig, ModelSpec, ReportConfig, RunnerConfig

    accelerator = cfg.trainer.accelerator if cfg.trainer.accelerator in ("auto", "cpu", "gpu") else "auto"
    return EvalConfig(
        out_dir=str(out_dir), models=[ModelSpec(name=name, model=str(model_dir), tokenizer=str(tokenizer_dir))],
        benchmarks=list(cfg.eval.benchmarks), generation=cfg.eval.generation,
        runner=RunnerConfig(lightning=False, accelerator=accelerator, devices="1", dtype=cfg.eval.dtype,
                            attn_implementation=cfg.model.attn_implementation, threads=cfg.trainer.threads),
        baselines=BaselineConfig(enabled=False),
        report=ReportConfig(num_examples=cfg.eval.num_examples, save_predictions=True),
        conversation_from=cfg.eval.conversation_from or cfg.data.mixture, seed=cfg.trainer.seed)


def _number(value: Any) -> Optional[float]:
    """A metric as float; undefined ones (NaN, written as null in report.json) as None."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _greedy_rewards(reward_fn, predictions: Path) -> Optional[float]:
    texts, answers = [], []
    with open(predictions) as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                texts.append(r.get("text") or "")
                answers.append(r.get("answer") or "")
    if not texts:
        return None
    values = [v for v in reward_fn(texts, ground_truth=answers) if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def evaluate_model(cfg: GRPOConfig, name: str, model_dir: str | Path, tokenizer_dir: str | Path,
                   out_dir: str | Path, reward_fn, reuse: bool = False) -> dict[str, Any]:
    """Every ``eval.benchmarks`` entry for the model in ``model_dir``; flat metrics.

    Keys: ``<benchmark>/<metric>`` for every numeric metric (and ``<benchmark>/mean_reward``, the
    mean reward of the greedy answers); the first gres benchmark's gIoU / cIoU / N-acc / T-acc and
    the mean reward over all items also without prefix. Undefined metrics (e.g. N-acc without a
    no-target sample) are ``None``. ``reuse``: keep a report already written
    for the same model (same directory fingerprint) instead of evaluating again.
    """
    from samtok.eval.evaluate import evaluate_benchmark
    from samtok.eval.report import dir_fingerprint

    ecfg = _eval_config(cfg, name, Path(model_dir), Path(tokenizer_dir), Path(out_dir))
    fingerprint = dir_fingerprint(str(model_dir))
    flat: dict[str, Any] = {}
    rewards_all: list[tuple[float, int]] = []
    for bench in ecfg.benchmarks:
        bdir = Path(out_dir) / bench.title
        report_path = bdir / "report.json"
        report = None
        if reuse and report_path.is_file() and (bdir / "predictions.jsonl").is_file():
            old = json.loads(report_path.read_text())
            if old.get("model", {}).get("fingerprint") == fingerprint:
                report = old
                log.info("%s / %s: reusing %s", name, bench.title, report_path)
        if report is None:
            report = evaluate_benchmark(ecfg, bench, ecfg.models[0], bdir)
        metrics = {k: _number(v) for k, v in report["metrics"].items()
                   if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
        for key, value in metrics.items():
            flat[f"{bench.title}/{key}"] = value
        mean_reward = _greedy_rewards(reward_fn, bdir / "predictions.jsonl")
        if mean_reward is not None:
            flat[f"{bench.title}/mean_reward"] = mean_reward
            rewards_all.append((mean_reward, int(report.get("num_items", 0))))
        if bench.benchmark == "gres" and "gIoU" not in flat:
            for key in ("gIoU", "cIoU", "N-acc", "T-acc"):
                if key in metrics:
                    flat[key] = metrics[key]
    if rewards_all:
        total = sum(n for _, n in rewards_all)
        flat["mean_reward"] = (sum(r * n for r, n in rewards_all) / total) if total else rewards_all[0][0]
    return flat


SHOWN = ("AP50", "mIoU", "recall", "mean_reward", "no_target_answers", "masks_per_answer", "tokens_per_answer")
"""Per-benchmark metrics printed below the headline (every metric is in summary.json)."""


def comparison_table(before: dict, after: dict, everything: bool = False) -> str:
    """``metric  before  after  change`` lines: the headline metrics, then a few per benchmark
    (``everything``: all of them)."""
    keys = [k for k in HEADLINE if k in before or k in after]
    rest = sorted(k for k in set(before) | set(after) if k not in keys)
    keys += [k for k in rest if everything or ("/" in k and k.split("/", 1)[1] in SHOWN)]
    width = max([len("metric")] + [len(k) for k in keys])
    lines = [f"{'metric'.ljust(width)}  {'before':>9}  {'after':>9}  {'change':>9}"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        fmt = lambda v: f"{v:9.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>9}"  # noqa: E731
        change = f"{a - b:+9.4f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else f"{'-':>9}"
        lines.append(f"{k.ljust(width)}  {fmt(b)}  {fmt(a)}  {change}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ recipe


def _training_summary(history: list[dict[str, float]], window: int = 10) -> dict[str, float]:
    out: dict[str, float] = {"batches": float(len(history))}
    rewards = [h["reward/mean"] for h in history if "reward/mean" in h]
    if rewards:
        w = max(1, min(window, len(rewards) // 2 or 1))
        out["reward_first"] = sum(rewards[:w]) / w
        out["reward_last"] = sum(rewards[-w:]) / w
    for key in ("kl", "completion/length_mean", "completion/no_target_fraction"):
        vals = [h[key] for h in history[-window:] if key in h]
        if vals:
            out[key.replace("/", "_")] = sum(vals) / len(vals)
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def train_rl(cfg: GRPOConfig) -> dict:
    """Run the whole stage (see the module docstring); returns the summary (on global rank 0)."""
    from samtok.core.callbacks import StepProgress
    from samtok.core.trainer import build_trainer, resume_checkpoint
    from samtok.data.datamodule import TRAINER_KWARGS
    from samtok.mllm.export import mask_tokenizer_for, save_trained_model
    from samtok.rl.rewards import build_reward_fn

    check_grpo_config(cfg)
    if not (Path(cfg.model_dir) / "config.json").is_file():
        raise SamtokError(f"model_dir {cfg.model_dir} is not a model directory (no config.json); run `make sft` "
                          "first or point model_dir at a QwenVL-SAMTok model")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed)
    if cfg.trainer.threads > 0:
        import torch

        torch.set_num_threads(cfg.trainer.threads)
    t0 = time.time()
    tokenizer_dir = mask_tokenizer_for(cfg.model_dir, cfg.mask_tokenizer)
    eval_reward = build_reward_fn(textual_reward_spec(cfg.reward))
    rank0 = _global_rank() == 0
    before: dict[str, Any] = {}
    if cfg.eval.enabled and rank0:
        log.info("evaluating the starting model %s", cfg.model_dir)
        before = evaluate_model(cfg, "before", cfg.model_dir, tokenizer_dir, out / "eval" / "before", eval_reward,
                                reuse=True)
    t_before = time.time()

    model, processor, reference, desc = load_policy(cfg)
    log.info("policy %s", desc)
    module = build_module(cfg, model, processor, reference, tokenizer_dir=tokenizer_dir)
    dm = build_datamodule(cfg, processor, tokenizer_dir)
    callbacks = ([StepProgress(cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else None, "rl", ("train/reward",))]
                 if cfg.progress_bar else [])
    trainer = build_trainer(cfg.trainer, out, per_device_batch=completions_per_step(cfg), batch_unit="completions",
                            callbacks=callbacks, strategy=build_strategy(cfg), accumulate_grad_batches=1,
                            gradient_clip_val=None, limit_val_batches=0, val_check_interval=None,
                            **TRAINER_KWARGS)
    # manual optimisation: a checkpoint holds the state after the optimiser step, which is what resuming needs
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    ckpt = resume_checkpoint(out, cfg.resume)
    if ckpt:
        log.info("resuming from %s", ckpt)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    t_train = time.time()
    if not trainer.is_global_zero:
        return {}
    final = out / "final"
    info = {"stage": "rl", "recipe": "samtok rl", "steps": trainer.global_step,
            "minutes": round((t_train - t_before) / 60, 2), "data": cfg.data.mixture,
            "base_model": str(cfg.model_dir), "lora": dict(cfg.lora.__dict__),
            "grpo": {"G": cfg.loss.num_generations, "beta": cfg.loss.beta, "loss_type": cfg.loss.loss_type,
                     "lr": cfg.optim.lr, "reward": {k: v for k, v in cfg.reward.weights.__dict__.items() if v}}}
    save_trained_model(module.model, processor, final, tokenizer_dir, info)
    after: dict[str, Any] = {}
    if cfg.eval.enabled:
        log.info("evaluating the trained model %s", final)
        after = evaluate_model(cfg, "after", final, tokenizer_dir, out / "eval" / "after", eval_reward)
    minutes = (time.time() - t0) / 60
    summary = {
        "steps": trainer.global_step, "minutes": minutes,
        "minutes_by_phase": {"eval_before": (t_before - t0) / 60, "train": (t_train - t_before) / 60,
                             "save_and_eval_after": (time.time() - t_train) / 60},
        "before": before, "after": after,
        # flat "<metric>_before / _after" pairs of the headline metrics (shown by `samtok demo`)
        "generation": {f"{k}_{when}": d[k] for k in HEADLINE for when, d in (("before", before), ("after", after))
                       if k in d},
        "train": _training_summary(module.history),
        "model_dir": str(cfg.model_dir), "final": str(final), "mask_tokenizer": str(tokenizer_dir),
    }
    _write_json(out / "summary.json", summary)
    (final / "DONE").write_text("rl\n")
    return summary
