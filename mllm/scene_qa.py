"""Questions about freshly rendered synthetic scenes: the vision-path check and the grounding pretraining.

A tiny Qwen-VL is trained from scratch on question/answer pairs about scenes of the synthetic world
(:mod:`samtok.data.synth`), with the very pieces SFT uses (``build_tiny``, the processor,
``build_training_example``, ``training_collator``, ``causal_lm_loss``, ``prepare_model_for_training``),
then answers held-out scenes greedily. Two uses:

**The vision-path check** (``samtok vision-check``, ``configs/scene_qa/vision_check.yaml``). Questions whose
prompt text is the SAME for every image, so that the answer can only come from the pixels and a
text-only model scores the best constant answer (the most frequent training answer) at most:

* ``colour`` ("What colour is the object?", one object): pixel values, patch embedding, merger,
  placeholder expansion;
* ``location`` ("Where is the object?", one object, its 3 x 3 cell such as "in the upper left"):
  the same plus WHERE, which needs the vision tower's positions and the merge order to survive;
* ``shape`` ("What shape is the object?"), ``count`` ("How many objects are there?", 1-4 objects).

**Grounding pretraining** (``samtok pretrain``, ``configs/scene_qa/pretrain.yaml``), the stage real Qwen-VL
models go through before anyone adds mask words, in miniature: in scenes of 1-4 objects,

* ``ground`` ("Where is the red star?" -> "in the upper left"): words bound to a place;
* ``box`` ("Where is the red star? Answer with its box." -> ``(x1,y1),(x2,y2)``, Qwen-VL's plain-text
  box with coordinates scaled to 0-999): words bound to the object's extent, the geometry that the
  first mask code mostly encodes (docs/sft.md). Scored by the mean IoU of the parsed box, against
  the mean training box.

With ``save_model`` the trained model is written as a Hugging Face model directory (the 514 mask words
in its vocabulary, never trained, and no ``samtok.json``) whose BPE was trained on the SFT mixture's texts
too (``corpus_from``), which ``samtok sft`` continues from (``init_from``; the mask words then get the
SFT config's init).
Measured numbers: docs/sft.md, "Does the image reach the model?" and "Grounding pretraining".
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from samtok.core.config import ConfigError
from samtok.mllm.models import TinyModelConfig

# question name -> (prompt template, objects per scene (min, max)); {object} is "red star" etc.
QUESTIONS: dict[str, tuple[str, tuple[int, int]]] = {
    "colour": ("What colour is the object?", (1, 1)),
    "location": ("Where is the object?", (1, 1)),
    "shape": ("What shape is the object?", (1, 1)),
    "count": ("How many objects are there?", (1, 4)),
    "ground": ("Where is the {object}?", (1, 4)),
    "box": ("Where is the {object}? Answer with its box.", (1, 4)),
    # binding: the object named by its colour alone among 2-3 (a model that only finds objects scores
    # the "random object" baseline; the key sorts last so the other questions keep their scenes)
    "which_colour": ("Where is the {colour} object?", (2, 3)),
}
NAMED = ("ground", "box", "which_colour")
"""Questions that name one object of a multi-object scene."""
NAMED_PLACE = ("ground", "which_colour")
"""Those answered with a cell: reported by object count, next to the score of naming a random object's cell
(``baseline: random_object``)."""
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_BOX_RE = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)")


@dataclass
class SceneQAConfig:
    """``samtok vision-check`` and ``samtok pretrain`` (keys documented in docs/sft.md).

    Attributes:
        model: the tiny Qwen-VL built from scratch (``samtok.mllm.models.TinyModelConfig``); the
            presets copy the model block of ``configs/sft/tiny.yaml``.
        questions: which of ``colour``, ``location``, ``shape``, ``count``, ``ground``, ``box``,
            ``which_colour`` to train and score (mixed uniformly in training).
        train_images / val_images: scenes rendered per question for training / held out (other seeds).
        steps, batch_size, lr, warmup_fraction: AdamW with linear warm-up and linear decay.
        min_margin: each question's held-out score must beat its baseline by this much
            (``samtok vision-check`` exits 1 otherwise; ``samtok pretrain`` only reports it).
        baseline: ``constant`` (the best answer that ignores the image) or ``random_object`` (for
            ``ground`` / ``which_colour``: the cell of a random object of the scene — perfect place,
            no binding of the phrase; the binding check, ``configs/scene_qa/binding.yaml``).
        image_size: side of the rendered square scenes in pixels (the synthetic data set's 128).
        seed: scenes, weights and batches.
        threads: torch CPU threads (0 keeps torch's default).
        corpus_from: an SFT config whose mixture's conversation texts also train the BPE (so that
            ``samtok sft`` continuing from this model tokenizes its data as a fresh tiny model would).
        corpus_samples: conversations of that mixture read for the BPE.
        save_model: write the trained model to ``out_dir/final`` (``samtok pretrain``).
        out_dir: where ``report.json`` (and ``final/``) go; None: nowhere.
        image_position: ``before`` the question (Qwen-VL's usual order) or ``after`` it; after, the
            image tokens can attend to the question's words (causal attention) — see docs/sft.md.
    """

    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    questions: list[str] = field(default_factory=lambda: ["colour", "location", "count"])
    train_images: int = 1000
    val_images: int = 200
    steps: int = 300
    batch_size: int = 8
    lr: float = 1.0e-3
    warmup_fraction: float = 0.05
    min_margin: float = 0.3
    baseline: str = "constant"
    image_size: int = 128
    seed: int = 0
    threads: int = 2
    corpus_from: Optional[str] = None
    corpus_samples: int = 4000
    save_model: bool = False
    out_dir: Optional[str] = "runs/vision_check"
    image_position: str = "before"

    def validate(self) -> None:
        unknown = [q for q in self.questions if q not in QUESTIONS]
        if unknown or not self.questions:
            raise ConfigError(f"questions must be a non-empty subset of {sorted(QUESTIONS)}, got unknown {unknown}")
        for key in ("train_images", "val_images", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.baseline not in ("constant", "random_object"):
            raise ConfigError(f"baseline must be 'constant' or 'random_object', got {self.baseline!r}")
        if self.baseline == "random_object" and any(q not in NAMED_PLACE for q in self.questions):
            raise ConfigError(f"baseline: random_object needs questions among {list(NAMED_PLACE)}")
        if self.image_position not in ("before", "after"):
            raise ConfigError(f"image_position must be 'before' or 'after', got {self.image_position!r}")
        if self.save_model and not self.out_dir:
            raise ConfigError("save_model needs an out_dir")
        self.model.validate()


@dataclass
class QuestionSample:
    question: str  # key of QUESTIONS
    prompt: str
    image: np.ndarray  # (H, W, 3) uint8
    answer: str
    image_position: str = "before"
    objects: int = 1  # objects in the scene
    random_object: Optional[float] = None  # questions naming one object: score of naming a random one instead

    def messages(self, with_answer: bool = True) -> list[dict]:
        content = ("<image>\n" + self.prompt) if self.image_position == "before" else (self.prompt + "\n<image>")
        msgs = [{"role": "user", "content": content}]
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs


def box_text(box: Sequence[int], width: int, height: int) -> str:
    """Qwen-VL's plain-text box: inclusive pixel corners scaled to 0..999."""
    x1, y1, x2, y2 = box
    sx, sy = 1000.0 / width, 1000.0 / height
    q = [min(999, int(x1 * sx)), min(999, int(y1 * sy)), min(999, int((x2 + 1) * sx)), min(999, int((y2 + 1) * sy))]
    return f"({q[0]},{q[1]}),({q[2]},{q[3]})"


def parse_box(text: str) -> Optional[tuple[int, int, int, int]]:
    m = _BOX_RE.search(text)
    return None if m is None else tuple(int(v) for v in m.groups())  # type: ignore[return-value]


def box_iou(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """IoU of two xyxy boxes; 0 when either is missing or empty."""
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_samples(question: str, n: int, seed: int, image_size: int = 128) -> list[QuestionSample]:
    """``n`` freshly rendered scenes and the answer to ``question`` on each (deterministic in ``seed``)."""
    from samtok.data.synth import SynthConfig
    from samtok.data.synth.scene import sample_scene

    if question not in QUESTIONS:
        raise ConfigError(f"unknown question {question!r}; expected one of {sorted(QUESTIONS)}")
    template, (lo, hi) = QUESTIONS[question]
    # attribute_repeat_prob 0: no two objects of a scene share a colour or a shape, so "the red star" is unique
    cfg = SynthConfig(image_size=image_size, min_objects=lo, max_objects=hi, attribute_repeat_prob=0.0)
    rng = np.random.default_rng([seed, sorted(QUESTIONS).index(question)])
    out = []
    while len(out) < n:
        scene = sample_scene(cfg, rng)
        facts = scene.facts
        objects = facts.objects
        prompt, random_object = template, None
        if question == "count":
            answer = _NUMBER_WORDS.get(len(objects))
        elif question in NAMED:
            obj = objects[int(rng.integers(len(objects)))]
            prompt = template.format(object=f"{obj.color} {obj.shape}", colour=obj.color)
            if question == "box":
                answer = box_text(obj.box, facts.width, facts.height)
            else:
                answer = facts.location_phrase(obj)
                random_object = float(np.mean([facts.location_phrase(o) == answer for o in objects]))
        else:
            [obj] = objects
            answer = {"colour": obj.color, "shape": obj.shape}.get(question) or facts.location_phrase(obj)
        if answer is not None:
            out.append(QuestionSample(question, prompt, scene.image, answer, objects=len(objects),
                                      random_object=random_object))
    return out


def score(question: str, predicted: str, reference: str) -> float:
    """Exact (stripped) match, or the box IoU for ``box``."""
    if question == "box":
        return box_iou(parse_box(predicted), parse_box(reference))
    return float(predicted.strip() == reference)


def best_constant(train: Sequence[QuestionSample], held_out: Sequence[QuestionSample]) -> tuple[str, float]:
    """The best answer that ignores the image, fitted on ``train``, and its mean score on ``held_out``:
    the most frequent training answer, or for ``box`` the mean training box."""
    if train and train[0].question == "box":
        mean = np.mean([parse_box(s.answer) for s in train], axis=0).round().astype(int)
        answer = f"({mean[0]},{mean[1]}),({mean[2]},{mean[3]})"
    else:
        answer = Counter(s.answer for s in train).most_common(1)[0][0]
    return answer, float(np.mean([score(s.question, answer, s.answer) for s in held_out])) if held_out else 0.0


def greedy_scores(model, processor, samples: Sequence[QuestionSample], batch_size: int = 32,
                  max_new_tokens: int = 24) -> tuple[float, Counter]:
    """Mean :func:`score` of the greedy answers, and the counts of the answers given."""
    per_sample, given = greedy_answers(model, processor, samples, batch_size, max_new_tokens)
    return float(np.mean(per_sample)) if per_sample else 0.0, given


def greedy_answers(model, processor, samples: Sequence[QuestionSample], batch_size: int = 32,
                   max_new_tokens: int = 24) -> tuple[list[float], Counter]:
    """:func:`score` of each greedy answer, and the counts of the answers given."""
    from samtok.mllm.generation import greedy_texts

    texts = greedy_texts(model, processor, [(s.messages(False), [s.image]) for s in samples], batch_size, max_new_tokens)
    return [score(s.question, t, s.answer) for s, t in zip(samples, texts)], Counter(t.strip() for t in texts)


def by_object_count(samples: Sequence[QuestionSample], scores: Sequence[float]) -> dict[str, dict[str, float]]:
    """Held-out score per number of objects in the scene, next to naming a random object's place."""
    out: dict[str, dict[str, float]] = {}
    for n in sorted({s.objects for s in samples}):
        rows = [(sc, s.random_object) for s, sc in zip(samples, scores) if s.objects == n]
        out[str(n)] = {"count": len(rows), "score": float(np.mean([r[0] for r in rows]))}
        if all(r[1] is not None for r in rows):
            out[str(n)]["random_object"] = float(np.mean([r[1] for r in rows]))
    return out


def build_model(model_cfg: TinyModelConfig, samples: Sequence[QuestionSample], extra_corpus: Sequence[str] = ()):
    """A tiny model (random weights) whose BPE is trained on the prompts and answers (+ ``extra_corpus``)."""
    from samtok.mllm.models import build_tiny

    corpus = [s.prompt for s in samples] + [s.answer for s in samples]
    return build_tiny(model_cfg, corpus=list(extra_corpus) + corpus)


def train(model, processor, samples: Sequence[QuestionSample], steps: int, batch_size: int, lr: float,
          warmup_fraction: float = 0.05, seed: int = 0, progress: bool = True, desc: str = "scene-qa") -> list[float]:
    """Full fine-tuning (vision tower included) on random batches of ``samples``; the loss per step."""
    from transformers import get_linear_schedule_with_warmup

    from samtok.mllm.loss import causal_lm_loss
    from samtok.mllm.sequences import build_training_example, model_inputs, training_collator
    from samtok.mllm.sft import LoraSettings, prepare_model_for_training

    model = prepare_model_for_training(model, LoraSettings(enabled=False), freeze_vision=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(warmup_fraction * steps), steps)
    collate = training_collator(processor)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step")
    for _ in range(steps):
        picked = rng.choice(len(samples), size=batch_size, replace=len(samples) < batch_size)
        batch = collate([build_training_example(processor, samples[i].messages(), [samples[i].image]) for i in picked])
        out = model(**model_inputs(batch, with_labels=False))
        loss = causal_lm_loss(out.logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def _sft_corpus(path: str, n: int) -> list[str]:
    from samtok.core.config import load_config
    from samtok.mllm.train_sft import SFTConfig, conversation_corpus

    return conversation_corpus(load_config(SFTConfig, path, []), n)


def run_scene_qa(cfg: SceneQAConfig, progress: bool = True) -> dict:
    """Train and score; returns the report (also ``out_dir/report.json``; with ``save_model`` the model
    in ``out_dir/final``)."""
    from samtok.core.runtime import seed_everything

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    train_sets = {q: make_samples(q, cfg.train_images, seed=2 * cfg.seed, image_size=cfg.image_size)
                  for q in cfg.questions}
    val_sets = {q: make_samples(q, cfg.val_images, seed=2 * cfg.seed + 1, image_size=cfg.image_size)
                for q in cfg.questions}
    if cfg.image_position != "before":
        for samples in (*train_sets.values(), *val_sets.values()):
            for s in samples:
                s.image_position = cfg.image_position
    train_all = [s for q in cfg.questions for s in train_sets[q]]
    extra = _sft_corpus(cfg.corpus_from, cfg.corpus_samples) if cfg.corpus_from else []
    model, processor = build_model(cfg.model, train_all, extra)
    t0 = time.perf_counter()
    losses = train(model, processor, train_all, cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup_fraction,
                   seed=cfg.seed, progress=progress)
    minutes = (time.perf_counter() - t0) / 60
    report = {"steps": cfg.steps, "batch_size": cfg.batch_size, "train_minutes": round(minutes, 2),
              "final_loss": float(np.mean(losses[-10:])), "min_margin": cfg.min_margin, "questions": {}}
    for q in cfg.questions:
        per_sample, given = greedy_answers(model, processor, val_sets[q])
        acc = float(np.mean(per_sample))
        constant, constant_acc = best_constant(train_sets[q], val_sets[q])
        r = report["questions"][q] = {
            "prompt": QUESTIONS[q][0], "held_out": len(val_sets[q]), "metric": "box IoU" if q == "box" else "exact",
            "score": acc, "best_constant": constant, "best_constant_score": constant_acc, "distinct_answers": len(given),
        }
        if q in NAMED_PLACE:
            r["random_object_score"] = float(np.mean([s.random_object for s in val_sets[q]]))
            r["by_objects"] = by_object_count(val_sets[q], per_sample)
        r["baseline"] = cfg.baseline
        r["margin"] = acc - (r["random_object_score"] if cfg.baseline == "random_object" else constant_acc)
        r["passed"] = r["margin"] >= cfg.min_margin
    report["passed"] = all(r["passed"] for r in report["questions"].values())
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.save_model:
            from samtok.mllm.models import save_model_and_processor

            final = save_model_and_processor(model, processor, out / "final")
            (final / "DONE").write_text("pretrain\n")
            report["model"] = str(final)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict, title: str = "vision-path check") -> str:
    lines = [f"{title}: {report['steps']} steps x {report['batch_size']} in {report['train_minutes']} min "
             f"(final loss {report['final_loss']:.3f}); held-out greedy answers",
             "| question | prompt | metric | score | best constant | random object | margin | passed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for q, r in report["questions"].items():
        rand = f"{r['random_object_score']:.3f}" if "random_object_score" in r else "-"
        lines.append(f"| {q} | {r['prompt']} | {r['metric']} | {r['score']:.3f} | {r['best_constant_score']:.3f} "
                     f"(\"{r['best_constant']}\") | {rand} | {r['margin']:+.3f} (vs {r.get('baseline', 'constant')}) | "
                     f"{'yes' if r['passed'] else 'NO'} |")
    for q, r in report["questions"].items():
        for n, b in r.get("by_objects", {}).items():
            lines.append(f"  {q}, {n} object(s): {b['score']:.3f} on {b['count']} scenes"
                         + (f" (a random object: {b['random_object']:.3f})" if "random_object" in b else ""))
    verdict = "PASSED" if report["passed"] else f"FAILED (a margin below {report['min_margin']})"
    if any(r.get("baseline") == "random_object" for r in report["questions"].values()):
        lines.append(f"{verdict}: the answers {'find' if report['passed'] else 'may not find'} the named object "
                     "more often than a random object of the scene")
    else:
        lines.append(f"{verdict}: the answers {'depend' if report['passed'] else 'may not depend'} on the image")
    return "\n".join(lines)
