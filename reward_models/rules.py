"""Programmatic rewards with the same call signature as a learned reward model.

Each rule is an object with a `name` and `score(prompts, responses) -> torch.Tensor` (float32, shape [n]), so PPO and
the evaluator can take either a trained reward model or a rule without caring which:

    rule = load_rule("gsm8k_exact", data="data/gsm8k_400.jsonl")
    rewards = rule.score(prompts, responses)

A prompt is a string or a list of chat messages ({"role", "content"}); a response is a string or a list of messages
whose assistant turns are the text being judged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Union

import torch

from align.formats import check_utf8, open_text
from reward_models.math_answer import Checker

Message = dict[str, Any]
Text = Union[str, list[Message]]

# A number as GSM8K writes it: an optional sign and dollar sign, either strictly grouped thousands ("1,234,567") or a
# plain digit run, then optional decimals. Grouping must be strict so that a list like "3,4" reads as 3 and 4, not 34.
# The minus only counts when it does not follow a word character, so the range "10-5" ends in 5, not -5.
_NUMBER = re.compile(r"(?:(?<!\w)-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def prompt_text(p: Text) -> str:
    """The question a prompt asks: the string itself, or the content of the last user message of a chat (earlier
    turns and the system prompt are context, the last user turn is what is being answered)."""
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        users = [m["content"] for m in p if m.get("role") == "user"]
        if not users:
            raise ValueError(f"prompt has no user message: roles {[m.get('role') for m in p]}")
        return users[-1]
    raise TypeError(f"prompt must be a string or a list of messages, got {type(p).__name__}")


def response_text(r: Text) -> str:
    """The text to judge: the string itself, or the assistant messages' contents joined with newlines (a response
    given as a chat may hold several assistant turns, e.g. after a tool call)."""
    if isinstance(r, str):
        return r
    if isinstance(r, list):
        parts = [m["content"] for m in r if m.get("role") == "assistant"]
        if not parts:
            raise ValueError(f"response has no assistant message: roles {[m.get('role') for m in r]}")
        return "\n".join(parts)
    raise TypeError(f"response must be a string or a list of messages, got {type(r).__name__}")


def _check_lengths(prompts: Sequence[Text], responses: Sequence[Text]) -> None:
    # Silently zipping mismatched lists would pair rewards with the wrong samples.
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")


def _normalise_number(raw: str) -> str:
    """'$1,234.50' -> '1234.5': drop '$' and separators, then let Decimal drop trailing zeros so that equal values
    have equal strings ('72' == '72.00' == '72.')."""
    value = Decimal(raw.replace("$", "").replace(",", ""))
    if value == 0:
        value = Decimal(0)  # "-0" and "0.0" are just 0
    return format(value.normalize(), "f")


def final_answer(text: str) -> str | None:
    """The final numeric answer of a solution, normalised (see `_normalise_number`), or None if there is none.

    GSM8K marks the answer with a last line "#### N", so when "####" is present the first number after the last
    "####" is the answer; otherwise (a free-form model response) the last number in the text is."""
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
    else:
        matches = list(_NUMBER.finditer(text))
        match = matches[-1] if matches else None
    return None if match is None else _normalise_number(match.group(0))


def reference_for(references: dict[str, Any], prompt: Text) -> tuple[str, Any]:
    """The prompt's question and its reference answer; a question without one is a KeyError (a data bug)."""
    question = prompt_text(prompt).strip()
    if question not in references:
        raise KeyError(f"no reference answer for question {question[:60]!r}")
    return question, references[question]


def read_answers(path: str | Path, same_answer: Callable[[str], Any]) -> dict[str, str]:
    """A JSONL file of {"question", "answer"} rows (blank lines skipped) as {question: answer}, questions stripped.
    A question that repeats with an answer whose `same_answer(...)` differs is an error (the reward would depend on
    file order). Errors are ValueErrors (a non-UTF-8 byte: align.formats.DataError, a ValueError) of one line naming
    the file and the line."""
    answers: dict[str, str] = {}
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            check_utf8(path, line, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for field in ("question", "answer"):
                if not isinstance(row.get(field), str):
                    raise ValueError(f"{path}:{lineno}: missing or non-string field {field!r}")
            question = row["question"].strip()
            if question in answers and same_answer(answers[question]) != same_answer(row["answer"]):
                raise ValueError(f"{path}:{lineno}: question {question[:60]!r} repeats with a different answer")
            answers[question] = row["answer"]
    return answers


class GSM8KExactMatch:
    """1.0 when the response's final answer equals the reference's numerically, else 0.0.

    `answers` maps a question to its reference: a full GSM8K worked answer ending in "#### N", or just the number.
    Questions are matched after stripping surrounding whitespace."""

    name = "gsm8k_exact"

    def __init__(self, answers: dict[str, str]):
        self.references: dict[str, str] = {}
        for question, answer in answers.items():
            # Extract once, up front: a reference without a number is a data bug that must not score every
            # response 0.0 silently for the whole run.
            ref = final_answer(answer)
            if ref is None:
                raise ValueError(f"reference answer has no number for question {question.strip()[:60]!r}")
            self.references[question.strip()] = ref

    @classmethod
    def from_file(cls, path: str | Path) -> GSM8KExactMatch:
        """Read a JSONL file of {"question", "answer"} rows; see `read_answers` for its errors."""
        return cls(read_answers(path, final_answer))

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> torch.Tensor:
        _check_lengths(prompts, responses)
        rewards = []
        for prompt, response in zip(prompts, responses):
            _, reference = reference_for(self.references, prompt)
            rewards.append(1.0 if final_answer(response_text(response)) == reference else 0.0)
        return torch.tensor(rewards, dtype=torch.float32)


class MathAnswer:
    r"""1.0 when the response's final answer is mathematically equal to the reference's, else 0.0: "1,000" equals
    "1000", "\boxed{\frac{1}{2}}" equals "0.5", "The answer is 18." equals "#### 18".

    Checked by math-verify (reward_models.math_answer): it reads \boxed{} answers, "the answer is ..." and the last
    expression, and compares with sympy under a timeout; a response it cannot read or check scores 0.0, never an
    error. `answers` maps a question to its reference: a GSM8K worked answer ("... #### 72": the number after the
    last "####"), a MATH solution with \boxed{}, or a bare answer ("72", "\frac{1}{2}"). A response with "####"
    is judged by the first line after its last "####", as gsm8k_exact does. `timeout` bounds each parse and
    comparison, in seconds."""

    name = "math_answer"

    def __init__(self, answers: dict[str, str], timeout: int = 5):
        try:  # now rather than at the first score, minutes into a run
            import math_verify  # noqa: F401
        except ImportError as err:
            raise ValueError(f"math_answer needs the math-verify package (pip install math-verify): {err}") from None
        self.checker = Checker(timeout)
        self.references = {q.strip(): reference_answer(a, q) for q, a in answers.items()}

    @classmethod
    def from_file(cls, path: str | Path, timeout: int = 5) -> MathAnswer:
        """Read a JSONL file of {"question", "answer"} rows; see `read_answers` for its errors."""
        return cls(read_answers(path, lambda a: final_answer(a) if "####" in a else a.strip()), timeout)

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> torch.Tensor:
        _check_lengths(prompts, responses)
        rewards = []
        for prompt, response in zip(prompts, responses):
            question, reference = reference_for(self.references, prompt)
            text = response_text(response)
            if "####" in text:
                text = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
            try:
                equal = self.checker(reference, text)
            except ValueError as err:  # the reference, not the response: a data bug worth stopping for
                raise ValueError(f"question {question[:60]!r}: {err}") from None
            rewards.append(1.0 if equal else 0.0)
        return torch.tensor(rewards, dtype=torch.float32)


def reference_answer(answer: str, question: str = "") -> str:
    """What a reference says the answer is, as text for math-verify: the number after GSM8K's last "####"
    (normalised: "1,080" -> "1080"), else the stripped text (a solution with \\boxed{} or a bare answer)."""
    if "####" in answer:
        number = final_answer(answer)
        if number is None:
            raise ValueError(f"reference answer has no number after '####' for question {question.strip()[:60]!r}")
        return number
    if not answer.strip():
        raise ValueError(f"reference answer is empty for question {question.strip()[:60]!r}")
    return answer.strip()


class LengthReward:
    """A simple shaping reward on response length in characters, mostly for tests and smoke runs.

    With `target=None`: `per_char * len` (the default, negative, is a length penalty; a positive value a bonus).
    With a `target`: `-abs(len - target) / target`, 0 at the target and falling linearly either side."""

    name = "length"

    def __init__(self, target: int | None = None, per_char: float = -0.001):
        if target is not None and target <= 0:
            raise ValueError(f"target must be a positive number of characters, got {target}")
        self.target = target
        self.per_char = per_char

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> torch.Tensor:
        _check_lengths(prompts, responses)
        lengths = [len(response_text(r)) for r in responses]
        if self.target is None:
            rewards = [self.per_char * n for n in lengths]
        else:
            rewards = [-abs(n - self.target) / self.target for n in lengths]
        return torch.tensor(rewards, dtype=torch.float32)


class RegexReward:
    r"""`reward` when `pattern` matches anywhere in the response (re.DOTALL, so "." crosses lines), else `penalty`.

    E.g. `RegexReward(r"#### -?[\d,.]+\s*$")` rewards ending with a GSM8K-style final-answer line."""

    name = "regex"

    def __init__(self, pattern: str, reward: float = 1.0, penalty: float = 0.0):
        self.pattern = re.compile(pattern, re.DOTALL)  # compiling here reports a bad pattern at load time
        self.reward = reward
        self.penalty = penalty

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> torch.Tensor:
        _check_lengths(prompts, responses)
        rewards = [self.reward if self.pattern.search(response_text(r)) else self.penalty for r in responses]
        return torch.tensor(rewards, dtype=torch.float32)


Rule = Union[GSM8KExactMatch, MathAnswer, LengthReward, RegexReward]

RULES: dict[str, type] = {
    "gsm8k_exact": GSM8KExactMatch,
    "math_answer": MathAnswer,
    "length": LengthReward,
    "regex": RegexReward,
}


def load_rule(name: str, **kwargs: Any) -> Rule:
    """Build a rule by registry name. For "gsm8k_exact" and "math_answer", `data=PATH` reads the references from a
    JSONL file of {"question", "answer"} rows; otherwise the keyword arguments go to the rule's constructor."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    if name == "gsm8k_exact" and "data" in kwargs:
        path = kwargs.pop("data")
        if kwargs:
            raise TypeError(f"gsm8k_exact with data= takes no other arguments, got {sorted(kwargs)}")
        return GSM8KExactMatch.from_file(path)
    if name == "math_answer" and "data" in kwargs:
        return MathAnswer.from_file(kwargs.pop("data"), **kwargs)
    return RULES[name](**kwargs)
