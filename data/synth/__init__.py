"""The embedded synthetic world: procedural scenes with exact instance masks and language.

    from samtok.data.synth import SynthConfig, generate_split, generate
    images, samples, pixels = generate_split(SynthConfig(seed=0), "train", count=10)
    summary = generate(SynthConfig(out_dir="runs/synth"))   # writes PNGs + annotation files + DONE

Modules: ``world`` (vocabulary: colours, shapes, sizes, predicates), ``shapes`` (polygons and
rasterisation), ``scene`` (rendering with occlusion), ``facts`` (attributes and relations of a
scene), ``language`` (expression grammar, parser, evaluator), ``tasks`` (task samples),
``dataset`` (splits, disk layout, preview), ``config`` (``SynthConfig``).
"""

from samtok.data.synth.config import SplitSizes, SynthConfig
from samtok.data.synth.facts import ObjectFacts, SceneFacts, relation_value
from samtok.data.synth.dataset import (
    SPLITS,
    SynthImage,
    SynthSplit,
    generate,
    generate_image,
    generate_split,
    iter_split,
    read_done,
    write_preview,
)
from samtok.data.synth.language import Query, evaluate, parse, render, resolve_robust

__all__ = [
    "SPLITS",
    "ObjectFacts",
    "Query",
    "SceneFacts",
    "SplitSizes",
    "SynthConfig",
    "SynthImage",
    "SynthSplit",
    "evaluate",
    "generate",
    "generate_image",
    "generate_split",
    "iter_split",
    "parse",
    "read_done",
    "relation_value",
    "render",
    "resolve_robust",
    "write_preview",
]
