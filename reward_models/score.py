"""Score a file with a reward model: every response gets a reward, written back into its row.

    python -m reward_models.score --model runs/rm/model --data FILE --out FILE

Rows may be {prompt, response} (-> "reward"), preference pairs in any format align reads (-> "reward_chosen",
"reward_rejected"), ranked lists (-> "rewards", one per response) or OpenAssistant trees (-> "reward" on every
ranked assistant reply). The template and truncation are the ones the model was trained with; sequences are
batched by length. Works with align's reward models and any one-output sequence-classification model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from align import formats
from align.formats import DataError
from align.precision import autocast
from align.precision import resolve as resolve_precision
from align.train import log, setup_logging
from reward_models.model import RewardScorer


def _items(records: list[formats.Record], fmt: str) -> tuple[str, list[list]]:
    """(format name, for each record the list of (prompt, response) pairs to score), every field checked."""
    first = records[0]
    if fmt == "prompt_response" or (fmt == "auto" and {"prompt", "response"} <= set(first.data)):
        return "prompt_response", [[formats.prompt_response(r)] for r in records]
    kind = formats.get_format(fmt, first, "preference")
    out = []
    for r in records:
        converted = kind.convert(r)
        examples = converted if isinstance(converted, list) else [converted]
        pairs = []
        for ex in examples:
            ranking = ex.as_ranking() if hasattr(ex, "as_ranking") else ex
            pairs.extend((ranking.prompt, resp) for resp in ranking.responses)
        out.append(pairs)
    return kind.name, out


def _write_back(fmt: str, row: dict, rewards: list[float]) -> dict:
    row = dict(row)
    if fmt == "prompt_response":
        row["reward"] = rewards[0]
    elif fmt in ("preference", "hh"):
        row["reward_chosen"], row["reward_rejected"] = rewards
    elif fmt == "ranking":
        row["rewards"] = rewards
    elif fmt == "oasst":
        row = json.loads(json.dumps(row))  # a deep copy: the tree is annotated in place
        replies = [reply for _, ranked in formats.oasst_groups(row["prompt"]) for reply in ranked]
        for reply, reward in zip(replies, rewards):
            reply["reward"] = reward
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m reward_models.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="reward model folder")
    ap.add_argument("--data", required=True, help="JSONL/JSON/parquet file or datasets path")
    ap.add_argument("--out", required=True, help="output JSONL file")
    ap.add_argument("--format", default="auto", help="record format (default: detected)")
    ap.add_argument("--max-length", type=int, default=None, help="override the model's max_length")
    ap.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per forward pass")
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="autocast precision of the forwards (auto: bf16 where the hardware multiplies it natively)")
    args = ap.parse_args(argv)
    setup_logging(is_main=True)
    choice = resolve_precision(args.precision)
    log.info("precision: %s", choice.describe())
    try:
        records = formats.read_records(args.data)
        fmt, per_record = _items(records, args.format)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    scorer = RewardScorer(args.model, device=args.device, max_tokens=args.max_tokens, max_length=args.max_length)
    try:  # the model's truncation rule may be `error`: a row too long is bad input too
        seqs = [scorer.tokenize(prompt, response, record.origin)
                for record, pairs in zip(records, per_record) for prompt, response in pairs]
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    with autocast(choice, scorer.device):
        rewards = scorer.score_sequences(seqs, progress=True).float().tolist()
    out, tmp = Path(args.out), Path(args.out).with_name(f".tmp-{Path(args.out).name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    k = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record, pairs in zip(records, per_record):
            f.write(json.dumps(_write_back(fmt, record.data, rewards[k: k + len(pairs)])) + "\n")
            k += len(pairs)
    os.replace(tmp, out)
    print(f"scored {len(seqs)} responses in {len(records)} rows ({fmt}) -> {out}")


if __name__ == "__main__":
    main()
