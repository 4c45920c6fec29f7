"""The forgetting check: what a policy stage may have cost the model outside the data it trained on.

    check = forgetting.Check(cfg.forgetting, tokenizer, accelerator, run.dir, cfg.seed)   # reads and checks the data
    check.before(model, schedule.start)   # the starting model, kept in output_dir/forgetting_before.json
    ...train...
    report["forgetting"] = check.after(model)

Measured on the starting model and again on the trained one (`forgetting:` in sft, dpo, ppo and grpo recipes):

    text loss       token-mean negative log-likelihood of general text the model was not trained on (by default
                    data/general_reference.jsonl, replies from OpenAssistant conversations; see data/README.md), and
                    its perplexity. The rise is a paired difference over the same records: rise = sum_i (a_i - b_i) /
                    sum_i n_i, with b_i, a_i record i's summed NLL before and after and n_i its token count. Its 95%
                    interval is rise +- 1.96 SE, the SE of this ratio of means by the delta method over records:
                    sd_i(n_i (d_i - rise)) / (mean(n) sqrt(m)), d_i = (a_i - b_i) / n_i, m records.
    KL from start   KL(start || trained) on general prompts, with no second model in memory: before training, the
                    starting model samples one response y_i per prompt (temperature 1, each row from its own seeded
                    generator, `max_new_tokens`) and its log-prob log p_start(y_i) is kept; after, the trained model
                    scores the same tokens. k_i = log p_start(y_i) - log p_trained(y_i) (nats per response, summed over
                    its tokens) is an unbiased sample of the sequence KL; the value is mean_i k_i, the 95% interval
                    mean +- 1.96 sd(k) / sqrt(m). (One sample per prompt: a single k_i can be negative, the mean
                    estimates a non-negative number.)
    exact match     (with `exact_match`) accuracy of greedy answers to question/answer records, the final number
                    compared with the reference's (reward_models.rules.final_answer, as gsm8k_exact does). The drop is
                    before - after, paired per question: d_i in {-1, 0, 1}. Its 95% interval is Wilson's on the
                    outcomes (d_i + 1) / 2 in [0, 1], mapped back (as align.evaluate does for win rates with ties): a
                    normal interval would have zero width whenever no answer changed, the common case.

Flags (one line each in result["flags"]): the text loss rises by more than `max_loss_rise` and its interval excludes
0; the KL exceeds `max_kl` (when set); accuracy drops by more than `max_accuracy_drop`. Exactly at a threshold is not
a flag.

Everything the after-measurement needs from the starting model (per-record NLL sums and token counts, the sampled
token ids and their log-probs, the per-question outcomes) is in output_dir/forgetting_before.json, so a resumed run
needs neither the starting model nor a second copy of it. Measuring consumes no random numbers of the run (the
sampler has its own generators and the global state is restored), so enabling the check does not change training.
Under several processes every process does the same forwards on the whole (small) sets: sharded models (FSDP,
ZeRO-3) need every process in every forward.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import data, formats, models, rollout
from .config import ConfigError, DataSource, ForgettingConfig
from .formats import DataError, Origin

log = logging.getLogger("align")

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "general_reference.jsonl"
BEFORE_FILE = "forgetting_before.json"
FILE_VERSION = 1
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
DEFAULT_TEXTS, DEFAULT_PROMPTS = 32, 16
"""How much of the shipped file a check uses when `forgetting.text` / `forgetting.prompts` are null: its first 32
records for the loss and its first 16 prompts for the KL, which keeps one check (before and after) on SmolLM2-135M
under a minute on 2 CPU cores (forward passes over every text token twice, sampling, scoring the samples twice; see
data/README.md for the figure). Name the file in `text` / `prompts` to use all of it."""


# --------------------------------------------------------------------------------------------------------------
# Statistics: pure functions of per-record numbers


def mean_ci(values: Sequence[float]) -> tuple[float, list[float]]:
    """Mean and its 95% normal interval, mean +- 1.96 sd / sqrt(n) (sd with n - 1)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("an interval needs at least 2 values")
    mean, half = float(x.mean()), Z95 * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, [mean - half, mean + half]


def loss_rise(nll_before: Sequence[float], nll_after: Sequence[float], tokens: Sequence[int]
              ) -> tuple[float, list[float]]:
    """The rise of the token-mean loss over the same records, sum(after - before) / sum(tokens), and its 95% interval
    (delta method for a ratio of means over records; see the module docstring)."""
    b, a, n = (np.asarray(v, dtype=np.float64) for v in (nll_before, nll_after, tokens))
    if len(n) < 2:
        raise ValueError("an interval needs at least 2 records")
    rise = float((a - b).sum() / n.sum())
    z = ((a - b) - rise * n) / n.mean()  # linearised contribution of each record to the ratio
    half = Z95 * float(z.std(ddof=1)) / math.sqrt(len(n))
    return rise, [rise - half, rise + half]


def accuracy_drop(correct_before: Sequence[int], correct_after: Sequence[int]) -> tuple[float, list[float]]:
    """before - after accuracy over the same questions, and its 95% interval (Wilson's on the paired outcomes; see
    the module docstring)."""
    from .evaluate import wilson_interval

    d = np.asarray(correct_before, dtype=np.float64) - np.asarray(correct_after, dtype=np.float64)
    if len(d) < 2:
        raise ValueError("an interval needs at least 2 questions")
    lo, hi = wilson_interval(float(((d + 1) / 2).mean()), len(d))
    return float(d.mean()), [2 * lo - 1, 2 * hi - 1]


def flags(result: dict, cfg: ForgettingConfig) -> list[str]:
    """One line per threshold the result crosses (strictly), naming the number and the setting."""
    out = []
    loss = result["text_loss"]
    if loss["rise"] > cfg.max_loss_rise and loss["ci95"][0] > 0:
        out.append(f"general-text loss rose by {loss['rise']:.4f} nats/token (95% CI {loss['ci95'][0]:.4f} to "
                   f"{loss['ci95'][1]:.4f}; {loss['before']:.4f} -> {loss['after']:.4f}), more than "
                   f"forgetting.max_loss_rise={cfg.max_loss_rise}")
    kl = result["kl_from_start"]
    if cfg.max_kl is not None and kl["value"] > cfg.max_kl:
        out.append(f"KL from the starting model on general prompts is {kl['value']:.4f} nats per response (95% CI "
                   f"{kl['ci95'][0]:.4f} to {kl['ci95'][1]:.4f}), more than forgetting.max_kl={cfg.max_kl}")
    em = result.get("exact_match")
    if em is not None and em["drop"] > cfg.max_accuracy_drop:
        out.append(f"exact-match accuracy fell by {em['drop']:.4f} ({em['before']:.4f} -> {em['after']:.4f}, 95% CI "
                   f"of the drop {em['ci95'][0]:.4f} to {em['ci95'][1]:.4f}), more than "
                   f"forgetting.max_accuracy_drop={cfg.max_accuracy_drop}")
    return out


def summarize(before: dict, after: dict, cfg: ForgettingConfig) -> dict:
    """The result (report.json["forgetting"]) from the per-record measurements of the two models: `before` as kept in
    forgetting_before.json, `after` with the same keys' numbers for the trained model."""
    tokens = before["text"]["tokens"]
    nll_b, nll_a = before["text"]["nll"], after["text"]["nll"]
    loss_b, loss_a = sum(nll_b) / sum(tokens), sum(nll_a) / sum(tokens)
    rise, rise_ci = loss_rise(nll_b, nll_a, tokens)
    kl, kl_ci = mean_ci([s - t for s, t in zip(before["kl"]["logprob"], after["kl"]["logprob"])])
    result = {
        "text_loss": {"before": loss_b, "after": loss_a, "rise": rise, "ci95": rise_ci},
        "text_ppl": {"before": math.exp(min(loss_b, 50.0)), "after": math.exp(min(loss_a, 50.0))},
        "kl_from_start": {"value": kl, "ci95": kl_ci},
    }
    if "exact_match" in before:
        right_b, right_a = before["exact_match"]["correct"], after["exact_match"]["correct"]
        drop, drop_ci = accuracy_drop(right_b, right_a)
        result["exact_match"] = {"before": float(np.mean(right_b)), "after": float(np.mean(right_a)), "drop": drop,
                                 "ci95": drop_ci, "questions": len(right_b)}
    result["records"], result["prompts"] = len(tokens), len(before["kl"]["logprob"])
    result["flags"] = flags(result, cfg)
    result["flagged"] = bool(result["flags"])
    return result


def summary(result: Optional[dict]) -> str:
    """One line for the log: before -> after of each measure, then the flags."""
    if not result:
        return "not measured"
    loss, kl = result["text_loss"], result["kl_from_start"]
    parts = [f"general-text loss {loss['before']:.4f} -> {loss['after']:.4f} (rise {loss['rise']:+.4f}, 95% CI "
             f"{loss['ci95'][0]:+.4f} to {loss['ci95'][1]:+.4f}; {result['records']} records)",
             f"KL from start {kl['value']:.4f} (95% CI {kl['ci95'][0]:.4f} to {kl['ci95'][1]:.4f}; "
             f"{result['prompts']} prompts)"]
    if "exact_match" in result:
        em = result["exact_match"]
        parts.append(f"exact match {em['before']:.3f} -> {em['after']:.3f}")
    parts.append("FLAGGED: " + "; ".join(result["flags"]) if result["flagged"] else "no forgetting flagged")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Question:
    prompt_ids: list[int]
    answer: str  # the reference's final number, normalised
    origin: Optional[Origin] = None


def shipped(at: str, fmt: str, limit: int) -> DataSource:
    """The first `limit` records of the shipped file, read as `fmt` (it has both a text and a prompt field)."""
    if not SHIPPED.is_file():
        raise ConfigError(f"{at} is null, which means the file that ships with align, {SHIPPED}, and it is missing; "
                          f"set {at} to a file of your own")
    return DataSource(path=str(SHIPPED), format=fmt, limit=limit)


def load_text(source: DataSource, tokenizer, max_length: int) -> list[data.Tokenized]:
    """General text: `text` records (loss on every token) or any conversation format (loss on its assistant turns),
    cut to max_length tokens."""
    out = []
    for ex in formats.load_examples(source, "sft"):
        tok = data.truncate(data.tokenize_sft_example(ex, tokenizer, "assistant"), max_length, "right")
        if tok.num_targets:
            out.append(tok)
    return out


def load_prompts(source: DataSource, tokenizer, max_length: int) -> list[data.Prompt]:
    examples = formats.load_examples(source, "prompt")
    template = data.resolve_policy_template(tokenizer, "auto")
    return data.tokenize_prompts(examples, tokenizer, template, max_length, "left")[0]


def load_questions(source: DataSource, tokenizer, max_length: int) -> list[Question]:
    """Question/answer records (any conversation format): the turns before the last assistant turn are the prompt,
    the final number of that turn is the reference."""
    from reward_models.rules import final_answer

    template = data.resolve_policy_template(tokenizer, "auto")
    out = []
    for ex in formats.load_examples(source, "sft"):
        if ex.messages is None:
            raise DataError(f"{ex.origin}: field 'text': forgetting.exact_match needs question/answer records")
        *prompt, last = ex.messages
        answer = final_answer(last["content"]) if last["role"] == "assistant" else None
        if answer is None:
            raise DataError(f"{ex.origin}: field 'answer': the reference answer has no number to compare with")
        ids = data.tokenize_prompts([formats.PromptExample(prompt, ex.origin)], tokenizer, template, max_length,
                                    "left")[0][0].ids
        out.append(Question(ids, answer, ex.origin))
    return out


def digest(rows: Sequence[Sequence[int]]) -> str:
    """sha256 of token id lists: a resumed run checks that it measures the same tokens."""
    return hashlib.sha256(json.dumps([list(r) for r in rows]).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Measurements (no gradients; the bare network in eval mode, the run's autocast)


@torch.no_grad()
def text_nll(net, texts: Sequence[data.Tokenized], micro_batch_size: int, accelerator) -> list[float]:
    """Each record's summed negative log-likelihood of its target tokens."""
    out = []
    for chunk in data.chunks(texts, micro_batch_size):
        batch = data.collate(chunk, padding_free=True).to(accelerator.device)
        with accelerator.autocast():
            logits = models.logits_at(net, batch)
        nll = F.cross_entropy(logits.float(), batch.targets, reduction="none").double().cpu()
        out.extend(piece.sum().item() for piece in torch.split(nll, [t.num_targets for t in chunk]))
    return out


@torch.no_grad()
def sequence_logprobs(net, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], micro_batch_size: int,
                      accelerator) -> list[float]:
    """log p(response | prompt) of each pair, summed over the response's tokens (temperature 1)."""
    out = []
    for ids in data.chunks(range(len(prompt_ids)), micro_batch_size):
        seqs = [data.Tokenized(prompt_ids[i] + response_ids[i], [False] * len(prompt_ids[i]) +
                               [True] * len(response_ids[i])) for i in ids]
        with accelerator.autocast():
            logps = models.response_logprobs(net, seqs, 1.0, 0, accelerator.device)[0].double().cpu()
        out.extend(piece.sum().item() for piece in torch.split(logps, [len(response_ids[i]) for i in ids]))
    return out


def generate(net, tokenizer, prompt_ids: Sequence[list[int]], sampling: rollout.Sampling, batch_size: int,
             accelerator, seeds: Optional[list[int]] = None) -> list[list[int]]:
    engine = rollout.HFEngine(net, tokenizer, batch_size, accelerator.autocast)
    return engine.generate(prompt_ids, sampling, seeds).response_ids


class Check:
    """The forgetting check of one run (see the module docstring). Reads and checks its data when built, so bad input
    stops the run before its folder is created."""

    def __init__(self, cfg: ForgettingConfig, tokenizer, accelerator, run_dir: str | Path, seed: int):
        self.cfg, self.tokenizer, self.accelerator, self.seed = cfg, tokenizer, accelerator, seed
        self.path = Path(run_dir) / BEFORE_FILE
        text_source = cfg.text or shipped("forgetting.text", "text", DEFAULT_TEXTS)
        prompt_source = cfg.prompts or shipped("forgetting.prompts", "prompt", DEFAULT_PROMPTS)
        self.texts = load_text(text_source, tokenizer, cfg.max_length)
        self.prompts = [p.ids for p in load_prompts(prompt_source, tokenizer, cfg.max_length)]
        self.questions = (load_questions(cfg.exact_match, tokenizer, cfg.max_length)
                          if cfg.exact_match is not None else [])
        for what, items, source in (("text records", self.texts, text_source),
                                    ("prompts", self.prompts, prompt_source),
                                    ("questions", self.questions, cfg.exact_match)):
            if source is not None and len(items) < 2:
                raise DataError(f"{source.path}: the forgetting check needs at least 2 {what} (for an interval); "
                                f"found {len(items)}")
        self.digests = {"text": digest([t.input_ids for t in self.texts]), "prompts": digest(self.prompts),
                        "exact_match": digest([q.prompt_ids for q in self.questions])}
        self._before: Optional[dict] = None
        log.info("forgetting check: %d general-text records (%d tokens) from %s, %d prompts from %s%s",
                 len(self.texts), sum(t.num_targets for t in self.texts), text_source.path, len(self.prompts),
                 prompt_source.path, f", {len(self.questions)} exact-match questions from {cfg.exact_match.path}"
                 if self.questions else "")

    def _measure(self, model, responses: Optional[list[list[int]]] = None) -> dict:
        """Per-record numbers of `model`; samples the KL's responses when `responses` is None (the starting model)."""
        from .train import evaluating  # train imports models, which this module imports too

        cfg, acc = self.cfg, self.accelerator
        devices = [acc.device] if torch.device(acc.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices), evaluating(model, acc) as net:
            out = {"text": {"digest": self.digests["text"], "tokens": [t.num_targets for t in self.texts],
                            "nll": text_nll(net, self.texts, cfg.micro_batch_size, acc)}}
            if responses is None:
                seeds = rollout.row_seeds(self.seed, "forgetting", range(len(self.prompts)))
                responses = generate(net, self.tokenizer, self.prompts, rollout.Sampling(cfg.max_new_tokens, 1.0),
                                     cfg.micro_batch_size, acc, seeds)
            out["kl"] = {"digest": self.digests["prompts"], "prompt_ids": self.prompts, "response_ids": responses,
                         "logprob": sequence_logprobs(net, self.prompts, responses, cfg.micro_batch_size, acc)}
            if self.questions:
                from reward_models.rules import final_answer

                answers = generate(net, self.tokenizer, [q.prompt_ids for q in self.questions],
                                   rollout.Sampling(4 * cfg.max_new_tokens, 0.0), cfg.micro_batch_size, acc)
                texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
                out["exact_match"] = {"digest": self.digests["exact_match"],
                                      "correct": [int(final_answer(t) == q.answer)
                                                  for t, q in zip(texts, self.questions)]}
        return out

    def before(self, model, start_step: int) -> Optional[dict]:
        """Measure the starting model (start_step 0) and keep the numbers in output_dir/forgetting_before.json (main
        process); on a resume (start_step > 0) read them back. None when a resumed run has no such file."""
        if start_step == 0:
            self._before = {"version": FILE_VERSION, **self._measure(model)}
            if self.accelerator.is_main_process:
                from .train import write_text_atomic

                write_text_atomic(self.path, json.dumps(self._before) + "\n")  # one line: mostly token ids
            loss = sum(self._before["text"]["nll"]) / sum(self._before["text"]["tokens"])
            log.info("forgetting check before training: general-text loss %.4f (perplexity %.2f)", loss,
                     math.exp(min(loss, 50.0)))
            return self._before
        if not self.path.is_file():
            log.warning("forgetting check: %s is missing, so the starting model's numbers are lost; this resumed run "
                        "reports no forgetting check", self.path)
            return None
        self._before = self.load(self.path)
        return self._before

    def load(self, path: Path) -> dict:
        """forgetting_before.json, checked against this run's data (a resume must measure the same tokens)."""
        try:
            kept = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not readable JSON ({err}); delete it and start the run again") from None
        if kept.get("version") != FILE_VERSION:
            raise DataError(f"{path}: version {kept.get('version')!r}, expected {FILE_VERSION}")
        for part in ("text", "kl", *(["exact_match"] if self.questions else [])):
            recorded = kept.get(part, {}).get("digest")
            current = self.digests["prompts" if part == "kl" else part]
            if recorded != current:
                raise DataError(f"{path}: field '{part}': it was measured on other tokens than this run's forgetting "
                                f"data (the data or the tokenizer changed since the run started)")
        return kept

    def after(self, model) -> Optional[dict]:
        """Measure the trained model on the same records and responses; logs one line (a warning when flagged) and
        returns the result for report.json["forgetting"] (None when before() found nothing to compare with)."""
        if self._before is None:
            return None
        now = self._measure(model, self._before["kl"]["response_ids"])
        result = summarize(self._before, now, self.cfg)
        (log.warning if result["flagged"] else log.info)("forgetting check: %s", summary(result))
        return result
