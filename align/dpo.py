"""Direct preference optimisation (and its variants): train a policy to prefer what humans preferred, from pairs,
with no reward model and no rollouts.

    python -m align.dpo recipes/smollm2-135m/dpo_hh.yaml [key=value ...]
    accelerate launch --num_processes 2 -m align.dpo RECIPE.yaml

Loss (align/losses.py, `loss.type`): DPO's -log sigmoid(beta h) on the log-ratio margin h against a frozen
reference (Rafailov et al. 2023), or conservative/robust DPO, IPO, SLiC hinge, reference-free SimPO; plus an
optional NLL term on the chosen response (RPO).
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
from typing import Optional, Sequence

import torch

from . import data, formats, losses, models, train
from .config import DPOConfig, LoraConfig, run_cli

log = logging.getLogger("align")
SETTINGS_FILE = "align_dpo.json"  # beside a saved policy: beta, loss, template, reference (reward_models reads it)
CACHE_VERSION = 1


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


def pair_logps(model, pairs: Sequence[data.TokenizedPair], padding_free: bool, pad_id: int, device):
    """Summed response log-probs of chosen and rejected [B] each, and their token counts [B] each, from one
    forward over all 2B sequences."""
    batch = data.collate_pairs(pairs, padding_free, pad_id).to(device)
    token_logps = losses.token_logprobs(models.logits_at(model, batch), batch.targets)
    counts = torch.tensor([p.chosen.num_targets for p in pairs] + [p.rejected.num_targets for p in pairs],
                          device=token_logps.device)
    logps = losses.sequence_logprobs(token_logps, counts)
    b = len(pairs)
    return logps[:b], logps[b:], counts[:b], counts[b:]


# --------------------------------------------------------------------------------------------------------------
# Reference log-probabilities, computed once and cached on disk


@dataclass
class ReferenceLogps:
    chosen: torch.Tensor  # [N] summed response log-probs under the reference, in pair order
    rejected: torch.Tensor

    def take(self, ids: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(list(ids))
        return self.chosen[idx].to(device), self.rejected[idx].to(device)


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
                    out[name] = ReferenceLogps(saved["chosen"], saved["rejected"])
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
                torch.save({"chosen": out[name].chosen, "rejected": out[name].rejected}, tmp)
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
                chosen, rejected, _, _ = pair_logps(net, [pairs[i] for i in chunks[c]], cfg.data.padding_free,
                                                    pad_id, accelerator.device)
            mine.append((c, chosen.float().cpu().tolist(), rejected.float().cpu().tolist()))
    done = gather_object(mine) if accelerator.num_processes > 1 else mine
    chosen, rejected = torch.empty(len(pairs)), torch.empty(len(pairs))
    for c, ch, rj in done:
        chosen[chunks[c]], rejected[chunks[c]] = torch.tensor(ch), torch.tensor(rj)
    return ReferenceLogps(chosen, rejected), len(mine)


# --------------------------------------------------------------------------------------------------------------
# Loss and evaluation


def pair_loss(cfg: DPOConfig, pc, pr, rc, rr, nc, nr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss [B] and the implicit rewards of chosen and rejected [B] each."""
    lc = cfg.loss
    loss = losses.preference_loss(lc.type, pc, pr, rc, rr, nc, nr, lc.beta, lc.label_smoothing, lc.simpo_gamma)
    reward_c, reward_r = losses.implicit_rewards(lc.type, pc, pr, rc, rr, nc, nr, lc.beta)
    return loss, reward_c, reward_r


@torch.no_grad()
def evaluate_pairs(model, pairs, ref: Optional[ReferenceLogps], cfg: DPOConfig, accelerator, pad_id: int) -> dict:
    """Loss, implicit rewards, margin, preference accuracy and log-probs on held-out pairs. Forwards use the
    reference pass's chunks, so before any update the policy reproduces the reference exactly (accuracy 50%)."""
    chunks = data.chunks(range(len(pairs)), cfg.reference_batch_size)
    sums = torch.zeros(8, device=accelerator.device)
    with train.evaluating(model, accelerator) as net:
        for c in range(accelerator.process_index, len(chunks), accelerator.num_processes):
            ids = chunks[c]
            with accelerator.autocast():
                pc, pr, nc, nr = pair_logps(net, [pairs[i] for i in ids], cfg.data.padding_free, pad_id,
                                            accelerator.device)
            rc, rr = ref.take(ids, pc.device) if ref is not None else (None, None)
            loss, reward_c, reward_r = pair_loss(cfg, pc.float(), pr.float(), rc, rr, nc, nr)
            sums += losses.preference_stats(loss, reward_c, reward_r, pc, pr)
    return losses.summarize_preference_stats(accelerator.reduce(sums, "sum"), "val")


def save_settings(folder: Path, cfg: DPOConfig, template: str, reference: Optional[str]) -> None:
    """What reward_models.evaluate --policy needs to score this policy's implicit reward the way it was trained."""
    settings = {"beta": cfg.loss.beta, "loss": cfg.loss.type, "reference_free": cfg.loss.type == "simpo",
                "reference": reference, "template": template, "max_length": cfg.data.max_length,
                "truncation": cfg.data.truncation}
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
    trainable, total = models.count_parameters(model)
    log.info("policy %s: %.1fM parameters, %.2fM trainable (%s); loss %s, beta %g", cfg.model.name_or_path,
             total / 1e6, trainable / 1e6, "LoRA" if cfg.lora.enabled else "full", cfg.loss.type, cfg.loss.beta)
    pad_id = tokenizer.pad_token_id
    sets = {"train": train_pairs, **({"validation": val_pairs} if val_pairs else {})}
    ref, ref_info = reference_logps(cfg, model, sets, accelerator, pad_id)  # before any update (and any resume)
    run.start()
    model, schedule = train.prepare(model, cfg, accelerator, run, len(train_pairs))
    val_ref = ref.get("validation")
    evaluate = (lambda: evaluate_pairs(model, val_pairs, val_ref, cfg, accelerator, pad_id)) if val_pairs else None

    before = run.before_training(schedule.start, evaluate)  # measured now, or read back on a resume
    if before and schedule.start == 0:
        log.info("held-out preference accuracy before training: %.3f (margin %.4f)", before["accuracy/val"],
                 before["rewards/margin/val"])

    # ---- the loop -------------------------------------------------------------------------------------------
    train_ref = ref.get("train")
    loop = train.Loop(cfg, run, accelerator, model, tokenizer, schedule, evaluate, base_location)
    for step, micro_batches in loop:
        num_pairs = len(loop.batch_ids)  # the loss is a mean over the pairs of the global batch
        chosen_tokens = sum(train_pairs[i].chosen.num_targets for i in loop.batch_ids)  # RPO's token mean
        sums = torch.zeros(8, device=accelerator.device)
        objective, nll = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        for k, ids in enumerate(micro_batches):
            with loop.accumulating(k, len(micro_batches)):
                pc, pr, nc, nr = pair_logps(model, [train_pairs[i] for i in ids], cfg.data.padding_free, pad_id,
                                            accelerator.device)
                rc, rr = train_ref.take(ids, pc.device) if train_ref is not None else (None, None)
                per_pair, reward_c, reward_r = pair_loss(cfg, pc, pr, rc, rr, nc, nr)
                loss = per_pair.sum() / num_pairs
                if cfg.loss.rpo_alpha:
                    nll_part = losses.nll_loss(pc, chosen_tokens)
                    loss = loss + cfg.loss.rpo_alpha * nll_part
                    nll += nll_part.detach()
                # DDP averages gradients over processes; scaling by their number turns that into the global sum.
                accelerator.backward(loss * accelerator.num_processes)
            objective += loss.detach()
            sums += losses.preference_stats(per_pair, reward_c, reward_r, pc, pr)
        metrics = losses.summarize_preference_stats(accelerator.reduce(sums, "sum"), "train")
        if cfg.loss.rpo_alpha:  # loss/train is what is optimised: the preference loss plus alpha x RPO's NLL
            metrics["loss/preference/train"] = metrics["loss/train"]
            metrics["nll/train"] = accelerator.reduce(nll, "sum").item()
            metrics["loss/train"] = accelerator.reduce(objective, "sum").item()
        loop.end_step(step, metrics, tokens=sum(train_pairs[i].num_tokens for i in loop.batch_ids))

    # ---- evaluate and save ----------------------------------------------------------------------------------
    after = evaluate() if evaluate else {}
    if after:
        run.log(after, step=schedule.num_steps)
    report = {"steps": schedule.num_steps, "train_loss": loop.last_metrics.get("loss/train"),
              "train_accuracy": loop.last_metrics.get("accuracy/train"), "loss_type": cfg.loss.type,
              "beta": cfg.loss.beta, "data": data_report, "reference": ref_info, "model": str(run.dir / "model")}
    if before:
        report["val_accuracy_before"] = before["accuracy/val"]
        report["val_margin_before"] = before["rewards/margin/val"]
    if after:
        report["val_accuracy"], report["val_margin"] = after["accuracy/val"], after["rewards/margin/val"]
        report["val_loss"] = after["loss/val"]
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
    log.info("policy saved to %s", run.dir / "model")
    return report


if __name__ == "__main__":
    run_cli(DPOConfig, main, "python -m align.dpo")
