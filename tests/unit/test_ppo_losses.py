"""PPO's pure functions (align/losses.py) against naive loops and hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from align import losses


def ragged_batch(seed: int = 0):
    """Three responses of lengths 4, 2 and 3 in a [3, 4] layout, with junk after each end (it must not leak)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [4, 2, 3]
    mask = torch.zeros(3, 4)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    junk = 100.0 * (1 - mask)
    rewards = torch.randn(3, 4, generator=g) + junk
    values = torch.randn(3, 4, generator=g) + junk
    return rewards, values, mask, lengths


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """The textbook loop over one episode:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_loop(gamma, lam):
    rewards, values, mask, lengths = ragged_batch()
    advantages, returns = losses.gae(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        want_a, want_r = naive_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, lam)
        assert advantages[row, :n].tolist() == pytest.approx(want_a, abs=1e-5)
        assert returns[row, :n].tolist() == pytest.approx(want_r, abs=1e-5)
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_gae_with_lambda_one_and_no_discount_is_return_minus_value():
    """Monte Carlo: A_t = sum_{k>=t} r_k - V_t."""
    rewards, values, mask, lengths = ragged_batch(1)
    advantages, _ = losses.gae(rewards, values, mask, 1.0, 1.0)
    for row, n in enumerate(lengths):
        togo = rewards[row, :n].flip(0).cumsum(0).flip(0)
        assert torch.allclose(advantages[row, :n], togo - values[row, :n], atol=1e-5)


def test_shaped_rewards_put_the_score_on_the_last_token_and_kl_everywhere():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    out = losses.shaped_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(out, torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.25 - 1.0, 0.0, 0.0]]))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert losses.kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    # k3 = (r - 1) - log r with r = exp(ref - logp)
    want = [(math.exp(-0.5) - 1) + 0.5, (math.exp(1.0) - 1) - 1.0, 0.0]
    assert losses.kl_penalty(logp, ref, "k3").tolist() == pytest.approx(want, abs=1e-6)
    assert (losses.kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        losses.kl_penalty(logp, ref, "k2")


def test_kl_estimators_are_unbiased_for_the_true_kl():
    """Both estimators average to KL(p || q) over samples from p."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum().item()
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for estimator in ("k1", "k3"):
        est = losses.kl_penalty(p.log()[samples], q.log()[samples], estimator).mean().item()
        assert est == pytest.approx(true_kl, abs=5e-3), estimator


def test_policy_loss_by_hand():
    logp = torch.tensor([0.0, math.log(1.5), math.log(0.5), math.log(1.1)])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    loss, clipped = losses.ppo_policy_loss(logp, old, adv, clip_eps=0.2)
    # ratio 1: -A; ratio 1.5 with A>0: clipped to 1.2 -> -1.2; ratio 0.5 with A<0: max(1.0, 1.6) = 1.6 (clipped);
    # ratio 1.1 with A<0 inside the range: 1.1
    assert loss.tolist() == pytest.approx([-1.0, -1.2, 1.6, 1.1])
    assert clipped.tolist() == [False, True, True, False]


def test_policy_loss_gradient_vanishes_where_clipped():
    logp = torch.tensor([math.log(1.5), math.log(1.1)], requires_grad=True)
    loss, _ = losses.ppo_policy_loss(logp, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.2)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -1.1])  # d(-A r)/d logp = -A r


def test_value_loss_by_hand():
    values = torch.tensor([1.0, 2.0, 0.0])
    old = torch.tensor([0.5, 1.0, 0.0])
    returns = torch.tensor([1.0, 0.0, 1.0])
    loss, clipped = losses.ppo_value_loss(values, old, returns, clip_eps=0.2)
    # 1: V=1 hits R, V_clip=0.7 -> max(0, 0.09)/2; 2: V=2 err 4, V_clip=1.2 err 1.44 -> 2; 3: both 1 -> 0.5
    assert loss.tolist() == pytest.approx([0.045, 2.0, 0.5])
    assert clipped.tolist() == [True, False, False]


def test_adaptive_kl_controller_update_rule():
    # KL above target: e = clip(12/6 - 1, .2) = 0.2 -> beta (1 + 0.2 * 64/10000)
    assert losses.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # below target, inside the clip: e = 5/6 - 1
    assert losses.adaptive_kl_coef(0.1, 5.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 + (5 / 6 - 1) * 0.1))
    # far below: clipped at -0.2
    assert losses.adaptive_kl_coef(0.1, 0.0, 6.0, 100, 100) == pytest.approx(0.1 * 0.8)
    # at the target: unchanged
    assert losses.adaptive_kl_coef(0.3, 6.0, 6.0, 100, 100) == pytest.approx(0.3)


def test_whiten_over_masked_entries_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = losses.whiten(x, mask)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0])
    want = (kept - kept.mean()) / kept.std()
    assert out[mask.bool()].tolist() == pytest.approx(want.tolist(), abs=1e-4)
    assert out[~mask.bool()].abs().sum() == 0


def test_entropy_and_approx_kl_and_explained_variance():
    assert losses.entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)
    assert losses.entropy_from_logits(torch.tensor([[0.0, -1e9]])).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.approx_kl(torch.tensor([0.3]), torch.tensor([0.3])).item() == 0.0
    assert losses.approx_kl(torch.tensor([0.0]), torch.tensor([0.5])).item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert losses.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert losses.explained_variance(torch.full((1, 3), 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
