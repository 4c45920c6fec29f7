"""align.evaluate's statistics against hand computations: win rate with ties, its interval, length control."""

import math

import numpy as np
import pytest

from align.evaluate import Z95, length_controlled, length_summary, outcomes, summarize, wilson_interval, win_rate


def test_win_rate_counts_ties_half_and_its_interval_is_wilsons():
    # d = [1, -1, 0, 2] -> outcomes [1, 0, 1/2, 1]; mean p = 0.625, n = 4, z = 1.96: Wilson's interval is
    # (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n) = (1.105200 -+ 0.675049) / 1.9604
    # = [0.219420, 0.908082].
    result = win_rate([1.0, -1.0, 0.0, 2.0])
    assert result["win_rate"] == pytest.approx(0.625)
    assert result["win_rate_ci95"] == pytest.approx([0.219420, 0.908082], abs=2e-5)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1) and result["n"] == 4
    # The textbook case: no successes in 10 gives [0, z^2 / (n + z^2)].
    assert wilson_interval(0.0, 10) == pytest.approx([0.0, Z95 ** 2 / (10 + Z95 ** 2)])


def test_tie_margin_makes_small_differences_ties():
    assert outcomes([0.05, -0.05, 0.2, -0.3], tie_margin=0.1).tolist() == [0.5, 0.5, 1.0, 0.0]
    # [0.05, 0.05, 0.2]: three wins without the margin; with it, two ties and a win.
    assert win_rate([0.05, 0.05, 0.2])["win_rate"] == 1.0
    with_margin = win_rate([0.05, 0.05, 0.2], tie_margin=0.1)
    assert with_margin["win_rate"] == pytest.approx(2 / 3) and with_margin["ties"] == 2


def test_all_ties_still_have_an_interval_of_honest_width():
    """The normal interval (mean +- 1.96 sd / sqrt n) has zero width when every outcome ties; Wilson's does not."""
    result = win_rate([0.0] * 24)
    lo, hi = result["win_rate_ci95"]
    assert result["win_rate"] == 0.5 and lo == pytest.approx(1 - hi) and hi - lo == pytest.approx(0.371451, abs=1e-5)


def test_the_win_rate_interval_covers_95_percent_when_nearly_every_outcome_ties():
    """24 prompts, 96% ties, 3% wins, 1% losses: the true win rate is 0.51. The normal interval covers it in only
    about 63% of samples (often all ties: zero width); Wilson's in at least 95%."""
    rng = np.random.default_rng(0)
    truth = 0.03 + 0.96 * 0.5
    wilson = normal = 0
    trials = 4000
    for _ in range(trials):
        diff = rng.choice([1.0, 0.0, -1.0], size=24, p=[0.03, 0.96, 0.01])
        lo, hi = win_rate(diff)["win_rate_ci95"]
        wilson += lo <= truth <= hi
        w = outcomes(diff)
        half = 1.96 * w.std(ddof=1) / math.sqrt(len(w))
        normal += w.mean() - half <= truth <= w.mean() + half
    assert wilson / trials >= 0.95
    assert normal / trials < 0.75  # the interval this replaced: the test tells them apart


def test_length_control_by_hand():
    # Length differences [-1, 0, 1]: sd 1, feature tanh([-1, 0, 1]) = [-t, 0, t] with t = tanh(1); mean 0.
    # Reward differences [0, 1, 5], mean 2: slope = sum(f (d - 2)) / sum(f^2) = t (2 + 3) / (2 t^2) = 5 / (2 t).
    # Controlled: d - slope f = [2.5, 1, 2.5], all wins; raw outcomes [1/2, 1, 1].
    t = math.tanh(1.0)
    result = length_controlled([0.0, 1.0, 5.0], [-1.0, 0.0, 1.0])
    assert result["length_slope"] == pytest.approx(5 / (2 * t))
    assert result["intercept"] == pytest.approx(2.0)
    assert result["lc_win_rate"] == 1.0
    assert win_rate([0.0, 1.0, 5.0])["win_rate"] == pytest.approx(2.5 / 3)
    lo, hi = result["lc_win_rate_ci95"]
    assert (lo, hi) == pytest.approx(wilson_interval(1.0, 3))  # no resample does worse than all wins: Wilson's


def test_a_judge_that_only_pays_for_length_gives_one_half_after_length_control():
    lengths = np.array([-30.0, -12.0, -5.0, 4.0, 9.0, 40.0])
    diff = 3.0 * np.tanh(lengths / lengths.std(ddof=1))  # reward difference explained by length alone
    raw = win_rate(diff)["win_rate"]
    controlled = length_controlled(diff, lengths, tie_margin=1e-9)
    assert raw == pytest.approx(0.5)  # three longer and three shorter
    assert controlled["length_slope"] == pytest.approx(3.0)
    assert controlled["lc_win_rate"] == 0.5  # every controlled difference is 0: all ties
    # Every bootstrap resample gives 0.5 too; the interval is still Wilson's width for six outcomes, not zero.
    assert controlled["lc_win_rate_ci95"] == pytest.approx(wilson_interval(0.5, 6))


def test_length_control_credits_a_shorter_but_better_policy():
    # The candidate is shorter on 3 of 4 prompts and the judge pays 2 per unit of the length feature, so it loses on
    # raw rewards; at equal length it is 0.5 better everywhere.
    lengths = np.array([-10.0, -20.0, -30.0, 10.0])
    feature = np.tanh(lengths / lengths.std(ddof=1))
    diff = 0.5 + 2.0 * feature
    assert win_rate(diff)["win_rate"] == 0.25
    result = length_controlled(diff, lengths)
    assert result["length_slope"] == pytest.approx(2.0) and result["intercept"] == pytest.approx(0.5)
    assert result["lc_win_rate"] == 1.0


def test_without_length_spread_the_length_effect_is_not_estimated():
    assert length_controlled([1.0, -1.0, 2.0], [5.0, 5.0, 5.0]) == {"lc_win_rate": None, "lc_win_rate_ci95": None,
                                                                   "length_slope": None, "intercept": None}
    # One side longer by many standard deviations everywhere: tanh saturates, length and policy are confounded.
    saturated = length_controlled([0.3, -0.2, 0.1, -0.4, 0.2, 0.0], [40.0, 41.0, 42.0, 43.0, 44.0, 45.0])
    assert saturated["lc_win_rate"] is None
    assert length_controlled([0.3, -0.2], [-5.0, 5.0])["lc_win_rate"] is None  # fewer than 3 prompts


def test_length_summary_and_summarize():
    summary = length_summary([10, 20, 30, 40], [True, False, True, True])
    assert summary["mean"] == 25 and summary["median"] == 25 and summary["eos_rate"] == 0.75
    assert summary["p10"] == pytest.approx(13.0) and summary["p90"] == pytest.approx(37.0)
    out = summarize([1.0, 2.0, 0.0], [0.5, 2.0, 1.0], [5, 6, 7], [5, 6, 9], [0.1, 0.2, 0.6], [True] * 3, [True] * 3)
    assert out["win_rate"] == pytest.approx(0.5) and out["n"] == 3
    assert out["kl"] == pytest.approx(0.3) and out["reward_diff"] == pytest.approx(-0.5 / 3)
    assert out["reward_candidate"] == pytest.approx(1.0) and out["reward_baseline"] == pytest.approx(3.5 / 3)


def test_identical_responses_are_ties_whatever_the_judge_rounding():
    out = summarize([0.5000001, 1.0], [0.5, 0.2], [4, 4], [4, 3], [0.0, 0.1], [True] * 2, [True] * 2,
                    same_response=[True, False])
    assert (out["wins"], out["ties"], out["losses"]) == (1, 1, 0)


def test_the_length_controlled_interval_holds_its_coverage():
    """A candidate 0.2 better at equal length, judged by a reward that also pays for length: over 400 samples of 40
    prompts the LC win rate's interval covers the LC win rate of the whole population in at least 95% (97% measured;
    a normal interval on the controlled outcomes, which ignores the fitted slope's uncertainty, covers 93.5%)."""
    rng = np.random.default_rng(1)

    def draw(n):
        lengths = rng.normal(0, 10, size=n)
        diff = 0.2 + 1.5 * np.tanh(lengths / 10) + rng.normal(0, 1.0, size=n)
        return diff, lengths

    population = length_controlled(*draw(200_000), n_boot=1)["lc_win_rate"]
    covered = 0
    for _ in range(400):
        lo, hi = length_controlled(*draw(40), n_boot=400, seed=int(rng.integers(1 << 30)))["lc_win_rate_ci95"]
        covered += lo <= population <= hi
    assert covered / 400 >= 0.95


def test_kl_is_null_where_it_is_not_defined():
    out = summarize([1.0, 0.0], [0.5, 0.2], [4, 4], [4, 3], [None, None], [True] * 2, [True] * 2)
    assert out["kl"] is None and out["kl_sd"] is None and out["win_rate"] == 0.5
