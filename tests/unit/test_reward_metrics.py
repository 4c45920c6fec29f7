"""Reward-model evaluation metrics: hand-computed cases for every number the report contains."""

import json
import math

import pytest

from reward_models import metrics
from reward_models.metrics import Group


def pair(score_chosen, score_rejected, len_chosen=10, len_rejected=10, category=None):
    """A preference pair: response 0 is the human-preferred one (rank 0)."""
    return Group(scores=[score_chosen, score_rejected], ranks=[0, 1], lengths=[len_chosen, len_rejected],
                 category=category)


def pairs_with_accuracy(n_right, n_wrong):
    return [pair(1.0, 0.0) for _ in range(n_right)] + [pair(0.0, 1.0) for _ in range(n_wrong)]


# ----------------------------------------------------------------------------------------------- pairs, accuracy


def test_group_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        Group(scores=[1.0, 2.0], ranks=[0, 1], lengths=[3])


def test_ordered_pairs_skip_rank_ties_and_put_the_better_first():
    group = Group(scores=[0, 0, 0, 0], ranks=[1, 0, 1, 2], lengths=[1, 1, 1, 1])
    # 0 and 2 are tied (no pair); 1 beats everyone; 3 loses to everyone.
    assert sorted(metrics.ordered_pairs(group)) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]
    assert metrics.ordered_pairs(Group(scores=[1, 2], ranks=[0, 0], lengths=[1, 1])) == []


def test_pairwise_accuracy_counts_score_ties_as_half():
    groups = [pair(2.0, 1.0), pair(3.0, -1.0), pair(0.5, 0.5), pair(0.0, 1.0)]
    assert metrics.pairwise_accuracy(groups) == (pytest.approx((1 + 1 + 0.5 + 0) / 4), 4)


def test_pairwise_accuracy_ignores_tied_ranks_and_counts_all_pairs_of_a_ranking():
    tied = Group(scores=[5.0, 0.0], ranks=[0, 0], lengths=[1, 1])  # no ordered pair: must not count
    ranking = Group(scores=[3.0, 1.0, 2.0], ranks=[0, 1, 2], lengths=[1, 1, 1])  # (0,1) ok, (0,2) ok, (1,2) wrong
    acc, n = metrics.pairwise_accuracy([tied, ranking])
    assert n == 3
    assert acc == pytest.approx(2 / 3)
    acc, n = metrics.pairwise_accuracy([tied])
    assert n == 0 and math.isnan(acc)


def test_best_vs_worst_uses_one_pair_per_group():
    ranking = Group(scores=[3.0, 1.0, 2.0], ranks=[0, 1, 2], lengths=[1, 1, 1])  # best (3.0) beats worst (2.0)
    wrong = Group(scores=[0.0, 1.0, 2.0], ranks=[0, 1, 2], lengths=[1, 1, 1])
    assert metrics.best_vs_worst_accuracy([ranking, wrong]) == (0.5, 2)


# ----------------------------------------------------------------------------------------------- bootstrap


def accuracy_statistic(groups):
    return metrics.pairwise_accuracy(groups)[0]


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    groups = pairs_with_accuracy(30, 10)
    lo, hi = metrics.bootstrap_ci(groups, accuracy_statistic, n_boot=500, seed=3)
    assert lo < 0.75 < hi
    assert 0.5 < lo and hi < 0.95
    assert metrics.bootstrap_ci(groups, accuracy_statistic, n_boot=500, seed=3) == (lo, hi)


def test_bootstrap_ci_narrows_with_more_groups():
    lo40, hi40 = metrics.bootstrap_ci(pairs_with_accuracy(30, 10), accuracy_statistic, n_boot=1000, seed=0)
    lo400, hi400 = metrics.bootstrap_ci(pairs_with_accuracy(300, 100), accuracy_statistic, n_boot=1000, seed=0)
    assert lo400 < 0.75 < hi400
    # the width scales like 1/sqrt(groups): about sqrt(10) ~ 3.2 times narrower
    assert (hi400 - lo400) * 2 < (hi40 - lo40)


def test_bootstrap_resamples_whole_groups_not_pairs():
    # One ranking of 5 responses, 10 pairs, 8 right: resampling the single group always gives the same group, so the
    # interval collapses to the point estimate. Resampling pairs would give a wide interval.
    group = Group(scores=[5.0, 4.0, 1.0, 3.0, 2.0], ranks=[0, 1, 2, 3, 4], lengths=[1] * 5)
    acc, n = metrics.pairwise_accuracy([group])
    assert (acc, n) == (pytest.approx(0.8), 10)  # wrong: (2, 3) and (2, 4)
    lo, hi = metrics.bootstrap_ci([group], accuracy_statistic, n_boot=200, seed=0)
    assert lo == pytest.approx(acc) and hi == pytest.approx(acc)


# ----------------------------------------------------------------------------------------------- rank correlation


def test_kendall_tau_perfect_reversed_and_undefined():
    ranks = [0, 1, 2, 3]
    assert metrics.kendall_tau(Group(scores=[4, 3, 2, 1], ranks=ranks, lengths=[1] * 4)) == pytest.approx(1.0)
    assert metrics.kendall_tau(Group(scores=[1, 2, 3, 4], ranks=ranks, lengths=[1] * 4)) == pytest.approx(-1.0)
    assert metrics.kendall_tau(Group(scores=[1.0], ranks=[0], lengths=[1])) is None
    assert metrics.kendall_tau(Group(scores=[2, 2, 2], ranks=[0, 1, 2], lengths=[1] * 3)) is None  # no score spread
    assert metrics.kendall_tau(Group(scores=[1, 2, 3], ranks=[0, 0, 0], lengths=[1] * 3)) is None  # all tied


def test_kendall_tau_b_with_ties_by_hand():
    # x = scores = [3, 1, 2, 2], y = -ranks = [0, -1, -1, -2]
    # pairs: (0,1) C, (0,2) C, (0,3) C, (1,2) tie in y, (1,3) D (x up, y down), (2,3) tie in x
    # C = 3, D = 1, n0 = 6, n1 (x ties) = 1, n2 (y ties) = 1: tau_b = (3 - 1) / sqrt((6 - 1) * (6 - 1)) = 0.4
    group = Group(scores=[3, 1, 2, 2], ranks=[0, 1, 1, 2], lengths=[1] * 4)
    assert metrics.kendall_tau(group) == pytest.approx(0.4)
    # tau-a would be (3 - 1) / 6 = 1/3: the tie correction must be applied
    assert metrics.kendall_tau(group) != pytest.approx(1 / 3)


def test_kendall_tau_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(3, 9))
        scores = rng.integers(0, 4, size=k).astype(float)  # small integer ranges force ties on both sides
        ranks = rng.integers(0, 3, size=k).astype(float)
        ours = metrics.kendall_tau(Group(scores=list(scores), ranks=list(ranks), lengths=[1] * k))
        ref = stats.kendalltau(scores, -ranks).statistic
        if math.isnan(ref):
            assert ours is None
        else:
            assert ours == pytest.approx(ref)


def test_mean_kendall_tau_skips_undefined_groups():
    groups = [
        Group(scores=[3, 2, 1], ranks=[0, 1, 2], lengths=[1] * 3),  # 1
        Group(scores=[3, 1, 2, 2], ranks=[0, 1, 1, 2], lengths=[1] * 4),  # 0.4
        Group(scores=[1, 1, 1], ranks=[0, 1, 2], lengths=[1] * 3),  # undefined
    ]
    assert metrics.mean_kendall_tau(groups) == pytest.approx(0.7)
    assert metrics.mean_kendall_tau(groups[2:]) is None


def test_top1_accuracy():
    groups = [
        Group(scores=[3, 2, 1], ranks=[0, 1, 2], lengths=[1] * 3),  # top-scored is best: 1
        Group(scores=[1, 3, 2], ranks=[0, 1, 2], lengths=[1] * 3),  # top-scored is middle: 0
        Group(scores=[1, 2, 2], ranks=[1, 0, 0], lengths=[1] * 3),  # top tie, both tied-best: 1
        Group(scores=[5, 5, 0], ranks=[0, 1, 2], lengths=[1] * 3),  # top tie, one of two best: 0.5
        Group(scores=[0, 9], ranks=[0, 1], lengths=[1] * 2),  # K = 2: excluded
        Group(scores=[0, 9, 1], ranks=[0, 0, 0], lengths=[1] * 3),  # no rank variation: excluded
    ]
    assert metrics.top1_accuracy(groups) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert metrics.top1_accuracy(groups[4:]) is None
    assert metrics.top1_accuracy(groups[4:5], min_k=2) == 0.0


# ----------------------------------------------------------------------------------------------- calibration


def test_ece_is_zero_when_probabilities_match_frequencies():
    # sigmoid(ln 3) = 0.75: 3 of 4 pairs ranked right at that margin; sigmoid(ln 5/3) = 0.625: 5 of 8 right.
    # Score ties (p = 0.5) are calibrated by the symmetrisation.
    d1, d2 = math.log(3), math.log(5 / 3)
    groups = [pair(d1, 0.0)] * 3 + [pair(0.0, d1)] + [pair(d2, 0.0)] * 5 + [pair(0.0, d2)] * 3 + [pair(1.0, 1.0)] * 2
    result = metrics.calibration(groups)
    assert result["ece"] == pytest.approx(0.0, abs=1e-12)
    assert result["n"] == 2 * len(groups)
    counts = {round(b["lo"], 1): b["count"] for b in result["bins"]}
    assert counts[0.7] == 4 and counts[0.2] == 4 and counts[0.6] == 8 and counts[0.3] == 8 and counts[0.5] == 4
    bin_07 = next(b for b in result["bins"] if round(b["lo"], 1) == 0.7)
    assert bin_07["mean_p"] == pytest.approx(0.75) and bin_07["frac_positive"] == pytest.approx(0.75)


def test_ece_hand_computed():
    # pair A: p = sigmoid(ln 3) = 0.75 -> (0.75, 1) and (0.25, 0); pair B: score tie, p = 0.5 -> (0.5, 1), (0.5, 0)
    # bins: [0.7, 0.8): |1 - 0.75| = 0.25, weight 1/4; [0.2, 0.3): |0 - 0.25| = 0.25, weight 1/4;
    # [0.5, 0.6): |0.5 - 0.5| = 0, weight 2/4.  ECE = 0.125
    result = metrics.calibration([pair(math.log(3), 0.0), pair(2.0, 2.0)])
    assert result["ece"] == pytest.approx(0.125)
    assert len(result["bins"]) == 10
    nonempty = [b for b in result["bins"] if b["count"]]
    assert [(b["count"], b["frac_positive"]) for b in nonempty] == [(1, 0.0), (2, 0.5), (1, 1.0)]
    assert all(b["mean_p"] is None and b["frac_positive"] is None for b in result["bins"] if not b["count"])
    assert metrics.calibration([Group(scores=[1, 2], ranks=[0, 0], lengths=[1, 1])])["ece"] is None


def test_calibration_handles_extreme_margins():
    result = metrics.calibration([pair(1000.0, -1000.0), pair(-1000.0, 1000.0)])
    # p = 1 wrong once, right once: both the top and bottom bins hold frequency 0.5 -> ECE 0.5
    assert result["ece"] == pytest.approx(0.5)
    assert result["bins"][-1]["count"] == 2 and result["bins"][0]["count"] == 2


# ----------------------------------------------------------------------------------------------- length bias


def test_length_bias_splits_pairs_by_length():
    groups = [
        pair(1.0, 0.0, len_chosen=20, len_rejected=5),  # chosen longer, right
        pair(0.0, 1.0, len_chosen=30, len_rejected=5),  # chosen longer, wrong
        pair(2.0, 1.0, len_chosen=30, len_rejected=40),  # chosen shorter, right
        pair(1.0, 1.0, len_chosen=3, len_rejected=40),  # chosen shorter, score tie
        pair(0.0, 5.0, len_chosen=7, len_rejected=7),  # same length, wrong
    ]
    result = metrics.length_bias(groups)
    assert result == {
        "chosen_longer": {"accuracy": 0.5, "n": 2},
        "chosen_shorter": {"accuracy": 0.75, "n": 2},
        "same_length": {"accuracy": 0.0, "n": 1},
    }
    assert metrics.length_bias(groups[:2])["same_length"] == {"accuracy": None, "n": 0}
    # "shorter wins": 0 + 0 + 1 + 1 + 0.5 over 5 pairs
    assert metrics.length_heuristic_accuracy(groups) == pytest.approx(2.5 / 5)
    assert metrics.length_heuristic_accuracy([]) is None


def test_length_bias_on_a_ranking_uses_every_ordered_pair():
    group = Group(scores=[3.0, 2.0, 1.0], ranks=[0, 1, 2], lengths=[30, 20, 10])  # better is always longer
    result = metrics.length_bias([group])
    assert result["chosen_longer"] == {"accuracy": 1.0, "n": 3}
    assert result["chosen_shorter"]["n"] == 0
    assert metrics.length_heuristic_accuracy([group]) == 0.0


# ----------------------------------------------------------------------------------------------- categories


def test_per_category():
    groups = [pair(1, 0, category="math"), pair(0, 1, category="math"), pair(1, 0, category="chat"), pair(0, 1)]
    result = metrics.per_category(groups)
    assert result == {
        "(none)": {"accuracy": 0.0, "n": 1, "groups": 1},
        "chat": {"accuracy": 1.0, "n": 1, "groups": 1},
        "math": {"accuracy": 0.5, "n": 2, "groups": 2},
    }
    assert metrics.per_category([pair(1, 0), pair(0, 1)]) == {}


# ----------------------------------------------------------------------------------------------- plot, summary


def test_reliability_plot_writes_a_png(tmp_path):
    result = metrics.calibration(pairs_with_accuracy(30, 10) + [pair(0.3, 0.0), pair(0.0, 2.0)])
    out = metrics.reliability_plot(result, tmp_path / "nested" / "dir" / "reliability.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    empty = metrics.reliability_plot(metrics.calibration([]), tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_rankings_with_categories():
    groups = pairs_with_accuracy(6, 2) + [
        Group(scores=[3, 2, 1], ranks=[0, 1, 2], lengths=[5, 9, 1], category="math"),
        Group(scores=[1, 3, 2], ranks=[0, 1, 2], lengths=[5, 9, 1], category="math"),
    ]
    summary = metrics.summarize(groups, n_boot=200, seed=0)
    required = {"accuracy", "n", "ci95", "groups", "ece", "length_bias", "length_heuristic_accuracy",
                "kendall_tau", "top1_accuracy", "accuracy_all_pairs", "per_category"}
    assert required <= summary.keys()
    json.dumps(summary, allow_nan=False)
    acc, n = metrics.pairwise_accuracy(groups)
    assert summary["n"] == n == 8 + 3 + 3
    assert summary["groups"] == 10
    assert summary["accuracy"] == pytest.approx(acc) == summary["accuracy_all_pairs"]
    assert summary["accuracy"] == pytest.approx((6 + 3 + 1) / 14)
    lo, hi = summary["ci95"]
    assert lo <= summary["accuracy"] <= hi
    assert summary["top1_accuracy"] == pytest.approx(0.5)
    # mean over every group where tau is defined: pairs give +1 / -1, the rankings 1 and -1/3
    assert summary["kendall_tau"] == pytest.approx((6 - 2 + 1 - 1 / 3) / 10)
    assert summary["per_category"]["math"]["n"] == 6
    assert summary["ece"] == metrics.calibration(groups)["ece"]


def test_summarize_pairs_only_omits_ranking_keys_and_empty_data_is_none():
    summary = metrics.summarize(pairs_with_accuracy(3, 1), n_boot=50)
    assert "kendall_tau" not in summary and "top1_accuracy" not in summary and "per_category" not in summary
    assert summary["accuracy"] == 0.75 and summary["n"] == 4
    empty = metrics.summarize([Group(scores=[1, 2], ranks=[0, 0], lengths=[1, 1])], n_boot=50)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["ci95"] is None and empty["ece"] is None
    json.dumps(empty, allow_nan=False)


def test_length_carried_flags_a_shorter_wins_split_and_not_a_balanced_one():
    shorter_wins = {"chosen_longer": {"accuracy": 0.233, "n": 30}, "chosen_shorter": {"accuracy": 0.787, "n": 34},
                    "same_length": {"accuracy": None, "n": 0}, "shorter_wins_heuristic": 0.531}
    warning = metrics.length_carried(shorter_wins)
    assert warning is not None and "\n" not in warning
    assert "prefers shorter" in warning and "0.787" in warning and "0.233" in warning and "0.531" in warning
    longer_wins = {"chosen_longer": {"accuracy": 0.8, "n": 20}, "chosen_shorter": {"accuracy": 0.3, "n": 20}}
    assert "prefers longer" in metrics.length_carried(longer_wins)
    balanced = {"chosen_longer": {"accuracy": 0.62, "n": 30}, "chosen_shorter": {"accuracy": 0.70, "n": 34}}
    assert metrics.length_carried(balanced) is None
    # better on one side but above chance on both; a small gap; too few pairs: not flagged
    assert metrics.length_carried({"chosen_longer": {"accuracy": 0.55, "n": 30},
                                   "chosen_shorter": {"accuracy": 0.95, "n": 30}}) is None
    assert metrics.length_carried({"chosen_longer": {"accuracy": 0.45, "n": 30},
                                   "chosen_shorter": {"accuracy": 0.6, "n": 30}}) is None
    assert metrics.length_carried({"chosen_longer": {"accuracy": 0.1, "n": 9},
                                   "chosen_shorter": {"accuracy": 0.9, "n": 30}}) is None
    # length_bias's own result works as input
    groups = [Group(scores=[1.0, 0.0], ranks=[0, 1], lengths=[5, 50]) for _ in range(12)] + \
             [Group(scores=[0.0, 1.0], ranks=[0, 1], lengths=[50, 5]) for _ in range(12)]
    assert "prefers shorter" in metrics.length_carried(metrics.length_bias(groups))
