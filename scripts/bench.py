"""Benchmarks: align against TRL on the same model, data, batches and machine, in one run.

    python scripts/bench.py sft [--steps 30] [--rounds 2] [--out bench]
    python scripts/bench.py rm | dpo
    python scripts/bench.py ppo [--steps 6] [--batch 8] [--max-new-tokens 32] [--ppo-epochs 2] [--engine hf|vllm]
    python scripts/bench.py grpo [--steps 6] [--batch 8] [--group-size 4] [--max-new-tokens 32] [--ppo-epochs 2]
                                 [--micro-batch N] [--mini-batch N]
    python scripts/bench.py rollout [--steps 4] [--batch 8] [--max-new-tokens 64]
    python scripts/bench.py all            # sft, rm, dpo, ppo, grpo (rollout needs vLLM: run it by name)
    python scripts/bench.py STAGE --quick  # a smoke run: tiny sizes, one round, fp32 (the numbers mean nothing)
    python scripts/bench.py sft [--precision best|fp32|bf16] [--trial-steps 4] [--trial-cap-s SECONDS]

Each stage's benchmark runs both sides in turn, interleaved over `--rounds` (align, TRL, align, TRL...; two
training processes at once would halve each other's speed), on identical examples in an identical order from
an identical initialisation, prints one table (throughput each side, ratio, loss each side, each side's precision,
model FLOP utilisation) and writes it as JSON under --out. The last line of output is one JSON object, e.g.
{"stage": "sft", "ratio": align_over_trl, "align_precision": "fp32", ...}.

Both sides run at their best on the machine where they run. At start-up the benchmark prints the CPU's model and
the flags that decide bf16's speed (avx512_bf16, amx_bf16, aarch64's bf16: without them torch emulates bf16, ~100x
slower than float32), and measures the matmul peak in float32 and in bfloat16 (a short measure where bf16 is
emulated). Before the measured rounds, each side of sft, rm, dpo, ppo and grpo gets a precision trial: a short run
(--trial-steps, the first step a warm-up left out of the timing) in fp32, then in bf16 autocast (float32 master
weights on both sides). The bf16 trial is stopped after max(60 s, 4x the fp32 trial's wall time), or --trial-cap-s,
and a stopped trial counts as the slower. Each side keeps its faster precision (a line per side says which and
why) and runs the measured rounds in it; its MFU is against the peak of the dtype it kept. --precision fp32|bf16
forces one precision on both sides and skips the trials.

TRL runs in its best configuration for the machine, not its defaults: no gradient checkpointing (in either
precision), padding-free batches where it has them, and the precision its trial picked (its defaults, bf16 and
checkpointing, are ~30x slower on a CPU without bf16 instructions).

This file is the command line; scripts/benchlib.py is the harness every stage shares (the machine's measures, the
precision trials, the interleaved rounds, the medians, MFU, the JSON line), and scripts/bench_<stage>.py is each
stage: what its two sides run, on what data, and what still differs between them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stage files and the harness, imported by name

import torch  # noqa: E402
from benchlib import ROOT, cpu_info, describe_machine, headline, matmul_peaks, peaks_text  # noqa: E402

STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "rollout")  # each a file scripts/bench_<stage>.py
ALL = ("sft", "rm", "dpo", "ppo", "grpo")  # `all`: the comparisons with TRL

DEFAULTS = {"batch": 8, "rounds": 2, "max_new_tokens": 32, "group_size": 4, "precision": "best", "trial_steps": 4,
            "layers": 8}
# --quick: the smallest run that goes through every phase of a stage: a warm-up step and a timed one, a 2-layer
# model, fp32 on both sides (no precision trials)
QUICK = {"steps": 2, "batch": 2, "rounds": 1, "max_new_tokens": 8, "group_size": 2, "layers": 2, "precision": "fp32",
         "trial_steps": 2}


def stage_module(stage: str):
    """scripts/bench_<stage>.py: its bench(args, peaks) -> result and print_table(result)."""
    return importlib.import_module(f"bench_{stage}")


def settle_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset: with --quick from QUICK, else (and for the rest) from DEFAULTS. An option given
    on the command line always wins."""
    for key in {**DEFAULTS, **QUICK}:
        if getattr(args, key) is None:
            setattr(args, key, QUICK.get(key) if args.quick and key in QUICK else DEFAULTS.get(key))
    return args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=[*STAGES, "all"])
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps (default 30); ppo, grpo: iterations (default 6)")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (default 8); ppo, grpo: prompts per "
                    "iteration")
    ap.add_argument("--rounds", type=int, default=None, help="measured runs of each side, interleaved (default 2)")
    ap.add_argument("--layers", type=int, default=None,
                    help="sft, dpo, ppo, grpo: the random Llama's depth (default 8: ~19M parameters)")
    ap.add_argument("--max-length", type=int, default=256, help="longest example in tokens; ppo, grpo: longest prompt")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="ppo, grpo: response length limit, both sides (default 32)")
    ap.add_argument("--ppo-epochs", type=int, default=2,
                    help="ppo, grpo: optimizer passes over each rollout batch (TRL's num_iterations)")
    ap.add_argument("--group-size", type=int, default=None, help="grpo: responses per prompt (default 4)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="grpo: responses per forward (default --batch; must divide --batch)")
    ap.add_argument("--mini-batch", type=int, default=None,
                    help="grpo: responses per optimizer step (default all of the iteration's: one step per pass)")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="ppo: align's rollout engine")
    ap.add_argument("--out", default=str(ROOT / "bench"))
    ap.add_argument("--precision", choices=["best", "fp32", "bf16"], default=None,
                    help="best (default): trials of each side in fp32 and bf16 keep its faster; fp32|bf16: both "
                    "sides, no trial")
    ap.add_argument("--trial-steps", type=int, default=None,
                    help="steps (ppo, grpo: iterations) of a precision trial, the first a warm-up (default 4, at "
                    "least 2)")
    ap.add_argument("--trial-cap-s", type=float, default=None,
                    help="stop the bf16 trial after this many seconds (default: max(60, 4x the fp32 trial's))")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                    + " unless given (seconds to a minute per stage; the numbers mean nothing)")
    return ap


def main() -> None:
    ap = parser()
    args = settle_defaults(ap.parse_args())
    if args.trial_steps < 2:
        ap.error("--trial-steps: at least 2 (the first step is a warm-up, left out of the timing)")

    from align.train import setup_logging

    setup_logging(is_main=False)  # the benchmark prints its own lines
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    machine = {**cpu_info(), "threads": torch.get_num_threads()}
    print(f"[bench] {describe_machine(machine)}", flush=True)
    peaks = matmul_peaks()
    print(f"[bench] matmul peak: {peaks_text(peaks)} on {machine['threads']} threads", flush=True)
    stages = list(ALL) if args.stage == "all" else [args.stage]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for stage in stages:
        module = stage_module(stage)
        result = {**module.bench(args, peaks), "peaks_gflops": peaks, "machine": machine}
        module.print_table(result)
        (out / f"{stage}.json").write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
    lines = [headline(r) for r in results]
    print(json.dumps(lines[0] if len(lines) == 1 else {"stage": "all", "results": lines}))


if __name__ == "__main__":
    main()
