"""RLHF with PPO and a critic: sample responses, score them, penalise drift from the reference, improve the policy.

    python -m align.ppo recipes/smollm2-135m/ppo_hh.yaml [key=value ...]
    accelerate launch --num_processes 2 -m align.ppo RECIPE.yaml

Follows Ziegler et al. 2019 ("Fine-tuning language models from human preferences") and InstructGPT (Ouyang et al.
2022): PPO (Schulman et al. 2017) on the per-token reward r_t = -beta KL_t, plus the reward model's score at the last
token, with GAE (Schulman et al. 2016) against a learned value model. The maths is in align/losses.py.

One iteration (`train.batch_size` prompts), in numbered phases:
    1 rollout     the engine samples a response per prompt (align/rollout.py: hf generate, or vLLM)
    2 score       decode, re-template for the reward model (its own tokenizer), score; or a programmatic rule
    3 forwards    log-probs of the sampled tokens under the policy (old_logprobs) and the reference (ref_logprobs),
                  and the critic's values, teacher-forced on packed padding-free rows
    4 advantages  KL-shaped per-token rewards, GAE, whitening
    5 update      ppo.ppo_epochs passes of minibatch PPO steps on policy and critic (early stop on approx-KL)
    6 log, sync   metrics; the rollout engine gets the new weights; checkpoint

A rollout batch lives as [B, T] tensors (B responses, T the longest; response_mask marks each response's tokens);
forwards pack the B sequences into one row and read logits only where a response token is predicted.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import data, formats, losses, models, rollout, train
from .config import ConfigError, LoraConfig, ModelConfig, PPOConfig, RewardConfig, run_cli
from .formats import DataError

log = logging.getLogger("align")


# --------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    messages: list[dict]  # what the reward model sees (re-templated with its own tokenizer)
    ids: list[int]  # what the policy sees: the prompt rendered with its generation prompt
    origin: Optional[formats.Origin] = None


def tokenize_prompts(examples: Sequence[formats.PromptExample], tokenizer, template: str, max_length: int,
                     truncation: str) -> tuple[list[Prompt], data.TruncationStats]:
    stats = data.TruncationStats(truncation, max_length, total=len(examples))
    out = []
    for ex in examples:
        if template == "chat":
            ids = data.prompt_ids(tokenizer, ex.prompt)
        else:
            ids = tokenizer(data.plain_text(ex.prompt) + "\n\nAssistant:")["input_ids"]
        if len(ids) > max_length:
            stats.too_long += 1
            if truncation == "error":
                raise DataError(f"{ex.origin}: the prompt is {len(ids)} tokens, longer than "
                                f"data.max_prompt_length={max_length} (data.truncation=error; or drop, or left)")
            if truncation == "drop":
                stats.dropped["prompt longer than max_prompt_length"] += 1
                continue
            ids = ids[-max_length:]
        out.append(Prompt(ex.prompt, ids, ex.origin))
    if not out:
        raise DataError(f"no usable prompts: {stats.summary()}")
    return out, stats


# --------------------------------------------------------------------------------------------------------------
# Models: reward, critic, reference


def load_reward(cfg: RewardConfig, device, at: str = "reward"):
    """An object with score(prompts, responses) -> [n] float32: a reward-model folder or a rule."""
    if cfg.rule is not None:
        from reward_models.rules import load_rule

        try:
            return load_rule(cfg.rule, **cfg.rule_args)
        except (ValueError, TypeError, OSError) as err:
            raise ConfigError(f"{at}.rule={cfg.rule}: {err}") from None
    from reward_models.model import RewardScorer

    folder = Path(models.resolve(cfg.model))
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{at}.model={cfg.model}: no reward model there ({folder / 'config.json'} not "
                          f"found); train one with `python -m align.rm RECIPE.yaml` or name a sequence-classification "
                          f"model folder")
    return RewardScorer(folder, device=str(device), max_length=cfg.max_length)


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


@contextlib.contextmanager
def reference_network(policy, frozen):
    """The reference: a frozen model, or the policy with its adapters disabled (LoRA)."""
    if frozen is not None:
        yield frozen
    else:
        with policy.disable_adapter():
            yield policy


# --------------------------------------------------------------------------------------------------------------
# Teacher-forced forwards on packed rows


def sequences(ro: rollout.Rollout, ids: Sequence[int]) -> list[data.Tokenized]:
    """prompt + response, targets on the response tokens."""
    return [data.Tokenized(ro.prompt_ids[i] + ro.response_ids[i],
                           [False] * len(ro.prompt_ids[i]) + [True] * len(ro.response_ids[i])) for i in ids]


def response_logprobs(model, seqs: list[data.Tokenized], temperature: float, pad_id: int, device,
                      entropy: Optional[str] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(a_t | s_t) of every response token [K] (sequence by sequence), under softmax(logits / T), and the
    per-token entropy [K] when asked: "grad" (it is in the loss) or "metric" (no backward through a second
    full-vocabulary softmax)."""
    batch = data.collate(seqs, padding_free=True, pad_token_id=pad_id).to(device)
    logits = models.logits_at(model, batch).float() / temperature
    logps = losses.token_logprobs(logits, batch.targets)
    if entropy is None:
        return logps, None
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        return logps, losses.entropy_from_logits(logits if entropy == "grad" else logits.detach())


@torch.no_grad()
def policy_and_reference_logprobs(policy, frozen_ref, ro: rollout.Rollout, micro_batch_size: int,
                                  temperature: float, pad_id: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi and log pi_ref of every response token of a rollout [K] each, in micro-batches."""
    logps, ref_logps = [], []
    with train.evaluating(policy, accelerator) as net, accelerator.autocast():
        for chunk in data.chunks(range(len(ro)), micro_batch_size):
            seqs = sequences(ro, chunk)
            logps.append(response_logprobs(net, seqs, temperature, pad_id, accelerator.device)[0])
            with reference_network(net, frozen_ref) as ref:
                ref_logps.append(response_logprobs(ref, seqs, temperature, pad_id, accelerator.device)[0])
    return torch.cat(logps), torch.cat(ref_logps)


def response_values(critic, seqs: list[data.Tokenized], pad_id: int, device) -> torch.Tensor:
    """V(s_t) at every response token [K]: the value head read where token t is predicted."""
    batch = data.collate(seqs, padding_free=True, pad_token_id=pad_id).to(device)
    out = critic(**batch.model_inputs()).logits.squeeze(-1)  # [1, N]
    return out[batch.predict_mask].float()


def to_rows(flat: torch.Tensor, lengths: Sequence[int], width: int) -> torch.Tensor:
    """[K] concatenated per-sequence values -> [B, width], zero after each sequence's end."""
    out = flat.new_zeros(len(lengths), width)
    for row, piece in enumerate(torch.split(flat, list(lengths))):
        out[row, : len(piece)] = piece
    return out


def from_rows(rows: torch.Tensor, ids: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The inverse of to_rows for the rows `ids`: [K]."""
    return torch.cat([rows[i, : lengths[i]] for i in ids])


def whole_batch(ro: rollout.Rollout, lengths: list[int], rows: list[torch.Tensor], accelerator):
    """The iteration's rollout and per-token rows of every process, on every process, in global order (process 0's
    rows first, as data.shard dealt them). One process: as given."""
    if accelerator.num_processes == 1:
        return ro, lengths, rows
    from accelerate.utils import gather_object

    mine = [(ro.prompt_ids[i], ro.response_ids[i], [r[i, : lengths[i]].tolist() for r in rows]) for i in range(len(ro))]
    everyone = gather_object(mine)
    all_lengths = [len(response) for _, response, _ in everyone]
    width = max(all_lengths)
    whole = rollout.Rollout([p for p, _, _ in everyone], [r for _, r, _ in everyone], [], [], ro.policy_version)
    device = rows[0].device
    gathered = [to_rows(torch.tensor([x for _, _, parts in everyone for x in parts[k]], dtype=rows[k].dtype),
                        all_lengths, width).to(device) for k in range(len(rows))]
    return whole, all_lengths, gathered


# --------------------------------------------------------------------------------------------------------------
# The KL controller and the reward normaliser (both saved in checkpoints)


class KLController:
    """beta of the KL penalty: fixed, or adapted toward a target KL (Ziegler et al. 2019)."""

    def __init__(self, cfg: PPOConfig):
        self.coef, self.cfg = cfg.ppo.kl_coef, cfg.ppo

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


def decode(tokenizer, ro: rollout.Rollout) -> list[str]:
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ro.response_ids]


def score(reward, prompts: Sequence[Prompt], texts: Sequence[str], accelerator) -> torch.Tensor:
    """[n] float32 rewards; a reward model scores under the run's autocast precision, like the policy."""
    with accelerator.autocast():
        return reward.score([p.messages for p in prompts], list(texts)).float()


@torch.no_grad()
def evaluate(cfg: PPOConfig, policy, frozen_ref, engine, reward, prompts: list[Prompt], tokenizer, accelerator,
             sampling: rollout.Sampling) -> dict:
    """Mean reward, KL to the reference (summed k1 per response), response length and EOS rate on held-out prompts,
    each sampled with its own fixed seed (with hf, the same random draws before and after training, under any number
    of processes; vLLM keeps its own generator). Training's RNG is left untouched."""
    # Every prompt, dealt out over the processes (counts may differ by one; sums are reduced, nothing is dropped).
    mine = data.spread(prompts, accelerator.process_index, accelerator.num_processes)
    positions = data.spread(range(len(prompts)), accelerator.process_index, accelerator.num_processes)
    sums = torch.zeros(5)
    if mine:  # each prompt drawn with its own seed: the same responses however the prompts are dealt out
        ro = engine.generate([p.ids for p in mine], sampling, rollout.row_seeds(cfg.seed, "held-out", positions))
        scores = score(reward, mine, decode(tokenizer, ro), accelerator)
        logps, ref_logps = policy_and_reference_logprobs(policy, frozen_ref, ro, cfg.train.micro_batch_size,
                                                         sampling.temperature, tokenizer.pad_token_id, accelerator)
        lengths = torch.tensor([len(r) for r in ro.response_ids])
        kl = losses.sequence_logprobs(logps - ref_logps, lengths.to(logps.device)).cpu()
        sums = torch.stack([scores.sum(), kl.sum(), lengths.float().sum(), ro.stopped.float().sum(),
                            torch.tensor(float(len(mine)))])
    sums = accelerator.reduce(sums.to(accelerator.device), "sum")
    n = max(sums[4].item(), 1.0)
    return {"reward/val": sums[0].item() / n, "kl/val": sums[1].item() / n, "response/length/val": sums[2].item() / n,
            "response/eos_rate/val": sums[3].item() / n, "response/count/val": int(sums[4].item())}


# --------------------------------------------------------------------------------------------------------------
# The recipe


def main(cfg: PPOConfig) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    accelerator, run = train.begin(cfg, "ppo")
    if run.finished:
        log.info("%s is already complete (report.json exists); nothing to do", run.dir)
        return run.report()
    device, pc = accelerator.device, cfg.ppo
    with accelerator.main_process_first():  # the first process converts a GGUF model into the cache
        base_location = models.materialize(cfg.model)
        if cfg.reference is not None:
            models.materialize(cfg.reference, "reference")
        tokenizer = models.load_tokenizer(cfg.model)
    template = data.resolve_policy_template(tokenizer, cfg.data.template)
    train_examples, val_examples = formats.load_train_validation(cfg.data, "prompt", cfg.seed)
    tokenize = dict(tokenizer=tokenizer, template=template, max_length=cfg.data.max_prompt_length,
                    truncation=cfg.data.truncation)
    prompts, stats = tokenize_prompts(train_examples, **tokenize)
    log.info("prompts: %d train; %s", len(prompts), stats.summary())
    data_report = {"template": template, "skipped_records": train_examples.skipped, "train": stats.as_dict()}
    val_prompts = []
    if val_examples:
        val_prompts, val_stats = tokenize_prompts(val_examples, **tokenize)
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
    critic, critic_source = load_critic(cfg, base_location, tokenizer)
    trainable, total = models.count_parameters(policy)
    log.info("policy %s: %.1fM parameters, %.2fM trainable (%s); reward: %s", cfg.model.name_or_path, total / 1e6,
             trainable / 1e6, "LoRA" if cfg.lora.enabled else "full", cfg.reward.rule or cfg.reward.model)

    optimizer = train.make_optimizer(policy, cfg.train)
    critic_train = dataclass_replace(cfg.train, learning_rate=cfg.critic.learning_rate or cfg.train.learning_rate)
    critic_optimizer = train.make_optimizer(critic, critic_train)
    scheduler = train.make_scheduler(optimizer, cfg.train, num_steps)
    critic_scheduler = train.make_scheduler(critic_optimizer, critic_train, num_steps)
    kl_ctl, moments = KLController(cfg), RunningMoments()
    run.start()
    state = run.resume(policy, optimizer, scheduler, extra={"critic": (critic, critic_optimizer, critic_scheduler)})
    start = state["step"]
    if start:
        kl_ctl.coef = state["kl_coef"]
        moments.load_state_dict(state["reward_moments"])
    policy.train()
    critic.train()
    policy, critic, optimizer, critic_optimizer = accelerator.prepare(policy, critic, optimizer, critic_optimizer)
    run.restore_sharded_optimizers(policy, optimizer, extra={"critic": (critic, critic_optimizer)})
    sampling = rollout.Sampling(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                                cfg.rollout.top_k)
    engine = rollout.make_engine(cfg.rollout, accelerator.unwrap_model(policy), tokenizer, accelerator, sampling)
    engine.version = start  # the weights it samples from have seen `start` updates
    pad = tokenizer.pad_token_id
    mini = pc.mini_batch_size or cfg.train.batch_size
    per_process = cfg.train.batch_size // accelerator.num_processes
    mini_local = mini // accelerator.num_processes
    if per_process * accelerator.num_processes != cfg.train.batch_size or mini_local % cfg.train.micro_batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} and ppo.mini_batch_size={mini} must split into "
                          f"{accelerator.num_processes} processes x micro-batches of {cfg.train.micro_batch_size}")
    log.info("%d iterations of %d prompts (%.2f epochs); %d PPO epochs of %d minibatches each; engine %s",
             num_steps, cfg.train.batch_size, num_steps / sampler.steps_per_epoch, pc.ppo_epochs,
             cfg.train.batch_size // mini, engine.name)

    def held_out() -> dict:
        return evaluate(cfg, policy, frozen_ref, engine, reward, val_prompts, tokenizer, accelerator, sampling)

    before = run.before_training(start, held_out if val_prompts else None)  # measured now, or read back
    if before and start == 0:
        log.info("held-out before training: reward %.4f, KL %.3f, length %.1f, EOS rate %.2f", before["reward/val"],
                 before["kl/val"], before["response/length/val"], before["response/eos_rate/val"])

    progress = train.Progress(num_steps, start, accelerator.is_main_process and cfg.log.progress, "ppo")
    totals = {"rollout": 0.0, "score": 0.0, "forward": 0.0, "update": 0.0}
    last = {}
    for step in range(start, num_steps):
        t0 = time.perf_counter()
        positions = data.shard(range(cfg.train.batch_size), accelerator.process_index, accelerator.num_processes)
        chosen = sampler.indices(step)
        batch_prompts = [prompts[chosen[i]] for i in positions]

        # ---- 1 rollout: one response per prompt from the current policy -------------------------------------
        # (hf: each row drawn with its own seed, so the same responses under any number of processes)
        ro = engine.generate([p.ids for p in batch_prompts], sampling,
                             rollout.row_seeds(cfg.seed, f"rollout/{step}", positions))
        if ro.policy_version != step:
            raise RuntimeError(f"iteration {step}: the rollout came from policy version {ro.policy_version}, not "
                               f"{step}: the engine's weights are stale")
        lengths = [len(r) for r in ro.response_ids]
        width = max(lengths)
        response_mask = to_rows(torch.ones(sum(lengths)), lengths, width).to(device)
        t1 = time.perf_counter()

        # ---- 2 score: the reward model (its own template and tokenizer) or a rule --------------------------
        raw_scores = score(reward, batch_prompts, decode(tokenizer, ro), accelerator).to(device)
        train.stop_if_not_finite(run, step + 1, {"reward/score": accelerator.reduce(raw_scores.sum(), "sum").item()})
        scores = raw_scores.clone()
        if pc.missing_eos_penalty is not None:
            scores -= pc.missing_eos_penalty * (~ro.stopped).float().to(device)
        if pc.normalize_reward:
            moments.update(accelerator.gather(scores).cpu())
            scores = (scores - moments.mean) / max(moments.std, 1e-6)
        if pc.reward_clip is not None:
            scores = scores.clamp(-pc.reward_clip, pc.reward_clip)
        t2 = time.perf_counter()

        # ---- 3 log-probs under policy and reference, values under the critic -------------------------------
        old_logps, ref_logps = policy_and_reference_logprobs(policy, frozen_ref, ro, cfg.train.micro_batch_size,
                                                             sampling.temperature, pad, accelerator)
        old_values = []
        with torch.no_grad(), accelerator.autocast(), train.evaluating(critic, accelerator) as value_net:
            for chunk in data.chunks(range(len(ro)), cfg.train.micro_batch_size):
                old_values.append(response_values(value_net, sequences(ro, chunk), pad, device))
        old_logprobs = to_rows(old_logps, lengths, width)
        ref_logprobs = to_rows(ref_logps, lengths, width)
        values = to_rows(torch.cat(old_values), lengths, width)
        engine_logprobs = to_rows(torch.tensor([x for lp in ro.logprobs for x in lp]), lengths, width).to(device)
        logprob_diff = losses.masked_mean((engine_logprobs - old_logprobs).abs(), response_mask)

        # ---- 4 KL-shaped per-token rewards, GAE ----------------------------------------------------------------
        kl = losses.kl_penalty(old_logprobs, ref_logprobs, pc.kl_estimator) * response_mask
        rewards = losses.shaped_rewards(scores, kl, response_mask, kl_ctl.coef)
        advantages, returns = losses.gae(rewards, values, response_mask, pc.gamma, pc.lam)
        t3 = time.perf_counter()

        # ---- 5 PPO epochs of minibatch updates on policy and critic ----------------------------------------
        # Every process holds the whole iteration's rows, and a minibatch is a seeded global choice of rows of
        # which each process takes its share: the same minibatches under any number of processes.
        every, every_lengths, (every_old, every_adv, every_values, every_returns) = whole_batch(
            ro, lengths, [old_logprobs, advantages, values, returns], accelerator)
        every_mask = to_rows(torch.ones(sum(every_lengths)), every_lengths, every_values.shape[1]).to(device)
        explained = losses.explained_variance(every_values, every_returns, every_mask)  # of the whole batch
        if pc.whiten_advantages:  # over the whole batch, computed alike on every process
            every_adv = losses.whiten(every_adv, every_mask)
        update_sums, updates, stopped_early = torch.zeros(7, device=device), 0, False
        for epoch in range(pc.ppo_epochs):
            order = torch.randperm(len(every), generator=torch.Generator().manual_seed(
                rollout.row_seeds(cfg.seed, f"order/{step}", [epoch])[0])).tolist()
            for first in range(0, len(order), mini):
                global_minibatch = order[first: first + mini]
                minibatch = data.shard(global_minibatch, accelerator.process_index, accelerator.num_processes)
                tokens = torch.tensor(float(sum(every_lengths[i] for i in global_minibatch)), device=device)
                micro = data.chunks(minibatch, cfg.train.micro_batch_size)
                step_sums = torch.zeros(7, device=device)
                for k, mb in enumerate(micro):
                    sync = contextlib.ExitStack()
                    if k < len(micro) - 1:  # DDP all-reduces once per minibatch, on its last micro-batch
                        sync.enter_context(accelerator.no_sync(policy))
                        sync.enter_context(accelerator.no_sync(critic))
                    with sync:
                        seqs = sequences(every, mb)
                        mb_lengths = [every_lengths[i] for i in mb]
                        with accelerator.autocast():
                            logps, entropy = response_logprobs(policy, seqs, sampling.temperature, pad, device,
                                                               entropy="grad" if pc.ent_coef else "metric")
                            new_values = response_values(critic, seqs, pad, device)
                        old = from_rows(every_old, mb, every_lengths)
                        adv = from_rows(every_adv, mb, every_lengths)
                        pg, pg_clipped = losses.ppo_policy_loss(logps, old, adv, pc.clip_eps)
                        vf, vf_clipped = losses.ppo_value_loss(new_values, from_rows(every_values, mb, every_lengths),
                                                               from_rows(every_returns, mb, every_lengths),
                                                               pc.clip_eps_value)
                        # Token means over the whole minibatch (all micro-batches and processes); DDP averages
                        # gradients over processes, so each process's sum is scaled by their number.
                        scale = accelerator.num_processes / tokens
                        policy_loss = (pg.sum() - pc.ent_coef * entropy.sum()) * scale
                        value_loss = vf.sum() * scale
                        accelerator.backward(policy_loss)
                        accelerator.backward(value_loss)
                    with torch.no_grad():
                        step_sums += torch.stack([
                            pg.sum(), vf.sum(), pg_clipped.float().sum(), vf_clipped.float().sum(),
                            losses.approx_kl(logps, old).sum(), entropy.sum(),
                            torch.tensor(float(sum(mb_lengths)), device=device)]).detach()
                step_sums = accelerator.reduce(step_sums, "sum")
                # A NaN or infinite loss stops the run before the update: the last checkpoint stays the last good one.
                train.stop_if_not_finite(run, step + 1, {"loss/policy": step_sums[0].item(),
                                                         "loss/value": step_sums[1].item()})
                if cfg.train.max_grad_norm:
                    norms = [accelerator.clip_grad_norm_(net.parameters(), cfg.train.max_grad_norm)
                             for net in (policy, critic)]
                    train.stop_if_not_finite(run, step + 1, {"optim/grad_norm": float(sum(norms))})
                optimizer.step()
                critic_optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                critic_optimizer.zero_grad(set_to_none=True)
                update_sums += step_sums
                updates += 1
                if pc.target_kl is not None and (step_sums[4] / step_sums[6]).item() > pc.target_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        scheduler.step()
        critic_scheduler.step()
        t4 = time.perf_counter()

        # ---- 6 log, update the KL coefficient, sync the rollout engine, checkpoint --------------------------
        seq_kl = accelerator.reduce(kl.sum(1).sum(), "sum").item() / cfg.train.batch_size
        coef_used = kl_ctl.coef
        kl_ctl.update(seq_kl, cfg.train.batch_size)
        engine.sync(accelerator.unwrap_model(policy))
        n_tok = update_sums[6].clamp(min=1)
        glob = accelerator.reduce(torch.stack([
            raw_scores.sum(), scores.sum(), (rewards * response_mask).sum(), response_mask.sum(),
            ro.stopped.float().sum().to(device), logprob_diff * response_mask.sum(),
            explained * len(ro),  # each process's share of the batch: the sum is the whole batch's value
            torch.tensor(float(ro.num_response_tokens), device=device)]), "sum")
        b = cfg.train.batch_size
        elapsed = time.perf_counter() - t0
        row = {
            "reward/score": glob[0].item() / b, "reward/normalized": glob[1].item() / b,
            "reward/shaped": glob[2].item() / b, "kl/ref": seq_kl, "kl/coef": coef_used,
            "loss/policy": (update_sums[0] / n_tok).item(), "loss/value": (update_sums[1] / n_tok).item(),
            "policy/clipfrac": (update_sums[2] / n_tok).item(), "value/clipfrac": (update_sums[3] / n_tok).item(),
            "policy/approx_kl": (update_sums[4] / n_tok).item(), "policy/entropy": (update_sums[5] / n_tok).item(),
            "value/explained_variance": glob[6].item() / b, "response/length": glob[3].item() / b,
            "response/eos_rate": glob[4].item() / b, "rollout/logprob_diff": glob[5].item() / glob[3].item(),
            "ppo/updates": updates, "ppo/early_stopped": float(stopped_early),
            "optim/lr": scheduler.get_last_lr()[0],
            "perf/rollout_s": t1 - t0, "perf/score_s": t2 - t1, "perf/forward_s": t3 - t2, "perf/update_s": t4 - t3,
            "perf/rollout_tokens_per_s": glob[7].item() / max(t1 - t0, 1e-9), "perf/samples_per_s": b / elapsed,
            "data/epoch": (step + 1) / sampler.steps_per_epoch,
        }
        for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += seconds
        done = step + 1
        progress.update(reward=row["reward/score"], kl=seq_kl)
        if done % cfg.log.every == 0 or done == num_steps:
            run.log(row, step=done)
        last = row
        if val_prompts and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < num_steps:
            run.log(held_out(), step=done)
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < num_steps:
            run.save_checkpoint(done, policy, tokenizer, optimizer, scheduler,
                                {"epoch": sampler.epoch_of(step), "kl_coef": kl_ctl.coef,
                                 "reward_moments": moments.state_dict()}, base_location,
                                extra={"critic": (critic, critic_optimizer, critic_scheduler)})
    progress.close()

    # ---- evaluate and save ----------------------------------------------------------------------------------
    after = held_out() if val_prompts else {}
    if after:
        run.log(after, step=num_steps)
    report = {"iterations": num_steps, "prompts_per_iteration": cfg.train.batch_size, "engine": engine.name,
              "critic_init": critic_source, "kl_coef_final": kl_ctl.coef, "data": data_report,
              "last_train": last, "seconds": totals, "model": str(run.dir / "model")}
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
