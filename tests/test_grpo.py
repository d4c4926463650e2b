"""GRPO math on hand-computed numbers: advantages, k3 KL, clipping at the boundaries, aggregation."""

import math

import pytest
import torch
from torch.testing import assert_close

from samtok.core.config import ConfigError, load_config
from samtok.core.errors import SamtokError
from samtok.rl.grpo import (
    GRPOLossConfig,
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    importance_ratio,
    kl_k3,
)

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


# ------------------------------------------------------------------------------ advantages


def test_group_advantages_with_and_without_std_scaling():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 2.0, 4.0])
    # group 1: mean 0.25, Bessel std sqrt((0.75² + 3·0.25²)/3) = 0.5; group 2: mean 3, std sqrt(4/3)
    s2 = math.sqrt(4 / 3)
    assert_close(group_advantages(r, 4, "group", eps=0.0),
                 torch.tensor([1.5, -0.5, -0.5, -0.5, -1 / s2, 1 / s2, -1 / s2, 1 / s2]))
    assert_close(group_advantages(r, 4, "none"), torch.tensor([0.75, -0.25, -0.25, -0.25, -1.0, 1.0, -1.0, 1.0]))
    eps = 1e-4
    assert_close(group_advantages(r, 4, "group")[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + eps))
    batch_std = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 2.0, 4.0]).std()  # Bessel, whole batch
    assert_close(group_advantages(r, 4, "batch", eps=0.0),
                 torch.tensor([0.75, -0.25, -0.25, -0.25, -1.0, 1.0, -1.0, 1.0]) / batch_std)


def test_equal_rewards_give_zero_advantages():
    r = torch.tensor([0.3, 0.3, 0.3, 0.3, 1.0, 1.0, 1.0, 1.0])
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(r, 4, scale)[:4], torch.zeros(4))
    assert torch.equal(group_advantages(r, 4, "group"), torch.zeros(8))
    assert torch.equal(group_advantages(torch.tensor([0.2, 0.9]), 1), torch.zeros(2))  # G = 1: no spread


def test_nan_rewards_are_left_out_and_get_zero():
    r = torch.tensor([1.0, float("nan"), 0.0, 0.5])
    # mean 0.5 over the three scored ones, std sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    assert_close(group_advantages(r, 4, eps=0.0), torch.tensor([1.0, 0.0, -1.0, 0.0]))


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(SamtokError):
        group_advantages(torch.zeros(4), 4, "std")
    assert_close(group_advantages([1.0, 0.0], 2, "none"), torch.tensor([0.5, -0.5]))  # lists accepted


# ------------------------------------------------------------------------------ KL, ratio


def test_kl_k3_values():
    logp = t(-1.0, -2.0, -0.5)
    ref = t(-1.0, -1.0, -1.5)  # d = ref - logp = 0, 1, -1
    assert_close(kl_k3(logp, ref), t(0.0, math.e - 2, math.exp(-1)))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g, dtype=D), torch.randn(1000, generator=g, dtype=D)
    assert (kl_k3(a, b) >= 0).all()


def test_kl_k3_is_unbiased_for_the_true_kl():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=D)
    q = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2], dtype=D)
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = float(kl_k3(p.log()[x], q.log()[x]).mean())
    assert estimate == pytest.approx(true_kl, rel=0.02)


def test_importance_ratio():
    logp = t(-1.0, -2.0).requires_grad_(True)
    assert_close(importance_ratio(logp, t(-1.5, -1.0)), t(math.exp(0.5), math.exp(-1.0)))
    on_policy = importance_ratio(logp)
    assert_close(on_policy, t(1.0, 1.0))
    (g,) = torch.autograd.grad(on_policy.sum(), logp)
    assert_close(g, t(1.0, 1.0))  # ratio 1, but the gradient of the policy


# ------------------------------------------------------------------------------ clipping


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_clipping_at_the_epsilon_boundaries(adv):
    lo, hi = 0.2, 0.28
    r = t(0.7, 0.8 - 1e-6, 0.8 + 1e-6, 1.0, 1.28 - 1e-6, 1.28 + 1e-6, 1.5)
    logp = r.log().requires_grad_(True)
    ratio = importance_ratio(logp, torch.zeros_like(logp))
    loss = clipped_surrogate(ratio.unsqueeze(0), torch.tensor([adv], dtype=D), lo, hi)[0]
    clipped = r.clamp(1 - lo, 1 + hi)
    expected = -torch.minimum(r * adv, clipped * adv)
    assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss.sum(), logp)  # d(-ρA)/dlogp = -ρA where not clipped, 0 where clipped
    if adv > 0:  # clipped above 1 + ε_high only
        frozen = torch.tensor([False, False, False, False, False, True, True])
    else:  # clipped below 1 - ε_low only
        frozen = torch.tensor([True, True, False, False, False, False, False])
    assert_close(g, torch.where(frozen, torch.zeros_like(r), -r * adv))


# ------------------------------------------------------------------------------ aggregation


def test_aggregations_hand_computed():
    per_token = t([1.0, 2.0, 3.0], [4.0, 100.0, 100.0])  # padding values must not matter
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert_close(aggregate_loss(per_token, mask, "grpo"), torch.tensor(3.0, dtype=D))  # mean(2, 4)
    assert_close(aggregate_loss(per_token, mask, "dapo"), torch.tensor(2.5, dtype=D))  # 10 / 4
    assert_close(aggregate_loss(per_token, mask, "dapo", num_items=20), torch.tensor(0.5, dtype=D))
    assert_close(aggregate_loss(per_token, mask, "dr_grpo"), torch.tensor(10 / 6, dtype=D))  # 10 / (2·3)
    assert_close(aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=5), torch.tensor(1.0, dtype=D))
    empty = torch.tensor([[1, 1, 1], [0, 0, 0]])  # an empty completion adds 0 to the grpo mean
    assert_close(aggregate_loss(per_token, empty, "grpo"), torch.tensor(1.0, dtype=D))
    with pytest.raises(SamtokError):
        aggregate_loss(per_token, mask, "bnpo")


# ------------------------------------------------------------------------------ the loss


def test_on_policy_grpo_loss_and_gradient():
    adv = t(1.0, -2.0)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logp = t([-1.0, -2.0, -3.0], [-0.5, -0.1, -0.2]).requires_grad_(True)
    out = grpo_loss(logp, adv, mask, config=GRPOLossConfig(beta=0.0, loss_type="grpo"))
    assert_close(out.loss, torch.tensor(0.5, dtype=D))  # ratio 1: mean over sequences of -A = (-1 + 2) / 2
    (g,) = torch.autograd.grad(out.loss, logp)
    # d/dlogp_t = -A_i / |o_i| / B
    assert_close(g, t([-0.25, -0.25, 0.0], [1.0, 0.0, 0.0]))
    assert float(out.metrics["clip_ratio/region_mean"]) == 0.0 and float(out.metrics["kl"]) == 0.0
    assert float(out.metrics["num_tokens"]) == 3.0


def test_kl_term_and_metrics():
    adv = t(1.0, -1.0)
    mask = torch.tensor([[1, 1], [1, 1]])
    logp = t([0.0, 0.0], [0.0, 0.0])
    old = t([-0.5, 0.0], [0.5, 0.0])  # ratios e^0.5 (A>0: high-clipped), 1; e^-0.5 (A<0: low-clipped), 1
    ref = t([1.0, 0.0], [0.0, -1.0])  # k3: e - 2, 0, 0, e^-1
    cfg = GRPOLossConfig(beta=0.1, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")
    out = grpo_loss(logp, adv, mask, old_logps=old, ref_logps=ref, config=cfg)
    kl = torch.tensor([math.e - 2, 0.0, 0.0, math.exp(-1)], dtype=D)
    policy = torch.tensor([-1.2, -1.0, 0.8, 1.0], dtype=D)  # -min(ρA, clip(ρ)A)
    assert_close(out.metrics["policy_loss"], policy.mean())
    assert_close(out.loss, (policy + 0.1 * kl).mean())
    assert_close(out.metrics["kl"], kl.mean())
    assert float(out.metrics["clip_ratio/high_mean"]) == 0.25
    assert float(out.metrics["clip_ratio/low_mean"]) == 0.25
    assert float(out.metrics["clip_ratio/region_mean"]) == 0.5
    assert float(out.metrics["clip_ratio/high_max"]) == 0.5 and float(out.metrics["clip_ratio/low_min"]) == 0.0
    with pytest.raises(ValueError):
        grpo_loss(logp, adv, mask, config=cfg)  # beta > 0 needs reference log-probs
    # beta = 0: the reference is not needed and not used
    out0 = grpo_loss(logp, adv, mask, old_logps=old, config=GRPOLossConfig(beta=0.0, epsilon_high=0.2,
                                                                              loss_type="dapo"))
    assert_close(out0.loss, policy.mean())


def test_passing_detached_current_logps_equals_on_policy():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 5, generator=g, dtype=D)
    mask = torch.ones(4, 5)
    adv = t(0.5, -0.5, 1.0, -1.0)
    a = grpo_loss(logp, adv, mask, config=GRPOLossConfig(beta=0.0)).loss
    b = grpo_loss(logp, adv, mask, old_logps=logp.clone(), config=GRPOLossConfig(beta=0.0)).loss
    assert_close(a, b)


def test_loss_config_validation_and_yaml_overrides():
    with pytest.raises(SamtokError):
        GRPOLossConfig(loss_type="bnpo")
    with pytest.raises(SamtokError):
        GRPOLossConfig(epsilon_low=1.0)
    cfg = load_config(GRPOLossConfig, overrides=["loss_type=dr_grpo", "max_completion_length=256", "beta=0"])
    assert (cfg.loss_type, cfg.max_completion_length, cfg.beta) == ("dr_grpo", 256, 0.0)
    with pytest.raises(ConfigError):
        load_config(GRPOLossConfig, overrides=["kl_coef=0.1"])
