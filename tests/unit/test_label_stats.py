"""align.label.stats against hand computations: Kendall's W, pairwise agreement, the merge rule, verdicts, kappa."""

import math

import pytest

from align.label.stats import (
    cohen_kappa,
    dense_ranks,
    kendall_w,
    merge_rankings,
    merged_rankings,
    mid_ranks,
    pairwise_agreement,
    summarize_rankings,
    summarize_verdicts,
    verdict_score,
)

Z = 1.959963984540054


def wilson_by_hand(p: float, n: int) -> list[float]:
    # (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    denom = 1 + Z * Z / n
    centre = (p + Z * Z / (2 * n)) / denom
    half = Z / denom * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return [centre - half, centre + half]


def test_dense_ranks_share_a_rank_on_ties_and_leave_no_gaps():
    assert dense_ranks([0.1, 0.5, 0.5, 0.9]) == [1, 2, 2, 3]
    assert dense_ranks([3.0, -1.0, 3.0, 7.0, -1.0]) == [2, 1, 2, 3, 1]
    assert dense_ranks([2, 2, 2]) == [1, 1, 1]


def test_mid_ranks_give_ties_the_mean_of_their_positions():
    assert mid_ranks([1, 2, 2, 3]) == [1, 2.5, 2.5, 4]
    assert mid_ranks([2, 1, 2, 2]) == [3, 1, 3, 3]  # positions 2, 3, 4
    assert mid_ranks([1, 1, 1, 1]) == [2.5] * 4
    assert mid_ranks([3, 1, 2]) == [3, 1, 2]


def test_kendall_w_without_ties_matches_hand_computation():
    # m = 3, n = 4: R = [1+2+1, 2+1+3, 3+3+2, 4+4+4] = [4, 6, 8, 12], mean 7.5, deviations [-3.5, -1.5, 0.5, 4.5],
    # S = 12.25 + 2.25 + 0.25 + 20.25 = 35, W = 12 * 35 / (9 * (64 - 4)) = 420 / 540 = 7/9.
    assert kendall_w([[1, 2, 3, 4], [2, 1, 3, 4], [1, 3, 2, 4]]) == pytest.approx(7 / 9)


def test_kendall_w_with_ties_matches_hand_computation():
    # mid ranks: [1, 2.5, 2.5, 4], [1, 2, 3, 4], [1.5, 1.5, 3, 4]; R = [3.5, 6, 8.5, 12], mean 7.5,
    # S = 16 + 2.25 + 1 + 20.25 = 39.5; T = [2^3 - 2, 0, 2^3 - 2] = [6, 0, 6], sum 12;
    # W = 12 * 39.5 / (9 * 60 - 3 * 12) = 474 / 504 = 79/84 (without the correction it would be 474/540).
    assert kendall_w([[1, 2, 2, 3], [1, 2, 3, 4], [1, 1, 2, 3]]) == pytest.approx(79 / 84)


def test_kendall_w_edge_cases():
    assert kendall_w([[1, 2, 3], [1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)
    assert kendall_w([[1, 2, 2], [1, 2, 2]]) == pytest.approx(1.0)  # the same tied ranking: still perfect
    assert kendall_w([[1, 2], [2, 1]]) == pytest.approx(0.0)
    assert kendall_w([[1, 1, 1], [1, 1, 1]]) is None  # denominator 4 * 24 - 2 * (24 + 24) = 0
    assert kendall_w([[1, 2, 3]]) is None and kendall_w([[1], [1]]) is None


def test_pairwise_agreement_matches_hand_count():
    # Item a, response pairs (0,1), (0,2), (1,2); signs x: - - -, y: - - 0, z: + - -.
    # x-y agree on 2, x-z on 2, y-z on 1 (the tie (1,2) of y agrees with nobody's order) -> 5 of 9.
    # Item b: x and y both tie -> 1 of 1. Item c has one annotator and does not count. 6 of 10.
    result = pairwise_agreement({"a": {"x": [1, 2, 3], "y": [1, 2, 2], "z": [2, 1, 3]},
                                 "b": {"x": [1, 1], "y": [1, 1]},
                                 "c": {"z": [1, 2, 3]}})
    assert result == {"agreement": pytest.approx(0.6), "comparisons": 10, "items": 2}
    assert pairwise_agreement({"c": {"z": [1, 2]}}) == {"agreement": None, "comparisons": 0, "items": 0}


def test_merge_rule_mean_rank_then_dense():
    # Means [1.5, 1.5, 3]: the first two tie.
    assert merge_rankings({"x": [1, 2, 3], "y": [2, 1, 3]}) == [1, 1, 2]
    # Means [4/3, 2, 8/3]: no tie. And [1+2+1, 2+1+1]/3 = [4/3, 4/3]: thirds still tie.
    assert merge_rankings({"x": [1, 2, 3], "y": [2, 1, 3], "z": [1, 3, 2]}) == [1, 2, 3]
    assert merge_rankings({"x": [1, 2], "y": [2, 1], "z": [1, 1]}) == [1, 1]
    # Ranks are made dense first: [1, 3, 3] counts as [1, 2, 2], so means [2, 1.5, 2] -> [2, 1, 2]
    # (the raw ranks would give means [2, 2, 2.5] -> [1, 1, 2]).
    assert merge_rankings({"x": [1, 3, 3], "y": [3, 1, 2]}) == [2, 1, 2]
    assert merge_rankings({"x": [2, 4, 4, 1]}) == [2, 3, 3, 1]


def rank(item, annotator, ranks, policies=None):
    responses = [f"{item}-r{i}" for i in range(len(ranks))]
    return {"label": "rank", "item": item, "annotator": annotator, "ranks": ranks, "responses": responses,
            "prompt": [{"role": "user", "content": item}], "policies": policies}


def test_summarize_rankings_counts_skips_flags_and_last_answer_wins():
    answers = [rank("p1", "y", [3, 2, 1]),  # replaced by y's later answer
               rank("p1", "x", [1, 2, 3], policies=["a", "b", "c"]),
               rank("p2", "x", [1, 2]),
               {"label": "skip", "item": "p2", "annotator": "y"},
               {"label": "flag", "item": "p2", "annotator": "z", "reason": "broken prompt"},
               rank("p3", "x", [2, 1, 1]),
               rank("p1", "z", [1, 3, 2]),
               rank("p1", "y", [1, 2, 3])]
    s = summarize_rankings(answers)
    assert s["annotators"] == {"x": {"ranked": 3, "skipped": 0, "flagged": 0},
                               "y": {"ranked": 1, "skipped": 1, "flagged": 0},
                               "z": {"ranked": 1, "skipped": 0, "flagged": 1}}
    assert list(s["annotators"]) == ["x", "y", "z"]
    assert s["items"] == 3 and s["flagged_items"] == ["p2"]
    # p1 with x [1,2,3], y [1,2,3], z [1,3,2]: R = [3, 7, 8], mean 6, S = 9 + 1 + 4 = 14,
    # W = 12 * 14 / (9 * 24) = 7/9 (y's first answer [3,2,1] would give R = [5, 7, 6], W = 1/9).
    assert s["kendall_w"] == {"mean": pytest.approx(7 / 9), "items": 1}
    # p1 pairs: x-y 3 of 3, x-z 2, y-z 2 -> 7 of 9.
    assert s["pairwise_agreement"] == {"agreement": pytest.approx(7 / 9), "comparisons": 9, "items": 1}


def test_merged_rankings_leave_out_flagged_items_and_keep_first_appearance_order():
    answers = [rank("p3", "x", [2, 1, 1]),
               rank("p1", "x", [1, 2, 3], policies=["a", "b", "c"]),
               rank("p2", "x", [1, 2]),
               {"label": "flag", "item": "p2", "annotator": "z", "reason": "broken prompt"},
               rank("p1", "y", [3, 2, 1]),
               rank("p1", "z", [1, 3, 2]),
               rank("p1", "y", [2, 1, 3])]  # last answer wins
    merged = merged_rankings(answers)
    assert [m["item"] for m in merged] == ["p3", "p1"]
    p3, p1 = merged
    assert p3["ranks"] == [2, 1, 1] and p3["annotators"] == ["x"] and p3["policies"] is None
    # p1: x [1,2,3], y [2,1,3], z [1,3,2] -> means [4/3, 2, 8/3] -> [1, 2, 3] (y's first answer: [5/3, 7/3, 2]).
    assert p1["ranks"] == [1, 2, 3] and p1["annotators"] == ["x", "y", "z"]
    assert p1["label"] == "rank" and p1["policies"] == ["a", "b", "c"]
    assert p1["responses"] == ["p1-r0", "p1-r1", "p1-r2"] and p1["prompt"] == [{"role": "user", "content": "p1"}]


def test_verdict_score():
    assert [verdict_score(v) for v in ("candidate", "tie", "baseline")] == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        verdict_score("both")


def verdict(item, annotator, v, rc=None, rb=None):
    return {"label": "verdict", "item": item, "annotator": annotator, "verdict": v, "reward_candidate": rc,
            "reward_baseline": rb, "prompt": [], "candidate": "c", "baseline": "b"}


def test_summarize_verdicts_win_rates_intervals_and_agreement_match_hand_computation():
    answers = [verdict("i1", "a", "candidate", 2.0, 0.0), verdict("i1", "b", "candidate", 2.0, 0.0),
               verdict("i2", "a", "candidate", 0.0, 1.0), {"label": "skip", "item": "i2", "annotator": "b"},
               verdict("i3", "b", "candidate", 0.5, 1.0),  # replaced by b's later answer
               verdict("i3", "a", "baseline", 0.5, 1.0),
               verdict("i4", "a", "tie", 1.05, 1.0), {"label": "flag", "item": "i4", "annotator": "b", "reason": "x"},
               verdict("i5", "a", "candidate", 1.0, 0.0), verdict("i5", "b", "baseline", 1.0, 0.0),
               verdict("i6", "a", "candidate", 0.3, 0.0), verdict("i6", "b", "tie", 0.3, 0.0),
               verdict("i7", "a", "candidate"), verdict("i7", "b", "tie"),
               verdict("i3", "b", "baseline", 0.5, 1.0)]
    s = summarize_verdicts(answers, tie_margin=0.1)
    # Human scores [1, 1, 0, 0.5, 0.5, 0.75, 0.75]: rate 4.5 / 7 = 9/14, n = 7:
    # denom = 1 + z^2/7 = 1.548780, centre = (9/14 + z^2/14) / denom = 0.917247 / 1.548780 = 0.592239,
    # half = z / denom * sqrt(9/14 * 5/14 / 7 + z^2/196) = 0.289678 -> [0.302560, 0.881917].
    assert s["n_items"] == 7 and s["human_win_rate"] == pytest.approx(9 / 14)
    assert s["human_win_rate_ci95"] == pytest.approx(wilson_by_hand(9 / 14, 7))
    assert s["human_win_rate_ci95"] == pytest.approx([0.302560, 0.881917], abs=1e-6)
    # Judge, d = [2, -1, -0.5, 0.05, 1, 0.3] on i1..i6 (i7 has no rewards), margin 0.1: [1, 0, 0, 0.5, 1, 1],
    # rate 3.5 / 6 = 7/12 -> [0.241078, 0.860533].
    assert s["judge_items"] == 6 and s["judge_win_rate"] == pytest.approx(7 / 12)
    assert s["judge_win_rate_ci95"] == pytest.approx(wilson_by_hand(7 / 12, 6))
    # Human categories on i1..i6: C C B T T C; judge: C B B T C C. Matches i1 i3 i4 i6 -> 4/6.
    #                 judge C  T  B | total
    #   human C           2  0  1  |  3
    #   human T           1  1  0  |  2
    #   human B           0  0  1  |  1
    #   total             3  1  2  |  6
    # p_o = 4/6, p_e = (3*3 + 2*1 + 1*2) / 36 = 13/36, kappa = (24/36 - 13/36) / (23/36) = 11/23.
    assert s["human_judge_agreement"] == pytest.approx(2 / 3)
    assert s["cohen_kappa"] == pytest.approx(11 / 23)
    assert s["annotators"] == {"a": {"judged": 7, "skipped": 0, "flagged": 0},
                               "b": {"judged": 5, "skipped": 1, "flagged": 1}}
    # Items judged by both: i1 (C, C) agree, i3 (B, B) agree, i5, i6, i7 disagree -> 2 of 5.
    assert s["pairwise_agreement"] == {"agreement": pytest.approx(0.4), "comparisons": 5, "items": 5}
    assert s["flagged_items"] == ["i4"]


def test_summarize_verdicts_without_rewards_has_no_judge_figures():
    s = summarize_verdicts([verdict("i1", "a", "candidate"), verdict("i2", "a", "tie")])
    assert s["human_win_rate"] == pytest.approx(0.75) and s["judge_items"] == 0
    assert s["judge_win_rate"] is None and s["judge_win_rate_ci95"] is None
    assert s["human_judge_agreement"] is None and s["cohen_kappa"] is None


def test_cohen_kappa_textbook_example():
    # 50 items: both yes 20, A yes B no 5, A no B yes 10, both no 15. p_o = 35/50 = 0.7;
    # P(A yes) = 0.5, P(B yes) = 0.6: p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["tie"] * 3, ["tie"] * 3) is None  # p_e = 1
    assert cohen_kappa(["x", "y"], ["y", "x"]) == pytest.approx(-1.0)
