"""Evaluation metrics for reward models: turn per-response scores into an honest report.

The input is a list of `Group`s: one prompt's responses with the model's scores, the human ranks (lower = better,
equal ranks = tie; a preference pair is ranks [0, 1]) and the response lengths. Everything here is pure and
deterministic (numpy only; matplotlib is imported lazily inside `reliability_plot`).

Conventions used throughout:

- An *ordered pair* (b, w) is two responses of one group with rank[b] < rank[w]; tied ranks give no pair.
- A pair's *outcome* is 1 if score[b] > score[w], 0 if score[b] < score[w] and 0.5 for an exact score tie (the
  expected result of breaking the tie at random).
- Quantities that have no data (no ordered pairs, no group with K >= 3, ...) are None, never NaN, so that the
  summary stays strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Group",
    "ordered_pairs",
    "pair_outcome",
    "pairwise_accuracy",
    "best_vs_worst_accuracy",
    "bootstrap_ci",
    "kendall_tau",
    "mean_kendall_tau",
    "top1_accuracy",
    "calibration",
    "length_bias",
    "length_heuristic_accuracy",
    "length_carried",
    "per_category",
    "reliability_plot",
    "summarize",
]


@dataclass
class Group:
    """One prompt's K responses: model scores, human ranks (lower = better, equal = tie) and lengths (chars)."""

    scores: list[float]
    ranks: list[float]
    lengths: list[int]
    category: str | None = None

    def __post_init__(self) -> None:
        self.scores = [float(s) for s in self.scores]
        self.ranks = [float(r) for r in self.ranks]
        self.lengths = [int(n) for n in self.lengths]
        if not (len(self.scores) == len(self.ranks) == len(self.lengths)):
            raise ValueError(
                f"scores, ranks and lengths must have the same length, got "
                f"{len(self.scores)}, {len(self.ranks)}, {len(self.lengths)}"
            )
        if any(math.isnan(s) for s in self.scores) or any(math.isnan(r) for r in self.ranks):
            raise ValueError("scores and ranks must not be NaN")

    def __len__(self) -> int:
        return len(self.scores)


# ----------------------------------------------------------------------------------------------- pairs, accuracy


def ordered_pairs(group: Group) -> list[tuple[int, int]]:
    """All (better, worse) index pairs with rank[better] < rank[worse]; pairs with equal ranks give nothing.

    A group of K responses with distinct ranks gives K(K-1)/2 pairs, in (i, j) index order with i < j."""
    pairs = []
    ranks = group.ranks
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] < ranks[j]:
                pairs.append((i, j))
            elif ranks[j] < ranks[i]:
                pairs.append((j, i))
    return pairs


def pair_outcome(score_better: float, score_worse: float) -> float:
    """1 if score_better > score_worse, 0 if it is lower, 0.5 for an exact tie."""
    if score_better > score_worse:
        return 1.0
    if score_better < score_worse:
        return 0.0
    return 0.5


def _accuracy(outcomes: Sequence[float]) -> float | None:
    return float(sum(outcomes) / len(outcomes)) if outcomes else None


def pairwise_accuracy(groups: Sequence[Group]) -> tuple[float, int]:
    """Pooled pairwise accuracy over every ordered pair of every group.

    accuracy = (1/N) * sum_{(b, w)} [score_b > score_w] + 0.5 * [score_b == score_w], N = number of ordered pairs:
    an exact score tie counts as half a correct pair. Groups with K responses contribute up to K(K-1)/2 pairs, so
    larger rankings weigh more. Returns (accuracy, N); accuracy is NaN when N == 0."""
    outcomes = [pair_outcome(g.scores[b], g.scores[w]) for g in groups for b, w in ordered_pairs(g)]
    if not outcomes:
        return float("nan"), 0
    return float(sum(outcomes) / len(outcomes)), len(outcomes)


def best_vs_worst_accuracy(groups: Sequence[Group]) -> tuple[float | None, int]:
    """Accuracy on one pair per group: a best-ranked response vs a worst-ranked one (the "chosen vs rejected" view).

    For each group with at least two distinct ranks: outcome = mean over (best, worst) combinations of
    pair_outcome(score_best, score_worst) (exactly one combination unless the extreme ranks are tied);
    accuracy = mean over such groups. Returns (accuracy or None, number of groups used)."""
    per_group = []
    for g in groups:
        if len(g) < 2 or min(g.ranks) == max(g.ranks):
            continue
        best = [i for i, r in enumerate(g.ranks) if r == min(g.ranks)]
        worst = [i for i, r in enumerate(g.ranks) if r == max(g.ranks)]
        per_group.append(np.mean([pair_outcome(g.scores[b], g.scores[w]) for b in best for w in worst]))
    return _accuracy(per_group), len(per_group)


def bootstrap_ci(
    groups: Sequence[Group],
    statistic: Callable[[list[Group]], float | None],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval that resamples whole groups.

    Pairs within one ranking share a prompt and responses, so they are not independent: each replicate draws
    len(groups) groups with replacement (numpy default_rng(seed)) and evaluates `statistic` on them. The interval is
    (q_{alpha/2}, q_{1-alpha/2}) of the replicate values (linear-interpolated quantiles). Replicates where the
    statistic is None or NaN (e.g. a resample with no ordered pairs) are dropped; (NaN, NaN) if all are."""
    if not groups:
        raise ValueError("bootstrap_ci needs at least one group")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    groups = list(groups)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(groups), size=len(groups))
        value = statistic([groups[i] for i in idx])
        if value is not None and not math.isnan(value):
            values.append(float(value))
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------- rank correlation


def kendall_tau(group: Group) -> float | None:
    """Kendall's tau-b between the scores x and the human order y = -ranks (higher = better for both).

    Over all pairs i < j: C = concordant (sign(x_i - x_j) == sign(y_i - y_j) != 0), D = discordant (opposite
    non-zero signs), n0 = K(K-1)/2, n1 = pairs tied in x, n2 = pairs tied in y;
    tau_b = (C - D) / sqrt((n0 - n1) * (n0 - n2)).
    None when K < 2 or when either the scores or the ranks do not vary (denominator 0)."""
    k = len(group)
    if k < 2:
        return None
    x = np.asarray(group.scores, dtype=float)
    y = -np.asarray(group.ranks, dtype=float)
    iu = np.triu_indices(k, 1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    n0 = len(sx)
    n1 = int(np.sum(sx == 0))
    n2 = int(np.sum(sy == 0))
    denom = (n0 - n1) * (n0 - n2)
    if denom == 0:
        return None
    return float(np.sum(sx * sy) / math.sqrt(denom))


def mean_kendall_tau(groups: Sequence[Group]) -> float | None:
    """Unweighted mean of kendall_tau over the groups where it is defined; None if it is defined for none."""
    taus = [t for t in (kendall_tau(g) for g in groups) if t is not None]
    return float(np.mean(taus)) if taus else None


def top1_accuracy(groups: Sequence[Group], min_k: int = 3) -> float | None:
    """Fraction of groups (K >= min_k, default 3, and ranks not all tied) whose top-scored response is best-ranked.

    A response is "best-ranked" if its rank equals the group's minimum rank (any of several tied-best counts).
    If several responses share the top score, the group counts the fraction of them that are best-ranked (the
    expected result of a random tie-break, as in pairwise_accuracy). For K = 2 this would just repeat pairwise
    accuracy, hence the default min_k = 3. None when no group qualifies."""
    values = []
    for g in groups:
        if len(g) < min_k or min(g.ranks) == max(g.ranks):
            continue
        top_score = max(g.scores)
        best_rank = min(g.ranks)
        top = [i for i, s in enumerate(g.scores) if s == top_score]
        values.append(sum(g.ranks[i] == best_rank for i in top) / len(top))
    return _accuracy(values)


# ----------------------------------------------------------------------------------------------- calibration


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z, dtype=float)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def calibration(groups: Sequence[Group], n_bins: int = 10) -> dict:
    """Expected calibration error of the Bradley-Terry probability p = sigmoid(score_better - score_worse).

    p is the model's probability that the human-preferred response is better. Each ordered pair is symmetrised into
    two predictions, (p, outcome 1) and (1 - p, outcome 0), so n = 2 * pairs. Predictions fall into n_bins
    equal-width bins of [0, 1] (bin b = [b/n_bins, (b+1)/n_bins), the last one closed at 1), and
    ECE = sum_b (n_b / n) * |mean outcome_b - mean p_b|.
    Returns {"ece": float or None (no pairs), "n": n, "bins": [{"lo", "hi", "count", "mean_p", "frac_positive"}]}
    with every bin listed; mean_p and frac_positive are None for empty bins."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    diffs = np.array([g.scores[b] - g.scores[w] for g in groups for b, w in ordered_pairs(g)], dtype=float)
    p = _sigmoid(diffs)
    probs = np.concatenate([p, 1.0 - p])
    outcomes = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    idx = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    n = len(probs)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        mean_p = float(probs[mask].mean()) if count else None
        frac = float(outcomes[mask].mean()) if count else None
        if count:
            ece += count / n * abs(frac - mean_p)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count, "mean_p": mean_p,
                     "frac_positive": frac})
    return {"ece": float(ece) if n else None, "n": n, "bins": bins}


# ----------------------------------------------------------------------------------------------- length bias


def length_bias(groups: Sequence[Group]) -> dict:
    """Pairwise accuracy split by whether the human-preferred response is longer, shorter or equally long.

    For each ordered pair (b, w): bucket "chosen_longer" if len_b > len_w, "chosen_shorter" if len_b < len_w,
    "same_length" otherwise; accuracy per bucket = mean pair_outcome (score ties 0.5). A model that leans on length
    scores well on one bucket and badly on the other. Returns {bucket: {"accuracy": float or None, "n": pairs}}."""
    buckets: dict[str, list[float]] = {"chosen_longer": [], "chosen_shorter": [], "same_length": []}
    for g in groups:
        for b, w in ordered_pairs(g):
            if g.lengths[b] > g.lengths[w]:
                key = "chosen_longer"
            elif g.lengths[b] < g.lengths[w]:
                key = "chosen_shorter"
            else:
                key = "same_length"
            buckets[key].append(pair_outcome(g.scores[b], g.scores[w]))
    return {key: {"accuracy": _accuracy(vals), "n": len(vals)} for key, vals in buckets.items()}


def length_heuristic_accuracy(groups: Sequence[Group]) -> float | None:
    """Accuracy of the baseline rule "the shorter response wins" over all ordered pairs.

    = (1/N) * sum_{(b, w)} [len_b < len_w] + 0.5 * [len_b == len_w]; None when there are no ordered pairs.
    (1 minus this is the accuracy of "the longer response wins".)"""
    outcomes = [pair_outcome(-g.lengths[b], -g.lengths[w]) for g in groups for b, w in ordered_pairs(g)]
    return _accuracy(outcomes)


LENGTH_CARRIED_GAP = 0.2
LENGTH_CARRIED_MIN_PAIRS = 10


def length_carried(split: dict, gap: float = LENGTH_CARRIED_GAP, min_pairs: int = LENGTH_CARRIED_MIN_PAIRS
                   ) -> str | None:
    """A one-line warning when a held-out preference accuracy is carried by length; None otherwise.

    `split` is length_bias's result or align.dpo's report.json `val_by_length`: {"chosen_longer": {"accuracy",
    "n"}, "chosen_shorter": {"accuracy", "n"}, ...}, optionally with "shorter_wins_heuristic" (quoted if present).
    The rule: both buckets hold at least `min_pairs` pairs (default 10; fewer say nothing either way), their
    accuracies lie on opposite sides of chance (one above 0.5, the other below), and they differ by more than `gap`
    (default 0.2). The model then beats chance only where length agrees with the human label and loses where it
    disagrees: it ranks by length ("shorter wins" or "longer wins"), and its overall accuracy mostly measures how
    often the data's preferred response has that length. A model that is better on one side but above chance on
    both is not flagged."""
    longer, shorter = split.get("chosen_longer") or {}, split.get("chosen_shorter") or {}
    a_long, a_short = longer.get("accuracy"), shorter.get("accuracy")
    if a_long is None or a_short is None or min(longer.get("n", 0), shorter.get("n", 0)) < min_pairs:
        return None
    if not (min(a_long, a_short) < 0.5 < max(a_long, a_short)) or abs(a_short - a_long) <= gap:
        return None
    wins = "shorter" if a_short > a_long else "longer"
    heuristic = split.get("shorter_wins_heuristic")
    if heuristic is not None and wins == "longer":
        heuristic = 1 - heuristic
    alone = "" if heuristic is None else f"; '{wins} wins' alone scores {heuristic:.3f}"
    return (f"held-out accuracy is carried by length: {a_short:.3f} where the chosen response is shorter "
            f"(n={shorter['n']}) but {a_long:.3f} where it is longer (n={longer['n']}): the model prefers {wins} "
            f"responses more than better ones{alone}")


# ----------------------------------------------------------------------------------------------- categories


NO_CATEGORY = "(none)"


def per_category(groups: Sequence[Group]) -> dict[str, dict]:
    """Pooled pairwise accuracy per category: {category: {"accuracy": float or None, "n": pairs, "groups": count}}.

    Empty dict when no group has a category; otherwise groups without one are reported under "(none)".
    Categories are sorted by name."""
    if not any(g.category is not None for g in groups):
        return {}
    by_cat: dict[str, list[Group]] = {}
    for g in groups:
        by_cat.setdefault(g.category if g.category is not None else NO_CATEGORY, []).append(g)
    out = {}
    for cat in sorted(by_cat):
        acc, n = pairwise_accuracy(by_cat[cat])
        out[cat] = {"accuracy": acc if n else None, "n": n, "groups": len(by_cat[cat])}
    return out


# ----------------------------------------------------------------------------------------------- plot


def reliability_plot(calibration_result: dict, path: str | Path) -> Path:
    """Write a reliability diagram (PNG) of a `calibration` result to `path`, creating parent folders.

    Top: observed frequency of the positive outcome per bin (bars over the bin, a dot at the bin's mean predicted
    probability) against the diagonal y = x of perfect calibration, titled with the ECE. Bottom: prediction count
    per bin. Uses matplotlib's Agg canvas directly (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bins = calibration_result["bins"]
    ece = calibration_result.get("ece")

    fig = Figure(figsize=(5, 6))
    FigureCanvasAgg(fig)
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lo = [b["lo"] for b in bins]
    width = [b["hi"] - b["lo"] for b in bins]
    filled = [b for b in bins if b["count"]]
    ax.bar(lo, [b["frac_positive"] or 0.0 for b in bins], width=width, align="edge", alpha=0.5,
           edgecolor="tab:blue", label="observed frequency")
    ax.plot([b["mean_p"] for b in filled], [b["frac_positive"] for b in filled], "o", color="tab:blue",
            label="bin mean")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(f"Reliability (ECE = {ece:.4f})" if ece is not None else "Reliability (no pairs)")
    counts = [b["count"] for b in bins]
    ax_count.bar(lo, counts, width=width, align="edge", color="tab:gray", edgecolor="black")
    for b in filled:
        ax_count.annotate(str(b["count"]), ((b["lo"] + b["hi"]) / 2, b["count"]), ha="center", va="bottom",
                          fontsize="x-small")
    ax_count.set_ylim(0, max(counts + [1]) * 1.25)
    ax_count.set_xlabel("predicted probability (human-preferred is better)")
    ax_count.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


# ----------------------------------------------------------------------------------------------- summary


def summarize(groups: Sequence[Group], n_boot: int = 1000, seed: int = 0) -> dict:
    """All metrics in one JSON-serialisable dict (strict JSON: no NaN).

    Always present: "groups" (count), "n" (ordered pairs), "accuracy" (pooled pairwise accuracy), "ci95" ([lo, hi],
    group bootstrap with n_boot replicates and `seed`), "ece", "calibration" (the full `calibration` result),
    "length_bias", "length_heuristic_accuracy", "accuracy_best_vs_worst". The value is None where there is no data
    (accuracy, ci95, ece, length_heuristic_accuracy and accuracy_best_vs_worst when n = 0).
    Present only when some group has K >= 3: "kendall_tau" (mean tau-b; None if undefined for every group),
    "top1_accuracy" and "accuracy_all_pairs" (= accuracy, named to make explicit that all K(K-1)/2 pairs of a
    ranking count, unlike accuracy_best_vs_worst). Present only when some group has a category: "per_category"."""
    groups = list(groups)
    acc, n = pairwise_accuracy(groups)
    accuracy = acc if n else None
    if n:
        ci = list(bootstrap_ci(groups, lambda gs: pairwise_accuracy(gs)[0], n_boot=n_boot, seed=seed))
        if any(math.isnan(v) for v in ci):  # every resample drew only groups without ordered pairs
            ci = None
    else:
        ci = None
    cal = calibration(groups)
    out: dict = {
        "groups": len(groups),
        "n": n,
        "accuracy": accuracy,
        "ci95": ci,
        "ece": cal["ece"],
        "calibration": cal,
        "length_bias": length_bias(groups),
        "length_heuristic_accuracy": length_heuristic_accuracy(groups),
        "accuracy_best_vs_worst": best_vs_worst_accuracy(groups)[0],
    }
    if any(len(g) >= 3 for g in groups):
        out["kendall_tau"] = mean_kendall_tau(groups)
        out["top1_accuracy"] = top1_accuracy(groups)
        out["accuracy_all_pairs"] = accuracy
    cats = per_category(groups)
    if cats:
        out["per_category"] = cats
    return out
