"""The image reaches the language model and matters (issue 11, part 1; samtok.mllm.scene_qa).

Three probes, each able to fail on a broken image path (pixel values, grid sizes, placeholder
expansion, the order in which the collator stacks images, frozen or detached parts):
* the answer logits change when only the image changes, and follow their image when a batch is
  re-ordered;
* the answer loss sends gradient into the patch embedding, every vision block and the merger;
* a micro model trained for a minute on questions whose text never changes beats the best constant
  answer on held-out scenes by a wide margin.
"""

import numpy as np
import pytest
import torch

from samtok.mllm.models import TinyModelConfig
from samtok.mllm.sequences import build_prompt_example, build_training_example, generation_collator, model_inputs, \
    training_collator
from samtok.mllm.scene_qa import QUESTIONS, SceneQAConfig, best_constant, box_iou, box_text, build_model, \
    make_samples, parse_box, run_scene_qa, score

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


def micro(family: str, **kw) -> TinyModelConfig:
    return TinyModelConfig(family=family, min_pixels=16384, max_pixels=16384, weight_init="fan_in", **kw)


@pytest.fixture(scope="module")
def scenes():
    return make_samples("colour", 4, seed=5) + make_samples("location", 4, seed=5)


@pytest.fixture(scope="module", params=FAMILIES)
def model_and_processor(request, scenes):
    torch.set_num_threads(2)
    return build_model(micro(request.param), scenes)


def answer_logits(model, processor, samples):
    batch = generation_collator(processor)([build_prompt_example(processor, s.messages(False), [s.image])
                                            for s in samples])
    with torch.no_grad():
        return model(**model_inputs(batch, with_labels=False)).logits[:, -1].float()


def test_make_samples_are_deterministic_and_answer_from_the_scene():
    a, b = make_samples("count", 20, seed=3), make_samples("count", 20, seed=3)
    assert [s.answer for s in a] == [s.answer for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert {s.answer for s in a} <= {"one", "two", "three", "four"} and len({s.answer for s in a}) >= 2
    loc = make_samples("location", 40, seed=3)
    assert len({s.answer for s in loc}) >= 5  # the object lands in most of the nine cells
    assert all(s.messages(False)[0]["content"].endswith(QUESTIONS["location"][0]) for s in loc)
    # the constant baseline is the majority TRAINING answer, scored on the held-out samples
    answer, acc = best_constant(loc, loc[:10])
    assert acc == sum(s.answer == answer for s in loc[:10]) / 10


def test_answer_logits_change_only_with_the_image(model_and_processor, scenes):
    model, processor = model_and_processor
    model.eval()
    a, b = scenes[0], scenes[1]
    same = answer_logits(model, processor, [a, a])
    assert torch.equal(same[0], same[1])  # same prompt, same image: same answer distribution
    ab = answer_logits(model, processor, [a, b])
    assert (ab[0] - ab[1]).abs().max() > 1e-3 * ab.abs().max()  # same prompt text, other image: moves
    ba = answer_logits(model, processor, [b, a])
    # each row follows its own image when the batch is re-ordered (pixel values stay with their prompt)
    torch.testing.assert_close(ba[0], ab[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ba[1], ab[0], rtol=1e-4, atol=1e-4)


def test_answer_loss_reaches_the_vision_tower_and_the_merger(model_and_processor, scenes):
    from samtok.mllm.loss import causal_lm_loss
    from samtok.mllm.sft import LoraSettings, prepare_model_for_training

    model, processor = model_and_processor
    model = prepare_model_for_training(model, LoraSettings(enabled=False), freeze_vision=False)
    model.train()
    model.zero_grad(set_to_none=True)
    batch = training_collator(processor)([build_training_example(processor, s.messages(), [s.image]) for s in scenes])
    causal_lm_loss(model(**model_inputs(batch, with_labels=False)).logits, batch["labels"]).backward()
    visual = model.model.visual
    parts = {"patch_embed": visual.patch_embed, "merger": visual.merger}
    parts.update({f"block{i}": blk for i, blk in enumerate(visual.blocks)})
    if hasattr(visual, "deepstack_merger_list"):  # Qwen3-VL feeds intermediate vision layers to the LLM too
        parts.update({f"deepstack{i}": m for i, m in enumerate(visual.deepstack_merger_list)})
    if hasattr(visual, "pos_embed"):
        parts["pos_embed"] = visual.pos_embed
    norms = {}
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), f"{name}: a parameter got no gradient"
        norms[name] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))
    assert all(v > 1e-8 for v in norms.values()), norms
    model.zero_grad(set_to_none=True)
    model.eval()


def test_tiny_model_answers_an_image_only_question_from_the_image(tmp_path):
    # the embedded SFT model's sizes (configs/sft/tiny.yaml) with 16 visual tokens: ~40 s on 2 cores
    cfg = SceneQAConfig(
        model=micro("qwen3_vl", hidden_size=256, intermediate_size=512, num_hidden_layers=4, vision_hidden_size=128,
                    vision_intermediate_size=256, vision_num_heads=4),
        questions=["colour"], train_images=800, val_images=60, steps=400, batch_size=8, lr=1e-3,
        min_margin=0.3, threads=2, save_model=True, out_dir=str(tmp_path),
    )
    report = run_scene_qa(cfg, progress=False)
    r = report["questions"]["colour"]
    # one prompt text for every image: a text-only model scores the constant answer at best
    assert r["best_constant_score"] < 0.3, r
    assert r["margin"] >= 0.3 and r["distinct_answers"] >= 4, r
    assert report["passed"] and (tmp_path / "report.json").is_file()
    # the saved model (what `samtok sft` continues from with init_from) answers the same after reloading
    from samtok.mllm.models import load_model_and_processor
    from samtok.mllm.scene_qa import greedy_scores
    from samtok.mllm.vocab import mask_token_ids

    model, processor = load_model_and_processor(report["model"])
    assert len(mask_token_ids(processor.tokenizer)) == 514
    reloaded, _ = greedy_scores(model, processor, make_samples("colour", 60, seed=1))
    assert reloaded == pytest.approx(r["score"])


def test_box_text_parse_and_iou():
    assert box_text((0, 0, 63, 127), 128, 128) == "(0,0),(500,999)"
    assert box_text((32, 64, 95, 95), 128, 128) == "(250,500),(750,750)"
    assert parse_box("it is at (250,500),(750,750).") == (250, 500, 750, 750)
    assert parse_box("(250,500),(750") is None
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), None) == 0.0
    assert score("box", "garbage", "(0,0),(10,10)") == 0.0
    assert score("ground", " in the center", "in the center") == 1.0
    boxes = make_samples("box", 30, seed=2)
    assert all(parse_box(s.answer) is not None and s.prompt.endswith("Answer with its box.") for s in boxes)
    assert len({s.prompt for s in boxes}) > 5  # "Where is the red star? ...": the object is named in the prompt
    answer, mean_iou = best_constant(boxes, boxes)
    assert parse_box(answer) is not None and 0.0 < mean_iou < 0.5


def test_vision_check_rejects_unknown_questions():
    from samtok.core.config import ConfigError

    with pytest.raises(ConfigError, match="questions must be"):
        SceneQAConfig(questions=["colour", "weather"]).validate()
    with pytest.raises(ConfigError, match="unknown question"):
        make_samples("weather", 1, seed=0)
    with pytest.raises(ConfigError, match="image_position"):
        SceneQAConfig(image_position="middle").validate()


def test_the_probe_can_put_the_image_after_the_question():
    s = make_samples("ground", 1, seed=0)[0]
    assert s.messages(False) == [{"role": "user", "content": "<image>\n" + s.prompt}]
    s.image_position = "after"
    assert s.messages() == [{"role": "user", "content": s.prompt + "\n<image>"}, {"role": "assistant", "content": s.answer}]


def test_the_binding_question_names_one_of_several_objects_and_knows_a_random_pick():
    from samtok.mllm.scene_qa import by_object_count

    samples = make_samples("which_colour", 60, seed=3)
    assert all(s.prompt.startswith("Where is the ") and s.prompt.endswith(" object?") for s in samples)
    assert {s.objects for s in samples} >= {2, 3}
    # naming a random object's cell scores 1 when every object shares the answer's cell, 1/n at most otherwise
    assert all(0.0 < s.random_object <= 1.0 for s in samples)
    assert any(s.random_object < 1.0 for s in samples)
    # a model that always answers right scores 1 in every group; the random pick sits below
    table = by_object_count(samples, [1.0] * len(samples))
    assert all(row["score"] == 1.0 and row["random_object"] < 1.0 for n, row in table.items() if n != "1")
    assert sum(row["count"] for row in table.values()) == 60
    # the other questions keep their scenes (their seeds depend on the sorted question names)
    assert sorted(QUESTIONS)[-1] == "which_colour"
    with pytest.raises(Exception, match="random_object"):
        SceneQAConfig(questions=["colour"], baseline="random_object").validate()


def test_a_binding_run_reports_its_margin_over_a_random_object(tmp_path):
    from samtok.mllm.scene_qa import format_report

    cfg = SceneQAConfig(model=micro("qwen3_vl", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64),
                        questions=["which_colour"], train_images=40, val_images=30, steps=3, batch_size=4,
                        baseline="random_object", min_margin=0.05, threads=1, out_dir=str(tmp_path))
    report = run_scene_qa(cfg, progress=False)
    r = report["questions"]["which_colour"]
    assert r["baseline"] == "random_object" and 0.0 < r["random_object_score"] < 1.0
    assert r["margin"] == pytest.approx(r["score"] - r["random_object_score"])
    assert r["passed"] == (r["margin"] >= 0.05)
    assert set(r["by_objects"]) >= {"2", "3"} and all("random_object" in b for b in r["by_objects"].values())
    text = format_report(report, "binding check")
    assert "which_colour, 2 object(s)" in text and "(vs random_object)" in text
