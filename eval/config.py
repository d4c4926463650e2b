"""Config of ``samtok eval``: which models, which benchmarks, how to decode, how to run (documented in place).

The embedded default (``configs/eval/tiny.yaml`` starts from these defaults) compares the trained
tokenizer, the SFT model and the RL model of the embedded pipeline on the synthetic benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from samtok.data.conversations import ConversationConfig

BENCHMARKS = ("refcoco", "gres", "gcg", "region_caption", "mr_seg", "tokenizer")
"""Benchmark kinds; every kind but ``tokenizer`` needs a language model."""


@dataclass
class DataSpec:
    r"""Where a benchmark's samples come from: a kind of :func:`samtok.data.formats.open_source` and its arguments.

    Parameters:
        kind (`str`, defaults to `"synthetic"`):
            `refer` (RefCOCO/+/g), `grefcoco`, `gcg` (GranDf; eval layout: `caption_gt` + `mask_gt`),
            `region_caption` (DAM), `multiround` (SegLLM), `coco`, `sa1b`, `synthetic` ... (docs/formats.md).
        args (`dict`, defaults to `{}`):
            The kind's keyword arguments (paths, `split`, ...).
    """

    kind: str = "synthetic"
    args: dict = field(default_factory=dict)


@dataclass
class MaxNewTokens:
    r"""Most tokens generated per answer, per benchmark (greedy decoding, as the release evaluates).

    The release's evaluation scripts decode greedily (`do_sample=False`) with these limits: RES and
    GRES 128, multi-round segmentation 128, GCG 512 (1024 / 2048 for the RL models prompted to
    think first). Region captioning: no release script found; 512 is ours.
    """

    refcoco: int = 128
    gres: int = 128
    gcg: int = 512
    region_caption: int = 512
    mr_seg: int = 128


@dataclass
class GenerationConfig:
    r"""Decoding and answer handling.

    Parameters:
        max_new_tokens (`MaxNewTokens`): per-benchmark limits.
        batch_size (`int`, defaults to `8`):
            Prompts per generation batch and device (images per batch for the tokenizer benchmark).
        max_masks (`int` or `None`, defaults to `None`):
            Decode at most this many masks per answer (`None`: all). The release's GRES script keeps
            only the first mask when an answer holds more than 10; set 10 to come close.
        res_mask (`str`, defaults to `"first"`):
            RES answers with several masks: `"first"` scores the first mask, `"union"` their union.
        system_prompt (`str` or `None`, defaults to `None`):
            A system turn before every prompt (`None`: the chat template's default).
        max_prompt_length (`int` or `None`, defaults to `None`):
            Refuse longer prompts (tokens); `None`: no limit.
        span_grammar (`bool`, defaults to `False`):
            Decode with :class:`samtok.mllm.generation.MaskSpanGrammar` (well-formed mask spans only).
            Off by default: the reported numbers are of the model's own answers.
    """

    max_new_tokens: MaxNewTokens = field(default_factory=MaxNewTokens)
    batch_size: int = 8
    max_masks: Optional[int] = None
    res_mask: str = "first"
    system_prompt: Optional[str] = None
    max_prompt_length: Optional[int] = None
    span_grammar: bool = False


@dataclass
class RunnerConfig:
    r"""How predictions are computed.

    Parameters:
        lightning (`bool`, defaults to `True`):
            Run through Lightning's predict loop (multi-GPU / multi-node: every sample is processed by
            exactly one rank, results are gathered on rank 0); `False`: a plain loop in this process.
        accelerator (`str`, defaults to `"auto"`): `auto`, `cpu` or `gpu`.
        devices (`str`, defaults to `"auto"`): `auto`, a count (`"2"`) or a list (`"0,1"`).
        num_nodes (`int`, defaults to `1`).
        strategy (`str`, defaults to `"auto"`): `auto`, `ddp`, `ddp_spawn`.
        dtype (`str`, defaults to `"auto"`):
            Model weights: `auto` (the checkpoint's on GPU, float32 on CPU), `float32`, `bfloat16`, `float16`.
        attn_implementation (`str` or `None`, defaults to `None`): e.g. `sdpa`, `flash_attention_2`.
        threads (`int`, defaults to `0`): torch CPU threads (`0`: leave torch's default).
        num_workers (`int`, defaults to `0`): DataLoader workers per process.
    """

    lightning: bool = True
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    dtype: str = "auto"
    attn_implementation: Optional[str] = None
    threads: int = 0
    num_workers: int = 0


@dataclass
class BaselineConfig:
    r"""Mask-as-text baselines of the tokenizer benchmark (:mod:`samtok.eval.baselines`).

    Parameters:
        enabled (`bool`, defaults to `True`).
        text_tokenizer (`str`, defaults to `"qwen2_5"`):
            Tokenizer that counts tokens: `qwen2_5` (the real Qwen2.5 vocabulary, built offline) or a
            local tokenizer directory (e.g. the evaluated model's).
        polygon_tolerances (`list[float]`, defaults to `[0, 1, 2, 4]`): RDP tolerances in pixels.
        grid_cells (`int`, defaults to `16`): Text4Seg grid size per side.
        max_masks (`int`, defaults to `500`): masks measured (the first ones of the benchmark).
    """

    enabled: bool = True
    text_tokenizer: str = "qwen2_5"
    polygon_tolerances: List[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])
    grid_cells: int = 16
    max_masks: int = 500


@dataclass
class ReportConfig:
    r"""What report.md shows.

    Parameters:
        num_examples (`int`, defaults to `4`): best and worst predictions drawn (each).
        histogram_bins (`int`, defaults to `10`): bins of the per-sample IoU histogram over [0, 1].
        save_predictions (`bool`, defaults to `True`): write every prediction to predictions.jsonl.
    """

    num_examples: int = 4
    histogram_bins: int = 10
    save_predictions: bool = True


@dataclass
class BenchmarkConfig:
    r"""One benchmark run.

    Parameters:
        benchmark (`str`, defaults to `"gres"`): one of `refcoco`, `gres`, `gcg`, `region_caption`, `mr_seg`, `tokenizer`.
        name (`str`, defaults to `""`): report folder and summary column (default: the benchmark kind).
        data (`DataSpec`): the samples.
        max_samples (`int` or `None`, defaults to `None`): evaluate the first N samples only
            (images for the tokenizer benchmark; dialogues for mr_seg).
        max_masks_per_image (`int` or `None`, defaults to `None`): tokenizer benchmark: masks per image.
        include_vqa (`bool`, defaults to `False`): region_caption: also region-VQA samples.
        phrase_similarity (`str`, defaults to `"char3"`): gcg recall's phrase similarity (`char3`, or a
            local encoder directory such as bert-base-uncased, GLaMM's choice).
        prompt_templates (`str`, defaults to `"first"`): `first`: the first template of each list of
            the conversation config (for referring segmentation "Please segment {X} in this image.",
            the release's evaluation prompt); `random`: a template drawn per sample (seeded), as in training.
        prompt_seed (`int`, defaults to `0`): seed of the per-sample template draws (`random`).
    """

    benchmark: str = "gres"
    name: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    max_samples: Optional[int] = None
    max_masks_per_image: Optional[int] = None
    include_vqa: bool = False
    phrase_similarity: str = "char3"
    prompt_templates: str = "first"
    prompt_seed: int = 0

    @property
    def title(self) -> str:
        return self.name or self.benchmark


@dataclass
class ModelSpec:
    r"""A model to evaluate.

    Parameters:
        name (`str`): report folder and summary row.
        model (`str` or `None`, defaults to `None`): QwenVL-SAMTok model directory; `None`: a
            tokenizer-only entry (only the tokenizer benchmark runs for it).
        tokenizer (`str`, defaults to `"runs/tokenizer/final"`): SAMTok tokenizer directory.
        baseline (`str` or `None`, defaults to `None`): instead of a model, a constant answer scored
            by the same code on the language benchmarks: `"no_target"` (always ``No target.``) or
            `"majority_span"` (always the most frequent code pair of `pretokenized`, as one mask).
        pretokenized (`str` or `None`, defaults to `None`): the pre-tokenized table whose most
            frequent code pair `baseline: majority_span` answers with.
    """

    name: str = "model"
    model: Optional[str] = None
    tokenizer: str = "runs/tokenizer/final"
    baseline: Optional[str] = None
    pretokenized: Optional[str] = None

    @property
    def answers(self) -> bool:
        """Whether this entry answers prompts (a model or a constant-answer baseline)."""
        return self.model is not None or self.baseline is not None


def _synthetic(split: str = "val") -> DataSpec:
    return DataSpec(kind="synthetic", args={"root": "runs/synth", "split": split})


def default_models() -> list[ModelSpec]:
    return [
        ModelSpec(name="tokenizer", model=None, tokenizer="runs/tokenizer/final"),
        ModelSpec(name="sft", model="runs/sft/final", tokenizer="runs/tokenizer/final"),
        ModelSpec(name="rl", model="runs/rl/final", tokenizer="runs/tokenizer/final"),
    ]


def default_benchmarks() -> list[BenchmarkConfig]:
    return [BenchmarkConfig(benchmark=b, data=_synthetic()) for b in BENCHMARKS]


@dataclass
class EvalConfig:
    r"""``samtok eval --config``: every model × every benchmark that applies to it.

    Reports go to ``out_dir/<model name>/<benchmark name>/report.{json,md}`` and a comparison table
    to ``out_dir/summary.md``. A tokenizer benchmark runs once per distinct tokenizer directory.
    ``conversation`` holds the prompt templates and answer formats (:class:`ConversationConfig`);
    ``conversation_from`` names a data-mixture YAML (``configs/data/synth_mixture.yaml``) whose
    ``conversation`` section is used instead — the one SFT and RL trained with, so that evaluation
    prompts are training prompts.
    """

    out_dir: str = "runs/eval"
    models: List[ModelSpec] = field(default_factory=default_models)
    benchmarks: List[BenchmarkConfig] = field(default_factory=default_benchmarks)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    conversation_from: Optional[str] = None
    seed: int = 0


BASELINE_ANSWERS = ("no_target", "majority_span")
"""The constant answers a ``models`` entry may give instead of a model (``ModelSpec.baseline``)."""


def check_config(cfg: EvalConfig) -> None:
    """Semantic checks the schema cannot express (kinds, names, choices)."""
    from samtok.core.config import ConfigError

    for b in cfg.benchmarks:
        if b.benchmark not in BENCHMARKS:
            raise ConfigError(f"benchmarks: unknown benchmark {b.benchmark!r}; known: {', '.join(BENCHMARKS)}")
    titles = [b.title for b in cfg.benchmarks]
    if len(set(titles)) != len(titles):
        raise ConfigError(f"benchmarks: names must be unique (set 'name'), got {titles}")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"models: names must be unique, got {names}")
    for m in cfg.models:
        if m.baseline is None:
            if m.pretokenized is not None:
                raise ConfigError(f"models[{m.name}].pretokenized is only read by 'baseline: majority_span'")
            continue
        if m.baseline not in BASELINE_ANSWERS:
            raise ConfigError(f"models[{m.name}].baseline must be one of {', '.join(BASELINE_ANSWERS)}, got {m.baseline!r}")
        if m.model is not None:
            raise ConfigError(f"models[{m.name}]: give either 'model' or 'baseline', not both")
        if m.baseline == "majority_span" and not m.pretokenized:
            raise ConfigError(f"models[{m.name}]: baseline 'majority_span' needs 'pretokenized' (a pre-tokenized table)")
    if cfg.generation.res_mask not in ("first", "union"):
        raise ConfigError(f"generation.res_mask must be 'first' or 'union', got {cfg.generation.res_mask!r}")
    for b in cfg.benchmarks:
        if b.prompt_templates not in ("first", "random"):
            raise ConfigError(f"benchmarks[{b.title}].prompt_templates must be 'first' or 'random', got {b.prompt_templates!r}")
    if cfg.runner.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"runner.dtype must be auto, float32, bfloat16 or float16, got {cfg.runner.dtype!r}")


def conversation_config(cfg: EvalConfig) -> ConversationConfig:
    """The conversation options evaluation prompts are built with (``conversation_from`` wins)."""
    if cfg.conversation_from:
        from samtok.data.mixture import load_mixture_config

        return load_mixture_config(cfg.conversation_from).conversation.validate()
    return cfg.conversation.validate()


def max_new_tokens_for(cfg: EvalConfig, benchmark: str) -> int:
    return int(getattr(cfg.generation.max_new_tokens, benchmark))


def as_plain(obj: Any) -> Any:
    """A config (or part of one) as plain JSON-able data."""
    from samtok.core.config import to_dict

    return to_dict(obj)
