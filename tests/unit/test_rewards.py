"""align.rewards: weighted terms, functions by reference and their errors, scoring under the run's autocast."""

from __future__ import annotations

import contextlib
import re
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from align import rewards
from align.config import AlignError, ConfigError, RewardConfig, RewardTerm

PROMPTS = [[{"role": "user", "content": "What is 6 x 7?"}], [{"role": "user", "content": "Half of 5?"}]]
RESPONSES = ["6 x 7 = 42\n#### 42", "It is 2.5"]


@dataclass
class Prompt:  # what the recipes pass: anything with .messages
    messages: list


class Accelerator:
    """Counts autocast entries and says whether scoring is inside one."""

    def __init__(self):
        self.inside = False
        self.entered = 0

    @contextlib.contextmanager
    def autocast(self):
        self.inside, self.entered = True, self.entered + 1
        try:
            yield
        finally:
            self.inside = False


def user_module(tmp_path, monkeypatch, source: str) -> str:
    """A module of the user's in tmp_path, importable by a name unique to the test."""
    name = "user_rewards_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_weighted_terms_sum_and_each_term_is_reported_unweighted():
    cfg = RewardConfig(terms=[
        RewardTerm(rule="regex", rule_args={"pattern": r"####\s*-?[\d,.]+\s*$"}, weight=0.5),
        RewardTerm(rule="length", rule_args={"per_char": 1.0}, weight=-0.25, name="len"),
    ])
    reward = rewards.load_reward(cfg, "cpu")
    total, terms = reward.score_terms(PROMPTS, RESPONSES)
    assert list(terms) == ["regex", "len"]
    assert terms["regex"].tolist() == [1.0, 0.0]
    assert terms["len"].tolist() == [18.0, 9.0]  # len("6 x 7 = 42\n#### 42"), len("It is 2.5")
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, torch.tensor([0.5 * 1 - 0.25 * 18, 0.5 * 0 - 0.25 * 9]))
    torch.testing.assert_close(reward.score(PROMPTS, RESPONSES), total)


def test_single_source_is_one_term_of_weight_one_named_after_its_source(tmp_path, monkeypatch):
    module = user_module(tmp_path, monkeypatch, """
        def brevity(prompts, responses):
            return [-len(r) / 10 for r in responses]
    """)
    rule = rewards.load_reward(RewardConfig(rule="regex", rule_args={"pattern": "####"}), "cpu")
    fn = rewards.load_reward(RewardConfig(function=f"{module}:brevity"), "cpu")
    assert [(t.name, t.weight) for t in rule.terms] == [("regex", 1.0)]
    assert [(t.name, t.weight) for t in fn.terms] == [("brevity", 1.0)]
    total, terms = fn.score_terms(PROMPTS, RESPONSES)
    torch.testing.assert_close(total, torch.tensor([-1.8, -0.9]))
    assert torch.equal(terms["brevity"], total)
    assert rule.score(PROMPTS, RESPONSES).tolist() == [1.0, 0.0]


def test_function_by_reference_gets_message_lists_strings_and_rule_args(tmp_path, monkeypatch):
    module = user_module(tmp_path, monkeypatch, """
        calls = []

        def exact(prompts, responses, answer, bonus=0.0):
            calls.append((prompts, responses))
            return [float(r.endswith(answer)) + bonus for r in responses]
    """)
    cfg = RewardConfig(function=f"{module}:exact", rule_args={"answer": "42", "bonus": 0.5})
    reward = rewards.load_reward(cfg, "cpu")
    accelerator = Accelerator()
    total, terms = rewards.score_terms(reward, [Prompt(m) for m in PROMPTS], RESPONSES, accelerator)
    assert total.tolist() == [1.5, 0.5] and terms["exact"].tolist() == [1.5, 0.5]
    assert sys.modules[module].calls == [(PROMPTS, RESPONSES)]
    assert rewards.score(reward, [Prompt(m) for m in PROMPTS], RESPONSES, accelerator).tolist() == [1.5, 0.5]
    assert accelerator.entered == 2


def test_scoring_runs_under_the_accelerators_autocast(tmp_path, monkeypatch):
    accelerator = Accelerator()
    module = user_module(tmp_path, monkeypatch, "def inside(prompts, responses, acc):\n"
                                                "    return [float(acc.inside)] * len(responses)\n")
    reward = rewards.load_reward(RewardConfig(function=f"{module}:inside", rule_args={"acc": accelerator}), "cpu")
    assert rewards.score(reward, [Prompt(m) for m in PROMPTS], RESPONSES, accelerator).tolist() == [1.0, 1.0]
    assert not accelerator.inside


@pytest.mark.parametrize("result", [
    "torch.tensor([1.0, 2.0], dtype=torch.float64)",
    "np.array([1, 2])",
    "(1, 2.0)",
    "[np.float32(1.0), torch.tensor(2.0)]",
    "[True, 2]",
])
def test_function_may_return_any_sequence_of_numbers(tmp_path, monkeypatch, result):
    module = user_module(tmp_path, monkeypatch, f"""
        import numpy as np
        import torch

        def f(prompts, responses):
            return {result}
    """)
    scores = rewards.load_reward(RewardConfig(function=f"{module}:f"), "cpu").score(PROMPTS, RESPONSES)
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(("result", "message"), [
    ("[1.0]", "returned 1 scores for 2 responses"),
    ("[1.0, 2.0, 3.0]", "returned 3 scores for 2 responses"),
    ("[1.0, float('nan')]", "returned nan for response 1; scores must be finite"),
    ("np.array([np.inf, 0.0])", "returned inf for response 0; scores must be finite"),
    ("['0.5', 1.0]", "returned a non-number for response 0: '0.5' (str)"),
    ("[1.0, None]", "returned a non-number for response 1: None (NoneType)"),
    ("'1.0, 2.0'", "returned str; expected a list of one number per response (2)"),
    ("3.0", "returned float; expected a list"),
    ("torch.zeros(2, 1)", "returned an array of shape (2, 1)"),
])
def test_bad_function_outputs_give_one_line_errors_naming_the_function(tmp_path, monkeypatch, result, message):
    module = user_module(tmp_path, monkeypatch, f"""
        import numpy as np
        import torch

        def f(prompts, responses):
            return {result}
    """)
    cfg = RewardConfig(terms=[RewardTerm(rule="length"), RewardTerm(function=f"{module}:f")])
    reward = rewards.load_reward(cfg, "cpu")
    with pytest.raises(AlignError) as err:
        reward.score(PROMPTS, RESPONSES)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"reward.terms[1].function={module}:f returned") and message in text


@pytest.mark.parametrize(("source", "attr", "message"), [
    (None, "f", "no module named '{module}' in the working folder"),
    ("x = 1\n", "missing", "has no 'missing'"),
    ("x = 1\n", "x", "x is not callable (int)"),
    ("raise RuntimeError('boom\\nsecond line')\n", "f", "importing {module} failed: RuntimeError: boom second line"),
    ("import not_installed_dependency_xyz\n", "f", "importing {module} failed: No module named "
                                                    "'not_installed_dependency_xyz'"),
    ("def f(:\n", "f", "importing {module} failed: SyntaxError"),
])
def test_bad_function_references_are_config_errors_naming_the_key(tmp_path, monkeypatch, source, attr, message):
    module = user_module(tmp_path, monkeypatch, source or "")
    if source is None:
        (tmp_path / f"{module}.py").unlink()
    cfg = RewardConfig(terms=[RewardTerm(rule="length"), RewardTerm(function=f"{module}:{attr}")])
    with pytest.raises(ConfigError) as err:
        rewards.load_reward(cfg, "cpu")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"reward.terms[1].function={module}:{attr}: ") and message.format(module=module) in text


def test_function_module_is_found_in_the_working_folder_as_python_m_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    name = "cwd_rewards_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / f"{name}.py").write_text("def one(prompts, responses):\n    return [1] * len(responses)\n")
    before = list(sys.path)
    reward = rewards.load_reward(RewardConfig(function=f"{name}:one"), "cpu")
    assert reward.score(PROMPTS, RESPONSES).tolist() == [1.0, 1.0]
    assert sys.path == before  # the working folder was on the path for the import only


def test_rule_and_model_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^reward\.rule=bleu: unknown rule 'bleu'"):
        rewards.load_reward(RewardConfig(rule="bleu"), "cpu")
    with pytest.raises(ConfigError, match=r"^reward\.terms\[0\]\.rule=regex: "):
        rewards.load_reward(RewardConfig(terms=[RewardTerm(rule="regex", rule_args={"pattern": "("})]), "cpu")
    with pytest.raises(ConfigError, match=r"^evaluate\.reward\.rule=gsm8k_exact: .*missing\.jsonl"):
        rewards.load_reward(RewardConfig(rule="gsm8k_exact", rule_args={"data": str(tmp_path / "missing.jsonl")}),
                            "cpu", at="evaluate.reward")
    with pytest.raises(ConfigError, match=re.escape(f"reward.terms[0].model={tmp_path}: no reward model there")):
        rewards.load_reward(RewardConfig(terms=[RewardTerm(model=str(tmp_path))]), "cpu")


def test_non_finite_weight_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^reward\.terms\[0\]\.weight=nan: must be a finite number"):
        rewards.load_reward(RewardConfig(terms=[RewardTerm(rule="length", weight=float("nan"))]), "cpu")


def test_a_bare_scorer_counts_as_one_term():
    from reward_models.rules import RegexReward

    total, terms = rewards.score_terms(RegexReward("####"), [Prompt(m) for m in PROMPTS], RESPONSES, Accelerator())
    assert total.tolist() == [1.0, 0.0] and list(terms) == ["regex"]


def test_as_scores_rejects_what_is_not_one_finite_number_per_response():
    assert rewards.as_scores(np.array([0.5, -1]), 2, "f").tolist() == [0.5, -1.0]
    with pytest.raises(AlignError, match="^f returned 0 scores for 1 responses$"):
        rewards.as_scores([], 1, "f")
    with pytest.raises(AlignError, match="non-number for response 0"):
        rewards.as_scores([1 + 2j], 1, "f")
