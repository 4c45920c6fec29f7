"""Supervised fine-tuning: teach a model to answer like the demonstrations.

    python -m align.sft recipes/smollm2-135m/sft_gsm8k.yaml [key=value ...]
    accelerate launch --num_processes 2 -m align.sft RECIPE.yaml

Loss: the negative log-likelihood of the assistant turns (InstructGPT's SFT stage, Ouyang et al. 2022), a token
mean over the whole global batch, so gradient accumulation and data parallelism give the big-batch gradient.
Where a batch goes: formats (file -> SFTExample) -> data.tokenize_sft (template, assistant mask, truncation)
-> data.StepSampler/shard/collate (padding-free micro-batches) -> models.logits_at -> losses.sft_loss.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from . import data, forgetting, formats, losses, models, train
from .config import SFTConfig, run_cli

log = logging.getLogger("align")


def load_data(cfg: SFTConfig, tokenizer) -> tuple[list[data.Tokenized], list[data.Tokenized], dict]:
    """Train and validation sets, tokenized; returns what truncation did for the report."""
    examples, validation = formats.load_train_validation(cfg.data, "sft", cfg.seed)
    if cfg.data.system_prompt:
        examples, validation = (formats.with_system_prompt(x, cfg.data.system_prompt) for x in (examples, validation))
    tokenize = dict(tokenizer=tokenizer, max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                    loss_on=cfg.data.loss_on)
    train_set, stats = data.tokenize_sft(examples, **tokenize)
    log.info("train: %d examples, %d tokens, %d targets; %s", len(train_set), sum(map(len, train_set)),
             sum(t.num_targets for t in train_set), stats.summary())
    report = {"train": stats.as_dict()}
    val_set = []
    if validation:
        val_set, val_stats = data.tokenize_sft(validation, **tokenize)
        log.info("validation: %d examples; %s", len(val_set), val_stats.summary())
        report["validation"] = val_stats.as_dict()
    return train_set, val_set, report


@torch.no_grad()
def evaluate_nll(model, examples: list[data.Tokenized], cfg: SFTConfig, accelerator, pad_id: int
                 ) -> dict[str, float]:
    """Token-mean NLL and perplexity on the validation set, split over processes and summed."""
    mine = examples[accelerator.process_index:: accelerator.num_processes]
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with train.evaluating(model, accelerator) as net:
        for chunk in data.chunks(mine, cfg.train.micro_batch_size):
            batch = data.collate(chunk, cfg.data.padding_free, pad_id).to(accelerator.device)
            with accelerator.autocast():
                logits = models.logits_at(net, batch)
            totals[0] += F.cross_entropy(logits.float(), batch.targets, reduction="sum").double()
            totals[1] += batch.num_targets
    totals = accelerator.reduce(totals, "sum")
    loss = (totals[0] / totals[1]).item()
    return {"loss/val": loss, "ppl/val": math.exp(min(loss, 50.0))}


def main(cfg: SFTConfig) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    accelerator, run = train.begin(cfg, "sft")
    if run.finished:
        log.info("%s is already complete (report.json exists); nothing to do", run.dir)
        return run.report()
    with accelerator.main_process_first():  # the first process converts a GGUF model into the cache
        base_location = models.materialize(cfg.model)
        tokenizer = models.load_tokenizer(cfg.model)
    train_set, val_set, data_report = load_data(cfg, tokenizer)
    model = models.load_causal_lm(cfg.model, cfg.lora, cfg.seed, cfg.train.gradient_checkpointing)
    check = (forgetting.Check(cfg.forgetting, tokenizer, accelerator, run.dir, cfg.seed)
             if cfg.forgetting.enabled else None)  # what training may cost on general text and prompts
    trainable, total = models.count_parameters(model)
    log.info("model %s: %.1fM parameters, %.2fM trainable (%s)", cfg.model.name_or_path, total / 1e6,
             trainable / 1e6, "LoRA" if cfg.lora.enabled else "full")
    run.start(held_out=bool(val_set))  # inputs are good: now the run folder is created
    model, schedule = train.prepare(model, cfg, accelerator, run, len(train_set))
    pad_id = tokenizer.pad_token_id
    evaluate = (lambda: evaluate_nll(model, val_set, cfg, accelerator, pad_id)) if val_set else None

    before = run.before_training(schedule.start, evaluate)  # measured now, or read back on a resume
    if check:
        check.before(model, schedule.start)  # likewise: forgetting_before.json
    if before and schedule.start == 0:
        log.info("held-out loss before training: %.4f (perplexity %.2f)", before["loss/val"], before["ppl/val"])

    # ---- the loop -------------------------------------------------------------------------------------------
    loop = train.Loop(cfg, run, accelerator, model, tokenizer, schedule, evaluate, base_location, before=before)
    for step, micro_batches in loop:
        num_targets = sum(train_set[i].num_targets for i in loop.batch_ids)  # global count: no communication
        nll = torch.zeros((), device=accelerator.device)
        for k, ids in enumerate(micro_batches):
            batch = data.collate([train_set[i] for i in ids], cfg.data.padding_free, pad_id).to(accelerator.device)
            with loop.accumulating(k, len(micro_batches)):
                logits = models.logits_at(model, batch)
                loss = losses.sft_loss(logits, batch.targets, num_targets)
                # DDP averages gradients over processes; scaling by their number turns that into the global sum.
                accelerator.backward(loss * accelerator.num_processes)
            nll += loss.detach() * num_targets
        train_loss = (accelerator.reduce(nll, "sum") / num_targets).item()
        loop.end_step(step, {"loss/train": train_loss}, tokens=sum(len(train_set[i]) for i in loop.batch_ids))

    # ---- evaluate and save ----------------------------------------------------------------------------------
    after = loop.final_evaluation()  # with train.final_model=best, the best model's (its weights put back)
    report = {"train_loss": loop.last_metrics.get("loss/train"), "data": data_report, "model": str(run.dir / "model"),
              **loop.outcome()}
    if before:
        report["val_loss_before"], report["val_ppl_before"] = before["loss/val"], before["ppl/val"]
    if after:
        report["val_loss"], report["val_ppl"] = after["loss/val"], after["ppl/val"]
    if check:
        report["forgetting"] = check.after(model)  # logs before -> after and any flags
    train.save_policy(run, model, tokenizer, cfg, base_location, report)
    run.finish(report)
    if before and after:
        log.info("held-out loss: %.4f -> %.4f (perplexity %.2f -> %.2f)", before["loss/val"], after["loss/val"],
                 before["ppl/val"], after["ppl/val"])
    elif after:
        log.info("held-out loss: %.4f (perplexity %.2f)", after["loss/val"], after["ppl/val"])
    log.info("model saved to %s", run.dir / "model")
    return report


if __name__ == "__main__":
    run_cli(SFTConfig, main, "python -m align.sft")
