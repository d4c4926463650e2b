"""Config of ``samtok rl`` (GRPO): one dataclass, every default documented in place (TRL style).

Sections (YAML keys):

* ``model_dir``, ``mask_tokenizer``, ``out_dir``, ``resume`` — where to start from and where to write;
* ``model`` (:class:`RLModelSettings`) — loading dtype, image sizes, freezing, checkpointing;
* ``lora`` (:class:`~samtok.mllm.sft.LoraSettings`) — LoRA or full fine-tuning; ``reference``;
* ``data`` (:class:`RLDataSettings`) — the prompt mixture and its pre-tokenized table;
* ``grpo`` (:class:`GRPOSettings`) — prompts per step, passes per batch, micro-batches, logging;
* ``sampling`` (:class:`RolloutSampling`) — how completions are sampled;
* ``loss`` (:class:`~samtok.rl.grpo.GRPOLossConfig`) — group size ``num_generations``, ``beta``,
  clipping, aggregation, advantage scaling;
* ``reward`` (:class:`~samtok.rl.rewards.RewardSpec`) — reward components and weights;
* ``optim`` (:class:`~samtok.mllm.sft.OptimSettings`) — AdamW and the warm-up + cosine schedule;
* ``eval`` (:class:`RLEvalSettings`) — the before/after evaluation;
* ``trainer`` (:class:`~samtok.core.trainer.TrainerConfig`) — devices, strategy (DeepSpeed ZeRO-2),
  precision, steps, gradient clipping, checkpoints.

The defaults are the settings reported around the release (spec §4) where there is one: G = 8,
temperature 1.0, k3 KL with beta 0.01, AdamW lr 1e-6, weight decay 0.01, clip 1.0, vision frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from samtok.core.config import ConfigError
from samtok.core.trainer import TrainerConfig
from samtok.eval.config import BenchmarkConfig, DataSpec, GenerationConfig
from samtok.mllm.sft import LoraSettings, OptimSettings
from samtok.rl.grpo import GRPOLossConfig
from samtok.rl.rewards import RewardSpec

REFERENCE_KINDS = ("auto", "adapters_disabled", "copy")


@dataclass
class RLModelSettings:
    r"""How the policy is loaded and what of it trains.

    Parameters:
        dtype (`str`, defaults to `"float32"`):
            Weights dtype when loading `model_dir`: `float32`, `bfloat16`, `float16` or `auto` (the
            checkpoint's). On GPU use `bfloat16` together with `trainer.precision: bf16-mixed`.
        attn_implementation (`str` or `None`, defaults to `None`):
            e.g. `flash_attention_2` on GPU; `None`: the model's default (sdpa).
        min_pixels (`int` or `None`, defaults to `None`):
            Image resize lower bound in pixels; `None`: what the model directory's processor says.
        max_pixels (`int` or `None`, defaults to `None`):
            Image resize upper bound (release SFT: 2048·28·28); `None`: the processor's.
        freeze_vision (`bool`, defaults to `True`):
            Vision tower and merger frozen (release).
        gradient_checkpointing (`bool`, defaults to `False`):
            Recompute activations in the backward pass (saves memory for long completions).
    """

    dtype: str = "float32"
    attn_implementation: Optional[str] = None
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    freeze_vision: bool = True
    gradient_checkpointing: bool = False


@dataclass
class RLDataSettings:
    r"""GRPO prompts: the ``split`` entries of a data mixture (docs/data.md), answers removed.

    Parameters:
        mixture (`str`, defaults to `"configs/data/synth_rl_mixture.yaml"`):
            A mixture YAML (:class:`samtok.data.mixture.MixtureConfig`); its `split` entries are the
            prompts, each with its reference answer (`ground_truth`) for the reward.
        pretokenized (`str`, defaults to `"runs/pretok"`):
            The `samtok pretokenize` table holding the codes of every mask of those entries; it must
            have been made with the mask tokenizer of `model_dir` (checked by fingerprint).
        split (`str`, defaults to `"train"`):
            Which entries of the mixture are the training prompts.
        tasks (`list[str]` or `None`, defaults to `None`):
            Keep only prompts of these tasks (e.g. `[gres, gcg]`); `None`: every task of the entries.
        max_prompt_length (`int` or `None`, defaults to `None`):
            Prompts longer than this many tokens (images expanded) are left out; `None`: no limit.
    """

    mixture: str = "configs/data/synth_rl_mixture.yaml"
    pretokenized: str = "runs/pretok"
    split: str = "train"
    tasks: Optional[List[str]] = None
    max_prompt_length: Optional[int] = None


@dataclass
class GRPOSettings:
    r"""The GRPO loop around the loss (what TRL spreads over several `GRPOConfig` fields).

    Parameters:
        prompts_per_step (`int`, defaults to `8`):
            Prompts per device per batch; each gets `loss.num_generations` completions, so a batch
            holds `prompts_per_step × G` completions per device (global: × devices × nodes).
        num_iterations (`int`, defaults to `1`):
            Optimiser steps taken on each generated batch (TRL's μ). With 1, the importance ratio is
            exactly 1 (old log-probs = current ones, detached); with more, the log-probs of the
            policy that sampled the batch are computed once before the first step and reused, and
            the ratio is clipped to [1 − ε_low, 1 + ε_high]. `trainer.max_steps` counts optimiser
            steps, so it must be a multiple of this.
        micro_batch_size (`int`, defaults to `0`):
            Completions per forward/backward pass; the gradients of all micro-batches of a batch are
            accumulated into one optimiser step (the loss is exactly the full-batch loss). `0`: the
            whole batch at once.
        generation_batch_size (`int`, defaults to `0`):
            Completions per `generate` call; `0`: the whole batch at once.
        disable_dropout (`bool`, defaults to `True`):
            Set every dropout probability of the policy to 0 (TRL's `disable_dropout`), so that the
            log-probs of the optimisation pass are those of the policy that sampled (generation
            always runs in eval mode).
        log_completions_every_n_steps (`int`, defaults to `50`):
            Write sample completions (prompt, completion, reference, reward) to TensorBoard every
            this many batches; `0`: never.
        num_logged_completions (`int`, defaults to `4`):
            Completions written each time.
    """

    prompts_per_step: int = 8
    num_iterations: int = 1
    micro_batch_size: int = 0
    generation_batch_size: int = 0
    disable_dropout: bool = True
    log_completions_every_n_steps: int = 50
    num_logged_completions: int = 4


@dataclass
class RolloutSampling:
    r"""How completions are sampled during training (evaluation decodes greedily, see `eval`).

    Parameters:
        max_new_tokens (`int`, defaults to `256`):
            Most tokens per completion, the stop token included (TRL's `max_completion_length`).
            Also `loss.max_completion_length` for `dr_grpo` when that is not set.
        temperature (`float`, defaults to `1.0`):
            Sampling temperature (release: 1.0); log-probs are taken at the same temperature.
        top_p (`float`, defaults to `1.0`):
            Nucleus mass; `1.0` = off.
        top_k (`int`, defaults to `0`):
            Keep the k most likely tokens; `0` = off.
        repetition_penalty (`float`, defaults to `1.0`):
            transformers' repetition penalty; `1.0` = off.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def _default_eval_benchmarks() -> list[BenchmarkConfig]:
    return [BenchmarkConfig(benchmark="gres", data=DataSpec(kind="synthetic", args={"root": "runs/synth", "split": "val"}),
                            max_samples=200)]


@dataclass
class RLEvalSettings:
    r"""The before/after evaluation: the starting model and the trained one on the same benchmarks.

    Both are evaluated from their directories (`model_dir`, then `out_dir/final`) with the
    benchmarks of `samtok eval` (greedy decoding), reports under `out_dir/eval/{before,after}/`.
    The mean reward of the greedy answers (the training reward without its decoded-mask `iou`
    component; answer matching when `iou` is the only one) is added to each benchmark's metrics. Runs on global rank 0 only; a `before` report of the same model is reused on resume.

    Parameters:
        enabled (`bool`, defaults to `True`):
            `False`: no evaluation (summary.json then has no metrics).
        benchmarks (`list[BenchmarkConfig]`, defaults to gres on `runs/synth` split `val`, 200 samples):
            Entries as in `samtok eval` configs: `benchmark` (gres, gcg, refcoco, ...), `data`
            (`kind` + `args`, the split inside `args`), `max_samples`. The first `gres` entry gives
            the headline gIoU / cIoU / N-acc / T-acc of summary.json.
        generation (`GenerationConfig`):
            Decoding of `samtok eval`: `batch_size`, per-benchmark `max_new_tokens`, `max_masks`...
        conversation_from (`str` or `None`, defaults to `None`):
            Mixture YAML whose `conversation` section makes the evaluation prompts; `None`: `data.mixture`
            (the prompts RL trained on).
        dtype (`str`, defaults to `"auto"`):
            Weights for evaluation: `auto` (float32 on CPU, the checkpoint's on GPU), `float32`, `bfloat16`.
        num_examples (`int`, defaults to `2`):
            Best and worst predictions drawn in each report.
    """

    enabled: bool = True
    benchmarks: List[BenchmarkConfig] = field(default_factory=_default_eval_benchmarks)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    conversation_from: Optional[str] = None
    dtype: str = "auto"
    num_examples: int = 2


def _rl_lora() -> LoraSettings:
    # Embeddings frozen so that the base model with adapters disabled IS the starting policy (the
    # reference needs no second copy); LoRA dropout 0 (grpo.disable_dropout zeroes it anyway).
    return LoraSettings(enabled=True, r=64, alpha=128, dropout=0.0, train_embeddings=False)


def _rl_optim() -> OptimSettings:
    return OptimSettings(lr=1e-6, weight_decay=0.01, betas=[0.9, 0.999], warmup_fraction=0.05, min_lr_ratio=0.0)


def _rl_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=1000, gradient_clip_val=1.0, log_every_n_steps=1, val_every_n_steps=0,
                         checkpoint_every_n_steps=100)


@dataclass
class GRPOConfig:
    r"""``samtok rl --config``: GRPO of a QwenVL-SAMTok model with the textual answer-matching reward.

    Parameters:
        model_dir (`str`, defaults to `"runs/sft/final"`):
            The QwenVL-SAMTok directory to start from (the SFT result: a plain Hugging Face model +
            processor with the 514 mask words, `samtok.json` naming its mask tokenizer).
        mask_tokenizer (`str` or `None`, defaults to `None`):
            The SAMTok tokenizer directory; `None`: `model_dir/mask_tokenizer/` or the one recorded in
            `model_dir/samtok.json`. Used for evaluation and to check the pre-tokenized table.
        out_dir (`str`, defaults to `"runs/rl"`):
            Run directory: `tb/` (TensorBoard), `checkpoints/last.ckpt`, `eval/`, `final/`,
            `summary.json`, `config.yaml`.
        resume (`str`, defaults to `"auto"`):
            `auto`: continue from `out_dir/checkpoints/last.ckpt` when it exists; `never`; or a path.
        model (`RLModelSettings`): loading and freezing.
        lora (`LoraSettings`, defaults to enabled, r 64, α 128, dropout 0, embeddings frozen):
            `enabled: false` trains the whole language model (vision frozen unless
            `model.freeze_vision: false`).
        reference (`str`, defaults to `"auto"`):
            The KL reference policy (only built when `loss.beta > 0`): `adapters_disabled` — the
            policy itself with its LoRA adapters switched off (no second copy; needs LoRA with
            `train_embeddings: false`, so that nothing but adapters changes); `copy` — a frozen copy
            of the starting model; `auto` — `adapters_disabled` when possible, else `copy`.
        data (`RLDataSettings`): prompts.
        grpo (`GRPOSettings`): batch, passes, micro-batches, logging.
        sampling (`RolloutSampling`): sampling of completions.
        loss (`GRPOLossConfig`, defaults: G 8, beta 0.01, ε 0.2/0.2, `grpo` aggregation, group std scaling):
            The objective (samtok.rl.grpo); `num_generations` is the group size G.
        reward (`RewardSpec`, defaults to answer matching alone, the paper's reward):
            Components and weights (samtok.rl.rewards). The `iou` component decodes every span with
            the model's mask tokenizer (needs `image_column: images`; reference masks are the decoded
            reference spans); evaluations then report the textual reward without it.
        optim (`OptimSettings`, defaults to lr 1e-6, weight decay 0.01, betas (0.9, 0.999), 5 % warm-up, cosine):
            AdamW and its schedule over `trainer.max_steps` optimiser steps.
        eval (`RLEvalSettings`): the before/after evaluation.
        trainer (`TrainerConfig`, defaults to 1000 steps, clip 1.0, checkpoint every 100 steps):
            Devices, `strategy` (`deepspeed` with `zero_stage: 2` for the release setting), precision,
            `max_steps` (optimiser steps), `gradient_clip_val` (by norm, applied by this stage since
            optimisation is manual), `checkpoint_every_n_steps`, `max_minutes`, `seed`, `threads`.
            `accumulate_grad_batches` must stay 1 (use `grpo.micro_batch_size`).
        progress_bar (`bool`, defaults to `True`): a tqdm bar over optimiser steps.
    """

    model_dir: str = "runs/sft/final"
    mask_tokenizer: Optional[str] = None
    out_dir: str = "runs/rl"
    resume: str = "auto"
    model: RLModelSettings = field(default_factory=RLModelSettings)
    lora: LoraSettings = field(default_factory=_rl_lora)
    reference: str = "auto"
    data: RLDataSettings = field(default_factory=RLDataSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    sampling: RolloutSampling = field(default_factory=RolloutSampling)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    reward: RewardSpec = field(default_factory=RewardSpec)
    optim: OptimSettings = field(default_factory=_rl_optim)
    eval: RLEvalSettings = field(default_factory=RLEvalSettings)
    trainer: TrainerConfig = field(default_factory=_rl_trainer)
    progress_bar: bool = True


def reference_kind(cfg: GRPOConfig) -> Optional[str]:
    """``None`` (beta = 0: no reference), ``"adapters_disabled"`` or ``"copy"``, after resolving ``auto``."""
    if cfg.loss.beta == 0.0:
        return None
    adapters_only = cfg.lora.enabled and not cfg.lora.train_embeddings
    if cfg.reference == "auto":
        return "adapters_disabled" if adapters_only else "copy"
    return cfg.reference


def loss_config(cfg: GRPOConfig) -> GRPOLossConfig:
    """``cfg.loss`` with ``max_completion_length`` defaulting to ``sampling.max_new_tokens`` (dr_grpo)."""
    from dataclasses import replace

    if cfg.loss.max_completion_length is None:
        return replace(cfg.loss, max_completion_length=cfg.sampling.max_new_tokens)
    return cfg.loss


def check_grpo_config(cfg: GRPOConfig) -> None:
    """Raise :class:`ConfigError` for settings this stage cannot run (the schema cannot say these)."""
    g, s, t = cfg.grpo, cfg.sampling, cfg.trainer
    if cfg.reference not in REFERENCE_KINDS:
        raise ConfigError(f"reference must be one of {REFERENCE_KINDS}, got {cfg.reference!r}")
    if cfg.reference == "adapters_disabled" and cfg.loss.beta > 0 and (not cfg.lora.enabled or cfg.lora.train_embeddings):
        raise ConfigError("reference: adapters_disabled needs lora.enabled=true and lora.train_embeddings=false "
                          "(otherwise disabling the adapters does not give back the starting model); use copy or auto")
    if g.prompts_per_step < 1 or g.num_iterations < 1:
        raise ConfigError(f"grpo.prompts_per_step and grpo.num_iterations must be >= 1, got "
                          f"{g.prompts_per_step}, {g.num_iterations}")
    if g.micro_batch_size < 0 or g.generation_batch_size < 0:
        raise ConfigError("grpo.micro_batch_size and grpo.generation_batch_size must be >= 0 (0: the whole batch)")
    if s.max_new_tokens < 1 or s.temperature <= 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise ConfigError(f"sampling: need max_new_tokens >= 1, temperature > 0, 0 < top_p <= 1, top_k >= 0; got {s}")
    if cfg.loss.num_generations < 2:
        raise ConfigError("loss.num_generations must be >= 2: a group of one has no relative advantage")
    if t.accumulate_grad_batches != 1:
        raise ConfigError("trainer.accumulate_grad_batches must be 1 for GRPO (optimisation is manual); "
                          "use grpo.micro_batch_size to split a batch into several forward/backward passes")
    if t.precision.startswith("16"):
        raise ConfigError(f"trainer.precision {t.precision!r} is not supported by the GRPO stage; use bf16-mixed, "
                          "bf16-true or 32-true")
    if t.strategy == "deepspeed" and t.zero_stage == 3:
        raise ConfigError("trainer.zero_stage=3 is not supported: generation needs whole parameters on every rank "
                          "(use ZeRO-2, the release setting)")
    if t.max_steps > 0 and t.max_steps % g.num_iterations:
        raise ConfigError(f"trainer.max_steps ({t.max_steps}) counts optimiser steps and must be a multiple of "
                          f"grpo.num_iterations ({g.num_iterations})")
    if cfg.reward.weights.iou != 0.0:
        if cfg.reward.image_column != "images":
            raise ConfigError("reward.weights.iou: `samtok rl` gives the IoU reward each prompt's images in the column "
                              f"'images'; set reward.image_column: images (got {cfg.reward.image_column!r})")
        if cfg.reward.gt_mask_column is not None:
            raise ConfigError("reward.gt_mask_column: `samtok rl` scores the IoU reward against the decoded reference "
                              "spans (code-space IoU); leave it null")
    if cfg.eval.enabled and not cfg.eval.benchmarks:
        raise ConfigError("eval.enabled is true but eval.benchmarks is empty")
    if cfg.eval.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"eval.dtype must be auto, float32, bfloat16 or float16, got {cfg.eval.dtype!r}")


__all__ = ["GRPOConfig", "GRPOSettings", "RLDataSettings", "RLEvalSettings", "RLModelSettings", "RolloutSampling",
           "check_grpo_config", "loss_config", "reference_kind"]
