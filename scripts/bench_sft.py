"""sft: align.sft against TRL's SFTTrainer on GSM8K question/answer chats (assistant-only loss), the random Llama.

The same examples in the same order from the same initialisation: align reads the file and shuffles with its seeded
StepSampler; TRL gets the records already in that order and samples sequentially. TRL runs at its best on the
machine, not its defaults: no gradient checkpointing, padding-free batches, the precision its trial picked.
Throughput: tokens per second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from benchlib import ROOT, compare, model_flops, print_training_table, reset_accelerate, stage_setup, step_clock


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


def bench(args, peaks: dict) -> dict:
    from align import data, formats

    tokenizer, work, model = stage_setup("sft", args.layers)
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
    flops_per_step = [model_flops(model.body, model.head, tokens,
                                  sum(tokenized[i].num_targets for i in sampler.indices(step)))
                      for step, tokens in enumerate(tokens_per_step)]

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        if side == "align":
            return _run_align_sft(model.dir, data_file, out, n, batch, lr, precision=precision)
        return _run_trl_sft(model.dir, ordered, out, n, batch, lr, precision=precision)

    def measure(side: str, res: dict, skip: int) -> dict:
        n, seconds = len(res["step_s"]), sum(res["step_s"][skip:])
        return {"tokens_per_s": sum(tokens_per_step[skip:n]) / seconds,
                "flops_per_s": sum(flops_per_step[skip:n]) / seconds,
                "loss_first": res["loss"][0], "loss_last": res["loss"][-1]}

    # the first steps warm up allocators and kernels
    sides = compare(args, "sft", work, peaks, run, measure, key="tokens_per_s", unit="tok/s", steps=steps,
                    skip=min(2, steps - 1))
    return {
        "stage": "sft", "ratio": sides["align"]["tokens_per_s"] / sides["trl"]["tokens_per_s"], **sides,
        "model": model.fields(),
        "work": {"steps": steps, "batch": batch, "tokens": sum(tokens_per_step), "max_length": args.max_length,
                 "data": "data/gsm8k_400.jsonl (assistant-only loss)", "rounds": args.rounds},
    }


print_table = print_training_table
