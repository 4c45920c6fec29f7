"""Derive data/general_reference.jsonl (the forgetting check's general text and prompts) from the OpenAssistant trees
that ship with align (data/oasst_en100_trees.jsonl, Apache-2.0).

    python scripts/make_general_reference.py [--source FILE] [--out FILE]   # defaults: the two files named here

One record per tree, in file order: the tree's first user message (`prompt`, for the KL on general prompts) and the
best-ranked human-written assistant reply to it that is short enough (`text`, for the loss on general text). Left
out: model-written (synthetic) or deleted messages, prompts over MAX_PROMPT_CHARS characters, trees with no reply of
at most MAX_TEXT_CHARS characters (about 160 SmolLM2 tokens of prose; code runs denser). Texts are copied unchanged,
only stripped of surrounding whitespace. Deterministic: the same input gives the same file, byte for byte.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_PROMPT_CHARS = 400
MAX_TEXT_CHARS = 700


def human(node: dict) -> bool:
    return not node.get("synthetic") and not node.get("deleted") and bool((node.get("text") or "").strip())


def record(tree: dict) -> dict | None:
    prompt = tree["prompt"]
    if prompt.get("role") != "prompter" or not human(prompt) or len(prompt["text"].strip()) > MAX_PROMPT_CHARS:
        return None
    replies = [r for r in prompt.get("replies") or [] if r.get("role") == "assistant" and human(r)]
    replies.sort(key=lambda r: (r.get("rank") is None, r.get("rank") or 0))  # best rank first, unranked last
    short = [r for r in replies if len(r["text"].strip()) <= MAX_TEXT_CHARS]
    if not short:
        return None
    return {"prompt": prompt["text"].strip(), "text": short[0]["text"].strip(),
            "source": f"oasst en_100_tree {tree['message_tree_id']} reply {short[0]['message_id']}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT / "data" / "oasst_en100_trees.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "data" / "general_reference.jsonl"))
    args = ap.parse_args()
    with open(args.source, encoding="utf-8") as f:
        rows = [r for r in (record(json.loads(line)) for line in f if line.strip()) if r is not None]
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(rows)} records -> {args.out}")


if __name__ == "__main__":
    main()
