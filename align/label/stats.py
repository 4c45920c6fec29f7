"""What the annotators' answers say: agreement between people, the merged rankings, the human win rate.

Pure functions of answer records (dicts, one per journal line). Ranks are dense, 1 = best, equal = tie, one per
response in the item's canonical order (the same for every annotator of an item).

One answer per (item, annotator): if a hand-edited journal holds several, the LAST line counts, whatever its label
(a later skip replaces an earlier ranking, a later ranking an earlier flag), as when a person changes their mind.

    mid ranks       fractional ranks 1..n, ties getting the mean of the positions they occupy: [1, 2, 2, 3] ->
                    [1, 2.5, 2.5, 4]. Their sum is n (n + 1) / 2 with or without ties, which Kendall's W relies on.
    Kendall's W     concordance of m raters ranking the same n objects (Kendall & Babington Smith 1939), corrected
                    for ties: with r_ij rater j's mid rank of object i, R_i = sum_j r_ij and
                        S = sum_i (R_i - mean R)^2,   T_j = sum over rater j's tie groups of (t^3 - t),
                        W = 12 S / (m^2 (n^3 - n) - m sum_j T_j).
                    1 when every rater gives the same ranking (ties included: the correction makes the maximum S
                    reachable), 0 when the rank sums are all equal. Undefined (None) for m < 2, n < 2, or when every
                    rater ties everything (denominator 0).
    pairwise        for every pair of annotators of an item and every pair of responses i < j: they agree when
    agreement       sign(r_a[i] - r_a[j]) == sign(r_b[i] - r_b[j]); a tie agrees only with a tie. Agreements over
                    comparisons, pooled over items ranked by two or more people.
    merge rule      an item's ranking for align.rm: the mean over annotators of each response's dense rank, then the
                    dense ranks of those means (lower mean = better; means within 1e-9 tie). One annotator's
                    ranking merges to itself. Items flagged by anyone are left out: someone thought them broken.
    verdicts        (compare mode) candidate = 1, tie = 1/2, baseline = 0. An item's human score is the mean over its
                    annotators; the human win rate is the mean over items, with Wilson's 95% interval on n items
                    (align.evaluate.wilson_interval: valid for tie-split outcomes). The judge on the same items:
                    d = reward_candidate - reward_baseline (from the item's first verdict answer), outcome 1, 1/2 or 0
                    by align.evaluate.outcomes with the tie margin; items without rewards are left out of the judge's
                    figures and of agreement. Flagged items stay in (people did judge them) and are listed.
    human vs judge  per item, each side's verdict is candidate if its score > 1/2, baseline if < 1/2, tie if = 1/2;
                    the share of items where the two match, and Cohen's kappa over the three categories,
                        kappa = (p_o - p_e) / (1 - p_e),   p_e = sum_k P(human = k) P(judge = k),
                    agreement beyond what the two marginals give by chance (None when p_e = 1).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Mapping, Optional, Sequence

import numpy as np

from align.evaluate import outcomes, wilson_interval

MERGE_TOLERANCE = 1e-9  # mean ranks closer than this tie: float noise must not break a tie
VERDICT_SCORES = {"candidate": 1.0, "tie": 0.5, "baseline": 0.0}
VERDICT_RANKS = {"candidate": [1, 2], "baseline": [2, 1], "tie": [1, 1]}  # ranks over (candidate, baseline)


def _dense(values: Sequence[float], tolerance: float = 0.0) -> list[int]:
    """Dense ranks, lower = 1; sorted neighbours within `tolerance` share a rank."""
    rank_of, rank, previous = {}, 0, None
    for v in sorted(set(values)):
        if previous is None or v - previous > tolerance:
            rank += 1
        rank_of[v], previous = rank, v
    return [rank_of[v] for v in values]


def dense_ranks(values: Sequence[float]) -> list[int]:
    """Lower value = better = rank 1; equal values share a rank; no gaps: [0.1, 0.5, 0.5, 0.9] -> [1, 2, 2, 3]."""
    return _dense(values)


def mid_ranks(ranks: Sequence[float]) -> list[float]:
    """Fractional ranks 1..n, ties getting the mean of the positions they occupy: [1, 2, 2, 3] -> [1, 2.5, 2.5, 4]."""
    counts = Counter(ranks)
    below, before = {}, 0
    for v in sorted(counts):
        below[v], before = before, before + counts[v]
    return [below[v] + (counts[v] + 1) / 2 for v in ranks]


def kendall_w(rankings: Sequence[Sequence[float]]) -> Optional[float]:
    """Kendall's coefficient of concordance with the tie correction (see the module docstring); None if undefined."""
    m = len(rankings)
    n = len(rankings[0]) if m else 0
    if any(len(r) != n for r in rankings):
        raise ValueError("every rater must rank the same objects")
    if m < 2 or n < 2:
        return None
    rank_sums = np.asarray([mid_ranks(r) for r in rankings], dtype=np.float64).sum(axis=0)
    s = float(((rank_sums - rank_sums.mean()) ** 2).sum())
    ties = sum(t ** 3 - t for r in rankings for t in Counter(r).values())
    denominator = m * m * (n ** 3 - n) - m * ties  # integers: exactly 0 when every rater ties everything
    return None if denominator == 0 else float(12 * s / denominator)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def pairwise_agreement(rankings_by_item: Mapping[str, Mapping[str, Sequence[float]]]) -> dict:
    """Share of (annotator pair, response pair) comparisons on which two annotators order the responses alike."""
    agreements = comparisons = items = 0
    for item, by_annotator in rankings_by_item.items():
        if len(by_annotator) < 2:
            continue
        items += 1
        ranks = [by_annotator[name] for name in sorted(by_annotator)]
        n = len(ranks[0])
        if any(len(r) != n for r in ranks):
            raise ValueError(f"item {item!r}: annotators ranked different numbers of responses")
        for a, b in itertools.combinations(ranks, 2):
            for i, j in itertools.combinations(range(n), 2):
                comparisons += 1
                agreements += _sign(a[i] - a[j]) == _sign(b[i] - b[j])
    return {"agreement": agreements / comparisons if comparisons else None, "comparisons": comparisons,
            "items": items}


def merge_rankings(ranks_by_annotator: Mapping[str, Sequence[float]]) -> list[int]:
    """THE merge rule: dense ranks of the mean over annotators of each response's dense rank; means within 1e-9 tie."""
    if not ranks_by_annotator:
        raise ValueError("no rankings to merge")
    # Dense first, so [1, 3, 3] (a gap) weighs like [1, 2, 2]: every annotator's scale is the same.
    ranks = [dense_ranks(r) for r in ranks_by_annotator.values()]
    if len({len(r) for r in ranks}) != 1:
        raise ValueError("annotators ranked different numbers of responses")
    means = np.asarray(ranks, dtype=np.float64).mean(axis=0)
    return _dense(means.tolist(), MERGE_TOLERANCE)


def _last_answers(answers: Sequence[dict]) -> list[dict]:
    """Each (item, annotator)'s last answer, in file order."""
    last = {(a["item"], a["annotator"]): i for i, a in enumerate(answers)}
    return [a for i, a in enumerate(answers) if last[(a["item"], a["annotator"])] == i]


def _annotator_counts(answers: Sequence[dict], label: str, key: str) -> dict:
    counts: dict[str, Counter] = {}
    for a in answers:
        counts.setdefault(a["annotator"], Counter())[a["label"]] += 1
    return {name: {key: c[label], "skipped": c["skip"], "flagged": c["flag"]} for name, c in sorted(counts.items())}


def _flagged(answers: Sequence[dict]) -> list[str]:
    return sorted({a["item"] for a in answers if a["label"] == "flag"})


def _rank_answers_by_item(answers: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """item -> {annotator: rank answer}, last answers only, items in order of their first rank answer."""
    by_item: dict[str, dict[str, dict]] = {}
    for a in _last_answers(answers):
        if a["label"] == "rank":
            by_item.setdefault(a["item"], {})[a["annotator"]] = a
    return by_item


def summarize_rankings(answers: Sequence[dict]) -> dict:
    """Per-annotator counts, flagged items, and agreement between annotators (pairwise, Kendall's W) on rankings."""
    kept = _last_answers(answers)
    by_item = _rank_answers_by_item(kept)
    rankings = {item: {name: a["ranks"] for name, a in answers_.items()} for item, answers_ in by_item.items()}
    ws = [kendall_w(list(r.values())) for r in rankings.values() if len(r) >= 2]
    ws = [w for w in ws if w is not None]
    return {"annotators": _annotator_counts(kept, "rank", "ranked"), "items": len(by_item),
            "flagged_items": _flagged(kept), "pairwise_agreement": pairwise_agreement(rankings),
            "kendall_w": {"mean": sum(ws) / len(ws) if ws else None, "items": len(ws)}}


def merged_rankings(answers: Sequence[dict]) -> list[dict]:
    """One ranking record (align.rm's format) per item that has rank answers and that nobody flagged, merged by
    merge_rankings, in the order items first appear in `answers`."""
    kept = _last_answers(answers)
    by_item, flagged = _rank_answers_by_item(kept), set(_flagged(kept))
    records = []
    for item in dict.fromkeys(a["item"] for a in answers):
        if item not in by_item or item in flagged:
            continue
        first = next(iter(by_item[item].values()))  # the item's first rank answer in the file
        if any(a["responses"] != first["responses"] for a in by_item[item].values()):
            raise ValueError(f"item {item!r}: annotators saw different responses; cannot merge their ranks")
        records.append({"label": "rank", "item": item, "prompt": first["prompt"], "responses": first["responses"],
                        "policies": first.get("policies"),
                        "ranks": merge_rankings({n: a["ranks"] for n, a in by_item[item].items()}),
                        "annotators": sorted(by_item[item])})
    return records


def verdict_score(verdict: str) -> float:
    """candidate 1.0, tie 0.5, baseline 0.0."""
    if verdict not in VERDICT_SCORES:
        raise ValueError(f"unknown verdict {verdict!r}: expected one of {sorted(VERDICT_SCORES)}")
    return VERDICT_SCORES[verdict]


def _category(score: float) -> str:
    return "candidate" if score > 0.5 else "baseline" if score < 0.5 else "tie"


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> Optional[float]:
    """(p_o - p_e) / (1 - p_e), p_e from the two raters' marginals; None when 1 - p_e = 0 or nothing was rated."""
    if len(a) != len(b):
        raise ValueError("the two raters must rate the same items")
    n = len(a)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    p_e = sum(count_a[k] * count_b[k] for k in count_a) / (n * n)
    return None if 1 - p_e <= 0 else (p_o - p_e) / (1 - p_e)


def summarize_verdicts(answers: Sequence[dict], tie_margin: float = 0.0) -> dict:
    """Human win rate of candidate over baseline, the judge's on the same items, and how well they agree."""
    kept = _last_answers(answers)
    by_item: dict[str, list[dict]] = {}
    for a in kept:
        if a["label"] == "verdict":
            by_item.setdefault(a["item"], []).append(a)
    human = [float(np.mean([verdict_score(a["verdict"]) for a in v])) for v in by_item.values()]
    n_items = len(human)
    human_rate = sum(human) / n_items if n_items else None

    judged = [(h, v[0]) for h, v in zip(human, by_item.values())
              if v[0].get("reward_candidate") is not None and v[0].get("reward_baseline") is not None]
    judge = outcomes([a["reward_candidate"] - a["reward_baseline"] for _, a in judged], tie_margin).tolist()
    judge_rate = sum(judge) / len(judge) if judge else None
    human_cats, judge_cats = [_category(h) for h, _ in judged], [_category(j) for j in judge]
    matches = sum(h == j for h, j in zip(human_cats, judge_cats))

    rankings = {item: {a["annotator"]: VERDICT_RANKS[a["verdict"]] for a in v} for item, v in by_item.items()}
    return {"n_items": n_items, "human_win_rate": human_rate,
            "human_win_rate_ci95": wilson_interval(human_rate, n_items) if n_items else None,
            "judge_items": len(judge), "judge_win_rate": judge_rate,
            "judge_win_rate_ci95": wilson_interval(judge_rate, len(judge)) if judge else None,
            "human_judge_agreement": matches / len(judge) if judge else None,
            "cohen_kappa": cohen_kappa(human_cats, judge_cats),
            "annotators": _annotator_counts(kept, "verdict", "judged"),
            "pairwise_agreement": pairwise_agreement(rankings), "flagged_items": _flagged(kept)}
