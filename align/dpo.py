"""Direct preference optimisation (and its variants): train a policy to prefer what humans preferred, from pairs,
with no reward model and no rollouts.

    python -m align.dpo recipes/smollm2-135m/dpo_hh.yaml [key=value ...]
    accelerate launch --num_processes 2 -m align.dpo RECIPE.yaml

Loss (align/losses.py, `loss.type`): DPO's -log sigmoid(beta h) on the log-ratio margin h against a frozen
reference (Rafailov et al. 2023), or conservative/robust DPO, IPO, SLiC hinge, reference-free SimPO; plus an
optional NLL term on the chosen response (RPO). Two controls of the length shortcut: LD-DPO (`loss.ld_alpha`, Liu
et al. 2024) counts the tokens of the longer response past the shorter one's length ld_alpha times, in the policy's
and the reference's log-probs alike; R-DPO (`loss.rdpo_alpha`, Park et al. 2024) adds rdpo_alpha (|y_w| - |y_l|)
to the margin. Both change the loss only: the logged rewards/*, margin and accuracy stay the DPO implicit reward
beta (log pi(y) - log pi_ref(y)) of the whole response (what `reward_models.evaluate --policy` scores), so runs with
and without them compare. (TRL logs LD-weighted rewards instead.)
Every held-out evaluation also splits the preference accuracy by which response is longer (in response tokens):
accuracy/chosen_longer/val, accuracy/chosen_shorter/val, their pair counts and the "shorter wins" rule's accuracy;
report.json has them before and after training (val_by_length_before, val_by_length).
Where a batch goes: formats (file -> PreferenceExample; rankings -> pairs) -> data.tokenize_pairs (template,
response targets, pair-aligned truncation) -> data.collate_pairs (chosen and rejected packed in ONE padding-free
row) -> models.logits_at (logits only where a response token is predicted) -> per-sequence log-probs ->
losses.preference_loss with the reference log-probs.
The reference log-probs are computed once, before training, and cached on disk (see `reference_logps`): a second
run with another beta or loss skips the reference forward entirely. Because they are computed before the first
update, the reference is the policy itself at that moment (adapters disabled under LoRA): no second copy of the
model is ever held in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple, Optional, Sequence

import torch

from reward_models.metrics import length_carried

from . import data, forgetting, formats, losses, models, train
from .config import DPOConfig, LoraConfig, run_cli

log = logging.getLogger("align")
SETTINGS_FILE = "align_dpo.json"  # beside a saved policy: beta, loss, template, reference (reward_models reads it)
CACHE_VERSION = 2  # 2: the cache holds the log-probs past the pair's shorter response too (LD-DPO)


# --------------------------------------------------------------------------------------------------------------
# Data


def load_pairs(cfg: DPOConfig, tokenizer, template: str):
    """Train and validation pairs, tokenized, and what was skipped or truncated, for the report."""
    examples, validation = formats.load_train_validation(cfg.data, "preference", cfg.seed)
    report = {"template": template, "skipped_records": examples.skipped}
    tokenize = dict(tokenizer=tokenizer, template=template, max_length=cfg.data.max_length,
                    truncation=cfg.data.truncation)
    train_pairs, stats = data.tokenize_pairs(formats.ranking_pairs(examples, cfg.data.rankings), **tokenize)
    log.info("train: %d pairs from %d records, %d tokens; %s", len(train_pairs), len(examples),
             sum(p.num_tokens for p in train_pairs), stats.summary())
    report["train"] = stats.as_dict()
    val_pairs = []
    if validation:
        val_pairs, val_stats = data.tokenize_pairs(formats.ranking_pairs(validation, cfg.data.rankings), **tokenize)
        log.info("validation: %d pairs; %s", len(val_pairs), val_stats.summary())
        report["validation"] = val_stats.as_dict()
    return train_pairs, val_pairs, report


class PairLogps(NamedTuple):
    chosen: torch.Tensor  # [B] summed response log-probs
    rejected: torch.Tensor
    chosen_count: torch.Tensor  # [B] response tokens
    rejected_count: torch.Tensor
    chosen_tail: torch.Tensor  # [B] the part of `chosen` past min(|y_w|, |y_l|) tokens (LD-DPO); 0 when shorter
    rejected_tail: torch.Tensor


def pair_logps(model, pairs: Sequence[data.TokenizedPair], padding_free: bool, pad_id: int, device) -> PairLogps:
    """Summed response log-probs of chosen and rejected [B] each, their token counts, and the sums past the pair's
    shorter response (LD-DPO's down-weighted part), from one forward over all 2B sequences."""
    batch = data.collate_pairs(pairs, padding_free, pad_id).to(device)
    token_logps = losses.token_logprobs(models.logits_at(model, batch), batch.targets)
    counts = torch.tensor([p.chosen.num_targets for p in pairs] + [p.rejected.num_targets for p in pairs],
                          device=token_logps.device)
    logps = losses.sequence_logprobs(token_logps, counts)
    b = len(pairs)
    public = torch.minimum(counts[:b], counts[b:])
    tails = losses.tail_logprobs(token_logps, counts, torch.cat([public, public]))
    return PairLogps(logps[:b], logps[b:], counts[:b], counts[b:], tails[:b], tails[b:])


# --------------------------------------------------------------------------------------------------------------
# Reference log-probabilities, computed once and cached on disk


@dataclass
class ReferenceLogps:
    chosen: torch.Tensor  # [N] summed response log-probs under the reference, in pair order
    rejected: torch.Tensor
    chosen_tail: torch.Tensor  # [N] their part past the pair's shorter response (LD-DPO, any ld_alpha)
    rejected_tail: torch.Tensor
    FIELDS: ClassVar[tuple[str, ...]] = ("chosen", "rejected", "chosen_tail", "rejected_tail")  # the cache's keys

    def take(self, ids: Sequence[int], device) -> "ReferenceLogps":
        idx = torch.tensor(list(ids))
        return ReferenceLogps(*(t[idx].to(device) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return self.chosen, self.rejected, self.chosen_tail, self.rejected_tail


def weights_fingerprint(model) -> str:
    """A digest of the weights a reference forward uses: under LoRA the base weights only (adapter tensors are
    left out and peft's `.base_layer` naming undone, so a LoRA run and a full run of one base share a cache)."""
    base = model.get_base_model() if models.is_peft(model) else model
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(base.state_dict().items()):
        if "lora_" in name or "modules_to_save" in name:
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name.replace('.base_layer', '')}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pairs_fingerprint(pairs: Sequence[data.TokenizedPair]) -> str:
    """A digest of the token ids and targets: it changes with the data, the template and the truncation."""
    h = hashlib.blake2b(digest_size=16)
    for p in pairs:
        for tok in (p.chosen, p.rejected):
            h.update(json.dumps([tok.input_ids, [int(m) for m in tok.loss_mask]]).encode())
    return h.hexdigest()


def _reference_forward_settings(cfg: DPOConfig, model, accelerator) -> dict:
    """Besides weights and tokens, what changes the numbers: precision, attention kernel, batch composition."""
    base = model.get_base_model() if models.is_peft(model) else model
    return {"precision": accelerator.mixed_precision, "dtype": str(next(base.parameters()).dtype),
            "attention": getattr(base.config, "_attn_implementation", None), "padding_free": cfg.data.padding_free,
            "batch_pairs": cfg.reference_batch_size, "device": accelerator.device.type, "version": CACHE_VERSION}


@contextlib.contextmanager
def reference_network(cfg: DPOConfig, policy):
    """The network whose log-probs are the reference: a separate model when `reference` is set; else the policy
    itself, as it is before any update (with adapters disabled under LoRA)."""
    frozen = models.load_causal_lm(cfg.reference, LoraConfig(), cfg.seed) if cfg.reference is not None else None
    with models.reference_view(policy, frozen) as ref:
        yield ref
    del frozen


def reference_logps(cfg: DPOConfig, policy, sets: dict[str, list[data.TokenizedPair]], accelerator, pad_id: int
                    ) -> tuple[dict[str, ReferenceLogps], dict]:
    """Reference log-probs of every pair of each named set, from the cache or computed (split over processes)
    and then cached. Must run before the first update. Returns them and what happened, for the report."""
    if cfg.loss.type == "simpo":
        return {}, {"used": False}
    info = {"used": True, "forwards": 0, "seconds": 0.0, "cache": {}}
    cache = models.cache_dir() / "ref_logps"
    out = {}
    with reference_network(cfg, policy) as ref:
        if cfg.reference_cache:  # hashing every weight costs seconds on a large model: only for a cache key
            weights = weights_fingerprint(ref)
            settings = _reference_forward_settings(cfg, ref, accelerator)
        for name, pairs in sets.items():
            path = None
            if cfg.reference_cache:
                key = hashlib.blake2b(json.dumps({"weights": weights, "tokens": pairs_fingerprint(pairs), **settings},
                                                 sort_keys=True).encode(), digest_size=16).hexdigest()
                path = cache / f"{key}.pt"
            if path is not None and _on_every_process(path.is_file(), accelerator):
                saved = torch.load(path, weights_only=True)
                if len(saved["chosen"]) == len(pairs):
                    out[name] = ReferenceLogps(*(saved[k] for k in ReferenceLogps.FIELDS))
                    info["cache"][name] = f"hit {path}"
                    log.info("reference log-probs of %d %s pairs: from the cache (%s)", len(pairs), name, path.name)
                    continue
            start = time.perf_counter()
            out[name], forwards = _compute_reference(ref, pairs, cfg, accelerator, pad_id)
            info["forwards"] += forwards
            info["seconds"] += time.perf_counter() - start
            log.info("reference log-probs of %d %s pairs: computed in %.1f s", len(pairs), name,
                     time.perf_counter() - start)
            info["cache"][name] = "off" if path is None else f"miss, written {path}"
            if path is not None and accelerator.is_main_process:
                cache.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
                torch.save(dict(zip(ReferenceLogps.FIELDS, out[name].as_tuple())), tmp)
                os.replace(tmp, path)  # atomic: a crash never leaves a partial cache entry
            accelerator.wait_for_everyone()
    return out, info


def _on_every_process(decision: bool, accelerator) -> bool:
    """The main process's decision, so that all processes take the same branch (and meet at the same gathers)."""
    if accelerator.num_processes == 1:
        return decision
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([decision], from_process=0)[0]


@torch.no_grad()
def _compute_reference(ref, pairs, cfg: DPOConfig, accelerator, pad_id: int) -> tuple[ReferenceLogps, int]:
    from accelerate.utils import gather_object

    chunks = data.chunks(range(len(pairs)), cfg.reference_batch_size)
    mine = []
    with train.evaluating(ref.to(accelerator.device)) as net:
        for c in range(accelerator.process_index, len(chunks), accelerator.num_processes):
            with accelerator.autocast():
                lp = pair_logps(net, [pairs[i] for i in chunks[c]], cfg.data.padding_free, pad_id,
                                accelerator.device)
            values = (lp.chosen, lp.rejected, lp.chosen_tail, lp.rejected_tail)
            mine.append((c, [v.float().cpu().tolist() for v in values]))
    done = gather_object(mine) if accelerator.num_processes > 1 else mine
    columns = [torch.empty(len(pairs)) for _ in ReferenceLogps.FIELDS]
    for c, values in done:
        for column, v in zip(columns, values):
            column[chunks[c]] = torch.tensor(v)
    return ReferenceLogps(*columns), len(mine)


# --------------------------------------------------------------------------------------------------------------
# Loss and evaluation


def pair_loss(cfg: DPOConfig, policy: PairLogps, ref: Optional[ReferenceLogps]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss [B] and the implicit rewards of chosen and rejected [B] each.

    The rewards are DPO's beta (log pi - log pi_ref) of the whole responses whatever the length controls: LD-DPO
    (loss.ld_alpha) re-weights the log-probs the loss sees, R-DPO (loss.rdpo_alpha) adds its term to the loss's
    margin; neither is part of the policy's implicit reward."""
    lc = cfg.loss
    pc, pr, nc, nr = policy.chosen, policy.rejected, policy.chosen_count, policy.rejected_count
    rc, rr = (ref.chosen, ref.rejected) if ref is not None else (None, None)
    reward_c, reward_r = losses.implicit_rewards(lc.type, pc, pr, rc, rr, nc, nr, lc.beta)
    if lc.ld_alpha is not None:
        pc = losses.ld_logprobs(pc, policy.chosen_tail, lc.ld_alpha)
        pr = losses.ld_logprobs(pr, policy.rejected_tail, lc.ld_alpha)
        if ref is not None:
            rc = losses.ld_logprobs(rc, ref.chosen_tail, lc.ld_alpha)
            rr = losses.ld_logprobs(rr, ref.rejected_tail, lc.ld_alpha)
    loss = losses.preference_loss(lc.type, pc, pr, rc, rr, nc, nr, lc.beta, lc.label_smoothing, lc.simpo_gamma,
                                  lc.rdpo_alpha)
    return loss, reward_c, reward_r


@torch.no_grad()
def evaluate_pairs(model, pairs, ref: Optional[ReferenceLogps], cfg: DPOConfig, accelerator, pad_id: int) -> dict:
    """Loss, implicit rewards, margin, preference accuracy and log-probs on held-out pairs, and the accuracy split
    by which response is longer (losses.summarize_length_split). Forwards use the reference pass's chunks, so before
    any update the policy reproduces the reference exactly (accuracy 50%)."""
    chunks = data.chunks(range(len(pairs)), cfg.reference_batch_size)
    sums = torch.zeros(8, device=accelerator.device)
    by_length = torch.zeros(2 * len(losses.LENGTH_BUCKETS), device=accelerator.device)
    with train.evaluating(model, accelerator) as net:
        for c in range(accelerator.process_index, len(chunks), accelerator.num_processes):
            ids = chunks[c]
            with accelerator.autocast():
                lp = pair_logps(net, [pairs[i] for i in ids], cfg.data.padding_free, pad_id, accelerator.device)
            lp = PairLogps(*(t.float() if t.is_floating_point() else t for t in lp))
            ref_part = ref.take(ids, lp.chosen.device) if ref is not None else None
            loss, reward_c, reward_r = pair_loss(cfg, lp, ref_part)
            sums += losses.preference_stats(loss, reward_c, reward_r, lp.chosen, lp.rejected)
            by_length += losses.length_split_stats(reward_c - reward_r, lp.chosen_count, lp.rejected_count)
    metrics = losses.summarize_preference_stats(accelerator.reduce(sums, "sum"), "val")
    metrics.update(losses.summarize_length_split(accelerator.reduce(by_length, "sum"), "val"))
    return metrics


def length_split(metrics: dict, split: str = "val") -> dict:
    """The held-out accuracy by length from evaluate_pairs' metrics, for report.json, in the shape of
    reward_models.metrics.length_bias ({bucket: {"accuracy", "n"}}) plus the "shorter wins" rule's accuracy, so
    reward_models.metrics.length_carried reads either."""
    out: dict = {bucket: {"accuracy": metrics.get(f"accuracy/{bucket}/{split}"),
                          "n": metrics.get(f"pairs/{bucket}/{split}", 0)} for bucket in losses.LENGTH_BUCKETS}
    out["shorter_wins_heuristic"] = metrics.get(f"accuracy/shorter_wins/{split}")
    return out


def log_length_split(when: str, split: dict) -> None:
    cell = lambda c: "n/a" if c["accuracy"] is None else f"{c['accuracy']:.3f} (n={c['n']})"  # noqa: E731
    heuristic = split["shorter_wins_heuristic"]
    log.info("held-out accuracy %s by length: chosen longer %s, chosen shorter %s; 'shorter wins' alone %s", when,
             cell(split["chosen_longer"]), cell(split["chosen_shorter"]),
             "n/a" if heuristic is None else f"{heuristic:.3f}")
    warning = length_carried(split)
    if warning:
        log.warning("%s", warning)


def save_settings(folder: Path, cfg: DPOConfig, template: str, reference: Optional[str]) -> None:
    """What reward_models.evaluate --policy needs to score this policy's implicit reward the way it was trained."""
    settings = {"beta": cfg.loss.beta, "loss": cfg.loss.type, "reference_free": cfg.loss.type == "simpo",
                "reference": reference, "template": template, "max_length": cfg.data.max_length,
                "truncation": cfg.data.truncation, "ld_alpha": cfg.loss.ld_alpha, "rdpo_alpha": cfg.loss.rdpo_alpha}
    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# The recipe


def main(cfg: DPOConfig) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    accelerator, run = train.begin(cfg, "dpo")
    if run.finished:
        log.info("%s is already complete (report.json exists); nothing to do", run.dir)
        return run.report()
    with accelerator.main_process_first():  # the first process converts a GGUF model into the cache
        base_location = models.materialize(cfg.model)
        ref_location = models.materialize(cfg.reference, "reference") if cfg.reference is not None else None
        tokenizer = models.load_tokenizer(cfg.model)
    template = data.resolve_policy_template(tokenizer, cfg.data.template)
    train_pairs, val_pairs, data_report = load_pairs(cfg, tokenizer, template)
    model = models.load_causal_lm(cfg.model, cfg.lora, cfg.seed, cfg.train.gradient_checkpointing)
    check = (forgetting.Check(cfg.forgetting, tokenizer, accelerator, run.dir, cfg.seed)
             if cfg.forgetting.enabled else None)  # what training may cost on general text and prompts
    trainable, total = models.count_parameters(model)
    log.info("policy %s: %.1fM parameters, %.2fM trainable (%s); loss %s, beta %g", cfg.model.name_or_path,
             total / 1e6, trainable / 1e6, "LoRA" if cfg.lora.enabled else "full", cfg.loss.type, cfg.loss.beta)
    if cfg.loss.ld_alpha is not None:
        log.info("LD-DPO: response tokens past the shorter response of a pair count %g times (policy and reference)",
                 cfg.loss.ld_alpha)
    if cfg.loss.rdpo_alpha:
        log.info("R-DPO: the margin gets %+g x (|chosen| - |rejected|) tokens", cfg.loss.rdpo_alpha)
    pad_id = tokenizer.pad_token_id
    sets = {"train": train_pairs, **({"validation": val_pairs} if val_pairs else {})}
    ref, ref_info = reference_logps(cfg, model, sets, accelerator, pad_id)  # before any update (and any resume)
    run.start(held_out=bool(val_pairs))
    model, schedule = train.prepare(model, cfg, accelerator, run, len(train_pairs))
    val_ref = ref.get("validation")
    evaluate = (lambda: evaluate_pairs(model, val_pairs, val_ref, cfg, accelerator, pad_id)) if val_pairs else None

    before = run.before_training(schedule.start, evaluate)  # measured now, or read back on a resume
    if check:
        check.before(model, schedule.start)  # likewise: forgetting_before.json
    if before and schedule.start == 0:
        log.info("held-out preference accuracy before training: %.3f (margin %.4f)", before["accuracy/val"],
                 before["rewards/margin/val"])
        log_length_split("before training", length_split(before))

    # ---- the loop -------------------------------------------------------------------------------------------
    train_ref = ref.get("train")
    loop = train.Loop(cfg, run, accelerator, model, tokenizer, schedule, evaluate, base_location, before=before)
    for step, micro_batches in loop:
        num_pairs = len(loop.batch_ids)  # the loss is a mean over the pairs of the global batch
        chosen_tokens = sum(train_pairs[i].chosen.num_targets for i in loop.batch_ids)  # RPO's token mean
        sums = torch.zeros(8, device=accelerator.device)
        objective, nll = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        for k, ids in enumerate(micro_batches):
            with loop.accumulating(k, len(micro_batches)):
                lp = pair_logps(model, [train_pairs[i] for i in ids], cfg.data.padding_free, pad_id,
                                accelerator.device)
                per_pair, reward_c, reward_r = pair_loss(cfg, lp, train_ref.take(ids, lp.chosen.device)
                                                         if train_ref is not None else None)
                loss = per_pair.sum() / num_pairs
                if cfg.loss.rpo_alpha:  # on the whole chosen response, LD-DPO or not (as TRL's "sft" term)
                    nll_part = losses.nll_loss(lp.chosen, chosen_tokens)
                    loss = loss + cfg.loss.rpo_alpha * nll_part
                    nll += nll_part.detach()
                # DDP averages gradients over processes; scaling by their number turns that into the global sum.
                accelerator.backward(loss * accelerator.num_processes)
            objective += loss.detach()
            sums += losses.preference_stats(per_pair, reward_c, reward_r, lp.chosen, lp.rejected)
        metrics = losses.summarize_preference_stats(accelerator.reduce(sums, "sum"), "train")
        if cfg.loss.rpo_alpha:  # loss/train is what is optimised: the preference loss plus alpha x RPO's NLL
            metrics["loss/preference/train"] = metrics["loss/train"]
            metrics["nll/train"] = accelerator.reduce(nll, "sum").item()
            metrics["loss/train"] = accelerator.reduce(objective, "sum").item()
        loop.end_step(step, metrics, tokens=sum(train_pairs[i].num_tokens for i in loop.batch_ids))

    # ---- evaluate and save ----------------------------------------------------------------------------------
    after = loop.final_evaluation()  # with train.final_model=best, the best model's (its weights put back)
    report = {**loop.outcome(), "train_loss": loop.last_metrics.get("loss/train"),
              "train_accuracy": loop.last_metrics.get("accuracy/train"), "loss_type": cfg.loss.type,
              "beta": cfg.loss.beta, "ld_alpha": cfg.loss.ld_alpha, "rdpo_alpha": cfg.loss.rdpo_alpha,
              "data": data_report, "reference": ref_info, "model": str(run.dir / "model")}
    if before:
        report["val_accuracy_before"] = before["accuracy/val"]
        report["val_margin_before"] = before["rewards/margin/val"]
        report["val_by_length_before"] = length_split(before)
    if after:
        report["val_accuracy"], report["val_margin"] = after["accuracy/val"], after["rewards/margin/val"]
        report["val_loss"] = after["loss/val"]
        report["val_by_length"] = length_split(after)
        warning = length_carried(report["val_by_length"])
        if warning:  # the model card and the pipeline report say so too
            report["length_warning"] = warning
    if check:
        report["forgetting"] = check.after(model)  # logs before -> after and any flags
    # Where the reference lives for a later `reward_models.evaluate --policy`: an adapter's own base (null), the
    # `reference` model, or the policy's starting weights (not reloadable when they were random).
    full_ref = ref_location or (base_location if cfg.model.init == "pretrained" else None)
    adapter_ref = ref_location if cfg.lora.enabled else full_ref
    train.save_policy(run, model, tokenizer, cfg, base_location, report,
                      settings=lambda folder, merged: save_settings(folder, cfg, template,
                                                                    full_ref if merged else adapter_ref))
    run.finish(report)
    if before and after:
        log.info("held-out preference accuracy: %.3f -> %.3f; reward margin %.4f -> %.4f", before["accuracy/val"],
                 after["accuracy/val"], before["rewards/margin/val"], after["rewards/margin/val"])
    elif after:
        log.info("held-out preference accuracy: %.3f; reward margin %.4f", after["accuracy/val"],
                 after["rewards/margin/val"])
    if after:
        log_length_split("after training", report["val_by_length"])
    log.info("policy saved to %s", run.dir / "model")
    return report


if __name__ == "__main__":
    run_cli(DPOConfig, main, "python -m align.dpo")
