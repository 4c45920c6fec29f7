"""People rank responses and judge policies in a browser.

    python -m align.label rank --prompts FILE --policy DIR [--policy DIR ...] --k 4 --out rankings.jsonl
    python -m align.label rank --candidates FILE --out rankings.jsonl [--per-item 2] [--port 8000]
    python -m align.label compare --samples eval_dpo/samples.jsonl --out verdicts.jsonl
    python -m align.label summary rankings.jsonl [--merged merged.jsonl]      # or a verdicts file

rank: candidates are sampled once (--policy: each policy writes its share of the K responses per prompt, see
align/label/sample.py; they are kept beside --out as NAME.candidates.jsonl, and a restart reuses them) or read from
a file of `{"prompt", "responses": [...]}` records. A local web server then shows one prompt at a time with its
responses in a blind, shuffled order; each answer is one line of --out in the ranking format align.rm and
reward_models.evaluate train and evaluate on as it is. compare: candidate vs baseline from align.evaluate's
samples.jsonl, side by side, blind and shuffled. Stop the server with Ctrl-C (or kill it: every answer is already on
disk); run the same command again to continue where each annotator stopped. The summary (printed when the server
stops, or by `summary`) gives per-annotator counts, agreement, and for comparisons the human win rate beside the
judge's; its last line is one JSON object.

The server binds 127.0.0.1. With --host (another address, to let others on your network in) a token is required:
--token, or one is drawn and printed in the address to share.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import secrets
import socket
import sys
from pathlib import Path
from typing import Optional

from ..config import AlignError, ConfigError, DataSource
from . import stats
from .store import MAX_RESPONSES, Journal, Queue, comparison_items, ranking_items

log = logging.getLogger("align")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m align.label", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def server_args(p):
        p.add_argument("--out", required=True, help="the answers file (.jsonl): created, or continued if it holds "
                                                    "this command's earlier answers")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: a token is required)")
        p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
        p.add_argument("--token", default=None, help="required of every visitor (default: none on 127.0.0.1, "
                                                     "drawn at random on any other --host)")
        p.add_argument("--per-item", type=int, default=1, help="annotators who answer each item (default 1)")
        p.add_argument("--title", default="", help="shown in the page's header")

    rank = sub.add_parser("rank", help="rank K responses per prompt")
    rank.add_argument("--candidates", help="a file of {prompt, responses[, policies]} records")
    rank.add_argument("--prompts", help="prompts to sample candidates for (with --policy)")
    rank.add_argument("--offset", type=int, default=0, help="--prompts: skip this many records first")
    rank.add_argument("--n", type=int, default=None, help="--prompts: use at most this many records")
    rank.add_argument("--policy", action="append", default=[], help="a policy to sample from (repeat for several)")
    rank.add_argument("--k", type=int, default=4, help="responses per prompt (with --policy)")
    rank.add_argument("--max-new-tokens", type=int, default=128)
    rank.add_argument("--temperature", type=float, default=1.0)
    rank.add_argument("--top-p", type=float, default=1.0)
    rank.add_argument("--seed", type=int, default=0)
    rank.add_argument("--engine", default="auto", choices=("auto", "hf", "vllm"),
                      help="auto: vLLM where it is installed and a CUDA GPU is present, else transformers' generate")
    server_args(rank)

    compare = sub.add_parser("compare", help="judge a candidate policy against its baseline, side by side")
    compare.add_argument("--samples", required=True, help="align.evaluate's samples.jsonl")
    compare.add_argument("--tie-margin", type=float, default=0.0, help="the judge's tie margin (as align.evaluate)")
    server_args(compare)

    summary = sub.add_parser("summary", help="counts, agreement and merged rankings of an answers file")
    summary.add_argument("answers", help="a rankings or verdicts file written by align.label")
    summary.add_argument("--merged", default=None, help="write one merged ranking per item here (a new file)")
    summary.add_argument("--tie-margin", type=float, default=0.0, help="verdicts: the judge's tie margin")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Inputs, checked before anything is written


def candidates_path(out: str) -> Path:
    p = Path(out)
    return p.with_name(p.stem + ".candidates.jsonl")


def rank_items(args: argparse.Namespace) -> tuple[Optional[list], Optional[list]]:
    """(items, prompts): the items to rank when they exist already (a --candidates file, or candidates an earlier run
    of this command sampled and kept), else None and the prompts to sample them for (every input checked)."""
    if bool(args.candidates) == bool(args.policy):
        raise ConfigError("rank: give either --candidates FILE or --policy DIR (with --prompts FILE)")
    if args.candidates:
        if args.prompts:
            raise ConfigError("--prompts goes with --policy; a --candidates file carries its own prompts")
        return ranking_items(args.candidates), None
    if not args.prompts:
        raise ConfigError("--policy needs --prompts FILE: the prompts to sample candidates for")
    if not 2 <= args.k <= MAX_RESPONSES:
        raise ConfigError(f"--k={args.k}: a ranking needs 2 to {MAX_RESPONSES} responses (one rank key each)")
    from .. import models

    prompts = prompt_examples(args)  # readable, before anything is sampled or written
    for location in args.policy:
        if not location.startswith("pkg:") and not location.endswith(".gguf"):
            models.check_location(models.resolve(location), "--policy")
    kept = candidates_path(args.out)
    if not kept.exists():
        return None, prompts
    items = ranking_items(str(kept))
    first = json.loads(kept.read_text(encoding="utf-8").splitlines()[0])
    want = {json.dumps(ex.prompt) for ex in prompts}
    if first.get("sampled") != sampling_settings(args) or not {json.dumps(it.prompt) for it in items} <= want:
        raise ConfigError(f"{kept} holds candidates sampled with other prompts, policies or settings "
                          f"({first.get('sampled')}); pass it as --candidates, or choose another --out (nothing "
                          f"was touched)")
    log.info("candidates from %s (sampled by an earlier run)", kept)
    return items, None


def sampling_settings(args: argparse.Namespace) -> dict:
    """What the kept candidates were drawn with: a restart with anything else is refused."""
    return {"prompts": args.prompts, "offset": args.offset, "n": args.n, "policies": args.policy, "k": args.k,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed, "engine": args.engine}


def sample_and_keep(args: argparse.Namespace, prompts: list) -> list:
    """Sample the candidates and keep them beside --out (NAME.candidates.jsonl), then read them back as items."""
    from .. import rollout
    from ..train import write_text_atomic
    from .sample import sample_candidates

    engine = args.engine
    if engine == "auto":
        import importlib.util

        import torch

        engine = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    rows = sample_candidates(prompts, args.policy, args.k,
                             rollout.Sampling(args.max_new_tokens, args.temperature, args.top_p, 0), args.seed, engine)
    settings = sampling_settings(args)
    kept = candidates_path(args.out)
    write_text_atomic(kept, "".join(json.dumps({**r, "sampled": settings}, ensure_ascii=False) + "\n" for r in rows))
    log.info("%d candidates per prompt for %d prompts kept in %s", args.k, len(rows), kept)
    return ranking_items(str(kept))


def prompt_examples(args):
    from .. import formats

    return formats.load_examples(DataSource(path=args.prompts, offset=args.offset, limit=args.n), "prompt")


def check_server_args(args: argparse.Namespace) -> Optional[str]:
    """The token visitors need (None: none), after checking the address."""
    if args.per_item < 1:
        raise ConfigError(f"--per-item={args.per_item}: must be at least 1")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(args.host, None, proto=socket.IPPROTO_TCP)}
        loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (OSError, ValueError):
        raise ConfigError(f"--host {args.host}: not an address this machine can listen on") from None
    if args.token is not None and len(args.token) < 8:
        raise ConfigError("--token: at least 8 characters")
    return args.token if (args.token or loopback) else secrets.token_urlsafe(16)


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections wait in the backlog from now on, before uvicorn starts accepting
    except OSError as err:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    return sock


# --------------------------------------------------------------------------------------------------------------
# The server, and the summary when it stops


def serve(args: argparse.Namespace) -> dict:
    import uvicorn

    from .app import LOOPBACK_HOSTS, Task, build_app

    # Everything is checked before anything is written. The port is taken and --out locked before candidates are
    # sampled (minutes): a second run on the same --out stops at once, not after sampling.
    token = check_server_args(args)
    journal = Journal(args.out, args.command)
    identical = 0
    if args.command == "rank":
        items, prompts = rank_items(args)
    else:
        items, identical = comparison_items(args.samples)
    sock = listen(args.host, args.port)
    journal.open()
    if items is None:
        try:
            items = sample_and_keep(args, prompts)
        except BaseException:
            journal.close(discard=True)  # the answers file this run created, still empty, goes
            raise
    queue = Queue(items, journal.answers, args.per_item)
    try:
        task = Task(args.command, items, journal, queue, token, args.title, None if token else LOOPBACK_HOSTS)
        host, port = sock.getsockname()[:2]
        address = f"http://{'[' + host + ']' if ':' in host else host}:{port}/" + (f"?token={token}" if token else "")
        print(f"align.label {args.command}: {len(items)} items"
              + (f" ({identical} rows where both policies wrote the same text left out)" if identical else "")
              + f", {len(journal.answers)} answers so far in {args.out}", flush=True)
        print(f"open {address}   (Ctrl-C stops; every answer is already saved)", flush=True)
        server = uvicorn.Server(uvicorn.Config(build_app(task), log_level="warning", lifespan="off"))
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then raises it again: the normal way out
        pass
    finally:
        journal.close()
    return summarize(journal.answers, args.command, getattr(args, "tie_margin", 0.0))


def summarize(answers: list[dict], kind: str, tie_margin: float = 0.0) -> dict:
    if not answers:
        return {"answers": 0}
    if kind == "rank":
        out = stats.summarize_rankings(answers)
    else:
        out = stats.summarize_verdicts(answers, tie_margin)
    out["answers"] = len(answers)
    for line in describe(out, kind):
        log.info("%s", line)
    return out


def describe(summary: dict, kind: str) -> list[str]:
    """The summary for a person to read (the JSON line after it has everything)."""
    lines = []
    for name, counts in summary["annotators"].items():
        lines.append(f"{name}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    pa = summary["pairwise_agreement"]
    show = (lambda x: "n/a" if x is None else f"{x:.3f}")
    lines.append(f"agreement between annotators: {show(pa['agreement'])} over {pa['comparisons']} comparisons "
                 f"({pa['items']} items answered by two or more)")
    if kind == "rank":
        w = summary["kendall_w"]
        lines.append(f"Kendall's W: {show(w['mean'])} (mean over {w['items']} items)")
    elif summary["human_win_rate"] is None:
        lines.append("no verdicts yet (only skips or flags)")
    else:
        lo, hi = summary["human_win_rate_ci95"]
        lines.append(f"human win rate {summary['human_win_rate']:.3f} [{lo:.3f}, {hi:.3f}] over {summary['n_items']} "
                     f"items")
        if summary["judge_win_rate"] is not None:
            lo, hi = summary["judge_win_rate_ci95"]
            agree, kappa = show(summary["human_judge_agreement"]), show(summary["cohen_kappa"])
            lines.append(f"judge win rate {summary['judge_win_rate']:.3f} [{lo:.3f}, {hi:.3f}] on the same "
                         f"{summary['judge_items']} items; human and judge agree on {agree} (Cohen's kappa {kappa})")
    if summary["flagged_items"]:
        lines.append(f"flagged items (left out of merged rankings): {len(summary['flagged_items'])}")
    return lines


def answers_kind(path: Path) -> str:
    """rank or compare, from the file's first answer."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        raise ConfigError(f"{path}:1: not an align.label answers file (not JSON)") from None
    return "compare" if isinstance(record, dict) and "candidate" in record else "rank"


def summary_command(args: argparse.Namespace) -> dict:
    path = Path(args.answers)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    kind = answers_kind(path)
    answers = Journal(str(path), kind).answers
    if args.merged:
        if kind != "rank":
            raise ConfigError("--merged: merged rankings come from a rankings file, not verdicts")
        merged = Path(args.merged)
        if merged.exists():
            raise ConfigError(f"--merged {merged}: already exists; choose a new file (nothing was touched)")
        if not merged.parent.is_dir():
            raise ConfigError(f"--merged {merged}: the folder {merged.parent} does not exist")
    out = summarize(answers, kind, args.tie_margin)
    if args.merged:
        from ..train import write_text_atomic

        rows = stats.merged_rankings(answers)
        write_text_atomic(Path(args.merged), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        out["merged"] = {"path": args.merged, "items": len(rows)}
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from ..train import setup_logging

    setup_logging(True)
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        out = summary_command(args) if args.command == "summary" else serve(args)
    except AlignError as err:  # bad input: one line, exit 2, nothing written
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
