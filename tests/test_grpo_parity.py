"""Parity of samtok.rl.grpo (and the reward contract of samtok.rl.rewards) with TRL 1.16's GRPOTrainer.

What runs TRL's own code and what is re-expressed:

* Loss, gradient and logged metrics: TRL's ``GRPOTrainer._compute_loss`` itself, called unbound on
  an instance made with ``object.__new__(GRPOTrainer)`` (no ``__init__``) that carries only the
  attributes ``_compute_loss`` reads. Two things are stand-ins: ``_get_per_token_logps_and_entropies``
  (returns our log-prob tensor instead of running a model) and ``accelerator`` (single process:
  ``reduce``/``gather`` are the identity). Everything else — ratio, clipping, k3 KL, aggregation,
  clip metrics — is TRL's code path (``importance_sampling_level="token"``, no vLLM, no entropy
  masking, ``delta=None``, one gradient-accumulation step unless stated).
* Advantages: TRL computes them inline in ``_generate_and_score_completions`` (not callable on plain
  tensors). :func:`_trl_advantages` re-expresses those lines ("sum_then_normalize") with TRL's own
  ``nanstd``; in addition :func:`test_trl_trainer_calls_our_reward_and_matches_advantages` runs the
  real trainer on a tiny random model and compares the advantages TRL logged with ours, computed
  from the rewards TRL logged — TRL's code end to end, no re-expression.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

trl = pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from samtok.rl.grpo import GRPOLossConfig, group_advantages, grpo_loss  # noqa: E402
from samtok.rl.rewards import RewardSpec, RewardWeights, answer_matching_reward, build_reward_fn  # noqa: E402
from samtok.tokenizer.codec import MaskCodec  # noqa: E402

G = 4  # completions per prompt
B, T = 3 * G, 7


# ------------------------------------------------------------------------------ TRL stand-ins


class _SingleProcessAccelerator:
    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor


def _trl_trainer(loss_type, beta, eps_low, eps_high, max_completion_length, logps,
                 grad_accum=1, steps_per_generation=1):
    """A GRPOTrainer whose __init__ never ran, holding just the state _compute_loss reads."""
    tr = object.__new__(GRPOTrainer)
    tr._get_per_token_logps_and_entropies = lambda model, *a, **k: (logps, torch.zeros_like(logps), None)
    tr.model = SimpleNamespace(training=True)
    tr.accelerator = _SingleProcessAccelerator()
    tr.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps_per_generation)
    tr.loss_type, tr.beta = loss_type, beta
    tr.epsilon_low, tr.epsilon_high = eps_low, eps_high
    tr.max_completion_length = max_completion_length
    tr.importance_sampling_level = "token"
    tr.top_entropy_quantile = 1.0
    tr.off_policy_mask_threshold = None
    tr.aux_loss_enabled = False
    tr.use_vllm = False
    tr._entropy_bonus_enabled = False
    tr.current_gradient_accumulation_steps = grad_accum
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return tr


def _trl_loss(loss_type, data, beta, eps_low=0.2, eps_high=0.28, max_completion_length=T, with_old=True,
              num_items=None, grad_accum=1, steps_per_generation=1):
    logps = data["logps"].clone().requires_grad_(True)
    tr = _trl_trainer(loss_type, beta, eps_low, eps_high, max_completion_length, logps,
                      grad_accum, steps_per_generation)
    mask = data["mask"]
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": data["adv"], "ref_per_token_logps": data["ref"],
        "num_items_in_batch": torch.as_tensor(float(mask.sum()) if num_items is None else num_items),
    }
    if with_old:
        inputs["old_per_token_logps"] = data["old"]
    loss = GRPOTrainer._compute_loss(tr, None, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad, {k: v[-1] for k, v in tr._metrics["train"].items()}


def _ours(loss_type, data, beta, eps_low=0.2, eps_high=0.28, max_completion_length=T, with_old=True,
          num_items=None):
    logps = data["logps"].clone().requires_grad_(True)
    cfg = GRPOLossConfig(num_generations=G, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
                         loss_type=loss_type, max_completion_length=max_completion_length)
    out = grpo_loss(logps, data["adv"], data["mask"], old_logps=data["old"] if with_old else None,
                    ref_logps=data["ref"] if beta else None, config=cfg, num_items=num_items)
    (grad,) = torch.autograd.grad(out.loss, logps)
    return out.loss.detach(), grad, {k: float(v) for k, v in out.metrics.items()}


def _trl_advantages(rewards, num_generations, scale_rewards):
    """TRL 1.16 ``_generate_and_score_completions``, "sum_then_normalize" branch, re-expressed with
    the weighted reward sum already done; ``nanstd`` is TRL's function."""
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0,  0.3, 0.3, 0.3, 0.3,  0.0, 1.0, 1.0, 0.25])
    lengths = torch.tensor([7, 1, 4, 6, 2, 7, 5, 3, 7, 6, 1, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logps + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)  # several ratios outside the clip range
    old[4:8, 0] = logps[4:8, 0] - 0.5  # ratio e^0.5 and e^-0.5 where the advantage is exactly 0
    old[4:8, 1] = logps[4:8, 1] + 0.5
    ref = logps + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = group_advantages(rewards, G).to(torch.float64)
    return {"rewards": rewards, "mask": mask, "logps": logps, "old": old, "ref": ref, "adv": adv}


# ------------------------------------------------------------------------------ advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(data, scale):
    r = data["rewards"]
    assert_close(group_advantages(r, G, scale), _trl_advantages(r, G, scale))
    with_nan = r.clone()
    with_nan[[2, 9]] = float("nan")  # unscorable completions (every reward function returned None)
    assert_close(group_advantages(with_nan, G, scale), _trl_advantages(with_nan, G, scale))


# ------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_gradient_and_metrics_match_trl(data, loss_type, beta):
    """num_iterations > 1: old log-probs differ from the current ones, so clipping is active."""
    ours, ours_grad, ours_m = _ours(loss_type, data, beta)
    theirs, theirs_grad, theirs_m = _trl_loss(loss_type, data, beta)
    assert_close(ours, theirs)
    assert_close(ours_grad, theirs_grad)
    assert ours_m["clip_ratio/region_mean"] > 0.1  # the case really exercises clipping
    keys = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
            "clip_ratio/high_max"] + (["kl"] if beta else [])
    for k in keys:
        assert ours_m[k] == pytest.approx(theirs_m[k], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_on_policy_step_matches_trl(data, loss_type):
    """num_iterations = 1: no old log-probs; both use the detached current ones (ratio 1)."""
    ours, ours_grad, _ = _ours(loss_type, data, 0.04, with_old=False)
    theirs, theirs_grad, _ = _trl_loss(loss_type, data, 0.04, with_old=False)
    assert_close(ours, theirs)
    assert_close(ours_grad, theirs_grad)


def test_dapo_equals_trl_bnpo_and_global_token_count(data):
    ours, ours_grad, _ = _ours("dapo", data, 0.04)
    theirs, theirs_grad, _ = _trl_loss("bnpo", data, 0.04)  # TRL's local-token normalisation
    assert_close(ours, theirs)
    assert_close(ours_grad, theirs_grad)
    # Two accumulation steps per generation: TRL normalises by the tokens of the whole window.
    window = 2.5 * float(data["mask"].sum())
    ours, ours_grad, _ = _ours("dapo", data, 0.04, num_items=window)
    theirs, theirs_grad, _ = _trl_loss("dapo", data, 0.04, num_items=window, grad_accum=2, steps_per_generation=2)
    assert_close(ours, theirs)
    assert_close(ours_grad, theirs_grad)


def test_dr_grpo_uses_max_completion_length(data):
    ours, _, _ = _ours("dr_grpo", data, 0.0, max_completion_length=64)
    theirs, _, _ = _trl_loss("dr_grpo", data, 0.0, max_completion_length=64)
    assert_close(ours, theirs)


# ------------------------------------------------------------------------------ a real TRL run

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_model_dir(path):
    """A random 1-layer Qwen2 LM with a byte-level vocabulary plus the 514 mask words (non-special)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    hf.add_tokens(MaskCodec().tokens)
    hf.eos_token, hf.pad_token = "<|im_end|>", "<|endoftext|>"
    hf.chat_template = CHAT_TEMPLATE
    cfg = Qwen2Config(vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id, bos_token_id=None)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    hf.save_pretrained(path)


def test_trl_trainer_calls_our_reward_and_matches_advantages():
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    codec = MaskCodec()
    gts = ["No target.", codec.format(3, 4) + "," + codec.format(7, 1)]
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "Please segment the cat."}],
                   [{"role": "user", "content": "Please segment the dogs."}]],
        "ground_truth": gts,
    })
    calls = []

    def recorder(prompts, completions, completion_ids, **kwargs):  # varied rewards -> non-trivial advantages
        calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
        return [float(sum(ids) % 7) / 7 for ids in completion_ids]

    combined = build_reward_fn(RewardSpec(weights=RewardWeights(answer_matching=1.0, no_repeat=0.5)))
    logged_metrics = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged_metrics.append(dict(logs or {}))

    with tempfile.TemporaryDirectory() as d:
        _tiny_model_dir(d + "/model")
        args = GRPOConfig(output_dir=d + "/out", per_device_train_batch_size=2 * G, num_generations=G,
                          max_completion_length=6, max_steps=1, report_to="none", use_cpu=True,
                          logging_steps=1, save_strategy="no", beta=0.0, loss_type="grpo",
                          scale_rewards="group", reward_weights=[1.0, 0.5, 0.25], seed=0)
        trainer = GRPOTrainer(model=d + "/model", reward_funcs=[answer_matching_reward, recorder, combined],
                              args=args, train_dataset=ds, callbacks=[Keep()])
        trainer.train()

    assert len(calls) == 1
    kw = calls[0]
    assert {"prompts", "completions", "completion_ids", "ground_truth", "trainer_state",
            "log_extra", "log_metric"} <= set(kw)
    completions = kw["completions"]
    assert len(completions) == 2 * G and len(kw["ground_truth"]) == 2 * G
    assert all(isinstance(c, list) and c[-1]["role"] == "assistant" for c in completions)  # conversational
    # G completions per prompt, consecutive; the ground truth repeated alongside.
    assert [kw["ground_truth"][i * G] for i in range(2)] in (gts, gts[::-1])
    assert all(kw["ground_truth"][i] == kw["ground_truth"][i - i % G] for i in range(2 * G))

    # What TRL logged for our functions is what they return on the kwargs TRL passed.
    logged = {name: torch.tensor(list(v)) for name, v in trainer._logs["rewards"].items()}
    assert set(logged) == {"answer_matching_reward", "recorder", "samtok_reward"}
    assert_close(logged["answer_matching_reward"], torch.tensor(answer_matching_reward(**kw)))
    assert_close(logged["samtok_reward"], torch.tensor(combined(**kw)))
    assert any("reward_components/no_repeat" in entry for entry in logged_metrics)  # log_metric reached TRL

    # TRL's advantages (its real code path) = ours on TRL's weighted reward sum.
    total = logged["answer_matching_reward"] + 0.5 * logged["recorder"] + 0.25 * logged["samtok_reward"]
    theirs = torch.tensor(list(trainer._logs["advantages"]))
    assert theirs.abs().sum() > 0
    assert_close(group_advantages(total, G, "group"), theirs)
