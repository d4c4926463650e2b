"""GRPO step on tiny random Qwen-VL models: what trains and what does not, the reference policy,
micro-batch / loss parity with samtok.rl.grpo, old log-probs with num_iterations > 1, and a
"can fail" learning test (the mean reward must rise)."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader

from samtok.data.datamodule import RLCollator
from samtok.mllm.generation import SamplingConfig, completion_logprobs
from samtok.mllm.models import TinyModelConfig, build_tiny
from samtok.mllm.sequences import build_prompt_example, generation_collator
from samtok.mllm.sft import LoraSettings, OptimSettings, parameter_group, prepare_model_for_training
from samtok.mllm.vocab import mask_token_ids
from samtok.rl import algorithm as algorithm_module
from samtok.rl.algorithm import (
    GRPOAlgorithm,
    ReferencePolicy,
    cut_at_tokens,
    images_per_row,
    repeat_rows,
    select_rows,
)
from samtok.rl.grpo import GRPOLossConfig, grpo_loss
from samtok.rl.lightning import GRPOLightningModule

CORPUS = ["Please segment the red circle in this image.", "No target.", "Describe the image.",
          '```json\n[{"mask_2d": "x", "label": "the red circle"}]\n```']


def img(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny(TinyModelConfig(), corpus=CORPUS)


def fresh(tiny):
    """An independent copy of the tiny model (tests change weights)."""
    model, proc = tiny
    return copy.deepcopy(model), proc


def items(proc):
    """Three prompts: one image, another size, two images (pixel blocks of different lengths)."""
    specs = [("<image>Please segment the red circle in this image.", [img(56, 84, 0)], "No target.", "gres"),
             ("<image>Describe the image.", [img(84, 56, 1)], "A red circle.", "gcg"),
             ("<image><image>Please segment the red circle in this image.", [img(56, 56, 2), img(70, 56, 3)],
              "No target.", "gres")]
    out = []
    for text, images, answer, task in specs:
        prompt = [{"role": "user", "content": text}]
        item = {"prompt": prompt, "images": images, "ground_truth": answer, "task": task}
        item.update(build_prompt_example(proc, prompt, images))
        out.append(item)
    return out


def batch_of(proc, rows=(0, 1, 2)):
    its = items(proc)
    return RLCollator(generation_collator(proc).pad_token_id)([its[r] for r in rows])


def mask_word_fraction(proc):
    """A dense reward: the fraction of completion tokens that are mask words (random model: ~1/3)."""
    ids = set(mask_token_ids(proc.tokenizer))

    def reward(completions, completion_ids=None, **kwargs):
        return [sum(1 for t in row if t in ids) / max(1, len(row)) for row in completion_ids]

    return reward


def algorithm(model, proc, reward=None, beta=0.0, reference=None, G=4, max_new_tokens=6, **kwargs):
    loss_kw = {k: kwargs.pop(k) for k in ("loss_type", "scale_rewards", "epsilon_low", "epsilon_high") if k in kwargs}
    return GRPOAlgorithm(model, proc, reward or mask_word_fraction(proc),
                         GRPOLossConfig(num_generations=G, beta=beta, **loss_kw),
                         SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0), reference=reference, **kwargs)


def fit(module, batches, max_steps, tmp_path=None):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path) if tmp_path else None)
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda b: b, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


# ------------------------------------------------------------------------------------------ batches


def test_select_rows_equals_collating_the_chosen_prompts(tiny):
    _, proc = tiny
    its = items(proc)
    batch = batch_of(proc)
    assert images_per_row(batch) == [1, 1, 2]
    for rows in ([2, 0, 2], [1], [0, 0, 1, 1]):
        got = select_rows(batch, rows)
        want = RLCollator(generation_collator(proc).pad_token_id)([its[r] for r in rows])
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
            assert torch.equal(got[key], want[key]), key
        assert got["ground_truth"] == want["ground_truth"] and got["task"] == want["task"]
    group = repeat_rows(batch, 3)
    assert group["task"] == ["gres"] * 3 + ["gcg"] * 3 + ["gres"] * 3
    assert group["image_grid_thw"].shape[0] == 3 * 4


def test_sampled_vision_tokens_end_the_completion():
    ids = torch.tensor([[5, 7, 99, 8, 2], [5, 6, 7, 2, 0], [99, 1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    rows = cut_at_tokens(ids, mask, [99, 98], pad_id=0)
    assert rows.tolist() == [True, False, True]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert ids.tolist() == [[5, 7, 0, 0, 0], [5, 6, 7, 2, 0], [0, 0, 0, 0, 0]]


def test_rollout_groups_rewards_and_advantages(tiny):
    model, proc = fresh(tiny)
    algo = algorithm(model, proc, G=4)
    torch.manual_seed(0)
    model.train()
    r = algo.rollout(batch_of(proc))
    assert model.training, "the policy's mode is restored after sampling"
    assert r.size == 12 and r.completion_ids.shape == r.completion_mask.shape and len(r.texts) == 12
    assert r.batch["ground_truth"][:4] == ["No target."] * 4 and r.batch["task"][4:8] == ["gcg"] * 4
    expected = mask_word_fraction(proc)(r.texts, completion_ids=[
        row[: int(m.sum())].tolist() for row, m in zip(r.completion_ids, r.completion_mask)])
    assert_close(r.rewards, torch.tensor(expected))
    grouped = r.rewards.view(3, 4)
    assert_close(r.advantages.view(3, 4), (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4))
    assert r.old_logps is None and r.ref_logps is None  # one iteration, beta = 0
    metrics = algo.rollout_metrics(r)
    for key in ("reward/mean", "reward/std", "advantage/std", "completion/length_mean", "completion/spans_mean",
                "completion/no_target_fraction", "reward/task_gres/mean", "reward/frac_zero_std"):
        assert key in metrics


def test_qwen3_vl_rollout_and_micro_batched_loss():
    """The embedded default trains a Qwen3-VL (deepstack, interleaved M-RoPE): same contract."""
    torch.manual_seed(0)
    model, proc = build_tiny(TinyModelConfig(family="qwen3_vl"), corpus=CORPUS)
    algo = algorithm(model, proc, G=2, micro_batch_size=3)
    r = algo.rollout(batch_of(proc))
    assert r.size == 6 and images_per_row(r.batch) == [1, 1, 1, 1, 2, 2]
    model.zero_grad()
    total = sum(algo.loss(r, rows).loss for rows in algo.micro_batches(r.size))
    total.backward()
    full = grpo_loss(completion_logprobs(model, r.batch, r.completion_ids, r.completion_mask), r.advantages,
                     r.completion_mask, config=algo.loss_config)
    assert_close(total.detach(), full.loss.detach(), atol=1e-6, rtol=1e-5)
    assert float(r.advantages.abs().sum()) > 0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


# ------------------------------------------------------------------------------------------ what trains


def module_of(algo, lr=1e-2, **kwargs):
    return GRPOLightningModule(algo, OptimSettings(lr=lr, weight_decay=0.0, warmup_fraction=0.0), total_steps=100,
                               log_completions_every_n_steps=0, **kwargs)


def test_full_finetuning_step_changes_language_model_not_vision_nor_reference(tiny, tmp_path):
    model, proc = fresh(tiny)
    reference = ReferencePolicy.build("copy", model)
    model = prepare_model_for_training(model, LoraSettings(enabled=False), freeze_vision=True)
    algo = algorithm(model, proc, beta=0.05, reference=reference)
    before, ref_before = snapshot(model), snapshot(reference.model)
    torch.manual_seed(1)
    fit(module_of(algo), [batch_of(proc)], 1, tmp_path)
    moved = changed(model, before)
    groups = {parameter_group(n) for n in moved}
    assert "language" in groups and "vision" not in groups
    assert not any(parameter_group(n) == "vision" for n in moved)
    assert not changed(reference.model, ref_before), "the reference policy must stay frozen"
    assert all(not p.requires_grad for p in reference.model.parameters())
    assert reference.model is not model and not any(m is reference.model for m in algo.model.modules())


def test_lora_step_changes_only_adapters_and_reference_is_the_base_model(tiny, tmp_path):
    base, proc = fresh(tiny)
    frozen_base = copy.deepcopy(base)
    model = prepare_model_for_training(base, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0,
                                                          train_embeddings=False), freeze_vision=True)
    algo = algorithm(model, proc, beta=0.05, reference=ReferencePolicy.build("adapters_disabled", model))
    before = snapshot(model)
    torch.manual_seed(2)
    fit(module_of(algo), [batch_of(proc)], 1, tmp_path)
    moved = changed(model, before)
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:5]
    # after the step the adapters are non-zero: the policy differs from the base, the reference does not
    torch.manual_seed(3)
    r = algo.rollout(batch_of(proc, rows=(0, 1)))
    base_logps = completion_logprobs(frozen_base, r.batch, r.completion_ids, r.completion_mask, algo.temperature)
    assert_close(r.ref_logps, base_logps, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        policy_logps = completion_logprobs(model, r.batch, r.completion_ids, r.completion_mask, algo.temperature)
    assert (policy_logps - base_logps).abs().max() > 1e-4


def test_beta_zero_builds_no_reference(tiny, monkeypatch):
    from samtok.rl.config import GRPOConfig, reference_kind

    def no_copies(*args, **kwargs):
        raise AssertionError("a reference copy was made with beta = 0")

    monkeypatch.setattr(ReferencePolicy, "frozen_copy", classmethod(no_copies))
    for lora in (True, False):
        cfg = GRPOConfig()
        cfg.loss.beta, cfg.lora.enabled = 0.0, lora
        assert reference_kind(cfg) is None
        assert ReferencePolicy.build(reference_kind(cfg), tiny[0]) is None
    cfg = GRPOConfig()
    assert reference_kind(cfg) == "adapters_disabled"
    cfg.lora.enabled = False
    assert reference_kind(cfg) == "copy"
    model, proc = tiny
    algo = algorithm(model, proc, beta=0.0, reference=None)
    r = algo.rollout(batch_of(proc, rows=(0,)))
    assert algo.reference is None and r.ref_logps is None


# ------------------------------------------------------------------------------------------ loss parity


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batched_gradient_equals_the_full_batch_grpo_loss(tiny, loss_type):
    model, proc = fresh(tiny)
    reference = ReferencePolicy.build("copy", model)
    with torch.no_grad():  # make the policy differ from the reference so that the KL term matters
        for p in model.model.language_model.layers[0].parameters():
            p.add_(0.01 * torch.randn_like(p))
    algo = algorithm(model, proc, beta=0.1, reference=reference, micro_batch_size=5, loss_type=loss_type)
    torch.manual_seed(4)
    r = algo.rollout(batch_of(proc))
    assert [len(m) for m in algo.micro_batches(r.size)] == [5, 5, 2]
    model.zero_grad()
    total = sum(algo.loss(r, rows).loss for rows in algo.micro_batches(r.size))
    total.backward()
    micro_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logps = completion_logprobs(model, r.batch, r.completion_ids, r.completion_mask, algo.temperature)
    full = grpo_loss(logps, r.advantages, r.completion_mask, None, r.ref_logps, algo.loss_config)
    full.loss.backward()
    assert_close(total.detach(), full.loss.detach(), atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert_close(micro_grads[n], p.grad, atol=1e-6, rtol=1e-4)


def test_the_steps_loss_equals_grpo_loss_on_the_same_tensors(tiny, tmp_path):
    model, proc = fresh(tiny)
    reference = ReferencePolicy.build("copy", model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.02 * torch.randn_like(model.lm_head.weight))
    start = copy.deepcopy(model)
    algo = algorithm(model, proc, beta=0.04, reference=reference, micro_batch_size=4, loss_type="dr_grpo")
    module = module_of(algo)
    torch.manual_seed(5)
    fit(module, [batch_of(proc)], 1, tmp_path)
    r = module.last_rollout
    logps = completion_logprobs(start, r.batch, r.completion_ids, r.completion_mask, algo.temperature)
    expected = grpo_loss(logps, r.advantages, r.completion_mask, None, r.ref_logps,
                         GRPOLossConfig(num_generations=4, beta=0.04, loss_type="dr_grpo", max_completion_length=6))
    assert len(module.last_losses) == 1 and len(module.last_losses[0]) == 3
    assert sum(module.last_losses[0]) == pytest.approx(float(expected.loss), abs=1e-6, rel=1e-5)
    for key in ("kl", "policy_loss", "ratio/mean", "clip_ratio/region_mean"):  # merged over micro-batches
        assert module.history[-1][key] == pytest.approx(float(expected.metrics[key]), rel=1e-4, abs=1e-7), key


def test_two_iterations_reuse_the_stored_old_logprobs(tiny, tmp_path, monkeypatch):
    model, proc = fresh(tiny)
    start = copy.deepcopy(model)
    calls = []

    def spy(logps, advantages, completion_mask, old_logps=None, ref_logps=None, config=None, num_items=None):
        calls.append((logps.detach().clone(), None if old_logps is None else old_logps.clone()))
        return grpo_loss(logps, advantages, completion_mask, old_logps, ref_logps, config, num_items)

    monkeypatch.setattr(algorithm_module, "grpo_loss", spy)
    algo = algorithm(model, proc, num_iterations=2, epsilon_low=0.2, epsilon_high=0.2)
    module = module_of(algo, lr=5e-2)
    torch.manual_seed(6)
    trainer = fit(module, [batch_of(proc)] * 3, 2, tmp_path)
    assert trainer.global_step == 2 and len(module.history) == 1, "one batch, two optimiser steps"
    r = module.last_rollout
    assert r.old_logps is not None and len(calls) == 2
    old_expected = completion_logprobs(start, r.batch, r.completion_ids, r.completion_mask, algo.temperature)
    assert_close(r.old_logps, old_expected, atol=1e-5, rtol=1e-5)
    width = calls[0][0].shape[1]
    for logps, old in calls:
        assert torch.equal(old, r.old_logps[:, :width]), "every pass compares with the policy that sampled"
    assert_close(calls[0][0], calls[0][1], atol=1e-5, rtol=1e-5)  # first pass: ratio 1
    assert (calls[1][0] - calls[1][1]).abs().max() > 1e-3  # second pass: the policy has moved
    assert module.history[-1]["iter1/ratio/mean"] != pytest.approx(1.0, abs=1e-6)
    # one iteration: no old log-probs are computed or passed (TRL: the detached current ones)
    calls.clear()
    algo1 = algorithm(copy.deepcopy(start), proc, num_iterations=1)
    fit(module_of(algo1), [batch_of(proc)], 1, tmp_path)
    assert len(calls) == 1 and calls[0][1] is None


# ------------------------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_mean_reward_rises_on_a_simple_reward(tiny, tmp_path):
    """Can fail: a wrong sign, misaligned advantages or a broken optimiser step keep the reward flat."""
    model, proc = fresh(tiny)
    model = prepare_model_for_training(model, LoraSettings(enabled=False), freeze_vision=True)
    algo = algorithm(model, proc, G=8, max_new_tokens=6)
    module = module_of(algo, lr=1e-2)
    torch.manual_seed(7)
    fit(module, [batch_of(proc, rows=(0, 1))] * 30, 30, tmp_path)  # ~6 s on one idle core
    rewards = [h["reward/mean"] for h in module.history]
    first, last = float(np.mean(rewards[:5])), float(np.mean(rewards[-5:]))
    # measured: ~0.57 -> ~0.99 (a random policy writes mask words about half the time)
    assert last > first + 0.25 and last > 0.85, (first, last, rewards)
