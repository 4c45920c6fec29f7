"""Is the candidate policy better than the baseline, and at what cost?

    python -m align.evaluate --policy runs/pipeline/ppo/merged --baseline runs/pipeline/sft/merged \
        --reward-model runs/pipeline/rm/model --prompts data/hh_harmless.jsonl --offset 1600 --n 64 --out DIR
    python -m align.evaluate RECIPE.yaml [key=value ...]          # keys: config.EvalConfig

Both policies answer the same held-out prompts with the same sampling settings and, batch by batch, the same seed;
one judge (a reward model, ours or any one-output sequence-classification model, or a rule from
reward_models/rules.py) scores every response. Per prompt i, d_i = r(candidate_i) - r(baseline_i):

    win rate      mean of w_i: 1 if d_i > tie_margin, 1/2 if |d_i| <= tie_margin or the two responses are the same
                  text (the shared seed makes that common for nearby policies), 0 otherwise; the 95% interval is
                  Wilson's score interval on these tie-split outcomes. (The normal interval mean +- 1.96 sd(w)/sqrt(n)
                  has zero width when every outcome ties and covers far less than 95% near there; Wilson's uses the
                  largest variance outcomes in [0, 1] with that mean can have, so it holds with ties too.)
    LC win rate   AlpacaEval 2's length control (Dubois et al. 2024) on reward differences: regress d_i on the length
                  feature tanh(l_i / sd(l)), l_i = len(candidate_i) - len(baseline_i) in tokens, by least squares
                  (d = a + b * feature); the win rate of d_i - b * feature_i, the difference the two responses would
                  have at equal length. A reward difference that is a function of that feature alone gives 0.5.
                  Null when the feature hardly varies (one side far longer on every prompt: length and policy
                  are then confounded) or with fewer than 3 prompts. Its 95% interval: the percentile interval of
                  2,000 bootstrap resamples of the prompts (the slope refitted on each, so its uncertainty counts),
                  widened where needed to the Wilson interval of the controlled outcomes (which the bootstrap
                  misses when, say, every outcome ties).
    KL            KL(candidate || baseline) on the candidate's own samples: sum over response tokens of
                  log pi_c(y_t) - log pi_b(y_t) under the sampling temperature (the k1 estimator PPO logs), averaged.
                  Null under top_p < 1: the responses then come from truncated distributions, whose KL this is not.
    lengths       mean, median, 10th and 90th percentile in tokens, and the share that ended on EOS, for both.

Outputs (with output_dir): eval.json (everything below), samples.jsonl (prompt, both responses, rewards, lengths, KL),
rewards.png (reward histogram of both), kl_vs_reward.png and lengths.png. The last line of stdout is one JSON object
with win_rate, win_rate_ci95, lc_win_rate, kl, n and the rest of the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import data, formats, models, rewards, rollout, train
from .config import AlignError, ConfigError, EvalConfig, load_config, to_yaml
from .rewards import load_reward, score

log = logging.getLogger("align")


# --------------------------------------------------------------------------------------------------------------
# Statistics: pure functions of per-prompt reward differences and lengths


def outcomes(diff: Sequence[float], tie_margin: float = 0.0) -> np.ndarray:
    """Per prompt: 1 (candidate wins), 0.5 (tie: |d| <= tie_margin) or 0 (baseline wins)."""
    d = np.asarray(diff, dtype=np.float64)
    return np.where(np.abs(d) <= tie_margin, 0.5, (d > 0).astype(np.float64))


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(rate: float, n: int, z: float = Z95) -> list[float]:
    """Wilson's score interval for a mean of n outcomes in [0, 1] (Wilson 1927): the p whose |rate - p| is within z
    standard errors sqrt(p (1 - p) / n). p (1 - p) bounds the variance of any [0, 1] outcome with mean p, so the
    interval is valid (conservative) for tie-split outcomes too, and never zero-width."""
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def win_rate(diff: Sequence[float], tie_margin: float = 0.0) -> dict:
    """Win rate (ties count half) with its 95% Wilson interval, and the counts."""
    w = outcomes(diff, tie_margin)
    n = len(w)
    if n == 0:
        raise ValueError("no prompts to compare")
    rate = float(w.mean())
    return {"win_rate": rate, "win_rate_ci95": wilson_interval(rate, n),
            "wins": int((w == 1).sum()), "ties": int((w == 0.5).sum()), "losses": int((w == 0).sum()), "n": n}


MIN_FEATURE_SD = 0.05  # below this spread the length term cannot be told apart from the intercept


def length_feature(lengths: np.ndarray) -> Optional[np.ndarray]:
    """tanh(l / sd(l)), or None when it cannot carry a slope (fewer than 3 prompts, or hardly any spread)."""
    sd = float(lengths.std(ddof=1)) if len(lengths) > 1 else 0.0
    if len(lengths) < 3 or sd == 0.0:
        return None
    feature = np.tanh(lengths / sd)
    return None if float(feature.std(ddof=1)) < MIN_FEATURE_SD else feature


def _slope_intercept(d: np.ndarray, feature: np.ndarray) -> tuple[float, float]:
    """Least squares of d = a + b * feature: (b, a)."""
    centred = feature - feature.mean()
    slope = float((centred * (d - d.mean())).sum() / (centred ** 2).sum())
    return slope, float(d.mean() - slope * feature.mean())


def length_controlled(diff: Sequence[float], length_diff: Sequence[float], tie_margin: float = 0.0,
                      n_boot: int = 2000, seed: int = 0) -> dict:
    """The win rate with the length effect regressed out, and its 95% interval (see the module docstring). Not
    estimable (lc_win_rate None) with fewer than 3 prompts, or when the length feature hardly varies: one side
    longer by many standard deviations on every prompt saturates tanh, and length is then confounded with the
    policy itself."""
    d = np.asarray(diff, dtype=np.float64)
    feature = length_feature(np.asarray(length_diff, dtype=np.float64))
    if feature is None:
        return {"lc_win_rate": None, "lc_win_rate_ci95": None, "length_slope": None, "intercept": None}
    slope, intercept = _slope_intercept(d, feature)
    rate = float(outcomes(d - slope * feature, tie_margin).mean())
    # Bootstrap: resample prompts and refit the slope on the feature as defined on all of them (its scale is a
    # convention, not an estimate).
    resampled = []
    rng = np.random.default_rng(seed)
    for idx in rng.integers(0, len(d), size=(n_boot, len(d))):
        if float(feature[idx].std()) < MIN_FEATURE_SD:  # (almost) one length in the resample: no slope to fit
            continue
        b, _ = _slope_intercept(d[idx], feature[idx])
        resampled.append(float(outcomes(d[idx] - b * feature[idx], tie_margin).mean()))
    lo, hi = wilson_interval(rate, len(d))
    if resampled:
        lo, hi = min(lo, float(np.percentile(resampled, 2.5))), max(hi, float(np.percentile(resampled, 97.5)))
    return {"lc_win_rate": rate, "lc_win_rate_ci95": [lo, hi], "length_slope": slope, "intercept": intercept}


def show(x: Optional[float], digits: int = 3) -> str:
    """A number for people; "n/a" where a statistic could not be estimated (JSON keeps null)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def length_summary(lengths: Sequence[int], stopped: Sequence[bool]) -> dict:
    x = np.asarray(lengths, dtype=np.float64)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p10": float(np.percentile(x, 10)),
            "p90": float(np.percentile(x, 90)), "eos_rate": float(np.mean(np.asarray(stopped, dtype=np.float64)))}


def summarize(candidate_rewards: Sequence[float], baseline_rewards: Sequence[float],
              candidate_lengths: Sequence[int], baseline_lengths: Sequence[int], kl: Optional[Sequence[float]],
              candidate_stopped: Sequence[bool], baseline_stopped: Sequence[bool], tie_margin: float = 0.0,
              same_response: Optional[Sequence[bool]] = None) -> dict:
    """Everything the evaluation reports, from per-prompt arrays (index i is prompt i on both sides). Where the two
    responses are the same text (`same_response`) the difference is 0, a tie, whatever rounding the judge adds.
    `kl` is None (or holds None) where the KL is not defined (top_p < 1)."""
    rc, rb = np.asarray(candidate_rewards, np.float64), np.asarray(baseline_rewards, np.float64)
    lc, lb = np.asarray(candidate_lengths, np.float64), np.asarray(baseline_lengths, np.float64)
    diff = rc - rb
    if same_response is not None:
        diff = np.where(np.asarray(same_response, dtype=bool), 0.0, diff)
    out = win_rate(diff, tie_margin)
    out.update(length_controlled(diff, lc - lb, tie_margin))
    kl = None if kl is None or any(k is None for k in kl) else np.asarray(kl, np.float64)
    out.update({
        "kl": None if kl is None else float(kl.mean()),
        "kl_sd": None if kl is None else float(kl.std(ddof=1)) if len(kl) > 1 else 0.0,
        "reward_candidate": float(rc.mean()), "reward_baseline": float(rb.mean()),
        "reward_diff": float((rc - rb).mean()),
        "length_candidate": length_summary(candidate_lengths, candidate_stopped),
        "length_baseline": length_summary(baseline_lengths, baseline_stopped),
    })
    return out


# --------------------------------------------------------------------------------------------------------------
# Sampling, scoring, KL


@dataclass
class Samples:
    """One policy's responses to the prompts, in prompt order, with their rewards."""

    rollout: rollout.Rollout
    texts: list[str]
    rewards: torch.Tensor  # [n]

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.rollout.response_ids]


def load_prompts(cfg: EvalConfig, tokenizer) -> tuple[list[data.Prompt], dict]:
    examples = formats.load_examples(cfg.prompts, "prompt")
    template = data.resolve_policy_template(tokenizer, cfg.template)
    prompts, stats = data.tokenize_prompts(examples, tokenizer, template, cfg.max_prompt_length, "drop")
    log.info("evaluation prompts: %d from %s; %s", len(prompts), cfg.prompts.path, stats.summary())
    return prompts, {"template": template, "prompts": stats.as_dict(), "skipped_records": examples.skipped}


def sample_and_score(model, tokenizer, prompts: list[data.Prompt], reward, cfg: EvalConfig, accelerator) -> Samples:
    """Responses of `model` (this process's prompts), drawn after seeding with cfg.seed: two policies sampled with
    the same settings consume the same random stream (hf: batch by batch; vllm: prompt by prompt). Training's RNG
    state is left untouched."""
    sampling = rollout.Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, 0)
    seed = cfg.seed + accelerator.process_index
    engine = rollout.make_engine(cfg, model, tokenizer, accelerator, sampling, seed=seed)
    try:
        with accelerator.autocast():
            ro = rollout.generate_seeded(engine, [p.ids for p in prompts], sampling, seed, accelerator.device)
    finally:
        engine.close()  # a vLLM engine's memory goes back before the next policy's is built
    texts = rollout.decode(tokenizer, ro)
    return Samples(ro, texts, score(reward, prompts, texts, accelerator))


def sequence_kl(candidate, baseline, samples: Samples, cfg: EvalConfig, pad_id: int, accelerator) -> torch.Tensor:
    """Per response [n]: sum over its tokens of log pi_candidate - log pi_baseline (k1; KL in expectation)."""
    logps, base_logps = models.policy_and_reference_logprobs(candidate, baseline, samples.rollout, cfg.micro_batch_size,
                                                      cfg.temperature, pad_id, accelerator)
    per_token = (logps - base_logps).cpu()
    return torch.tensor([piece.sum().item() for piece in torch.split(per_token, samples.lengths)])


def load_policy(location: str, which: str):
    try:
        return models.load_policy_for_inference(location, f"evaluate.{which}")
    except OSError as err:
        raise ConfigError(f"evaluate.{which}={location}: cannot load it: {err}") from None


def check_same_vocabulary(candidate_tokenizer, baseline_tokenizer, cfg: EvalConfig) -> None:
    if candidate_tokenizer.get_vocab() != baseline_tokenizer.get_vocab():
        raise ConfigError(f"policy={cfg.policy} and baseline={cfg.baseline} have different tokenizers: the KL "
                          f"between them is not defined token by token")


# --------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no pyplot, no global backend)


def _figure(size=(5.5, 3.8)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot(out: Path, rows: list[dict], summary: dict, names: tuple[str, str]) -> None:
    rc = [r["reward_candidate"] for r in rows]
    rb = [r["reward_baseline"] for r in rows]
    fig, ax = _figure()
    bins = np.histogram_bin_edges(rc + rb, bins=20)
    ax.hist(rb, bins=bins, alpha=0.55, label=f"{names[1]} (mean {summary['reward_baseline']:.3f})")
    ax.hist(rc, bins=bins, alpha=0.55, label=f"{names[0]} (mean {summary['reward_candidate']:.3f})")
    ax.set(xlabel="reward", ylabel="responses",
           title=f"win rate {summary['win_rate']:.3f}, length-controlled {show(summary['lc_win_rate'])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=110)

    if summary["kl"] is not None:
        fig, ax = _figure()
        ax.scatter([r["kl"] for r in rows], [c - b for c, b in zip(rc, rb)], s=12, alpha=0.7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel=f"KL({names[0]} || {names[1]}) of the response (nats)", ylabel="reward difference",
               title=f"mean KL {summary['kl']:.3f}, mean reward difference {summary['reward_diff']:+.3f}")
        fig.tight_layout()
        fig.savefig(out / "kl_vs_reward.png", dpi=110)

    fig, ax = _figure()
    lengths_c = [r["length_candidate"] for r in rows]
    lengths_b = [r["length_baseline"] for r in rows]
    bins = np.histogram_bin_edges(lengths_c + lengths_b, bins=20)
    ax.hist(lengths_b, bins=bins, alpha=0.55, label=f"{names[1]} (mean {summary['length_baseline']['mean']:.1f})")
    ax.hist(lengths_c, bins=bins, alpha=0.55, label=f"{names[0]} (mean {summary['length_candidate']['mean']:.1f})")
    ax.set(xlabel="response length (tokens)", ylabel="responses", title="response lengths")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=110)


# --------------------------------------------------------------------------------------------------------------
# The evaluation


def main(cfg: EvalConfig, baseline_cache: Optional[dict] = None, accelerator=None) -> dict:
    """Sample, score and compare; write the files when cfg.output_dir is set; return the summary.
    `baseline_cache` (a dict the caller keeps) lets several candidates share one baseline's samples: same
    prompts, settings and seed give the same responses, so they are drawn once."""
    cfg.check_complete("evaluate")
    check_output_dir(cfg)
    if accelerator is None:
        accelerator = train.plain_accelerator(cfg.precision, cfg.seed)
    device = accelerator.device
    candidate, tokenizer = load_policy(cfg.policy, "policy")
    baseline, baseline_tokenizer = load_policy(cfg.baseline, "baseline")
    check_same_vocabulary(tokenizer, baseline_tokenizer, cfg)
    candidate.to(device)
    baseline.to(device)
    prompts, data_report = load_prompts(cfg, tokenizer)
    mine = data.spread(prompts, accelerator.process_index, accelerator.num_processes)
    reward = load_reward(cfg.reward, device, at="evaluate.reward")
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one creates and locks it
    lock = claim_output_dir(cfg, accelerator.is_main_process)  # inputs are good: the folder is created and locked

    key = to_yaml(dataclass_replace(cfg, policy=None, output_dir=None))  # everything the baseline's side depends on
    if baseline_cache is not None and key in baseline_cache:
        base = baseline_cache[key]
        log.info("baseline samples reused (same prompts, settings and seed)")
    else:
        log.info("sampling %d responses from the baseline %s", len(mine), cfg.baseline)
        base = sample_and_score(baseline, baseline_tokenizer, mine, reward, cfg, accelerator)
        if baseline_cache is not None:
            baseline_cache[key] = base
    log.info("sampling %d responses from the candidate %s", len(mine), cfg.policy)
    cand = sample_and_score(candidate, tokenizer, mine, reward, cfg, accelerator)
    kl = [None] * len(mine)  # top_p < 1: not the KL of the distributions the responses came from (see KL above)
    if cfg.top_p == 1:
        kl = sequence_kl(candidate, baseline, cand, cfg, tokenizer.pad_token_id, accelerator).tolist()

    rows = [{"prompt": p.messages, "candidate": ct, "baseline": bt, "reward_candidate": float(rc),
             "reward_baseline": float(rb), "length_candidate": lc, "length_baseline": lb, "kl": k,
             "stopped_candidate": bool(sc), "stopped_baseline": bool(sb)}
            for p, ct, bt, rc, rb, lc, lb, k, sc, sb in zip(mine, cand.texts, base.texts, cand.rewards, base.rewards,
                                                          cand.lengths, base.lengths, kl, cand.rollout.stopped,
                                                          base.rollout.stopped)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    summary = summarize([r["reward_candidate"] for r in rows], [r["reward_baseline"] for r in rows],
                        [r["length_candidate"] for r in rows], [r["length_baseline"] for r in rows],
                        [r["kl"] for r in rows], [r["stopped_candidate"] for r in rows],
                        [r["stopped_baseline"] for r in rows], cfg.tie_margin,
                        [r["candidate"] == r["baseline"] for r in rows])
    summary.update({"policy": cfg.policy, "baseline": cfg.baseline,
                    "judge": rewards.describe(cfg.reward), "data": data_report,
                    "precision": train.resolve_precision(cfg.precision).as_dict(),
                    "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                                 "top_p": cfg.top_p, "seed": cfg.seed, "engine": cfg.engine}})
    if cfg.output_dir and accelerator.is_main_process:
        out = Path(cfg.output_dir)
        summary["output_dir"] = cfg.output_dir
        train.write_text_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        plot(out, rows, summary, ("candidate", "baseline"))
        train.write_json_atomic(out / "eval.json", summary)  # last: its presence marks a complete evaluation
    if lock is not None:
        lock.release()
    log.info("win rate %.3f [%.3f, %.3f] (%d wins, %d ties, %d losses of %d); length-controlled %s; "
             "mean reward %.4f vs %.4f; KL %s; length %.1f vs %.1f tokens",
             summary["win_rate"], *summary["win_rate_ci95"], summary["wins"], summary["ties"], summary["losses"],
             summary["n"], show(summary["lc_win_rate"]), summary["reward_candidate"], summary["reward_baseline"],
             show(summary["kl"]), summary["length_candidate"]["mean"], summary["length_baseline"]["mean"])
    return summary


# What an evaluation writes in its folder: overwrite=true replaces these and nothing else.
EVAL_FILES = ("eval.json", "samples.jsonl", "rewards.png", "kl_vs_reward.png", "lengths.png")


def check_output_dir(cfg: EvalConfig) -> None:
    """The output folder is new, empty, or (with overwrite=true) holds an evaluation of ours no one is writing."""
    if not cfg.output_dir:
        return
    out = Path(cfg.output_dir)
    train.check_output_dir(out, "evaluate.output_dir")
    if train.holds_files(out):
        if not (out / "eval.json").is_file():
            raise ConfigError(f"evaluate.output_dir={out} holds files that are not an align evaluation; choose a new "
                              f"or empty folder (nothing in it was touched)")
        if not cfg.overwrite:
            raise ConfigError(f"evaluate.output_dir={out} already holds an evaluation; pass --overwrite "
                              f"(overwrite=true) to replace it, or choose another folder")
    train.FolderLock(out).refuse_if_held("evaluate.output_dir")


def claim_output_dir(cfg: EvalConfig, is_main: bool) -> Optional[train.FolderLock]:
    """Create and lock the output folder (main process), clearing an earlier evaluation's files first, so that an
    interrupted overwrite never looks complete."""
    if not cfg.output_dir or not is_main:
        return None
    out = Path(cfg.output_dir)
    lock = train.FolderLock(out)
    train.make_dir(out, "evaluate.output_dir")
    lock.acquire()
    if cfg.overwrite:
        train.clear_entries(out, EVAL_FILES, "earlier evaluation")
    return lock


# --------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> EvalConfig:
    """Flags (the common case) or a recipe with key=value overrides (every EvalConfig key)."""
    if argv and not argv[0].startswith("-"):
        from .config import parse_cli

        cfg = parse_cli(EvalConfig, argv, "python -m align.evaluate")
        cfg.check_complete(argv[0] if "=" not in argv[0] else "overrides")
        return cfg
    ap = argparse.ArgumentParser(prog="python -m align.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="the candidate policy (folder, adapter folder, .gguf, pkg:)")
    ap.add_argument("--baseline", required=True, help="the policy it is compared with (same tokenizer)")
    judge = ap.add_mutually_exclusive_group(required=True)
    judge.add_argument("--reward-model", help="a reward-model folder (align.rm's or any sequence classifier)")
    judge.add_argument("--rule", help="a rule from reward_models/rules.py: gsm8k_exact, length, regex")
    ap.add_argument("--rule-args", default="{}", help='the rule\'s arguments as JSON, e.g. \'{"data": "FILE"}\'')
    ap.add_argument("--prompts", required=True, help="a prompt-bearing file (.jsonl/.json/.parquet) or dataset")
    ap.add_argument("--format", default="auto", help="the prompts' record format (default: detected)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many records first")
    ap.add_argument("--n", type=int, default=None, help="use at most this many records (after --offset)")
    ap.add_argument("--out", default=None, help="folder for eval.json, samples.jsonl and the plots (new or empty)")
    ap.add_argument("--overwrite", action="store_true", help="replace the evaluation an --out folder already holds")
    defaults = EvalConfig()
    for name in ("max_new_tokens", "temperature", "top_p", "seed", "max_prompt_length", "tie_margin",
                 "generation_batch_size", "micro_batch_size", "engine"):
        value = getattr(defaults, name)
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = ap.parse_args(argv)
    try:
        rule_args = json.loads(args.rule_args)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--rule-args: not JSON ({err.msg})") from None
    overrides = {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_p", "seed",
                                                        "max_prompt_length", "tie_margin", "generation_batch_size",
                                                        "micro_batch_size", "engine")}
    layer = {
        "policy": args.policy, "baseline": args.baseline, "output_dir": args.out, "overwrite": args.overwrite,
        "reward": {"model": args.reward_model, "rule": args.rule, "rule_args": rule_args},
        "prompts": {"path": args.prompts, "format": args.format, "offset": args.offset, "limit": args.n},
        **overrides,
    }
    return load_config(EvalConfig, layers=[layer], where="align.evaluate")


def cli() -> None:
    try:
        cfg = parse_args(sys.argv[1:])
        summary = main(cfg)
    except AlignError as err:  # a bad recipe, bad data (DataError), a stopped run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: an evaluation writes its files at the end, so nothing was written", file=sys.stderr)
        sys.exit(130)
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}))


if __name__ == "__main__":
    cli()
