"""Losses as pure tensor functions. Imports torch only.

Each function takes tensors and returns tensors; none touches a model. Each is tested against a hand computation,
a naive loop, or TRL's implementation on the same inputs (tests/unit/test_losses.py).

Shapes: K = number of target tokens selected from a batch, V = vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_k | context_k) for each selected position.

    logits: [K, V] (the positions that predict a target), targets: [K] -> [K].
    Computed as -cross_entropy, which fuses log_softmax and the gather without a [K, V] log-prob copy.
    Upcast to float32 first: log_softmax in bf16 loses ~2 decimal digits on a 50k vocabulary.
    """
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, num_targets: int | torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood summed over these targets and divided by `num_targets`.

        L = -(1/N) * sum_k log p(y_k | y_<k)

    `num_targets` (N) is the number of target tokens in the whole optimizer step: every micro-batch of gradient
    accumulation and every process. Summing per micro-batch and dividing by the global count makes the gradient
    of an accumulated, distributed step equal to that of one big batch (the token mean of the global batch), as
    transformers does with `num_items_in_batch`; a mean per micro-batch would weight short micro-batches more.
    """
    return F.cross_entropy(logits.float(), targets, reduction="sum") / num_targets


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all elements, or along `dim`)."""
    mask = mask.to(values.dtype)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


# --------------------------------------------------------------------------------------------------------------
# Reward models: pairs and K-wise rankings
#
# A batch of rankings is laid out as rewards [G, K] (one score per response, from ONE forward pass each),
# ranks [G, K] (lower is better, equal is a tie) and valid [G, K] (groups have different K; padding is False).


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - m)  (Bradley & Terry 1952; margin m as in Llama 2)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def _pair_masks(ranks: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """better[g, i, j]: response i is ranked above j; tie[g, i, j]: tied, counted once (i < j)."""
    both = valid[:, :, None] & valid[:, None, :]
    better = both & (ranks[:, :, None] < ranks[:, None, :])
    upper = torch.ones(ranks.shape[1], ranks.shape[1], dtype=torch.bool, device=ranks.device).triu(1)
    tie = both & (ranks[:, :, None] == ranks[:, None, :]) & upper
    return better, tie


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
                 margins: torch.Tensor | None = None, ties: str = "ignore") -> torch.Tensor:
    """InstructGPT's K-wise loss, per group [G] (Ouyang et al. 2022, eq. 1):

        loss_g = 1/P_g * sum_{(w, l): rank_w < rank_l} -log sigmoid(r_w - r_l - m_g)

    over the P_g ordered pairs of the group, so each group weighs the same whatever its K. Every one of the
    C(K, 2) pairs reuses the K scores of one forward pass each. Ties give no pair (`ties="ignore"`), or with
    `ties="half"` a pair with target probability 1/2: -(log sigmoid(d) + log sigmoid(-d)) / 2, which pulls the
    two rewards together. The margin m_g (NaN = none) applies to the ordered pairs.
    """
    better, tie = _pair_masks(ranks, valid)
    diff = rewards[:, :, None] - rewards[:, None, :]
    if margins is not None:
        diff = diff - torch.nan_to_num(margins, nan=0.0)[:, None, None]
    total = (-F.logsigmoid(diff) * better).sum((1, 2))
    count = better.sum((1, 2))
    if ties == "half":
        raw = rewards[:, :, None] - rewards[:, None, :]
        total = total + (-(F.logsigmoid(raw) + F.logsigmoid(-raw)) / 2 * tie).sum((1, 2))
        count = count + tie.sum((1, 2))
    elif ties != "ignore":
        raise ValueError(f"ties: expected ignore or half, got {ties!r}")
    return total / count.clamp(min=1)


def plackett_luce_loss(rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Listwise negative log-likelihood of the human order under Plackett-Luce, per group [G]:

        loss_g = -1/(K_g - 1) * sum_{i=1}^{K_g - 1} [ r_(i) - log sum_{j >= i} exp r_(j) ]

    where r_(1) ... r_(K) are the rewards sorted best first. Divided by the K - 1 choices so that groups of any
    size weigh the same; for K = 2 it is exactly the Bradley-Terry loss. Tied responses are ordered as given.
    """
    key = torch.where(valid, ranks, torch.full_like(ranks, float("inf")))
    order = torch.sort(key, dim=1, stable=True).indices
    r = torch.gather(rewards, 1, order)
    v = torch.gather(valid, 1, order)
    r_safe = torch.where(v, r, torch.full_like(r, -1e4))  # exp(-1e4) = 0: padding never enters a sum
    suffix = torch.logcumsumexp(r_safe.flip(1), dim=1).flip(1)
    terms = torch.where(v, r_safe - suffix, torch.zeros_like(r))
    choices = (v.sum(1) - 1).clamp(min=1)
    return -terms.sum(1) / choices


def center_penalty(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per group [G]: (mean_k r_k)^2, pushing each group's mean reward to 0 (Eisenstein et al. 2023). For a pair
    it is ((r_c + r_r) / 2)^2, a quarter of TRL's center_rewards_coefficient term."""
    return (masked_sum(rewards, valid, 1) / valid.sum(1).clamp(min=1)) ** 2


def ranking_stats(rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sums to aggregate over micro-batches and processes before dividing:
    [pairs ranked right, ordered pairs, sum of (r_w - r_l), sum r, sum r^2, responses].

    A pair ranked right scores 1 when r_w > r_l and 1/2 when r_w == r_l (a random tie-break's expectation, as in
    reward_models.metrics and DPO's accuracy), so a model that scores every response alike is at exactly 0.5."""
    better, _ = _pair_masks(ranks, valid)
    diff = (rewards[:, :, None] - rewards[:, None, :]).detach()
    r = rewards.detach()[valid]
    right = ((diff > 0) & better).sum().float() + 0.5 * ((diff == 0) & better).sum().float()
    return torch.stack([right, better.sum().float(), (diff * better).sum(),
                        r.sum(), (r * r).sum(), torch.tensor(float(r.numel()), device=r.device)])


def summarize_ranking_stats(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """Metrics from summed ranking_stats. Accuracy and mean margin are over ordered pairs: without any (every
    ranking a tie) they are left out, neither 0 nor NaN, so logs and plots show no value rather than a wrong one."""
    correct, pairs, margin, total, squares, n = sums.tolist()
    mean = total / max(n, 1)
    out = {f"reward/mean_{prefix}": mean, f"reward/std_{prefix}": max(squares / max(n, 1) - mean * mean, 0) ** 0.5}
    if pairs:
        out.update({f"accuracy/{prefix}": correct / pairs, f"reward/margin_{prefix}": margin / pairs})
    return out


def length_correlation_penalty(rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The reward variance explained by log response length over a batch of responses:

        var(r) * rho(r, log len)^2  =  cov(r, x)^2 / var(x),   x = log(1 + len)

    Penalising it (after ODIN, Chen et al. 2024, which decorrelates reward from length) keeps the reward model
    from encoding "longer/shorter wins" as a shortcut for quality. Unlike rho^2 alone, which is scale-free and
    whose gradient grows as 1/std(r) while the rewards are still near zero, this term is small when the rewards
    are. Log lengths keep a few very long replies from dominating the estimate."""
    x = torch.log1p(lengths.float())
    r, x = rewards - rewards.mean(), x - x.mean()
    n = rewards.numel()
    return ((r * x).sum() / n) ** 2 / (x.pow(2).sum() / n).clamp(min=1e-8)


# --------------------------------------------------------------------------------------------------------------
# Offline preference optimisation: DPO and variants
#
# Inputs are per-sequence log-probabilities of the response tokens, summed: policy_* [B] and ref_* [B] for the
# chosen (y_w) and rejected (y_l) responses; counts are their numbers of response tokens [B] where a variant
# normalises by length. h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)). Each loss returns
# the per-pair loss [B]; the recipe averages over the global batch.
#
# Two controls of the length shortcut (DPO learning "longer wins" or "shorter wins" instead of quality) change
# what goes into a loss, not the losses: LD-DPO replaces each summed log-prob by its length-desensitised form
# (ld_logprobs, for policy and reference alike), R-DPO adds a length term to the margin (rdpo_logits).


def sequence_logprobs(token_logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum the target-token log-probs [K] of each sequence: counts [S] says how many consecutive entries of
    token_logps belong to each sequence (targets are ordered sequence by sequence) -> [S]."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=token_logps.device), counts)
    out = torch.zeros(len(counts), dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, owner, token_logps)


def tail_logprobs(token_logps: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per sequence [S], the sum of its target-token log-probs after its first keep[s] targets (laid out as in
    sequence_logprobs). With keep = min(|y_w|, |y_l|) of the sequence's pair this is the part of the longer response
    that LD-DPO down-weights; it is 0 for the shorter one."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=token_logps.device), counts)
    start = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(token_logps), device=token_logps.device) - start[owner]  # 0-based, in its sequence
    tail = token_logps * (position >= keep[owner])
    out = torch.zeros(len(counts), dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, owner, tail)


def ld_logprobs(logps: torch.Tensor, tail: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's length-desensitised log-likelihood of a response of a pair (Liu et al. 2024, "Length Desensitization
    in Direct Preference Optimization"; TRL's `ld_alpha`):

        log p~(y|x) = sum_{t <= l_p} log p(y_t | x, y_<t)  +  alpha * sum_{t > l_p} log p(y_t | x, y_<t)
        l_p = min(|y_w|, |y_l|)      (the "public length" of the pair)

    so the tokens of the longer response past the shorter one's length count alpha times (alpha = 1: plain DPO).
    Applied to the policy's and the reference's log-probs alike, as TRL does; the loss then takes them in place of
    log pi and log pi_ref. Computed as logps - (1 - alpha) * tail, with logps the full sum and tail the sum past
    l_p (tail_logprobs), so alpha = 1 gives back the plain sums exactly."""
    return logps - (1 - ld_alpha) * tail


def dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)): the implicit reward margin / beta."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def rdpo_logits(h: torch.Tensor, chosen_count: torch.Tensor, rejected_count: torch.Tensor, beta: float,
                alpha: float) -> torch.Tensor:
    """R-DPO's length-regularised margin (Park et al. 2024, "Disentangling Length from Quality in Direct Preference
    Optimization", the R-DPO objective):

        L = -log sigmoid( beta h + alpha (|y_w| - |y_l|) )          |y| in tokens

    returned as h + (alpha / beta)(|y_w| - |y_l|), so any loss of beta h (sigmoid, robust, hinge) takes it in place
    of h. It is the DPO derivation for the objective max E[r(x, y) - alpha |y|] - beta KL: the length term explains
    the part of a preference that length explains, so the policy does not learn it. alpha > 0 penalises length
    (the paper's use, against verbosity: a longer chosen response is already favoured by the term, so the policy
    is pushed less to prefer it); alpha < 0 would counter a "shorter wins" bias. alpha = 0 is plain DPO."""
    if not alpha:
        return h
    return h + (alpha / beta) * (chosen_count - rejected_count).to(h.dtype)


def dpo_sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): L = -log sigmoid(beta h).
    With label smoothing eps, conservative DPO (Mitchell 2023), for labels flipped with probability eps:
    L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    loss = -F.logsigmoid(beta * h)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    return loss


def robust_dpo_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 10), unbiased under label noise eps < 1/2:
    L = [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)."""
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_count, rejected_count,
             beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): L = (h_avg - 1/(2 tau))^2 with tau = beta, where h_avg uses log-ratios
    averaged over each response's tokens (as TRL does, agreed with the IPO authors: the summed form makes the
    squared loss scale with length)."""
    h = (policy_chosen - ref_chosen) / chosen_count.clamp(min=1) - \
        (policy_rejected - ref_rejected) / rejected_count.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF's calibration loss (Zhao et al. 2023, eq. 1) on the DPO margin: L = max(0, 1 - beta h)."""
    return torch.relu(1 - beta * h)


def simpo_loss(policy_chosen, policy_rejected, chosen_count, rejected_count, beta: float, gamma: float
               ) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:
    L = -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), gamma the target reward margin."""
    margin = beta * policy_chosen / chosen_count.clamp(min=1) - beta * policy_rejected / rejected_count.clamp(min=1)
    return -F.logsigmoid(margin - gamma)


def nll_loss(chosen_logps: torch.Tensor, num_chosen_tokens: torch.Tensor | int) -> torch.Tensor:
    """RPO's extra term (Pang et al. 2024, eq. 2: L_DPO + alpha L_NLL): the negative log-likelihood of the chosen
    responses as a mean over their tokens, -sum(log pi(y_w)) / sum|y_w| (TRL's "sft" loss term)."""
    return -chosen_logps.sum() / num_chosen_tokens


RDPO_LOSSES = ("sigmoid", "robust", "hinge")  # the losses of beta h, where R-DPO's length term has a meaning


def preference_loss(kind: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_count,
                    rejected_count, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                    rdpo_alpha: float = 0.0) -> torch.Tensor:
    """The per-pair loss [B] of variant `kind` (sigmoid, robust, ipo, hinge, simpo). ref_* are ignored by simpo.
    rdpo_alpha != 0 adds R-DPO's length term to the margin (rdpo_logits; sigmoid, robust and hinge only)."""
    if rdpo_alpha and kind not in RDPO_LOSSES:
        raise ValueError(f"R-DPO's length term applies to {', '.join(RDPO_LOSSES)}, not {kind!r}")
    if kind == "simpo":
        return simpo_loss(policy_chosen, policy_rejected, chosen_count, rejected_count, beta, gamma)
    if kind == "ipo":
        return ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_count, rejected_count, beta)
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    h = rdpo_logits(h, chosen_count, rejected_count, beta, rdpo_alpha)
    if kind == "sigmoid":
        return dpo_sigmoid_loss(h, beta, label_smoothing)
    if kind == "robust":
        return robust_dpo_loss(h, beta, label_smoothing)
    if kind == "hinge":
        return hinge_loss(h, beta)
    raise ValueError(f"unknown preference loss {kind!r}")


def implicit_rewards(kind: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_count,
                     rejected_count, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards the policy implies for chosen and rejected [B] each: beta (log pi - log pi_ref) (DPO, eq. 5), or
    SimPO's length-normalised beta/|y| log pi. A pair is ranked right when the chosen reward is higher."""
    if kind == "simpo":
        return beta * policy_chosen / chosen_count.clamp(min=1), beta * policy_rejected / rejected_count.clamp(min=1)
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def preference_stats(loss, reward_chosen, reward_rejected, policy_chosen, policy_rejected) -> torch.Tensor:
    """Sums for the metrics of a batch of pairs: [loss, reward chosen, reward rejected, margin, correct (a tie
    counts 1/2, so a policy equal to its reference scores exactly 50%), log pi chosen, log pi rejected, pairs]."""
    margin = reward_chosen - reward_rejected
    correct = (margin > 0).float() + 0.5 * (margin == 0).float()
    cols = [loss, reward_chosen, reward_rejected, margin, correct, policy_chosen, policy_rejected]
    return torch.stack([c.detach().float().sum() for c in cols] + [loss.new_tensor(float(len(loss)))])


def summarize_preference_stats(sums: torch.Tensor, split: str) -> dict[str, float]:
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy", "logps/chosen",
             "logps/rejected"]
    n = max(sums[-1].item(), 1.0)
    return {f"{name}/{split}": (sums[i] / n).item() for i, name in enumerate(names)}


LENGTH_BUCKETS = ("chosen_longer", "chosen_shorter", "same_length")


def length_split_stats(margin: torch.Tensor, chosen_count: torch.Tensor, rejected_count: torch.Tensor
                       ) -> torch.Tensor:
    """Preference accuracy split by which response of a pair is longer (in response tokens), as sums to reduce over
    batches and processes: [right, pairs] for chosen longer, chosen shorter, same length (6 values). A pair is right
    when margin > 0 (a tie 1/2, as in preference_stats). A policy that learned "shorter wins" instead of quality is
    right on the chosen-shorter pairs and wrong on the others."""
    margin = margin.detach().float()
    right = (margin > 0).float() + 0.5 * (margin == 0).float()
    out = []
    for bucket in (chosen_count > rejected_count, chosen_count < rejected_count, chosen_count == rejected_count):
        out += [(right * bucket).sum(), bucket.float().sum()]
    return torch.stack(out)


def summarize_length_split(sums: torch.Tensor, split: str) -> dict[str, float]:
    """Metrics from summed length_split_stats: pairs/<bucket>/<split> always, accuracy/<bucket>/<split> for buckets
    with pairs, and accuracy/shorter_wins/<split>, the accuracy of the rule "the shorter response wins" on the same
    pairs (a same-length pair counts 1/2): the score a pure length shortcut gets."""
    values = sums.tolist()
    out = {}
    for k, bucket in enumerate(LENGTH_BUCKETS):
        right, n = values[2 * k], values[2 * k + 1]
        out[f"pairs/{bucket}/{split}"] = int(n)
        if n:
            out[f"accuracy/{bucket}/{split}"] = right / n
    longer, shorter, same = values[1], values[3], values[5]
    if longer + shorter + same:
        out[f"accuracy/shorter_wins/{split}"] = (shorter + 0.5 * same) / (longer + shorter + same)
    return out


# --------------------------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017) for language models (Ziegler et al. 2019; Ouyang et al. 2022)
#
# A rollout batch is laid out as [B, T]: B responses, T the longest response; response_mask [B, T] is 1 on a
# response's tokens (through its EOS) and 0 after. Token t of a response is action a_t taken in state s_t (the
# prompt and the response tokens before t); logprobs[b, t] = log pi(a_t | s_t), values[b, t] = V(s_t).


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence", 2020), elementwise:

        k1 = log pi(a) - log pi_ref(a)                   unbiased, can be negative per token
        k3 = (r - 1) - log r,  r = pi_ref(a) / pi(a)     unbiased, always >= 0, lower variance
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
                   ) -> torch.Tensor:
    """The per-token reward PPO maximises (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2):

        r_t = -kl_coef * KL_t             for every response token
        r_T = r_T + score                 at the response's last token T

    scores [B] (the reward model's, after normalisation), kl [B, T] per-token KL estimates -> [B, T], 0 off-mask."""
    mask = response_mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), per response, backwards in time:

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t)       (V = 0 after the last token: the episode ends)
        A_t     = delta_t + gamma lam A_{t+1}
        returns_t = A_t + V(s_t)                        (the value target)

    rewards, values, response_mask [B, T] -> (advantages, returns) [B, T], 0 off-mask. Responses end where their
    mask ends, so positions past a response's end never leak into it."""
    mask = response_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the mean is added back with shift_mean=False). `stats`
    = (mean, var) computed elsewhere (e.g. over all processes) replaces the local ones."""
    mask = mask.to(values.dtype)
    if stats is None:
        mean = masked_mean(values, mask)
        var = masked_mean((values - mean) ** 2, mask)
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)  # unbiased, as torch.var
    else:
        mean, var = stats
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective (Schulman et al. 2017, eq. 7), as a per-token loss to minimise:

        ratio_t = pi(a_t|s_t) / pi_old(a_t|s_t)
        L_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))

    -> (loss [same shape], clipped [bool]: where the clipped term was the larger, i.e. the gradient is zero)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss (PPO2 baselines; used by Ziegler et al. and InstructGPT), per token:

        V_clip = old_V + clip(V - old_V, -eps, eps)
        L_t = 1/2 max((V - R)^2, (V_clip - R)^2)

    -> (loss, clipped [bool]: where the clipped error was the larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_err, clipped_err), clipped_err > unclipped_err


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: logits [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_old || pi) on tokens sampled from pi_old (the early-stopping signal):
    (r - 1) - log r with r = pi / pi_old."""
    log_ratio = logprobs - old_logprobs
    return torch.expm1(log_ratio) - log_ratio


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the masked entries: 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1 - var_residual / var_returns.clamp(min=1e-8)


def adaptive_kl_coef(kl_coef: float, observed_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (section 2.2), one update:

        e = clip(KL / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    observed_kl is the batch's mean KL per response; n_steps the number of responses it came from."""
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


# --------------------------------------------------------------------------------------------------------------
# GRPO and its family: group baselines instead of a critic (Shao et al. 2024), RLOO (Ahmadian et al. 2024),
# REINFORCE++ (Hu 2025), Dr.GRPO (Liu et al. 2025), DAPO (Yu et al. 2025), GSPO (Zheng et al. 2025)
#
# Scores [B] are laid out group by group: rows g*n .. g*n+n-1 are the n = group_size responses to prompt g. Token
# tensors are [B, T] as for PPO above, with response_mask [B, T] marking each response's tokens.


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, scale_rewards: bool = True
                     ) -> torch.Tensor:
    """One advantage per response [B] from its group's scores, with s_i the score of response i of n:

        grpo                   A_i = (s_i - mean(s)) / (std(s) + 1e-4)     (GRPO, Shao et al. 2024, sec. 4.1.2;
                                                                             std unbiased, as TRL's GRPOTrainer)
                               A_i = s_i - mean(s)       scale_rewards=False (Dr.GRPO, Liu et al. 2025)
        rloo                   A_i = s_i - 1/(n-1) sum_{j != i} s_j  =  n/(n-1) (s_i - mean(s))
                                                                            (RLOO, Ahmadian et al. 2024, eq. 5)
        reinforce_pp_baseline  A_i = s_i - mean(s)       (REINFORCE++-baseline, Hu 2025; the caller then whitens
                                                          over the global batch)

    scale_rewards applies to grpo only; the others never divide by a std. A group whose scores are all equal
    carries no signal and gets exactly 0 (TRL's formula leaves float noise up to ~1e-3 there: 1 ulp / 1e-4).
    """
    n = group_size
    if n < 2:
        raise ValueError(f"group_size must be >= 2: a group baseline is undefined for one response (got {n})")
    if scores.numel() % n:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {n}")
    if not scores.is_floating_point():
        scores = scores.float()
    grouped = scores.reshape(-1, n)
    centred = grouped - grouped.mean(1, keepdim=True)
    if estimator == "grpo":
        advantages = centred / (grouped.std(1, keepdim=True) + 1e-4) if scale_rewards else centred
    elif estimator == "rloo":
        advantages = centred * (n / (n - 1))
    elif estimator == "reinforce_pp_baseline":
        advantages = centred
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected grpo, rloo or reinforce_pp_baseline")
    flat = (grouped.amax(1, keepdim=True) == grouped.amin(1, keepdim=True))
    return torch.where(flat, torch.zeros_like(advantages), advantages).reshape(-1)


def discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token returns of each response (REINFORCE++, Hu 2025, eq. 3), backwards in time:

        G_t = sum_{k >= t} gamma^(k - t) r_k  =  r_t + gamma G_{t+1}      (G = 0 after the response's end)

    rewards, response_mask [B, T] -> [B, T], 0 off-mask; junk past a response's end never leaks into it."""
    mask = response_mask.to(rewards.dtype)
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, clip_low: float, clip_high: float, ratio: str = "token",
                        is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate of GRPO (Shao et al. 2024, eq. 3) as a per-token loss to minimise, with decoupled
    clip ranges (DAPO's clip-higher, Yu et al. 2025, eq. 10):

        L_t = -min(w_t A_t, clip(w_t, 1 - clip_low, 1 + clip_high) A_t)

        ratio="token":     log w_t = log pi(a_t|s_t) - log pi_old(a_t|s_t)
        ratio="sequence":  log w_t = 1/|y| sum_t' [log pi(a_t'|s_t') - log pi_old(a_t'|s_t')]  for every t
                           (GSPO, Zheng et al. 2025, eq. 7: the length-normalised sequence ratio; the gradient
                           flows through the mean, as TRL's importance_sampling_level="sequence")

    then times is_weights [B, T] if given (truncated importance sampling for the rollout engine's mismatch, see
    truncated_is_weights; no gradient through them). advantages [B, T] or [B] (one per response, broadcast).
    -> (per-token loss [B, T], not masked: aggregate_loss applies the mask; clipped [B, T] bool: where the clipped
    term was selected and differs, i.e. the gradient is zero, False off-mask)."""
    mask = response_mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    if ratio == "token":
        log_w = log_ratio
    elif ratio == "sequence":
        log_w = masked_mean(log_ratio, mask, 1)[:, None]
    else:
        raise ValueError(f"unknown ratio {ratio!r}; expected token or sequence")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    w = torch.exp(log_w)
    unclipped = w * advantages
    clipped_term = torch.clamp(w, 1 - clip_low, 1 + clip_high) * advantages
    loss = torch.broadcast_to(-torch.minimum(unclipped, clipped_term), logprobs.shape)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    clipped = torch.broadcast_to(clipped_term < unclipped, logprobs.shape) & response_mask.bool()
    return loss, clipped


def aggregate_loss(per_token: torch.Tensor, response_mask: torch.Tensor, how: str,
                   num_tokens: float | torch.Tensor, num_sequences: float | torch.Tensor, max_new_tokens: int
                   ) -> torch.Tensor:
    """This micro-batch's share of the loss of a whole minibatch split over micro-batches and processes: the
    caller sums the shares (backward on each), and num_tokens / num_sequences count the WHOLE minibatch, so the
    gradient equals that of one big batch whatever the split. With L_it the per-token loss and |y_i| the lengths:

        token_mean               sum_i sum_t L_it / sum_i |y_i|              (DAPO, Yu et al. 2025, eq. 8;
                                                                              TRL "dapo", and "bnpo" on one batch)
        seq_mean_token_mean      1/N sum_i (1/|y_i|) sum_t L_it              (GRPO, Shao et al. 2024, eq. 3;
                                                                              TRL "grpo")
        seq_mean_token_sum_norm  1/N sum_i sum_t L_it / max_new_tokens       (Dr.GRPO, Liu et al. 2025, eq. 2;
                                                                              TRL "dr_grpo")

    N = num_sequences. Counts below 1 are taken as 1 (an empty minibatch gives 0, not NaN), as TRL does."""
    mask = response_mask.to(per_token.dtype)
    if how == "token_mean":
        return masked_sum(per_token, mask) / _at_least_one(num_tokens)
    if how == "seq_mean_token_mean":
        per_sequence = masked_sum(per_token, mask, 1) / mask.sum(1).clamp(min=1)
        return per_sequence.sum() / _at_least_one(num_sequences)
    if how == "seq_mean_token_sum_norm":
        return masked_sum(per_token, mask) / max_new_tokens / _at_least_one(num_sequences)
    raise ValueError(f"unknown loss aggregation {how!r}; expected token_mean, seq_mean_token_mean or "
                     "seq_mean_token_sum_norm")


def _at_least_one(count: float | torch.Tensor) -> float | torch.Tensor:
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)


@torch.no_grad()
def truncated_is_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling weights that correct for the rollout engine (e.g. vLLM) sampling from a
    slightly different distribution than the trainer's pi_old (TIS, Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"; TRL's vllm_importance_sampling_mode="token_truncate"):

        w_t = min(pi_old(a_t|s_t) / pi_engine(a_t|s_t), C)

    -> (weights [B, T], no gradient; capped [B, T] bool: where w was cut to C). A token the engine could not score
    (NaN log-prob) gets weight 1, as in TRL, so one missing value cannot turn the loss into NaN."""
    log_w = torch.nan_to_num(old_logprobs - engine_logprobs, nan=0.0)
    weights = torch.exp(log_w)
    return weights.clamp(max=cap), weights > cap


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score of each response [B]:

        R(L) = 0                                   L <= L_max - L_buffer
               ((L_max - L_buffer) - L) / L_buffer   L_max - L_buffer < L <= L_max
               -1                                  L_max < L
    times `penalty`. A truncated response (L = L_max) gets the full -penalty."""
    if buffer <= 0:
        raise ValueError(f"overlong buffer must be > 0, got {buffer}")
    start = max_new_tokens - buffer
    excess = (lengths.to(torch.get_default_dtype()) - start).clamp(min=0)
    return -(excess / buffer).clamp(max=1) * penalty
