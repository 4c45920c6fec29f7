"""Evaluate a reward model on preference pairs or rankings, honestly.

    python -m reward_models.evaluate --model runs/rm/model --data FILE [--report DIR]
    python -m reward_models.evaluate --policy runs/dpo/model [--reference DIR] --data FILE

A DPO policy is scored by its implicit reward beta (log pi - log pi_ref) (reward_models/implicit.py).

Reports pairwise accuracy with a 95% interval (bootstrap over prompts), for rankings also accuracy over all pairs,
Kendall's tau and top-1; calibration (expected calibration error of sigmoid(r_chosen - r_rejected)) with a
reliability plot; a length-bias probe (accuracy where the preferred response is longer vs shorter in characters,
beside the "shorter wins" heuristic, with a warning when the accuracy is carried by length: see
metrics.length_carried); per-category accuracy when rows have a `category` field. Works on any one-output
sequence-classification model. The last line of output is one JSON object (accuracy, n, ci95, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from align import formats
from align.evaluate import show
from align.formats import DataError
from align.precision import autocast
from align.precision import resolve as resolve_precision
from align.train import log, setup_logging
from reward_models import metrics
from reward_models.model import RewardScorer


def load_groups(path: str, fmt: str = "auto", skip_invalid: bool = False, limit: int | None = None):
    """Rankings (pairs are K=2) with the category of their record, if any. Data without a single ordered pair
    is an error: there is nothing to measure, and an exit code says so more plainly than an accuracy of n/a."""
    records = formats.read_records(path, limit=limit)
    category = {r.origin.line: r.data.get("category") for r in records}
    examples = formats.convert_records(records, fmt, "preference", skip_invalid)
    rankings = [e.as_ranking() if hasattr(e, "as_ranking") else e for e in examples]
    if not any(min(r.ranks) < max(r.ranks) for r in rankings):
        raise DataError(f"{path}: nothing to evaluate: 0 ordered pairs in {len(rankings)} ranking(s), every "
                        f"ranking's responses tie (equal ranks give no pair)")
    return rankings, [category.get(e.origin.line) for e in rankings], examples.skipped


def score_groups(scorer: RewardScorer, rankings) -> list[list[float]]:
    flat = [scorer.tokenize(r.prompt, resp) for r in rankings for resp in r.responses]
    scores = scorer.score_sequences(flat, progress=True).tolist()
    out, k = [], 0
    for r in rankings:
        out.append(scores[k: k + len(r.responses)])
        k += len(r.responses)
    return out


def report(rankings, scores, categories, out_dir: str | None = None) -> dict:
    groups = [metrics.Group(s, r.ranks, [sum(len(m["content"]) for m in resp) for resp in r.responses], c)
              for r, s, c in zip(rankings, scores, categories)]
    summary = metrics.summarize(groups)
    summary["length_carried"] = metrics.length_carried({**summary["length_bias"],
                                                        "shorter_wins_heuristic": summary["length_heuristic_accuracy"]})
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics.reliability_plot(summary["calibration"], out / "reliability.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    lb = summary["length_bias"]
    cell = lambda c: "n/a" if c["accuracy"] is None else f"{c['accuracy']:.3f} (n={c['n']})"  # noqa: E731
    ci = "n/a" if summary["ci95"] is None else f"[{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}]"
    print(f"pairwise accuracy {show(summary['accuracy'])}  95% CI {ci}  ({summary['n']} pairs, "
          f"{summary['groups']} prompts)")
    if "kendall_tau" in summary:
        print(f"rankings: Kendall tau {show(summary['kendall_tau'])}, top-1 {show(summary['top1_accuracy'])}")
    print(f"calibration: ECE {show(summary['ece'])}")
    print(f"length bias: chosen longer {cell(lb['chosen_longer'])}, chosen shorter {cell(lb['chosen_shorter'])}; "
          f"'shorter wins' heuristic {show(summary['length_heuristic_accuracy'])}")
    if summary.get("length_carried"):
        print(f"warning: {summary['length_carried']}")
    for name, c in summary.get("per_category", {}).items():
        print(f"category {name}: {cell(c)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m reward_models.evaluate", description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="reward model folder (any one-output sequence-classification model)")
    which.add_argument("--policy", help="DPO policy folder (adapter or full model): scores its implicit reward")
    ap.add_argument("--reference", default=None, help="with --policy: the reference model folder (default: an "
                    "adapter's base with adapters disabled, or the reference recorded in align_dpo.json)")
    ap.add_argument("--beta", type=float, default=None, help="with --policy: beta (default: align_dpo.json's, "
                    "else 0.1)")
    ap.add_argument("--data", required=True, help="preference pairs or rankings (any format align reads)")
    ap.add_argument("--report", default=None, help="folder for summary.json and reliability.png")
    ap.add_argument("--format", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="use the first N records")
    ap.add_argument("--skip-invalid", action="store_true", help="skip (and count) invalid records")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="autocast precision of the forwards (auto: bf16 where the hardware multiplies it natively)")
    args = ap.parse_args(argv)
    setup_logging(is_main=True)
    choice = resolve_precision(args.precision)
    log.info("precision: %s", choice.describe())
    try:
        rankings, categories, skipped = load_groups(args.data, args.format, args.skip_invalid, args.limit)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if skipped:
        print(f"skipped {sum(skipped.values())} invalid records: {skipped}")
    if args.policy:
        from reward_models.implicit import ImplicitRewardScorer

        try:
            scorer = ImplicitRewardScorer(args.policy, args.reference, args.beta, args.device, args.max_length)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    else:
        scorer = RewardScorer(args.model, device=args.device, max_length=args.max_length)
    with autocast(choice, scorer.device):
        scores = score_groups(scorer, rankings)
    summary = report(rankings, scores, categories, args.report)
    print_summary(summary)
    line = {k: v for k, v in summary.items() if k != "calibration"}
    line.update(model=args.model or args.policy, data=args.data, precision=choice.as_dict())
    if args.policy:
        line["implicit_reward"] = scorer.description
    print(json.dumps(line))


if __name__ == "__main__":
    main()
