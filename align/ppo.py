"""Online RL on one loop: PPO with a critic, and the group-baseline family (GRPO, Dr.GRPO, DAPO, GSPO, RLOO,
REINFORCE++) without one. Sample responses, score them, estimate advantages, improve the policy.

    python -m align.ppo  recipes/smollm2-135m/ppo_hh.yaml [key=value ...]
    python -m align.grpo recipes/smollm2-135m/grpo_gsm8k.yaml [key=value ...]   # this loop, GRPO's defaults
    accelerate launch --num_processes 2 -m align.ppo RECIPE.yaml

PPO follows Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022): PPO (Schulman et al. 2017) on the per-token
reward r_t = -beta KL_t, plus the score at the last token, with GAE against a learned value model. The group family
replaces the critic with a baseline from rollout.n responses to the same prompt: GRPO (Shao et al. 2024), Dr.GRPO
(Liu et al. 2025), DAPO (Yu et al. 2025: clip-higher, dynamic sampling, token-mean loss, overlong shaping), GSPO
(Zheng et al. 2025: a sequence-level ratio), RLOO (Ahmadian et al. 2024), REINFORCE++ (Hu 2025). The maths is in
align/losses.py; `algorithm.*` picks the pieces (align/config.py: AlgorithmConfig).

One iteration (`train.batch_size` prompts, `rollout.n` responses each), in numbered phases:
    1 rollout     the engine samples n responses per prompt (align/rollout.py: hf generate, or vLLM); a group stays
                  on one process
    2 score       the reward (align/rewards.py: a reward model, rules, your functions, weighted); length shaping;
                  dynamic sampling repeats 1-2 until the batch holds enough groups whose rewards differ
    3 forwards    log-probs of the sampled tokens under the policy (old_logprobs) and the reference (ref_logprobs),
                  and the critic's values, teacher-forced on packed padding-free rows
    4 advantages  GAE on KL-shaped rewards (gae), a group baseline (grpo, rloo), or REINFORCE++ returns
    5 update      algorithm.ppo_epochs passes of minibatch clipped-ratio steps (and the critic's, with gae)
    6 log, sync   metrics; the rollout engine gets the new weights; checkpoint

A rollout batch lives as [B, T] tensors (B responses, T the longest; response_mask marks each response's tokens):
see `Batch`. Forwards pack the B sequences into one row and read logits only where a response token is predicted.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from typing import Optional, Sequence

import torch

from . import data, forgetting, formats, losses, models, rewards, rollout, train
from .config import AlignError, ConfigError, GRPOConfig, LoraConfig, ModelConfig, PPOConfig, run_cli
from .rewards import load_reward, score_terms

log = logging.getLogger("align")


# --------------------------------------------------------------------------------------------------------------
# Models: reward, critic, reference


def _reward_critic_problem(folder: str, tokenizer) -> Optional[str]:
    """Why the reward model cannot start the critic (None when it can): the critic reads the policy's tokens, so
    it needs the policy's vocabulary and a causal backbone."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if AutoTokenizer.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
        return "the reward model has another tokenizer"
    with torch.device("meta"):  # structure only, no weights: does the head read a causal backbone?
        probe = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder))
    if not hasattr(probe, "score"):
        return "the reward model is an encoder, not a causal backbone"
    return None


def load_critic(cfg: PPOConfig, policy_location: str, tokenizer):
    """The value model: a token-classification model with one output per position (V(s_t) at every token)."""
    from transformers import AutoModelForTokenClassification

    source, init = "policy", cfg.critic.init
    if init in ("auto", "reward") and cfg.reward.model is not None:
        problem = _reward_critic_problem(models.resolve(cfg.reward.model), tokenizer)
        if problem is None:
            source = "reward"
        elif init == "reward":
            raise ConfigError(f"critic.init=reward: {problem}; use critic.init=policy")
        else:
            log.info("critic: initialised from the policy (%s)", problem)
    if source == "reward":
        location = ModelConfig(name_or_path=models.resolve(cfg.reward.model), disable_dropout=True)
    else:
        location = dataclass_replace(cfg.model, name_or_path=policy_location, gguf_file=None, disable_dropout=True)
    critic = models.load_pretrained(AutoModelForTokenClassification, location, cfg.lora, cfg.seed + 1, num_labels=1)
    critic.config.use_cache = False
    critic.config.pad_token_id = tokenizer.pad_token_id
    models.disable_dropout(critic)  # value targets must not be noisy: the head's classifier dropout too
    if cfg.train.gradient_checkpointing:
        critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        critic = models.add_lora(critic, cfg.lora, task_type="TOKEN_CLS", seed=cfg.seed + 1,
                                 modules_to_save=["score" if hasattr(critic, "score") else "classifier"])
    log.info("critic: a value head on the %s's backbone (%s)", source, location.name_or_path)
    return critic, source


def whole_batch(ro: rollout.Rollout, lengths: list[int], rows: dict[str, torch.Tensor], accelerator):
    """The iteration's rollout and per-token rows of every process, on every process, in global order (process 0's
    rows first, as data.shard dealt them). One process: as given."""
    if accelerator.num_processes == 1:
        return ro, lengths, rows
    from accelerate.utils import gather_object

    names = list(rows)
    mine = [(ro.prompt_ids[i], ro.response_ids[i], [rows[k][i, : lengths[i]].tolist() for k in names])
            for i in range(len(ro))]
    everyone = gather_object(mine)
    all_lengths = [len(response) for _, response, _ in everyone]
    width = max(all_lengths)
    whole = rollout.Rollout([p for p, _, _ in everyone], [r for _, r, _ in everyone], [], [], ro.policy_version)
    gathered = {k: rollout.to_rows(torch.tensor([x for _, _, parts in everyone for x in parts[j]], dtype=rows[k].dtype),
                           all_lengths, width).to(rows[k].device) for j, k in enumerate(names)}
    return whole, all_lengths, gathered


# --------------------------------------------------------------------------------------------------------------
# The KL controller and the reward normaliser (both saved in checkpoints)


class KLController:
    """beta of the KL penalty: fixed, or adapted toward a target KL (Ziegler et al. 2019)."""

    def __init__(self, cfg: PPOConfig):
        self.coef, self.cfg = cfg.algorithm.kl_coef, cfg.algorithm

    def update(self, observed_kl: float, n_responses: int) -> None:
        if self.cfg.adaptive_kl:
            self.coef = losses.adaptive_kl_coef(self.coef, observed_kl, self.cfg.kl_target, self.cfg.kl_horizon,
                                                n_responses)


class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n, mean = x.numel(), x.double().mean().item()
        m2 = ((x.double() - mean) ** 2).sum().item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


# --------------------------------------------------------------------------------------------------------------
# Scoring and held-out evaluation


@torch.no_grad()
def evaluate(cfg: PPOConfig, policy, frozen_ref, engine, reward, prompts: list[data.Prompt], tokenizer, accelerator,
             sampling: rollout.Sampling) -> dict:
    """Mean reward, KL to the reference (summed k1 per response), response length and EOS rate on held-out prompts,
    each sampled with its own fixed seed (with hf, the same random draws before and after training, under any number
    of processes; vLLM keeps its own generator). Training's RNG is left untouched."""
    # Every prompt, dealt out over the processes (counts may differ by one; sums are reduced, nothing is dropped).
    mine = data.spread(prompts, accelerator.process_index, accelerator.num_processes)
    positions = data.spread(range(len(prompts)), accelerator.process_index, accelerator.num_processes)
    names = [t.name for t in getattr(reward, "terms", [])] if len(getattr(reward, "terms", [])) > 1 else []
    sums = {k: 0.0 for k in ("reward", "kl", "length", "eos", "count", *(f"term/{n}" for n in names))}
    if mine:  # each prompt drawn with its own seed: the same responses however the prompts are dealt out
        ro = engine.generate([p.ids for p in mine], sampling, rollout.row_seeds(cfg.seed, "held-out", positions))
        scores, terms = score_terms(reward, mine, rollout.decode(tokenizer, ro), accelerator)
        logps, ref_logps = models.policy_and_reference_logprobs(policy, frozen_ref, ro, cfg.train.micro_batch_size,
                                                                sampling.temperature, tokenizer.pad_token_id,
                                                                accelerator)
        lengths = torch.tensor([len(r) for r in ro.response_ids])
        kl = losses.sequence_logprobs(logps - ref_logps, lengths.to(logps.device)).cpu()
        sums.update({"reward": scores.sum(), "kl": kl.sum(), "length": lengths.float().sum(),
                     "eos": ro.stopped.float().sum(), "count": float(len(mine)),
                     **{f"term/{n}": terms[n].sum() for n in names}})
    sums = train.reduce_sums(accelerator, sums)
    n = max(sums["count"], 1.0)
    out = {"reward/val": sums["reward"] / n, "kl/val": sums["kl"] / n, "response/length/val": sums["length"] / n,
           "response/eos_rate/val": sums["eos"] / n, "response/count/val": int(sums["count"])}
    out.update({f"reward/term/{name}/val": sums[f"term/{name}"] / n for name in names})  # e.g. accuracy, format rate
    return out


# --------------------------------------------------------------------------------------------------------------
# One iteration's batch and its phases


@dataclass
class Batch:
    """One iteration's responses on this process, as rows: B = prompts x rollout.n, a group's n responses next to
    each other; T the longest response; every [B, T] tensor is zero past its response's end."""

    ro: rollout.Rollout
    prompts: list[data.Prompt]  # B: each response's prompt
    lengths: list[int]  # B: response lengths in tokens
    response_mask: torch.Tensor  # [B, T] 1.0 on response tokens
    raw_scores: torch.Tensor  # [B] the reward as scored (the weighted sum of its terms)
    scores: torch.Tensor  # [B] after shaping: missing-EOS and overlong penalties, normalisation, clip
    terms: dict[str, torch.Tensor]  # name -> [B] each reward term, unweighted
    dropped_groups: int = 0  # dynamic sampling: groups whose rewards were all equal
    rounds: int = 1  # generation rounds it took
    seconds: dict = field(default_factory=dict)  # rollout, score: time spent in phases 1 and 2
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] log pi_old (the policy that sampled), teacher-forced
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T] log pi_ref (None: algorithm.kl_penalty=none)
    engine_logprobs: Optional[torch.Tensor] = None  # [B, T] the engine's sampling log-probs
    values: Optional[torch.Tensor] = None  # [B, T] V(s_t) (None without a critic)
    kl: Optional[torch.Tensor] = None  # [B, T] the KL estimate of pi_old to pi_ref per token
    rewards: Optional[torch.Tensor] = None  # [B, T] per-token rewards (gae, reinforce_pp*)
    advantages: Optional[torch.Tensor] = None  # [B, T]
    returns: Optional[torch.Tensor] = None  # [B, T] the critic's targets (gae)


def take(ro: rollout.Rollout, rows: Sequence[int]) -> rollout.Rollout:
    return rollout.Rollout([ro.prompt_ids[i] for i in rows], [ro.response_ids[i] for i in rows],
                           [ro.logprobs[i] for i in rows], [ro.finish_reason[i] for i in rows], ro.policy_version,
                           ro.seconds)


def joined(parts: Sequence[rollout.Rollout]) -> rollout.Rollout:
    return rollout.Rollout([x for r in parts for x in r.prompt_ids], [x for r in parts for x in r.response_ids],
                           [x for r in parts for x in r.logprobs], [x for r in parts for x in r.finish_reason],
                           parts[0].policy_version, sum(r.seconds for r in parts))


def round_prompts(cfg: PPOConfig, sampler: data.StepSampler, num_prompts: int, step: int, round_: int) -> list[int]:
    """The prompts (data indices) of generation round `round_` of iteration `step`: the sampler's batch first, then
    (dynamic sampling) seeded draws from all prompts; a pure function of (seed, step, round): a resume redraws them."""
    if round_ == 0:
        return sampler.indices(step)
    seed = rollout.row_seeds(cfg.seed, f"resample/{step}", [round_])[0]
    return torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed))[: cfg.train.batch_size].tolist()


def shaped_scores(cfg: PPOConfig, raw: torch.Tensor, ro: rollout.Rollout) -> torch.Tensor:
    """The score less the missing-EOS penalty and DAPO's overlong penalty [B]."""
    algo, out = cfg.algorithm, raw.clone()
    if algo.missing_eos_penalty is not None:
        out -= algo.missing_eos_penalty * (~ro.stopped).float().to(out.device)
    if algo.overlong_buffer is not None:
        lengths = torch.tensor([len(r) for r in ro.response_ids], device=out.device)
        out += losses.overlong_penalty(lengths, cfg.rollout.max_new_tokens, algo.overlong_buffer,
                                       algo.overlong_penalty)
    return out


def sample_and_score(cfg: PPOConfig, step: int, engine, sampling, reward, prompts: list[data.Prompt], sampler,
                     tokenizer, accelerator, run) -> Batch:
    """Phases 1 and 2: n responses per prompt of this process's share, scored. With dynamic sampling, groups whose
    scores are all equal are dropped and more prompts sampled (every process generates in every round, so sharded
    models stay in step) until each process holds its share of train.batch_size groups."""
    algo, n, device = cfg.algorithm, cfg.rollout.n, accelerator.device
    positions = data.shard(range(cfg.train.batch_size), accelerator.process_index, accelerator.num_processes)
    need, dropped = len(positions), 0
    kept: list[tuple[rollout.Rollout, list[data.Prompt], torch.Tensor, torch.Tensor, dict]] = []
    rounds = algo.max_sampling_rounds if algo.dynamic_sampling else 1
    seconds = {"rollout": 0.0, "score": 0.0}
    for round_ in range(rounds):
        t0 = time.perf_counter()
        # ---- 1 rollout: n responses per prompt (hf: each row drawn with its own seed, the same under any split)
        chosen = round_prompts(cfg, sampler, len(prompts), step, round_)
        batch_prompts = [prompts[chosen[p]] for p in positions for _ in range(n)]
        key = f"rollout/{step}" if round_ == 0 else f"rollout/{step}/{round_}"
        ro = engine.generate([p.ids for p in batch_prompts], sampling,
                             rollout.row_seeds(cfg.seed, key, [p * n + j for p in positions for j in range(n)]))
        if ro.policy_version != step:
            raise RuntimeError(f"iteration {step}: the rollout came from policy version {ro.policy_version}, not "
                               f"{step}: the engine's weights are stale")
        t1 = time.perf_counter()

        # ---- 2 score: the reward's terms (a reward model re-templates with its own tokenizer), then shaping
        raw, terms = score_terms(reward, batch_prompts, rollout.decode(tokenizer, ro), accelerator)
        raw, terms = raw.to(device), {k: v.to(device) for k, v in terms.items()}
        train.stop_if_not_finite(run, step + 1, {"reward/score": accelerator.reduce(raw.sum(), "sum").item()})
        shaped = shaped_scores(cfg, raw, ro)
        groups = list(range(len(positions)))
        if algo.dynamic_sampling:  # a group whose scores are equal has zero advantage everywhere: no signal
            per_group = shaped.view(-1, n)
            informative = (per_group.max(1).values > per_group.min(1).values).tolist()
            dropped += informative.count(False)
            groups = [g for g in groups if informative[g]][: need]
        rows = [g * n + j for g in groups for j in range(n)]
        kept.append((take(ro, rows), [batch_prompts[i] for i in rows], raw[rows], shaped[rows],
                     {k: v[rows] for k, v in terms.items()}))
        need -= len(groups)
        seconds["rollout"] += t1 - t0
        seconds["score"] += time.perf_counter() - t1
        missing = accelerator.reduce(torch.tensor(float(need), device=device), "sum").item()
        if missing == 0:
            break
    else:
        raise AlignError(f"iteration {step + 1}: dynamic sampling found {cfg.train.batch_size - int(missing)} of "
                         f"{cfg.train.batch_size} groups whose rewards differ in algorithm.max_sampling_rounds="
                         f"{algo.max_sampling_rounds} rounds ({dropped} dropped on process {accelerator.process_index}"
                         f"); the reward gives these prompts too little signal: raise max_sampling_rounds or "
                         f"rollout.n, or turn dynamic_sampling off")
    ro = joined([k[0] for k in kept])
    lengths = [len(r) for r in ro.response_ids]
    return Batch(ro, [p for k in kept for p in k[1]], lengths, rollout.to_rows(torch.ones(sum(lengths)), lengths,
                 max(lengths)).to(device), torch.cat([k[2] for k in kept]), torch.cat([k[3] for k in kept]),
                 {name: torch.cat([k[4][name] for k in kept]) for name in kept[0][4]}, dropped, round_ + 1, seconds)


def normalise_scores(cfg: PPOConfig, batch: Batch, moments: "RunningMoments", accelerator) -> None:
    """Running-moment normalisation and clipping of the scores (after dynamic sampling chose the groups)."""
    algo = cfg.algorithm
    if algo.normalize_reward:
        moments.update(accelerator.gather(batch.scores).cpu())
        batch.scores = (batch.scores - moments.mean) / max(moments.std, 1e-6)
    if algo.reward_clip is not None:
        batch.scores = batch.scores.clamp(-algo.reward_clip, algo.reward_clip)


@torch.no_grad()
def forwards(cfg: PPOConfig, batch: Batch, policy, frozen_ref, critic, temperature: float, pad: int,
             accelerator) -> None:
    """Phase 3: old_logprobs and ref_logprobs under the policy and the reference, values under the critic."""
    ro, lengths, width = batch.ro, batch.lengths, batch.response_mask.shape[1]
    old_logps, ref_logps = models.policy_and_reference_logprobs(policy, frozen_ref, ro, cfg.train.micro_batch_size,
                                                         temperature, pad, accelerator,
                                                         with_reference=cfg.algorithm.kl_penalty != "none")
    batch.old_logprobs = rollout.to_rows(old_logps, lengths, width)
    batch.ref_logprobs = None if ref_logps is None else rollout.to_rows(ref_logps, lengths, width)
    batch.engine_logprobs = rollout.to_rows(torch.tensor([x for lp in ro.logprobs for x in lp]), lengths,
                                    width).to(accelerator.device)
    if critic is not None:
        values = []
        with accelerator.autocast(), train.evaluating(critic, accelerator) as value_net:
            for chunk in data.chunks(range(len(ro)), cfg.train.micro_batch_size):
                values.append(models.response_values(value_net, models.sequences(ro, chunk), pad, accelerator.device))
        batch.values = rollout.to_rows(torch.cat(values), lengths, width)


def estimate_advantages(cfg: PPOConfig, batch: Batch, kl_coef: float) -> None:
    """Phase 4, on this process's rows (whole groups): per-token KL, rewards, advantages and returns. Whitening over
    the whole batch follows in `update`."""
    algo, mask = cfg.algorithm, batch.response_mask
    if batch.ref_logprobs is not None:
        batch.kl = losses.kl_penalty(batch.old_logprobs, batch.ref_logprobs, algo.kl_estimator) * mask
    kl_in_reward = batch.kl if algo.kl_penalty == "reward" else torch.zeros_like(mask)
    if algo.advantage == "gae":
        batch.rewards = losses.shaped_rewards(batch.scores, kl_in_reward, mask, kl_coef)
        batch.advantages, batch.returns = losses.gae(batch.rewards, batch.values, mask, algo.gamma, algo.lam)
    elif algo.advantage in ("grpo", "rloo"):
        per_response = losses.group_advantages(batch.scores, cfg.rollout.n, algo.advantage, algo.scale_rewards)
        batch.advantages = per_response[:, None] * mask
    else:  # REINFORCE++: discounted returns of the (KL-shaped) rewards, from the group-centred score with _baseline
        base = batch.scores if algo.advantage == "reinforce_pp" else losses.group_advantages(
            batch.scores, cfg.rollout.n, "reinforce_pp_baseline")
        batch.rewards = losses.shaped_rewards(base, kl_in_reward, mask, kl_coef)
        batch.advantages = losses.discounted_returns(batch.rewards, mask, algo.gamma)


def update(cfg: PPOConfig, batch: Batch, step: int, policy, critic, optimizer, critic_optimizer, kl_coef: float,
           temperature: float, pad: int, accelerator, run) -> tuple[dict[str, float], int, bool]:
    """Phase 5: algorithm.ppo_epochs passes of minibatch steps -> (summed metrics by name, steps, stopped early).

    Every process holds the whole iteration's rows, and a minibatch is a seeded global choice of rows of which each
    process takes its share: the same minibatches under any number of processes."""
    algo, device = cfg.algorithm, accelerator.device
    rows = {"old": batch.old_logprobs, "adv": batch.advantages, "engine": batch.engine_logprobs}
    if batch.ref_logprobs is not None and algo.kl_penalty == "loss":
        rows["ref"] = batch.ref_logprobs
    if critic is not None:
        rows.update(values=batch.values, returns=batch.returns)
    every, every_lengths, every_rows = whole_batch(batch.ro, batch.lengths, rows, accelerator)
    every_mask = rollout.to_rows(torch.ones(sum(every_lengths)), every_lengths, every_rows["old"].shape[1]).to(device)
    sums = {}
    if critic is not None:  # of the whole batch, before the update
        sums["value/explained_variance"] = losses.explained_variance(every_rows["values"], every_rows["returns"],
                                                                     every_mask).item()
    if algo.whiten_advantages or algo.advantage.startswith("reinforce_pp"):  # over the whole batch, alike everywhere
        every_rows["adv"] = losses.whiten(every_rows["adv"], every_mask)
    clip_high = algo.clip_eps if algo.clip_eps_high is None else algo.clip_eps_high
    mini = algo.mini_batch_size or len(every)
    updates, stopped_early = 0, False
    for epoch in range(algo.ppo_epochs):
        order = torch.randperm(len(every), generator=torch.Generator().manual_seed(
            rollout.row_seeds(cfg.seed, f"order/{step}", [epoch])[0])).tolist()
        for first in range(0, len(order), mini):
            global_minibatch = order[first: first + mini]
            minibatch = data.shard(global_minibatch, accelerator.process_index, accelerator.num_processes)
            tokens = float(sum(every_lengths[i] for i in global_minibatch))
            micro = data.chunks(minibatch, cfg.train.micro_batch_size)
            step_sums: dict[str, torch.Tensor] = {}
            for k, mb in enumerate(micro):
                sync = contextlib.ExitStack()
                if k < len(micro) - 1:  # DDP all-reduces once per minibatch, on its last micro-batch
                    for net in (policy, critic):
                        if net is not None:
                            sync.enter_context(accelerator.no_sync(net))
                with sync:
                    seqs, lengths = models.sequences(every, mb), [every_lengths[i] for i in mb]
                    with accelerator.autocast():
                        flat_logps, flat_entropy = models.response_logprobs(policy, seqs, temperature, pad, device,
                                                                     entropy="grad" if algo.ent_coef else "metric")
                        flat_values = models.response_values(critic, seqs, pad, device) if critic is not None else None
                    logprobs, entropy = rollout.rows_of(flat_logps, lengths), rollout.rows_of(flat_entropy, lengths)
                    width = logprobs.shape[1]
                    part = {name: r[mb, :width] for name, r in every_rows.items()}
                    mask = every_mask[mb, :width]
                    is_weights = capped = None
                    if algo.engine_is_cap is not None:
                        is_weights, capped = losses.truncated_is_weights(part["old"], part["engine"],
                                                                         algo.engine_is_cap)
                    pg, pg_clipped = losses.clipped_policy_loss(logprobs, part["old"], part["adv"], mask,
                                                                algo.clip_eps, clip_high, algo.importance_ratio,
                                                                is_weights)
                    per_token = pg - algo.ent_coef * entropy
                    if "ref" in part:  # GRPO: beta KL_t(pi || pi_ref) in the loss, on the current policy
                        kl_t = losses.kl_penalty(logprobs, part["ref"], algo.kl_estimator)
                        per_token = per_token + kl_coef * kl_t
                    # Each micro-batch's share of the minibatch's loss (all micro-batches and processes); DDP averages
                    # gradients over processes, so each process's share is scaled by their number.
                    policy_loss = losses.aggregate_loss(per_token, mask, algo.loss_agg, tokens, len(global_minibatch),
                                                        cfg.rollout.max_new_tokens) * accelerator.num_processes
                    accelerator.backward(policy_loss)
                    with torch.no_grad():
                        new = {"loss/policy": losses.masked_sum(pg, mask),
                               "policy/clipfrac": losses.masked_sum(pg_clipped.float(), mask),
                               "policy/approx_kl": losses.masked_sum(losses.approx_kl(logprobs, part["old"]), mask),
                               "policy/entropy": losses.masked_sum(entropy, mask),
                               "tokens": mask.sum()}
                        if "ref" in part:
                            new["loss/kl"] = losses.masked_sum(kl_t, mask)
                        if capped is not None:
                            new["rollout/is_capped_frac"] = losses.masked_sum(capped.float(), mask)
                    if critic is not None:
                        values = rollout.rows_of(flat_values, lengths)
                        vf, vf_clipped = losses.ppo_value_loss(values, part["values"], part["returns"],
                                                               algo.clip_eps_value)
                        accelerator.backward(losses.masked_sum(vf, mask) * accelerator.num_processes / tokens)
                        new["loss/value"] = losses.masked_sum(vf, mask).detach()
                        new["value/clipfrac"] = losses.masked_sum(vf_clipped.float(), mask)
                for name, value in new.items():
                    step_sums[name] = step_sums.get(name, 0.0) + value.detach()
            step_sums = train.reduce_sums(accelerator, step_sums)
            # A NaN or infinite loss stops the run before the update: the last checkpoint stays the last good one.
            train.stop_if_not_finite(run, step + 1, {k: step_sums[k] for k in ("loss/policy", "loss/value")
                                                     if k in step_sums})
            nets = [(policy, optimizer)] + ([(critic, critic_optimizer)] if critic is not None else [])
            if cfg.train.max_grad_norm:
                norms = [accelerator.clip_grad_norm_(net.parameters(), cfg.train.max_grad_norm) for net, _ in nets]
                train.stop_if_not_finite(run, step + 1, {"optim/grad_norm": float(sum(norms))})
            for _, opt in nets:
                opt.step()
                opt.zero_grad(set_to_none=True)
            for name, value in step_sums.items():
                sums[name] = sums.get(name, 0.0) + value
            updates += 1
            if algo.target_kl is not None and step_sums["policy/approx_kl"] / step_sums["tokens"] > algo.target_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    return sums, updates, stopped_early


def iteration_metrics(cfg: PPOConfig, batch: Batch, update_sums: dict[str, float], accelerator) -> dict[str, float]:
    """Phase 6's numbers: the batch's (summed over processes) and the update's, by name."""
    mask, n_local = batch.response_mask, len(batch.ro)
    sums = {"reward/score": batch.raw_scores.sum(), "reward/normalized": batch.scores.sum(),
            "response/length": mask.sum(), "response/eos_rate": batch.ro.stopped.float().sum(),
            "rollout/logprob_diff": losses.masked_sum((batch.engine_logprobs - batch.old_logprobs).abs(), mask),
            "rollout/tokens": float(batch.ro.num_response_tokens), "responses": float(n_local)}
    if cfg.algorithm.dynamic_sampling:
        sums.update({"data/dropped_groups": float(batch.dropped_groups), "data/sampling_rounds": float(batch.rounds)})
    if batch.kl is not None:
        sums["kl/ref"] = batch.kl.sum()
    if batch.rewards is not None:
        sums["reward/shaped"] = (batch.rewards * mask).sum()
    if len(batch.terms) > 1:
        sums.update({f"reward/term/{name}": v.sum() for name, v in batch.terms.items()})
    if cfg.rollout.n > 1:  # how much the group's responses disagree: no spread, no signal
        sums["reward/group_std"] = batch.raw_scores.view(-1, cfg.rollout.n).std(1).sum() * cfg.rollout.n
    glob = train.reduce_sums(accelerator, sums)
    b, tokens = glob.pop("responses"), glob["response/length"]
    row = {k: v / b for k, v in glob.items() if not k.startswith(("data/", "rollout/"))}
    row["rollout/logprob_diff"] = glob["rollout/logprob_diff"] / tokens
    if cfg.algorithm.dynamic_sampling:  # groups dropped over all processes; rounds are the same on every process
        row["data/dropped_groups"] = glob["data/dropped_groups"]
        row["data/sampling_rounds"] = glob["data/sampling_rounds"] / accelerator.num_processes
    row["rollout/tokens"] = glob["rollout/tokens"]
    row["rollout/responses"] = b
    n_tok = max(update_sums.get("tokens", 0.0), 1.0)
    row.update({k: v / n_tok for k, v in update_sums.items() if k not in ("tokens", "value/explained_variance")})
    if "value/explained_variance" in update_sums:
        row["value/explained_variance"] = update_sums["value/explained_variance"]
    return row


# --------------------------------------------------------------------------------------------------------------
# The recipe


def main(cfg: PPOConfig) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    stage = "grpo" if isinstance(cfg, GRPOConfig) else "ppo"
    accelerator, run = train.begin(cfg, stage)
    if run.finished:
        log.info("%s is already complete (report.json exists); nothing to do", run.dir)
        return run.report()
    device, algo = accelerator.device, cfg.algorithm
    with accelerator.main_process_first():  # the first process converts a GGUF model into the cache
        base_location = models.materialize(cfg.model)
        if cfg.reference is not None:
            models.materialize(cfg.reference, "reference")
        tokenizer = models.load_tokenizer(cfg.model)
    template = data.resolve_policy_template(tokenizer, cfg.data.template)
    train_examples, val_examples = formats.load_train_validation(cfg.data, "prompt", cfg.seed)
    tokenize = dict(tokenizer=tokenizer, template=template, max_length=cfg.data.max_prompt_length,
                    truncation=cfg.data.truncation, system_prompt=cfg.data.system_prompt)
    prompts, stats = data.tokenize_prompts(train_examples, **tokenize)
    log.info("prompts: %d train; %s", len(prompts), stats.summary())
    data_report = {"template": template, "skipped_records": train_examples.skipped, "train": stats.as_dict()}
    val_prompts = []
    if val_examples:
        val_prompts, val_stats = data.tokenize_prompts(val_examples, **tokenize)
        val_prompts = val_prompts[: cfg.eval_samples]
        data_report["validation"] = val_stats.as_dict()
    reward = load_reward(cfg.reward, device)
    sampler = data.StepSampler(len(prompts), cfg.train.batch_size, cfg.seed)
    num_steps = train.total_steps(cfg.train, sampler.steps_per_epoch)

    policy_cfg = cfg.model
    if cfg.rollout.engine == "vllm" and cfg.lora.enabled and cfg.model.dtype == "auto":
        # Every sync merges the adapters into the base and unmerges them (TRL): in bf16 that rounds the base, which
        # is also the KL reference, a little more each time. float32 keeps the round trip exact.
        log.info("model.dtype=auto with LoRA and vLLM rollouts: the base stays in float32 (exact merge/unmerge)")
        policy_cfg = dataclass_replace(cfg.model, dtype="float32")
    policy = models.load_causal_lm(policy_cfg, cfg.lora, cfg.seed, cfg.train.gradient_checkpointing)
    frozen_ref = None
    if cfg.reference is not None:
        frozen_ref = models.load_causal_lm(cfg.reference, LoraConfig(), cfg.seed)
    elif not cfg.lora.enabled:  # full fine-tuning: keep the initial weights (taken before any resume loads)
        frozen_ref = copy.deepcopy(policy)
    if frozen_ref is not None:
        frozen_ref.requires_grad_(False).eval().to(device)
    check = (forgetting.Check(cfg.forgetting, tokenizer, accelerator, run.dir, cfg.seed)
             if cfg.forgetting.enabled else None)  # what training may cost on general text and prompts
    critic = critic_source = None
    if algo.advantage == "gae":  # the group family's baseline comes from the group: no value model
        critic, critic_source = load_critic(cfg, base_location, tokenizer)
    trainable, total = models.count_parameters(policy)
    log.info("policy %s: %.1fM parameters, %.2fM trainable (%s); reward: %s; advantage: %s", cfg.model.name_or_path,
             total / 1e6, trainable / 1e6, "LoRA" if cfg.lora.enabled else "full", rewards.describe(cfg.reward),
             algo.advantage)

    optimizer = train.make_optimizer(policy, cfg.train)
    scheduler = train.make_scheduler(optimizer, cfg.train, num_steps)
    critic_optimizer = critic_scheduler = None
    extra = {}
    if critic is not None:
        critic_train = dataclass_replace(cfg.train, learning_rate=cfg.critic.learning_rate or cfg.train.learning_rate)
        critic_optimizer = train.make_optimizer(critic, critic_train)
        critic_scheduler = train.make_scheduler(critic_optimizer, critic_train, num_steps)
        extra = {"critic": (critic, critic_optimizer, critic_scheduler)}
    kl_ctl, moments = KLController(cfg), RunningMoments()
    run.start(held_out=bool(val_prompts))
    state = run.resume(policy, optimizer, scheduler, extra=extra)
    start = state["step"]
    watch = train.Watch(cfg.train, stage, state)  # early stopping and the best model, on the held-out reward
    if start:
        kl_ctl.coef = state["kl_coef"]
        moments.load_state_dict(state["reward_moments"])
    policy.train()
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if critic is not None:
        critic.train()
        critic, critic_optimizer = accelerator.prepare(critic, critic_optimizer)
        extra = {"critic": (critic, critic_optimizer, critic_scheduler)}
    run.restore_sharded_optimizers(policy, optimizer, extra={k: v[:2] for k, v in extra.items()})
    sampling = rollout.Sampling(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                                cfg.rollout.top_k)
    engine = rollout.make_engine(cfg.rollout, accelerator.unwrap_model(policy), tokenizer, accelerator, sampling)
    engine.version = start  # the weights it samples from have seen `start` updates
    pad = tokenizer.pad_token_id
    responses = cfg.train.batch_size * cfg.rollout.n
    mini = algo.mini_batch_size or responses
    if cfg.train.batch_size % accelerator.num_processes or (mini // accelerator.num_processes) % \
            cfg.train.micro_batch_size or mini % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} prompts and algorithm.mini_batch_size={mini} "
                          f"responses must split into {accelerator.num_processes} processes x micro-batches of "
                          f"{cfg.train.micro_batch_size}")
    log.info("%d iterations of %d prompts x %d responses (%.2f epochs) on %d processes; %d update epochs of %d "
             "minibatches each; engine %s", num_steps, cfg.train.batch_size, cfg.rollout.n,
             num_steps / sampler.steps_per_epoch, accelerator.num_processes, algo.ppo_epochs, responses // mini,
             engine.name)

    def held_out() -> dict:
        return evaluate(cfg, policy, frozen_ref, engine, reward, val_prompts, tokenizer, accelerator, sampling)

    def save_best(step: int, value: float) -> None:
        train.save_best(run, step, watch.metric, value, policy, tokenizer, base_location)

    before = run.before_training(start, held_out if val_prompts else None)  # measured now, or read back
    if before and start == 0:
        watch.observe(0, before, save_best)
    if check:
        check.before(policy, start)  # measured now (forgetting_before.json), or read back on a resume
    if before and start == 0:
        log.info("held-out before training: reward %.4f, KL %.3f, length %.1f, EOS rate %.2f", before["reward/val"],
                 before["kl/val"], before["response/length/val"], before["response/eos_rate/val"])

    progress = train.Progress(num_steps, start, accelerator.is_main_process and cfg.log.progress, stage)
    totals = {"rollout": 0.0, "score": 0.0, "forward": 0.0, "update": 0.0}
    last, done, evaluated = {}, start, (-1, {})
    for step in range(start, num_steps):
        if watch.stopped_at is not None:
            break
        t0 = time.perf_counter()
        # ---- 1, 2 rollout and score (dynamic sampling: until enough groups have a signal) ------------------
        batch = sample_and_score(cfg, step, engine, sampling, reward, prompts, sampler, tokenizer, accelerator, run)
        normalise_scores(cfg, batch, moments, accelerator)
        t1 = time.perf_counter()
        # ---- 3 log-probs under policy and reference, values under the critic -------------------------------
        forwards(cfg, batch, policy, frozen_ref, critic, sampling.temperature, pad, accelerator)
        # ---- 4 advantages: GAE, a group baseline, or REINFORCE++ returns --------------------------------------
        estimate_advantages(cfg, batch, kl_ctl.coef)
        t2 = time.perf_counter()
        # ---- 5 update epochs on policy (and critic) ---------------------------------------------------------
        update_sums, updates, stopped_early = update(cfg, batch, step, policy, critic, optimizer, critic_optimizer,
                                                     kl_ctl.coef, sampling.temperature, pad, accelerator, run)
        for sched in (scheduler, critic_scheduler):
            if sched is not None:
                sched.step()
        t3 = time.perf_counter()

        # ---- 6 log, update the KL coefficient, sync the rollout engine, checkpoint --------------------------
        row = iteration_metrics(cfg, batch, update_sums, accelerator)
        coef_used = kl_ctl.coef
        if "kl/ref" in row:
            kl_ctl.update(row["kl/ref"], responses)
        engine.sync(accelerator.unwrap_model(policy))
        elapsed = time.perf_counter() - t0
        rollout_tokens = row.pop("rollout/tokens")
        row.update({"kl/coef": coef_used, "ppo/updates": updates, "ppo/early_stopped": float(stopped_early),
                    "optim/lr": scheduler.get_last_lr()[0], "perf/rollout_s": batch.seconds["rollout"],
                    "perf/score_s": batch.seconds["score"], "perf/forward_s": t2 - t1, "perf/update_s": t3 - t2,
                    "perf/rollout_tokens_per_s": rollout_tokens / max(batch.seconds["rollout"], 1e-9),
                    "perf/samples_per_s": responses / elapsed, "data/epoch": (step + 1) / sampler.steps_per_epoch})
        for key, seconds in zip(totals, (batch.seconds["rollout"], batch.seconds["score"], t2 - t1, t3 - t2)):
            totals[key] += seconds
        done = step + 1
        progress.update(reward=row["reward/score"], kl=row.get("kl/ref", 0.0))
        if done % cfg.log.every == 0 or done == num_steps:
            run.log(row, step=done)
        last = row
        if val_prompts and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < num_steps:
            evaluated = (done, held_out())
            run.log(evaluated[1], step=done)
            if watch.observe(done, evaluated[1], save_best):
                break
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < num_steps:
            run.save_checkpoint(done, policy, tokenizer, optimizer, scheduler,
                                {"epoch": sampler.epoch_of(step), "kl_coef": kl_ctl.coef,
                                 "reward_moments": moments.state_dict(), "watch": watch.state_dict()},
                                base_location, extra=extra)
    progress.close()

    # ---- evaluate and save ----------------------------------------------------------------------------------
    after, final_model = {}, "last"
    if val_prompts:
        after = evaluated[1] if evaluated[0] == done else held_out()  # an early stop has just evaluated
        run.log(after, step=done)
        if evaluated[0] != done:
            watch.observe(done, after, save_best, last=True)
        if cfg.train.final_model == "best" and watch.best_step not in (None, done):
            final_model = f"best (step {train.load_best(run, policy)})"
            engine.sync(accelerator.unwrap_model(policy))  # the held-out samples come from the engine
            log.info("train.final_model=best: the policy of step %d (%s %.4f) replaces the last (step %d)",
                     watch.best_step, watch.metric, watch.best, done)
            after = held_out()
    report = {"iterations": done, "prompts_per_iteration": cfg.train.batch_size,
              "responses_per_prompt": cfg.rollout.n, "advantage": algo.advantage, "engine": engine.name,
              "critic_init": critic_source, "kl_coef_final": kl_ctl.coef, "data": data_report,
              "last_train": last, "seconds": totals, "model": str(run.dir / "model")}
    if watch.active:
        report.update(early_stopping=watch.summary(), final_model=final_model)
    if check:
        report["forgetting"] = check.after(policy)  # logs before -> after and any flags
    if before:
        report["before"] = before
    if after:
        report["after"] = after
    train.save_policy(run, policy, tokenizer, cfg, base_location, report)
    engine.close()
    run.finish(report)
    if before and after:
        log.info("held-out reward %.4f -> %.4f; KL to the reference %.3f -> %.3f; length %.1f -> %.1f",
                 before["reward/val"], after["reward/val"], before["kl/val"], after["kl/val"],
                 before["response/length/val"], after["response/length/val"])
    log.info("policy saved to %s", run.dir / "model")
    return report


if __name__ == "__main__":
    run_cli(PPOConfig, main, "python -m align.ppo")
