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


# ---- the length shortcut: R-DPO, LD-DPO, accuracy by length ---------------------------------------------------

def test_rdpo_adds_alpha_times_the_length_difference_to_the_margin():
    pc, pr, rc, rr = torch.tensor([-10.0, -7.0]), torch.tensor([-12.0, -9.0]), torch.tensor([-11.0, -8.0]), \
        torch.tensor([-11.5, -8.5])
    nc, nr = torch.tensor([30, 4]), torch.tensor([10, 12])  # chosen longer by 20, then shorter by 8
    beta, alpha = 0.2, 0.01
    h = [(-10 + 11) - (-12 + 11.5), (-7 + 8) - (-9 + 8.5)]  # 1.5, 1.5
    margins = [beta * h[0] + alpha * 20, beta * h[1] + alpha * -8]
    got = losses.preference_loss("sigmoid", pc, pr, rc, rr, nc, nr, beta, rdpo_alpha=alpha)
    assert got.tolist() == pytest.approx([-math.log(_sig(m)) for m in margins], rel=1e-6)
    hinge = losses.preference_loss("hinge", pc, pr, rc, rr, nc, nr, beta, rdpo_alpha=alpha)
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - m) for m in margins], rel=1e-6)
    # the length term favours the longer chosen response, so the policy is pushed less to prefer it
    assert got[0] < losses.preference_loss("sigmoid", pc[:1], pr[:1], rc[:1], rr[:1], nc[:1], nr[:1], beta)[0]


def test_rdpo_alpha_zero_is_plain_dpo_and_other_losses_are_refused():
    pc, pr, rc, rr = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    nc, nr = torch.tensor([3, 9, 5, 5]), torch.tensor([7, 2, 5, 1])
    for kind in ("sigmoid", "hinge"):
        assert torch.equal(losses.preference_loss(kind, pc, pr, rc, rr, nc, nr, 0.1, rdpo_alpha=0.0),
                           losses.preference_loss(kind, pc, pr, rc, rr, nc, nr, 0.1))
    for kind in ("ipo", "simpo"):
        with pytest.raises(ValueError, match="R-DPO"):
            losses.preference_loss(kind, pc, pr, rc, rr, nc, nr, 0.1, rdpo_alpha=0.01)


def test_tail_logprobs_sum_each_sequence_past_its_kept_prefix_like_a_loop():
    token_logps = torch.tensor([-1.0, -2.0, -0.5, -0.25, -3.0, -1.5, -0.75, -4.0])
    counts, keep = torch.tensor([2, 4, 2]), torch.tensor([2, 1, 0])
    expected, k = [], 0
    for c, m in zip(counts.tolist(), keep.tolist()):
        expected.append(sum(token_logps[k + m: k + c].tolist()))
        k += c
    assert losses.tail_logprobs(token_logps, counts, keep).tolist() == pytest.approx(expected)  # [0, -4.75, -4.75]


def _ld_pair(alpha):
    """One pair: chosen 2 response tokens, rejected 4; policy and reference token log-probs as given."""
    policy = torch.tensor([-1.0, -2.0, -0.5, -0.25, -3.0, -1.5])  # chosen [-1, -2], rejected [-0.5, -0.25, -3, -1.5]
    ref = torch.tensor([-1.5, -1.0, -0.75, -0.5, -1.0, -1.0])
    counts, public = torch.tensor([2, 4]), torch.tensor([2, 2])
    out = []
    for t in (policy, ref):
        full, tail = losses.sequence_logprobs(t, counts), losses.tail_logprobs(t, counts, public)
        out.append(losses.ld_logprobs(full, tail, alpha) if alpha is not None else full)
    (pc, pr), (rc, rr) = out
    return losses.preference_loss("sigmoid", pc[None], pr[None], rc[None], rr[None], None, None, 0.5)


def test_ld_dpo_matches_hand_computation():
    alpha, beta = 0.3, 0.5
    # chosen is the shorter (l_p = 2): unchanged; rejected: its first 2 tokens plus alpha x the other 2
    pc, rc = -1 - 2, -1.5 - 1
    pr, rr = -0.5 - 0.25 + alpha * (-3 - 1.5), -0.75 - 0.5 + alpha * (-1 - 1)
    h = (pc - rc) - (pr - rr)
    assert _ld_pair(alpha).item() == pytest.approx(-math.log(_sig(beta * h)), rel=1e-6)


def test_ld_alpha_one_is_plain_dpo_exactly():
    assert torch.equal(_ld_pair(1.0), _ld_pair(None))
    assert not torch.equal(_ld_pair(0.5), _ld_pair(None))


def test_ld_dpo_equals_trls_masks_on_a_padded_batch():
    """TRL 1.16 DPOTrainer._compute_loss with ld_alpha, on a padded [2B, T] batch of per-token log-probs (rows
    [chosen..., rejected...], completion_mask shifted as TRL does): its shared + ld_alpha * tail sums, restated
    line for line, equal ours from the same tokens laid out sequence by sequence."""
    torch.manual_seed(0)
    alpha, b = 0.4, 3
    lengths = [5, 2, 4, 3, 6, 4]  # chosen 5, 2, 4; rejected 3, 6, 4 (the last pair: equal lengths)
    prompt, width = 3, 12
    completion_mask = torch.zeros(2 * b, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        completion_mask[row, prompt: prompt + n] = 1
    per_token_logps = -torch.rand(2 * b, width - 1)
    # TRL (the labels are shifted, so the log-prob of token t sits at t - 1):
    shift_completion_mask = completion_mask[..., 1:]
    per_token_logps = per_token_logps * shift_completion_mask
    comp_pos = shift_completion_mask.cumsum(dim=1)
    comp_lens = shift_completion_mask.sum(dim=1).long()
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    tail_mask = comp_pos > shared_lens.unsqueeze(1)
    trl = (per_token_logps * shared_mask).sum(dim=1) + alpha * (per_token_logps * tail_mask).sum(dim=1)
    # ours: the target log-probs in sequence order, counts, keep = min(|y_w|, |y_l|) of each sequence's pair
    flat = per_token_logps[shift_completion_mask.bool()]
    counts = torch.tensor(lengths)
    keep = torch.minimum(counts[:b], counts[b:]).repeat(2)
    ours = losses.ld_logprobs(losses.sequence_logprobs(flat, counts), losses.tail_logprobs(flat, counts, keep), alpha)
    torch.testing.assert_close(ours, trl, atol=1e-6, rtol=1e-6)


def test_length_split_counts_and_accuracies_equal_a_direct_computation():
    margin = torch.tensor([0.3, -0.2, 0.0, 0.5, -1.0, 0.1, 0.2, -0.4])
    nc = torch.tensor([10, 12, 5, 3, 4, 7, 7, 2])
    nr = torch.tensor([4, 8, 9, 9, 4, 1, 20, 6])
    got = losses.summarize_length_split(losses.length_split_stats(margin, nc, nr), "val")
    right = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margin.tolist()]
    buckets = {"chosen_longer": [i for i in range(8) if nc[i] > nr[i]],
               "chosen_shorter": [i for i in range(8) if nc[i] < nr[i]],
               "same_length": [i for i in range(8) if nc[i] == nr[i]]}
    assert [len(v) for v in buckets.values()] == [3, 4, 1]
    for name, ids in buckets.items():
        assert got[f"pairs/{name}/val"] == len(ids)
        assert got[f"accuracy/{name}/val"] == pytest.approx(sum(right[i] for i in ids) / len(ids))
    assert got["accuracy/shorter_wins/val"] == pytest.approx((4 + 0.5) / 8)
    # no pair in a bucket: its count is 0 and it has no accuracy (not 0, not NaN)
    none_same = losses.summarize_length_split(losses.length_split_stats(margin[:2], nc[:2], nr[:2]), "val")
    assert none_same["pairs/same_length/val"] == 0 and "accuracy/same_length/val" not in none_same
