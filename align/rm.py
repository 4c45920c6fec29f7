"""Reward model from human preferences: pairs, or rankings of K responses with ties (InstructGPT).

    python -m align.rm recipes/minilm/rm_hh.yaml [key=value ...]
    accelerate launch --num_processes 2 -m align.rm RECIPE.yaml

Loss (align/losses.py): Bradley-Terry over every ordered pair of a group, each group weighted equally, from ONE
forward pass per response (K forwards give all C(K, 2) pairs; Ouyang et al. 2022, eq. 1), or the Plackett-Luce
listwise likelihood; optional margin and reward centring.
Where a batch goes: formats (file -> Preference/RankingExample) -> data.tokenize_groups (template, truncation)
-> data.collate_reward (packed for causal backbones, length buckets for encoders) -> RewardModel -> rewards
[G, K] -> losses.ranking_loss. The result is a plain AutoModelForSequenceClassification folder.
"""

from __future__ import annotations

import logging

import torch

from reward_models import metrics as rm_metrics
from reward_models.model import RewardModel, RewardSettings, load_reward_model, reward_pad_token, save_reward_model

from . import data, formats, losses, models, train
from .config import RMConfig, run_cli
from .evaluate import show

log = logging.getLogger("align")


def load_groups(cfg: RMConfig, tokenizer, template: str):
    """Train and validation groups, tokenized; and what was skipped or truncated, for the report."""
    examples, validation = formats.load_train_validation(cfg.data, "preference", cfg.seed)
    report = {"template": template, "skipped_records": examples.skipped}
    tokenize = dict(tokenizer=tokenizer, template=template, max_length=cfg.data.max_length,
                    truncation=cfg.data.truncation)
    train_groups, stats = data.tokenize_groups(examples, **tokenize)
    sizes = sorted({len(g.sequences) for g in train_groups})
    log.info("train: %d groups (K in %s), %d sequences; %s", len(train_groups), sizes,
             sum(len(g.sequences) for g in train_groups), stats.summary())
    report["train"] = stats.as_dict()
    val_groups = []
    if validation:
        val_groups, val_stats = data.tokenize_groups(validation, **tokenize)
        log.info("validation: %d groups; %s", len(val_groups), val_stats.summary())
        report["validation"] = val_stats.as_dict()
    return train_groups, val_groups, report


def group_loss(cfg: RMConfig, rewards, ranks, valid, margins) -> torch.Tensor:
    """Per-group loss [G] for the recipe's loss settings."""
    if cfg.loss.type == "plackett_luce":
        per_group = losses.plackett_luce_loss(rewards, ranks, valid)
    else:
        per_group = losses.ranking_loss(rewards, ranks, valid, margins if cfg.loss.use_margin else None,
                                        cfg.loss.ties)
    if cfg.loss.center_coef:
        per_group = per_group + cfg.loss.center_coef * losses.center_penalty(rewards, valid)
    return per_group


def score_groups(model, groups, cfg: RMConfig, pad_id: int, device):
    """(rewards [G, K], ranks [G, K], valid [G, K], margins [G]) for `groups`; rewards carry gradients when the
    model is training."""
    net = getattr(model, "module", model)
    batch = data.collate_reward([s for g in groups for s in g.sequences], pad_id, net.packed,
                                cfg.data.max_tokens_per_forward).to(device)
    ranks, valid, margins = (t.to(device) for t in data.group_tensors(groups))
    return data.scatter_groups(model(batch), valid), ranks, valid, margins


@torch.no_grad()
def evaluate_groups(model, groups, cfg: RMConfig, accelerator, pad_id: int, full: bool = False) -> dict:
    """Loss, pairwise accuracy and reward statistics on held-out groups (split over processes). With full=True
    (main process, at the end) also the evaluation report of reward_models.metrics."""
    mine = list(range(accelerator.process_index, len(groups), accelerator.num_processes))
    sums, loss_sum, scored = torch.zeros(6, device=accelerator.device), torch.zeros((), device=accelerator.device), []
    with train.evaluating(model, accelerator) as net:
        for ids in data.chunks(mine, cfg.train.micro_batch_size):
            chunk = [groups[i] for i in ids]
            rewards, ranks, valid, margins = score_groups(net, chunk, cfg, pad_id, accelerator.device)
            loss_sum += group_loss(cfg, rewards, ranks, valid, margins).sum()
            sums += losses.ranking_stats(rewards, ranks, valid)
            scored.extend((i, rm_metrics.Group(r[v].tolist(), g.ranks, g.response_chars))
                          for i, r, v, g in zip(ids, rewards.cpu(), valid.cpu(), chunk))
    sums = accelerator.reduce(sums, "sum")
    out = {"loss/val": (accelerator.reduce(loss_sum, "sum") / len(groups)).item(),
           **losses.summarize_ranking_stats(sums, "val")}
    if full:
        if accelerator.num_processes > 1:  # every process's groups, back in file order (the bootstrap is seeded)
            from accelerate.utils import gather_object

            scored = gather_object(scored)
        out["report"] = rm_metrics.summarize([group for _, group in sorted(scored, key=lambda x: x[0])])
    return out


def main(cfg: RMConfig) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    accelerator, run = train.begin(cfg, "rm")
    if run.finished:
        log.info("%s is already complete (report.json exists); nothing to do", run.dir)
        return run.report()
    with accelerator.main_process_first():
        base_location = models.materialize(cfg.model)
        tokenizer = models.load_tokenizer(cfg.model)
    reward_pad_token(tokenizer)
    template = data.resolve_template(tokenizer, cfg.data.template)
    train_groups, val_groups, data_report = load_groups(cfg, tokenizer, template)
    model = load_reward_model(cfg.model, cfg.lora, cfg.seed, tokenizer, cfg.train.gradient_checkpointing)
    trainable, total = models.count_parameters(model)
    log.info("reward model %s (%s, %s template): %.1fM parameters, %.2fM trainable", cfg.model.name_or_path,
             "causal, last token" if model.causal else "encoder, [CLS]", template, total / 1e6, trainable / 1e6)
    run.start(held_out=bool(val_groups))
    model, schedule = train.prepare(model, cfg, accelerator, run, len(train_groups))
    pad_id = tokenizer.pad_token_id
    evaluate = (lambda: evaluate_groups(model, val_groups, cfg, accelerator, pad_id)) if val_groups else None

    before = run.before_training(schedule.start, evaluate)  # measured now, or read back on a resume
    if before and schedule.start == 0:
        log.info("held-out pairwise accuracy before training: %s", show(before.get("accuracy/val")))

    # ---- the loop -------------------------------------------------------------------------------------------
    loop = train.Loop(cfg, run, accelerator, model, tokenizer, schedule, evaluate, base_location, before=before)
    for step, micro_batches in loop:
        num_groups = len(loop.batch_ids)  # the loss is a mean over the groups of the global batch
        sums = torch.zeros(6, device=accelerator.device)
        loss_sum = torch.zeros((), device=accelerator.device)
        for k, ids in enumerate(micro_batches):
            groups = [train_groups[i] for i in ids]
            with loop.accumulating(k, len(micro_batches)):
                rewards, ranks, valid, margins = score_groups(model, groups, cfg, pad_id, accelerator.device)
                loss = group_loss(cfg, rewards, ranks, valid, margins).sum() / num_groups
                if cfg.loss.length_corr_coef:  # a per-micro-batch term, weighted by its share of the groups
                    chars = torch.tensor([c for g in groups for c in g.response_chars], device=accelerator.device)
                    penalty = losses.length_correlation_penalty(rewards[valid], chars)
                    loss = loss + cfg.loss.length_corr_coef * penalty * len(groups) / num_groups
                accelerator.backward(loss * accelerator.num_processes)
            loss_sum += loss.detach()
            sums += losses.ranking_stats(rewards, ranks, valid)
        metrics = {"loss/train": accelerator.reduce(loss_sum, "sum").item(),
                   **losses.summarize_ranking_stats(accelerator.reduce(sums, "sum"), "train")}
        tokens = sum(train_groups[i].num_tokens for i in loop.batch_ids)
        loop.end_step(step, metrics, tokens=tokens)

    # ---- evaluate and save ----------------------------------------------------------------------------------
    report = {"train_loss": loop.last_metrics.get("loss/train"), "data": data_report, "model": str(run.dir / "model"),
              "template": template}
    if val_groups:
        # the best model's weights when train.final_model=best, and its full report (intervals, length split)
        after = loop.final_evaluation(lambda: evaluate_groups(model, val_groups, cfg, accelerator, pad_id, full=True))
        report["val_accuracy_before"] = before.get("accuracy/val")
        report["val_accuracy"] = after.get("accuracy/val")  # None: no ordered pairs
        report["validation"] = after.get("report")
        if after.get("report"):
            r = after["report"]  # accuracy and its interval are None without ordered pairs (all ranks tied)
            ci = "n/a" if r["ci95"] is None else f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}"
            log.info("held-out pairwise accuracy: %s (95%% CI %s, %d pairs); chosen longer %s, shorter %s",
                     show(r["accuracy"]), ci, r["n"], _acc(r["length_bias"]["chosen_longer"]),
                     _acc(r["length_bias"]["chosen_shorter"]))
    report.update(loop.outcome())  # steps run; early stopping and which model was kept
    weights = train.full_state_dict(accelerator, model)  # sharded weights: every process gathers, the main one writes
    if accelerator.is_main_process:
        settings = RewardSettings(template, cfg.data.max_length, cfg.data.truncation)
        net = accelerator.unwrap_model(model)
        if weights is not None:  # this process holds a shard: save a whole copy built from the gathered weights
            net = RewardModel(models.unsharded_copy(*models.inner_model(net, weights)))
        with train.atomic_dir(run.dir / "model") as tmp:
            save_reward_model(net, tokenizer, settings, tmp)
    run.finish(report)
    log.info("reward model saved to %s", run.dir / "model")
    return report


def _acc(cell: dict) -> str:
    return "n/a" if cell.get("accuracy") is None else f"{cell['accuracy']:.3f} (n={cell['n']})"


if __name__ == "__main__":
    run_cli(RMConfig, main, "python -m align.rm")
