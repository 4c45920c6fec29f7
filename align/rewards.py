"""The reward of a (prompt, response) pair, for PPO, GRPO and evaluation: a reward model, a rule, your own function,
or a weighted sum of several (`reward.terms`), each term kept apart for logging.

    reward = load_reward(cfg.reward, device)                   # cfg.reward: align.config.RewardConfig
    total, terms = reward.score_terms(prompts, responses)      # [n] weighted sum; {name: [n] unweighted score}

A YAML reward of two terms, correctness plus a small bonus for ending on a GSM8K answer line:

    reward:
      terms:
        - {rule: math_answer, rule_args: {data: data/gsm8k_400.jsonl}}
        - {rule: regex, rule_args: {pattern: "####\\s*-?[\\d,.]+\\s*$"}, weight: 0.2}

A function term, `function: my_rewards:brevity`, is imported from the working folder or the Python path (never
executed from a file path) and called as brevity(prompts, responses, **rule_args): prompts are chat message lists,
responses strings, and it returns one finite number per response (a list, tuple, tensor or array).
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import models
from .config import AlignError, ConfigError, RewardConfig, RewardTerm, reward_name


@dataclass
class Term:
    name: str
    weight: float
    scorer: Any  # score(prompts, responses) -> [n]: a rule, a RewardScorer or a FunctionReward
    at: str  # the config key it came from, for errors


class Reward:
    """A weighted sum of terms; score() is the sum, score_terms() the sum and each term's own score."""

    def __init__(self, terms: list[Term]):
        if not terms:
            raise ValueError("a reward needs at least one term")
        self.terms = terms

    def score_terms(self, prompts: Sequence, responses: Sequence) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """([n] float32 weighted sum, {name: [n] float32 unweighted score}), on the CPU."""
        n = len(responses)
        scores = {}
        for term in self.terms:
            s = term.scorer.score(prompts, responses)
            if not isinstance(s, torch.Tensor) or s.shape != (n,):
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise AlignError(f"{term.at} ({term.name}) gave scores of shape {shape} for {n} responses")
            scores[term.name] = s.detach().float().cpu()
        total = sum(term.weight * scores[term.name] for term in self.terms)
        return total, scores

    def score(self, prompts: Sequence, responses: Sequence) -> torch.Tensor:
        return self.score_terms(prompts, responses)[0]


class FunctionReward:
    """A `module:function` reward: fn(prompts, responses, **kwargs) -> one finite number per response."""

    def __init__(self, fn: Callable, ref: str, kwargs: dict[str, Any], at: str):
        self.fn, self.ref, self.kwargs, self.at = fn, ref, dict(kwargs), at
        self.name = ref.split(":")[-1]

    def score(self, prompts: Sequence, responses: Sequence) -> torch.Tensor:
        out = self.fn(list(prompts), list(responses), **self.kwargs)
        return as_scores(out, len(responses), f"{self.at}.function={self.ref}")


def as_scores(out: Any, n: int, what: str) -> torch.Tensor:
    """A function's result as [n] float32, or an AlignError of one line saying what is wrong with it."""
    if isinstance(out, (torch.Tensor, np.ndarray)):
        if out.ndim != 1:
            raise AlignError(f"{what} returned an array of shape {tuple(out.shape)}; expected one number per "
                             f"response ({n})")
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise AlignError(f"{what} returned {type(out).__name__}; expected a list of one number per response ({n})")
    if len(out) != n:
        raise AlignError(f"{what} returned {len(out)} scores for {n} responses")
    values = []
    for i, v in enumerate(out):
        if isinstance(v, np.generic) or (isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0):
            v = v.item()
        if not isinstance(v, numbers.Real):  # bool and numpy scalars are Real; str, None, lists are not
            raise AlignError(f"{what} returned a non-number for response {i}: {_short(repr(v))} "
                             f"({type(v).__name__})")
        if not math.isfinite(v):
            raise AlignError(f"{what} returned {v} for response {i}; scores must be finite numbers")
        values.append(float(v))
    return torch.tensor(values, dtype=torch.float32)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def import_function(ref: str, at: str) -> Callable:
    """`module:function` (the function may be dotted: `module:Class.method`), imported as `python -m` would find
    it: the working folder first, then the Python path."""
    module_name, _, attr = ref.partition(":")
    key = f"{at}.function={ref}"
    if not module_name or not attr:
        raise ConfigError(f"{key}: expected module:function, e.g. my_rewards:score")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path  # "" in sys.path is the working folder already
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(f"{key}: no module named {err.name!r} in the working folder ({cwd}) or on the Python "
                              f"path") from None
        raise ConfigError(f"{key}: importing {module_name} failed: {_short(str(err), 200)}") from None
    except Exception as err:  # the user's module raised while importing: say so in one line
        raise ConfigError(f"{key}: importing {module_name} failed: {type(err).__name__}: "
                          f"{_short(str(err), 200)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            where = getattr(module, "__file__", None) or module_name
            raise ConfigError(f"{key}: {where} has no {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{key}: {attr} is not callable ({type(fn).__name__})")
    return fn


def _load_term(node: RewardConfig | RewardTerm, device, at: str) -> Any:
    """The scorer of one source: a rule, a function or a reward-model folder."""
    if node.rule is not None:
        from reward_models.rules import load_rule

        try:
            return load_rule(node.rule, **node.rule_args)
        except (ValueError, TypeError, OSError, re.error) as err:  # re.error: a regex rule's bad pattern
            raise ConfigError(f"{at}.rule={node.rule}: {err}") from None
    if node.function is not None:
        return FunctionReward(import_function(node.function, at), node.function, node.rule_args, at)
    from reward_models.model import RewardScorer

    folder = Path(models.resolve(node.model))
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{at}.model={node.model}: no reward model there ({folder / 'config.json'} not "
                          f"found); train one with `python -m align.rm RECIPE.yaml` or name a sequence-classification "
                          f"model folder")
    return RewardScorer(folder, device=str(device), max_length=node.max_length)


def load_reward(cfg: RewardConfig, device, at: str = "reward") -> Reward:
    """The reward a config describes: one source (model, rule or function) as a one-term Reward of weight 1, or
    `terms` as their weighted sum. Errors are ConfigErrors naming the key (`reward.terms[1].function=...`)."""
    if not cfg.terms:
        return Reward([Term(reward_name(cfg), 1.0, _load_term(cfg, device, at), at)])
    terms = []
    for i, node in enumerate(cfg.terms):
        where = f"{at}.terms[{i}]"
        if not math.isfinite(node.weight):
            raise ConfigError(f"{where}.weight={node.weight}: must be a finite number")
        terms.append(Term(reward_name(node), float(node.weight), _load_term(node, device, where),
                          where))
    return Reward(terms)


def score_terms(reward, prompts: Sequence, texts: Sequence[str], accelerator) -> tuple[torch.Tensor, dict]:
    """([n] float32 reward, {name: [n] float32 term score}) for prompts (with .messages) and decoded responses; a
    reward model scores under the run's autocast precision, like the policy. A bare scorer (a rule, a
    RewardScorer) counts as one term named by its `name`."""
    messages = [p.messages for p in prompts]
    with accelerator.autocast():
        if isinstance(reward, Reward):
            return reward.score_terms(messages, list(texts))
        total = reward.score(messages, list(texts)).float()
    return total, {getattr(reward, "name", "reward"): total}


def score(reward, prompts: Sequence, texts: Sequence[str], accelerator) -> torch.Tensor:
    """[n] float32 rewards; a reward model scores under the run's autocast precision, like the policy."""
    return score_terms(reward, prompts, texts, accelerator)[0]


def describe(cfg: RewardConfig) -> str:
    """The reward in a few words, for logs and reports: `rule:length`, `function:m:f`, the model folder, or the
    weighted sum of the terms."""
    def one(node) -> str:
        if node.model is not None:
            return node.model
        return f"rule:{node.rule}" if node.rule is not None else f"function:{node.function}"

    if cfg.terms:
        return " + ".join(f"{t.weight:g} x {t.name or one(t)}" for t in cfg.terms)
    return one(cfg)
