"""The GRPO family's pure functions (align/losses.py) against hand computations, naive loops and TRL 1.16's
GRPOTrainer._compute_loss on the same log-probs, advantages and masks."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from align import losses

# ---- group advantages ----------------------------------------------------------------------------------------

# Three groups of 3 (the middle one all equal: 0.9 is a value whose float32 group mean is off by one ulp, so
# TRL's formula would give ~6e-4 there instead of 0) and two groups of 4.
TABLE_3 = [[1.0, 0.0, 0.0], [0.9, 0.9, 0.9], [2.0, -1.0, 0.5]]
TABLE_4 = [[1.0, 1.0, 0.0, 0.0], [4.0, 0.0, 2.0, 2.0]]


def hand_advantages(table: list[list[float]], estimator: str, scale_rewards: bool = True) -> list[float]:
    out = []
    for group in table:
        mean = sum(group) / len(group)
        if len(set(group)) == 1:
            out += [0.0] * len(group)
        elif estimator == "grpo":
            std = statistics.stdev(group) if scale_rewards else None  # unbiased (n - 1), as torch.std
            out += [(s - mean) / (std + 1e-4) if scale_rewards else s - mean for s in group]
        elif estimator == "rloo":
            out += [s - (sum(group) - s) / (len(group) - 1) for s in group]  # s_i - mean of the others
        else:
            out += [s - mean for s in group]
    return out


@pytest.mark.parametrize("table", [TABLE_3, TABLE_4], ids=["n3", "n4"])
@pytest.mark.parametrize("estimator,scale_rewards", [("grpo", True), ("grpo", False), ("rloo", True),
                                                     ("reinforce_pp_baseline", True)])
def test_group_advantages_match_hand_computation(table, estimator, scale_rewards):
    scores = torch.tensor([s for group in table for s in group])
    got = losses.group_advantages(scores, len(table[0]), estimator, scale_rewards)
    want = torch.tensor(hand_advantages(table, estimator, scale_rewards))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_group_advantages_hand_values_for_one_group():
    """Written out: [1, 0, 0] has mean 1/3 and unbiased std sqrt(1/3); the leave-one-out baselines are 0, 1/2, 1/2."""
    scores = torch.tensor([1.0, 0.0, 0.0])
    std = math.sqrt(1 / 3)
    want = torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (std + 1e-4)
    torch.testing.assert_close(losses.group_advantages(scores, 3, "grpo"), want)
    torch.testing.assert_close(losses.group_advantages(scores, 3, "rloo"), torch.tensor([1.0, -0.5, -0.5]))
    torch.testing.assert_close(losses.group_advantages(scores, 3, "grpo", scale_rewards=False),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3]))


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_all_equal_group_gives_exact_zeros_not_nan(estimator):
    scores = torch.tensor([0.9, 0.9, 0.9, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.0, 0.0, 0.0, 0.0])
    for n, part in ((3, scores[:3]), (7, scores[3:10]), (4, scores[10:])):
        got = losses.group_advantages(part, n, estimator)
        assert torch.equal(got, torch.zeros(n)), (n, got)


def test_group_advantages_accept_integer_scores():
    torch.testing.assert_close(losses.group_advantages(torch.tensor([1, 0, 0, 0]), 2, "rloo"),
                               torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_group_of_one_raises():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        losses.group_advantages(torch.tensor([1.0, 2.0]), 1, "grpo")


def test_batch_not_divisible_by_group_size_raises():
    with pytest.raises(ValueError, match="groups of 3"):
        losses.group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 3, "grpo")


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        losses.group_advantages(torch.tensor([1.0, 2.0]), 2, "ppo")


# ---- discounted returns --------------------------------------------------------------------------------------

def test_discounted_returns_match_naive_loop():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 4, 0]
    mask = torch.zeros(4, 5)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    rewards = torch.randn(4, 5, generator=g) + 100.0 * (1 - mask)  # junk after each end must not leak
    got = losses.discounted_returns(rewards, mask, gamma=0.9)
    want = torch.zeros(4, 5)
    for row, n in enumerate(lengths):
        r = rewards[row, :n].tolist()
        for t in range(n):
            want[row, t] = sum(0.9 ** (k - t) * r[k] for k in range(t, n))
    torch.testing.assert_close(got, want)


# ---- clipped policy loss and aggregation against TRL's GRPOTrainer ------------------------------------------

HOW = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm", "dapo": "token_mean",
       "bnpo": "token_mean"}
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def trl_grpo():
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer


class FakeAccelerator:
    """One process: gathers and reductions are the identity."""
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(trainer_cls, logprobs, old_logprobs, advantages, mask, *, loss_type, epsilon_low, epsilon_high,
             level="token", beta=0.0, ref_logprobs=None, is_weights=None, bias_correction_kl=False,
             accumulation_steps=1, num_items_in_batch=None):
    """TRL's real GRPOTrainer._compute_loss, unbound, on a fake trainer whose model returns `logprobs`."""
    batch, length = logprobs.shape
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, use_vllm=is_weights is not None,
        vllm_importance_sampling_correction=is_weights is not None,
        args=SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None,
                             steps_per_generation=accumulation_steps),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation_steps,
        max_completion_length=MAX_NEW_TOKENS, accelerator=FakeAccelerator(), _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(batch, 1, dtype=torch.long), "prompt_mask": torch.ones(batch, 1),
              "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logprobs,
              "num_items_in_batch": mask.sum() if num_items_in_batch is None else num_items_in_batch}
    if ref_logprobs is not None:
        inputs["ref_per_token_logps"] = ref_logprobs
    if is_weights is not None:
        inputs["importance_sampling_ratio"] = is_weights
    return trainer_cls._compute_loss(fake, None, inputs), fake._metrics["train"]


def rollout(seed: int = 0, batch: int = 6, length: int = 7, per_token_advantages: bool = False):
    """Ragged responses (lengths 1..length, length < MAX_NEW_TOKENS) whose ratios pi/pi_old spread past the clip
    ranges, per token and per sequence: rows 0 and 1 (full length) are shifted far out on the side that clips for
    the sign of their advantage, rows 4 and 5 far out on the side that does not, so some clip and others not."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[:2] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    old = -torch.rand(batch, length, generator=g) * 3
    shift = torch.tensor([1.0, -1.0, 0.0, 0.0, -1.0, 1.0])[:, None]
    logprobs = old + shift + 0.4 * torch.randn(batch, length, generator=g)
    ref = old + 0.3 * torch.randn(batch, length, generator=g)
    engine = old + 0.5 * torch.randn(batch, length, generator=g)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    shape = (batch, length) if per_token_advantages else (batch,)
    advantages = torch.randn(shape, generator=g).abs() * (sign[:, None] if per_token_advantages else sign)
    return logprobs, old, ref, engine, advantages, mask


def ours(logprobs, old, advantages, mask, *, how, clip_low, clip_high, ratio="token", beta=0.0, ref=None,
         is_weights=None, kl_weight=None):
    """Our loss on one batch: clipped_policy_loss (+ beta * k3 KL) aggregated with the whole batch's counts."""
    per_token, clipped = losses.clipped_policy_loss(logprobs, old, advantages, mask, clip_low, clip_high, ratio,
                                                    is_weights)
    if beta:
        kl = losses.kl_penalty(logprobs, ref, "k3")
        per_token = per_token + beta * (kl if kl_weight is None else kl * kl_weight)
    loss = losses.aggregate_loss(per_token, mask, how, mask.sum(), float(len(mask)), MAX_NEW_TOKENS)
    return loss, clipped


EXTRAS = {
    "symmetric": dict(epsilon_low=0.2, epsilon_high=0.2),
    "clip_higher": dict(epsilon_low=0.2, epsilon_high=0.28),
    "beta": dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.04),
    "tis": dict(epsilon_low=0.2, epsilon_high=0.28, tis=True),
    "all": dict(epsilon_low=0.1, epsilon_high=0.3, beta=0.1, tis=True),
}


@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", list(HOW))
def test_loss_and_gradient_match_trl_grpo_trainer(trl_grpo, loss_type, level, extra):
    options = dict(EXTRAS[extra])
    tis = options.pop("tis", False)
    seed = list(HOW).index(loss_type) * 10 + list(EXTRAS).index(extra)
    logprobs, old, ref, engine, advantages, mask = rollout(seed)
    is_weights = losses.truncated_is_weights(old, engine, cap=2.0)[0] if tis else None
    beta = options.get("beta", 0.0)

    theirs_lp = logprobs.clone().requires_grad_()
    theirs, metrics = trl_loss(trl_grpo, theirs_lp, old, advantages, mask, loss_type=loss_type, level=level,
                               ref_logprobs=ref if beta else None, is_weights=is_weights, **options)
    theirs.backward()

    ours_lp = logprobs.clone().requires_grad_()
    loss, clipped = ours(ours_lp, old, advantages, mask, how=HOW[loss_type], clip_low=options["epsilon_low"],
                         clip_high=options["epsilon_high"], ratio=level, beta=beta, ref=ref, is_weights=is_weights)
    loss.backward()

    torch.testing.assert_close(loss, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, atol=1e-5, rtol=1e-5)
    assert ours_lp.grad.abs().sum() > 0
    # TRL's "clip_ratio/region_mean": the clipped fraction of tokens (of sequences at the sequence level)
    region = clipped[:, 0].float().mean() if level == "sequence" else clipped.float().sum() / mask.sum()
    assert 0 < region.item() < 1, "the inputs must clip some tokens and not others"
    assert region.item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)


def test_per_token_advantages_match_trl(trl_grpo):
    logprobs, old, _, _, advantages, mask = rollout(seed=3, per_token_advantages=True)
    theirs_lp = logprobs.clone().requires_grad_()
    theirs, _ = trl_loss(trl_grpo, theirs_lp, old, advantages, mask, loss_type="dapo", epsilon_low=0.2,
                         epsilon_high=0.28)
    theirs.backward()
    ours_lp = logprobs.clone().requires_grad_()
    loss, _ = ours(ours_lp, old, advantages, mask, how="token_mean", clip_low=0.2, clip_high=0.28)
    loss.backward()
    torch.testing.assert_close(loss, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trl_default_bias_corrected_kl_is_k3_times_the_ratio(trl_grpo, level):
    """TRL 1.16 defaults to use_bias_correction_kl=True: its KL term is k3 * w (w the policy ratio of `level`,
    with gradient). Ours is plain k3; a caller wanting TRL's default multiplies by w itself."""
    logprobs, old, ref, _, advantages, mask = rollout(seed=5)
    theirs_lp = logprobs.clone().requires_grad_()
    theirs, _ = trl_loss(trl_grpo, theirs_lp, old, advantages, mask, loss_type="dapo", level=level,
                         epsilon_low=0.2, epsilon_high=0.2, beta=0.1, ref_logprobs=ref, bias_correction_kl=True)
    theirs.backward()
    ours_lp = logprobs.clone().requires_grad_()
    log_ratio = ours_lp - old
    w = torch.exp(log_ratio if level == "token" else losses.masked_mean(log_ratio, mask, 1)[:, None])
    loss, _ = ours(ours_lp, old, advantages, mask, how="token_mean", clip_low=0.2, clip_high=0.2, ratio=level,
                   beta=0.1, ref=ref, kl_weight=w)
    loss.backward()
    torch.testing.assert_close(loss, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, atol=1e-5, rtol=1e-5)
    plain, _ = ours(logprobs, old, advantages, mask, how="token_mean", clip_low=0.2, clip_high=0.2, ratio=level,
                    beta=0.1, ref=ref)
    assert abs(plain.item() - theirs.item()) > 1e-4  # the two KL terms do differ off-policy


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_shares_of_two_micro_batches_match_trl_with_gradient_accumulation(trl_grpo, loss_type):
    """TRL splits a generation batch into equal micro-batches (gradient_accumulation_steps = steps_per_generation =
    2 here); its per-micro-batch losses add up to our shares computed with the whole batch's counts. (TRL's bnpo
    divides each micro-batch by its own token count, so it is a token mean only on one batch.)"""
    logprobs, old, _, _, advantages, mask = rollout(seed=7)
    theirs_lp = logprobs.clone().requires_grad_()
    ours_lp = logprobs.clone().requires_grad_()
    theirs_total, ours_total = 0.0, 0.0
    for part in (slice(0, 3), slice(3, 6)):
        theirs, _ = trl_loss(trl_grpo, theirs_lp[part], old[part], advantages[part], mask[part],
                             loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, accumulation_steps=2,
                             num_items_in_batch=mask.sum())
        theirs.backward()
        per_token, _ = losses.clipped_policy_loss(ours_lp[part], old[part], advantages[part], mask[part], 0.2, 0.28)
        share = losses.aggregate_loss(per_token, mask[part], HOW[loss_type], mask.sum(), 6.0, MAX_NEW_TOKENS)
        share.backward()
        theirs_total, ours_total = theirs_total + theirs.item(), ours_total + share.item()
    assert ours_total == pytest.approx(theirs_total, abs=1e-5)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, atol=1e-5, rtol=1e-5)


def test_k3_kl_penalty_equals_trl_per_token_kl():
    _, logprobs, ref, _, _, _ = rollout(seed=11)
    logprobs = logprobs.clone().requires_grad_()
    ref_minus = ref - logprobs
    trl_kl = torch.exp(ref_minus) - ref_minus - 1  # GRPOTrainer._compute_loss's per_token_kl
    ours_kl = losses.kl_penalty(logprobs, ref, "k3")
    torch.testing.assert_close(ours_kl, trl_kl, atol=1e-6, rtol=1e-6)
    (g_ours,) = torch.autograd.grad(ours_kl.sum(), logprobs, retain_graph=True)
    (g_trl,) = torch.autograd.grad(trl_kl.sum(), logprobs)
    torch.testing.assert_close(g_ours, g_trl, atol=1e-6, rtol=1e-6)


# ---- clipped policy loss: hand values ------------------------------------------------------------------------

def test_clipped_policy_loss_hand_values_with_clip_higher():
    """Ratios 1.5, 0.5, 1.1 and 0.7 against a clip range [0.8, 1.28]: the ratio 1.5 with A > 0 and 0.5 with A < 0
    are clipped (zero gradient), 1.1 is inside, and 0.7 with A > 0 is not clipped (min picks the unclipped term)."""
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    old = torch.zeros(1, 4)
    logprobs = torch.log(ratios).requires_grad_()
    advantages = torch.tensor([[2.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4)
    loss, clipped = losses.clipped_policy_loss(logprobs, old, advantages, mask, 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.28 * 2.0, 0.8, -1.1, -0.7]]))
    assert clipped.tolist() == [[True, True, False, False]]
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -1.1, -0.7]]))  # d(-w A)/d log w = -w A


def test_sequence_ratio_is_the_masked_mean_log_ratio_and_clipped_is_masked():
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.3, 0.6, 99.0], [-0.1, 0.1, 0.0]])  # 99: padding, must not enter the mean
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, clipped = losses.clipped_policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2, "sequence")
    # row 0: w = exp(0.45) = 1.568 > 1.2, clipped to 1.2; row 1: w = exp(0) = 1, unclipped
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2, -1.2], [1.0, 1.0, 1.0]]))
    assert clipped.tolist() == [[True, True, False], [False, False, False]]


def test_is_weights_scale_the_loss_without_gradient():
    logprobs = torch.tensor([[0.0, 0.1]], requires_grad=True)
    weights = torch.tensor([[0.5, 2.0]], requires_grad=True)
    loss, _ = losses.clipped_policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.2,
                                         is_weights=weights)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -2.0 * math.exp(0.1)]]))
    loss.sum().backward()
    assert weights.grad is None


def test_unknown_ratio_and_aggregation_raise():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown ratio"):
        losses.clipped_policy_loss(x, x, torch.zeros(1), x + 1, 0.2, 0.2, ratio="tokens")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        losses.aggregate_loss(x, x + 1, "mean", 2, 1, 2)


# ---- aggregation over micro-batches --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_shares_of_two_micro_batches_sum_to_the_whole_batch(how):
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(5, 6, generator=g)
    lengths = torch.tensor([6, 1, 4, 2, 5])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    per_token_leaf = per_token.clone().requires_grad_()
    whole = losses.aggregate_loss(per_token_leaf, mask, how, mask.sum(), 5, max_new_tokens=10)
    (want_grad,) = torch.autograd.grad(whole, per_token_leaf)
    # unequal micro-batches (2 and 3 sequences, 7 and 11 tokens): a per-micro-batch mean would be wrong here
    total = sum(losses.aggregate_loss(per_token_leaf[part], mask[part], how, mask.sum(), torch.tensor(5.0), 10)
                for part in (slice(0, 2), slice(2, 5)))
    (got_grad,) = torch.autograd.grad(total, per_token_leaf)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(got_grad, want_grad)
    naive = {"token_mean": (per_token * mask).sum() / lengths.sum(),
             "seq_mean_token_mean": sum((per_token[i, :n].mean() for i, n in enumerate(lengths.tolist()))) / 5,
             "seq_mean_token_sum_norm": (per_token * mask).sum() / 10 / 5}[how]
    torch.testing.assert_close(whole, naive)


def test_aggregate_of_an_empty_minibatch_is_zero_not_nan():
    for how in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert losses.aggregate_loss(torch.ones(1, 3), torch.zeros(1, 3), how, 0, 0, 3).item() == 0.0


# ---- truncated importance sampling and overlong penalty ------------------------------------------------------

def test_truncated_is_weights_hand_values():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.2), -1.0]], requires_grad=True)
    engine = torch.tensor([[math.log(0.25), math.log(0.9), math.log(0.8), float("nan")]])
    weights, capped = losses.truncated_is_weights(old, engine, cap=1.5)
    # ratios 2 (capped to 1.5), 1, 0.25, and NaN (the engine could not score it) -> 1
    torch.testing.assert_close(weights, torch.tensor([[1.5, 1.0, 0.25, 1.0]]))
    assert capped.tolist() == [[True, False, False, False]]
    assert not weights.requires_grad


def test_overlong_penalty_hand_values():
    lengths = torch.tensor([0, 12, 13, 14, 15, 16])
    # max 16, buffer 4: free up to 12, then -1/4 per token, -penalty at 16
    got = losses.overlong_penalty(lengths, max_new_tokens=16, buffer=4, penalty=2.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.5, -2.0]))
    torch.testing.assert_close(losses.overlong_penalty(torch.tensor([20]), 16, 4), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="buffer"):
        losses.overlong_penalty(lengths, 16, 0)
