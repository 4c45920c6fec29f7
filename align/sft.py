"""Supervised fine-tuning: teach a model to answer like the demonstrations.

    python -m align.sft recipes/smollm2-135m/sft_gsm8k.yaml [key=value ...]
    accelerate launch --num_processes 2 -m align.sft RECIPE.yaml

Loss: the negative log-likelihood of the assistant turns (InstructGPT's SFT stage, Ouyang et al. 2022), a token
mean over the whole global batch, so gradient accumulation and data parallelism give the big-batch gradient.
Where a batch goes: formats (file -> SFTExample) -> data.tokenize_sft (template, assistant mask, truncation)
-> data.StepSampler/shard/collate (padding-free micro-batches) -> models.logits_at -> losses.sft_loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math

import torch
import torch.nn.functional as F

from . import data, formats, losses, models, train
from .config import SFTConfig, run_cli

log = logging.getLogger("align")


def load_data(cfg: SFTConfig, tokenizer) -> tuple[list[data.Tokenized], list[data.Tokenized], dict]:
    """Train and validation sets, tokenized; returns what truncation did for the report."""
    examples = formats.load_examples(cfg.data.train, "sft")
    if cfg.data.validation is not None:
        validation = formats.load_examples(cfg.data.validation, "sft")
    else:
        examples, validation = formats.split_validation(examples, cfg.data.validation_fraction, cfg.seed)
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
def evaluate(model, examples: list[data.Tokenized], cfg: SFTConfig, accelerator, pad_id: int) -> dict[str, float]:
    """Token-mean NLL and perplexity on the validation set, split over processes and summed."""
    net = accelerator.unwrap_model(model)  # no DDP wrapper: processes may run different numbers of forwards
    was_training = net.training
    net.eval()
    mine = examples[accelerator.process_index:: accelerator.num_processes]
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for chunk in data.chunks(mine, cfg.train.micro_batch_size):
        batch = data.collate(chunk, cfg.data.padding_free, pad_id).to(accelerator.device)
        with accelerator.autocast():
            logits = models.logits_at(net, batch)
        totals[0] += F.cross_entropy(logits.float(), batch.targets, reduction="sum").double()
        totals[1] += batch.num_targets
    totals = accelerator.reduce(totals, "sum")
    net.train(was_training)
    loss = (totals[0] / totals[1]).item()
    return {"loss/val": loss, "ppl/val": math.exp(min(loss, 50.0))}


def main(cfg: SFTConfig) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    accelerator = train.make_accelerator(cfg.train, cfg.seed)
    run = train.Run(cfg, accelerator, "sft")
    if run.finished:
        log.info("%s is already complete (report.json exists); nothing to do", run.dir)
        return json.loads((run.dir / "report.json").read_text())
    with accelerator.main_process_first():  # the first process converts a GGUF model into the cache
        base_location = models.materialize(cfg.model)
        tokenizer = models.load_tokenizer(cfg.model)
    train_set, val_set, data_report = load_data(cfg, tokenizer)
    model = models.load_causal_lm(cfg.model, cfg.lora, cfg.seed, cfg.train.gradient_checkpointing)
    run.start()  # inputs are good: now the run folder is created
    trainable, total = models.count_parameters(model)
    log.info("model %s: %.1fM parameters, %.2fM trainable (%s)", cfg.model.name_or_path, total / 1e6,
             trainable / 1e6, "LoRA" if cfg.lora.enabled else "full")

    sampler = data.StepSampler(len(train_set), cfg.train.batch_size, cfg.seed)
    num_steps = train.total_steps(cfg.train, sampler.steps_per_epoch)
    optimizer = train.make_optimizer(model, cfg.train)
    scheduler = train.make_scheduler(optimizer, cfg.train, num_steps)
    start = run.resume(model, optimizer, scheduler)["step"]
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler steps once per optimizer step: ours
    pad_id = tokenizer.pad_token_id
    log.info("%d steps of %d examples (%d per micro-batch, %d accumulation, %d processes), %.2f epochs",
             num_steps, cfg.train.batch_size, cfg.train.micro_batch_size,
             train.accumulation_steps(cfg.train, accelerator.num_processes), accelerator.num_processes,
             num_steps / sampler.steps_per_epoch)

    before = {}
    if val_set and start == 0:
        before = evaluate(model, val_set, cfg, accelerator, pad_id)
        run.log(before, step=0)
        log.info("held-out loss before training: %.4f (perplexity %.2f)", before["loss/val"], before["ppl/val"])

    # ---- the loop -------------------------------------------------------------------------------------------
    progress = train.Progress(num_steps, start, accelerator.is_main_process and cfg.log.progress, "sft")
    timer, metrics = train.Timer(), {}
    window_tokens = window_steps = 0  # since the last log line
    for step in range(start, num_steps):
        batch_ids = sampler.indices(step)  # the same global batch on every process
        num_targets = sum(train_set[i].num_targets for i in batch_ids)  # global count, no communication needed
        num_tokens = sum(len(train_set[i]) for i in batch_ids)
        mine = data.shard(batch_ids, accelerator.process_index, accelerator.num_processes)
        micro_batches = data.chunks(mine, cfg.train.micro_batch_size)
        nll = torch.zeros((), device=accelerator.device)
        for k, chunk in enumerate(micro_batches):
            batch = data.collate([train_set[i] for i in chunk], cfg.data.padding_free, pad_id).to(accelerator.device)
            last = k == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                logits = models.logits_at(model, batch)
                loss = losses.sft_loss(logits, batch.targets, num_targets)
                # DDP averages gradients over processes; scaling by their number turns that into the global sum.
                accelerator.backward(loss * accelerator.num_processes)
            nll += loss.detach() * num_targets
        grad_norm = (accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                     if cfg.train.max_grad_norm else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        train_loss = (accelerator.reduce(nll, "sum") / num_targets).item()
        progress.update(loss=train_loss)
        window_tokens, window_steps = window_tokens + num_tokens, window_steps + 1
        if done % cfg.log.every == 0 or done == num_steps:
            elapsed = timer.lap()
            metrics = {"loss/train": train_loss, "optim/lr": scheduler.get_last_lr()[0],
                       "perf/tokens_per_s": window_tokens / elapsed, "perf/step_s": elapsed / window_steps,
                       "data/epoch": done / sampler.steps_per_epoch}
            window_tokens = window_steps = 0
            if grad_norm is not None:
                metrics["optim/grad_norm"] = float(grad_norm)
            run.log(metrics, step=done)
        if val_set and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != num_steps:
            run.log(evaluate(model, val_set, cfg, accelerator, pad_id), step=done)
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done != num_steps:
            run.save_checkpoint(done, model, tokenizer, optimizer, scheduler, {"epoch": sampler.epoch_of(step)},
                                base_location)
    progress.close()

    # ---- evaluate and save ----------------------------------------------------------------------------------
    after = {}
    if val_set:
        after = evaluate(model, val_set, cfg, accelerator, pad_id)
        run.log(after, step=num_steps)
    report = {"steps": num_steps, "train_loss": metrics.get("loss/train"), "data": data_report,
              "model": str(run.dir / "model")}
    if before:
        report["val_loss_before"], report["val_ppl_before"] = before["loss/val"], before["ppl/val"]
    if after:
        report["val_loss"], report["val_ppl"] = after["loss/val"], after["ppl/val"]
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(model)
        with train.atomic_dir(run.dir / "model") as tmp:
            models.save(net, tokenizer, tmp, base_location)
        if cfg.lora.enabled and cfg.save_merged:
            with train.atomic_dir(run.dir / "merged") as tmp:
                models.save_merged(net, tokenizer, tmp)
            report["merged_model"] = str(run.dir / "merged")
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
