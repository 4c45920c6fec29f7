import math

import pytest
import torch

from align import losses


def test_sft_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1])
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = math.e / (1 + math.e + math.exp(3))
    expected = -(math.log(p0) + math.log(p1)) / 5  # divided by the global count, not by 2
    assert abs(losses.sft_loss(logits, targets, 5).item() - expected) < 1e-6
    assert torch.allclose(losses.token_logprobs(logits, targets), torch.tensor([math.log(p0), math.log(p1)]))


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    torch.manual_seed(0)
    weight = torch.randn(4, 6, requires_grad=True)
    hidden = torch.randn(10, 4)
    targets = torch.randint(0, 6, (10,))
    losses.sft_loss(hidden @ weight, targets, 10).backward()
    full = weight.grad.clone()
    weight.grad = None
    for part in (slice(0, 3), slice(3, 10)):  # unequal micro-batches: a per-micro-batch mean would be wrong here
        losses.sft_loss(hidden[part] @ weight, targets[part], 10).backward()
    torch.testing.assert_close(weight.grad, full)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert losses.masked_mean(values, mask).item() == (1 + 2 + 6) / 3
    assert losses.masked_mean(values, mask, dim=1).tolist() == [1.5, 6.0]


# ---- reward-model losses ------------------------------------------------------------------------------------

def _groups():
    """Three groups of K = 4, 3, 2 (padded to 4), with a tie in the first."""
    rewards = torch.tensor([[0.3, -1.2, 2.0, 0.7], [1.5, 0.1, -0.4, 0.0], [0.2, 0.9, 0.0, 0.0]], requires_grad=True)
    ranks = torch.tensor([[1.0, 3.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return rewards, ranks, valid


def naive_pairs(ranks_row, k):
    return [(i, j) for i in range(k) for j in range(k) if ranks_row[i] < ranks_row[j]]


def test_kwise_loss_equals_the_naive_sum_over_its_pairs():
    rewards, ranks, valid = _groups()
    per_group = losses.ranking_loss(rewards, ranks, valid)
    for g in range(3):
        k = int(valid[g].sum())
        pairs = naive_pairs(ranks[g].tolist(), k)
        naive = sum(-math.log(1 / (1 + math.exp(-(rewards[g, i].item() - rewards[g, j].item())))) for i, j in pairs)
        assert abs(per_group[g].item() - naive / len(pairs)) < 1e-6
    assert len(naive_pairs(ranks[0].tolist(), 4)) == 5  # C(4,2) = 6 pairs, minus the tie


def test_kwise_gradient_equals_pairwise_expansion():
    """The one-pass K-wise loss and the same groups expanded into separate pairs give the same gradient."""
    rewards, ranks, valid = _groups()
    losses.ranking_loss(rewards, ranks, valid).sum().backward()
    kwise = rewards.grad.clone()
    rewards.grad = None
    total = 0
    for g in range(3):
        pairs = naive_pairs(ranks[g].tolist(), int(valid[g].sum()))
        for i, j in pairs:
            total = total + losses.bradley_terry_loss(rewards[g, i], rewards[g, j]) / len(pairs)
    total.backward()
    torch.testing.assert_close(rewards.grad, kwise)


def test_ties_give_no_pair_or_a_half_target():
    rewards = torch.tensor([[1.0, 3.0]])
    ranks, valid = torch.tensor([[0.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool)
    assert losses.ranking_loss(rewards, ranks, valid).item() == 0.0
    assert losses.ranking_stats(rewards, ranks, valid)[1].item() == 0  # no ordered pair
    half = losses.ranking_loss(rewards, ranks, valid, ties="half").item()
    expected = -(math.log(1 / (1 + math.exp(2))) + math.log(1 / (1 + math.exp(-2)))) / 2
    assert abs(half - expected) < 1e-6


def test_bradley_terry_with_margin():
    assert abs(losses.bradley_terry_loss(torch.tensor(2.0), torch.tensor(0.5), torch.tensor(1.0)).item()
               - math.log(1 + math.exp(-0.5))) < 1e-6
    rewards, ranks, valid = torch.tensor([[2.0, 0.5]]), torch.tensor([[0.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool)
    with_margin = losses.ranking_loss(rewards, ranks, valid, torch.tensor([1.0])).item()
    assert abs(with_margin - math.log(1 + math.exp(-0.5))) < 1e-6


def test_plackett_luce_matches_hand_computation():
    # Best first: response 2 (r=2), then 0 (r=0.5), then 1 (r=-1).
    rewards, ranks = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.0, 2.0, 0.0]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    e = math.exp
    nll = -(math.log(e(2) / (e(2) + e(0.5) + e(-1))) + math.log(e(0.5) / (e(0.5) + e(-1))))
    assert abs(losses.plackett_luce_loss(rewards, ranks, valid).item() - nll / 2) < 1e-6
    # Padding does not change a group's value.
    padded = losses.plackett_luce_loss(torch.tensor([[0.5, -1.0, 2.0, 9.0]]), torch.tensor([[1.0, 2.0, 0.0, 0.0]]),
                                       torch.tensor([[1, 1, 1, 0]], dtype=torch.bool))
    assert abs(padded.item() - nll / 2) < 1e-6


def test_plackett_luce_on_a_pair_is_bradley_terry():
    rewards, ranks, valid = torch.tensor([[0.2, 1.1]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(losses.plackett_luce_loss(rewards, ranks, valid),
                               losses.bradley_terry_loss(torch.tensor([1.1]), torch.tensor([0.2])))


def test_center_penalty_and_stats():
    rewards, ranks, valid = _groups()
    assert abs(losses.center_penalty(rewards, valid)[2].item() - ((0.2 + 0.9) / 2) ** 2) < 1e-6
    correct, pairs, margin, total, squares, n = losses.ranking_stats(rewards, ranks, valid).tolist()
    assert (pairs, n) == (5 + 3 + 1, 9)
    # group 0: (2>0) (2>3) (2>1) (0>1) (3>1) with r = .3 -1.2 2 .7 -> all right; group 1: 0>2, 0>1, 2>1 ->
    # 1.5>-0.4 yes, 1.5>0.1 yes, -0.4>0.1 no; group 2: 1>0 -> 0.9>0.2 yes.
    assert correct == 8


def test_ranking_stats_count_a_reward_tie_as_half():
    # A group of 3 ranked 0 < 1 < 2 and a pair whose second response (index 1) is the better one.
    ranks = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    # Group: (0 over 1) rewards tie -> 1/2, (0 over 2) right -> 1, (1 over 2) right -> 1; pair: 0.2 < 0.5 -> 0.
    rewards = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.2, 0.0]])
    correct, pairs, *_ = losses.ranking_stats(rewards, ranks, valid).tolist()
    assert (correct, pairs) == (2.5, 4)
    # An untrained model that gives every response the same reward is at exactly chance.
    same = torch.zeros(2, 3)
    stats = losses.summarize_ranking_stats(losses.ranking_stats(same, ranks, valid), "val")
    assert stats["accuracy/val"] == 0.5 and stats["reward/margin_val"] == 0.0


def test_ranking_stats_without_ordered_pairs_report_no_accuracy():
    ranks, valid = torch.tensor([[0.0, 0.0], [3.0, 3.0]]), torch.ones(2, 2, dtype=torch.bool)
    stats = losses.summarize_ranking_stats(losses.ranking_stats(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), ranks,
                                                                valid), "val")
    assert stats == {"reward/mean_val": 0.75, "reward/std_val": pytest.approx(0.8291562)}  # no accuracy, no margin


def test_length_correlation_penalty_matches_hand_computation():
    rewards = torch.tensor([1.0, 2.0, 0.5, 3.0])
    lengths = torch.tensor([10, 40, 5, 100])
    x = [math.log1p(v) for v in (10, 40, 5, 100)]
    r = [1.0, 2.0, 0.5, 3.0]
    mx, mr = sum(x) / 4, sum(r) / 4
    cov = sum((a - mx) * (b - mr) for a, b in zip(x, r))
    var_x, var_r = sum((a - mx) ** 2 for a in x) / 4, sum((b - mr) ** 2 for b in r) / 4
    rho = cov / 4 / math.sqrt(var_x * var_r)
    assert abs(losses.length_correlation_penalty(rewards, lengths).item() - var_r * rho**2) < 1e-6
    assert losses.length_correlation_penalty(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1, 5, 9])).item() == 0


# ---- DPO and variants -----------------------------------------------------------------------------------------

def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_sequence_logprobs_sums_each_sequence_like_a_loop():
    token_logps = torch.tensor([-1.0, -2.0, -0.5, -0.25, -3.0, -1.5])
    counts = torch.tensor([2, 1, 3])
    expected, k = [], 0
    for c in counts.tolist():
        expected.append(sum(token_logps[k: k + c].tolist()))
        k += c
    assert torch.allclose(losses.sequence_logprobs(token_logps, counts), torch.tensor(expected))


def test_dpo_and_conservative_dpo_match_hand_computation():
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.5])
    h = (-10 + 11) - (-12 + 11.5)  # 1.5
    beta, eps = 0.2, 0.1
    assert losses.dpo_logits(pc, pr, rc, rr).item() == pytest.approx(h)
    plain = losses.preference_loss("sigmoid", pc, pr, rc, rr, None, None, beta).item()
    assert plain == pytest.approx(-math.log(_sig(beta * h)), rel=1e-6)
    smoothed = losses.preference_loss("sigmoid", pc, pr, rc, rr, None, None, beta, eps).item()
    expected = -(1 - eps) * math.log(_sig(beta * h)) - eps * math.log(_sig(-beta * h))
    assert smoothed == pytest.approx(expected, rel=1e-6)
    robust = losses.preference_loss("robust", pc, pr, rc, rr, None, None, beta, eps).item()
    expected = (-(1 - eps) * math.log(_sig(beta * h)) + eps * math.log(_sig(-beta * h))) / (1 - 2 * eps)
    assert robust == pytest.approx(expected, rel=1e-6)


def test_simpo_matches_hand_computation_and_ignores_the_reference():
    pc, pr = torch.tensor([-6.0, -2.0]), torch.tensor([-9.0, -1.0])
    nc, nr = torch.tensor([3, 4]), torch.tensor([3, 1])
    beta, gamma = 2.0, 0.5
    expected = [-math.log(_sig(beta * -6 / 3 - beta * -9 / 3 - gamma)),  # margin 2 - 0.5
                -math.log(_sig(beta * -2 / 4 - beta * -1 / 1 - gamma))]  # margin 1 - 0.5
    got = losses.preference_loss("simpo", pc, pr, None, None, nc, nr, beta, gamma=gamma)
    assert torch.allclose(got, torch.tensor(expected))
    rewards = losses.implicit_rewards("simpo", pc, pr, None, None, nc, nr, beta)
    assert torch.allclose(rewards[0], torch.tensor([-4.0, -1.0]))
    assert torch.allclose(rewards[1], torch.tensor([-6.0, -2.0]))


def test_rpo_nll_term_is_a_token_mean_over_chosen_responses():
    chosen_sums = torch.tensor([-6.0, -2.0])  # 3 and 1 tokens
    assert losses.nll_loss(chosen_sums, torch.tensor(4)).item() == pytest.approx(8 / 4)
    # split over two micro-batches with the global count, the parts add up to the whole
    parts = losses.nll_loss(chosen_sums[:1], 4) + losses.nll_loss(chosen_sums[1:], 4)
    assert parts.item() == pytest.approx(2.0)


def test_ipo_averages_log_ratios_over_tokens():
    pc, pr, rc, rr = torch.tensor([-8.0]), torch.tensor([-9.0]), torch.tensor([-10.0]), torch.tensor([-8.0])
    nc, nr = torch.tensor([4]), torch.tensor([2])
    tau = 0.5
    h = (-8 + 10) / 4 - (-9 + 8) / 2  # 1.0
    got = losses.preference_loss("ipo", pc, pr, rc, rr, nc, nr, tau).item()
    assert got == pytest.approx((h - 1 / (2 * tau)) ** 2)  # exactly at its target: 0
    assert losses.preference_loss("hinge", pc, pr, rc, rr, nc, nr, 0.25).item() == pytest.approx(max(0, 1 - 0.25 * 3))


def test_preference_stats_count_a_tie_as_half():
    loss = torch.tensor([0.7, 0.7, 0.7])
    rc, rr = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    s = losses.summarize_preference_stats(losses.preference_stats(loss, rc, rr, rc, rr), "val")
    assert s["accuracy/val"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["rewards/margin/val"] == pytest.approx((1 + 0 - 2) / 3)
