"""dpo: align.dpo against TRL's DPOTrainer on HH-RLHF harmless pairs (chat template, no truncation), the random
Llama, sigmoid loss with beta 0.1.

TRL evaluates its frozen reference copy every step (its default); align computes the reference log-probs once per
run and caches them. Three sides: align (a cold cache: its one reference pass is charged to the timed steps in
proportion), align_cached (align* in the table: the cache the cold run filled) and TRL. Throughput: pairs per second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from benchlib import ROOT, compare, model_flops, print_training_table, reset_accelerate, stage_setup, step_clock


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


def bench(args, peaks: dict) -> dict:
    from align import data

    tokenizer, work, model = stage_setup("dpo", args.layers)
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
    policy_flops = [model_flops(model.body, model.head, t, k) for t, k in zip(tokens_per_step, targets_per_step)]
    reference_flops = [model_flops(model.body, model.head, t, k, passes=1)
                       for t, k in zip(tokens_per_step, targets_per_step)]

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        if side == "trl":
            return _run_trl_dpo(model.dir, ordered, out, n, batch, lr, precision=precision)
        # ALIGN_CACHE is the folder beside the run's: a round's (empty: its first align run is cold, align* then
        # finds it warm), or a trial's own, so that no trial warms the cache of a measured cold run.
        res = _run_align_dpo(model.dir, data_file, out, n, batch, lr, out.parent / "cache", precision=precision)
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

    # align_cached runs in align's precision: the warm cache is the one align's cold run fills; the first steps
    # warm up allocators and kernels
    sides = compare(args, "dpo", work, peaks, run, measure, key="items_per_s", unit="pairs/s", steps=steps,
                    skip=min(2, steps - 1), sides=("align", "align_cached", "trl"),
                    precision_of={"align_cached": "align"})
    return {
        "stage": "dpo", "ratio": sides["align"]["items_per_s"] / sides["trl"]["items_per_s"], "unit": "pairs/s",
        "cached_ratio": sides["align_cached"]["items_per_s"] / sides["trl"]["items_per_s"], **sides,
        "model": model.fields(),
        "work": {"steps": steps, "batch_pairs": batch, "tokens": sum(tokens_per_step), "max_length": args.max_length,
                 "loss": "sigmoid, beta 0.1", "data": "data/hh_harmless.jsonl (chat template, no truncation)",
                 "rounds": args.rounds},
    }


def print_table(result: dict) -> None:
    print_training_table(result)
    print(f"align* (reference log-probs from the warm cache)/trl: {result['cached_ratio']:.2f}x; the cold align run "
          f"spent {result['align']['reference_s']:.1f} s on its one reference pass")
