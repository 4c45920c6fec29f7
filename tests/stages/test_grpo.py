"""align.grpo (the group-baseline family on align.ppo's loop) end to end on a tiny random model (seconds each)."""

import json
import shutil
import textwrap

import pytest
import torch
import yaml

from align import ppo
from align.config import AlignError, ConfigError, GRPOConfig, PPOConfig, load_config

TINY_GRPO = "recipes/tiny/grpo.yaml"


def run(tmp_path, name, *overrides, cls=GRPOConfig, recipe=TINY_GRPO):
    cfg = load_config(cls, recipe, [f"output_dir={tmp_path / name}", "log.progress=false", *overrides])
    return cfg, ppo.main(cfg)


def rows(folder, key="reward/score"):
    return [r for r in map(json.loads, open(folder / "metrics.jsonl")) if key in r]


@pytest.fixture
def function_recipe(tmp_path, monkeypatch):
    """A user's reward function by reference: prompts whose question has an even length in characters score 0 whatever
    the response (their groups carry no signal), the others by the response's length."""
    (tmp_path / "user_rewards.py").write_text(textwrap.dedent("""
        def half_flat(prompts, responses):
            return [0.0 if len(p[-1]["content"]) % 2 == 0 else 0.01 * len(r) for p, r in zip(prompts, responses)]

        def flat(prompts, responses):
            return [1.0 for _ in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    def recipe(function: str) -> str:
        cfg = yaml.safe_load(open(TINY_GRPO))
        cfg["reward"] = {"function": f"user_rewards:{function}"}
        path = tmp_path / f"grpo_{function}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    return recipe


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_toy_task_mean_reward_rises_within_a_bounded_number_of_iterations(tmp_path, advantage):
    """The length rule pays 0.01 per character: a group baseline alone (no critic) teaches a random 2-layer model to
    pick long tokens in 12 iterations."""
    kl = ["algorithm.kl_penalty=reward"] if advantage == "reinforce_pp_baseline" else []
    _, report = run(tmp_path, advantage, f"algorithm.advantage={advantage}", *kl)
    scores = [r["reward/score"] for r in rows(tmp_path / advantage)]
    assert len(scores) == 12
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.1, scores
    assert report["after"]["reward/val"] > report["before"]["reward/val"] + 0.1
    assert report["critic_init"] is None and not (tmp_path / advantage / "model" / "critic").exists()
    assert report["responses_per_prompt"] == 4 and report["advantage"] == advantage


def test_grpo_defaults_put_a_k3_kl_in_the_loss_and_run_no_critic(tmp_path):
    cfg, report = run(tmp_path, "defaults", "train.max_steps=3", "algorithm.ppo_epochs=1",
                      "algorithm.mini_batch_size=32")
    assert (cfg.algorithm.advantage, cfg.algorithm.kl_penalty, cfg.algorithm.kl_estimator) == ("grpo", "loss", "k3")
    logged = rows(tmp_path / "defaults")
    assert logged[0]["loss/kl"] == 0.0  # the first (only) update of iteration 1 is taken at the reference's weights
    assert logged[-1]["loss/kl"] > 0 and "loss/value" not in logged[-1]
    assert all(r["kl/ref"] >= 0 for r in logged)  # k3 is non-negative
    assert json.loads((tmp_path / "defaults" / "run.json").read_text())["stage"] == "grpo"


def test_kl_penalty_none_runs_no_reference_forward_and_logs_no_kl(tmp_path):
    _, report = run(tmp_path, "none", "train.max_steps=2", "algorithm.kl_penalty=none")
    assert all("kl/ref" not in r and "loss/kl" not in r for r in rows(tmp_path / "none"))


def test_dynamic_sampling_fills_the_batch_and_counts_the_dropped_groups(tmp_path, function_recipe):
    _, report = run(tmp_path, "dyn", "train.max_steps=3", "algorithm.dynamic_sampling=true",
                    "algorithm.max_sampling_rounds=8", recipe=function_recipe("half_flat"))
    logged = rows(tmp_path / "dyn")
    assert sum(r["data/dropped_groups"] for r in logged) > 0
    assert all(r["reward/group_std"] > 0 for r in logged)  # no group without a spread was kept
    assert max(r["data/sampling_rounds"] for r in logged) > 1
    assert all(r["rollout/responses"] == 32 for r in logged)  # every iteration trained on 8 prompts x 4 responses


def test_dynamic_sampling_bound_is_an_error_not_a_hang(tmp_path, function_recipe):
    with pytest.raises(AlignError, match="dynamic sampling found 0 of 8 groups"):
        run(tmp_path, "flat", "train.max_steps=2", "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=2",
            recipe=function_recipe("flat"))
    assert not (tmp_path / "flat" / "model").exists()


def test_exact_resume_with_groups_and_dynamic_sampling(tmp_path, function_recipe):
    recipe = function_recipe("half_flat")
    common = ["train.max_steps=4", "train.save_every=2", "overwrite=false", "algorithm.dynamic_sampling=true",
              "algorithm.max_sampling_rounds=8", "algorithm.clip_eps_high=0.28", "algorithm.overlong_buffer=4"]
    run(tmp_path, "whole", *common, recipe=recipe)
    keys = ("step", "reward/score", "loss/policy", "loss/kl", "data/dropped_groups")
    want = [tuple(r[k] for k in keys) for r in rows(tmp_path / "whole")]
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    shutil.rmtree(crashed / "model")
    (crashed / "report.json").unlink()
    run(tmp_path, "crashed", *common, "resume=true", recipe=recipe)
    assert [tuple(r[k] for k in keys) for r in rows(crashed)] == want
    from safetensors.torch import load_file

    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "whole", crashed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_response_per_prompt_is_a_config_error_for_a_group_baseline():
    with pytest.raises(ConfigError, match="needs rollout.n >= 2"):
        load_config(GRPOConfig, TINY_GRPO, ["output_dir=x", "rollout.n=1"])
    with pytest.raises(ConfigError, match="kl_penalty=reward"):
        load_config(GRPOConfig, TINY_GRPO, ["output_dir=x", "algorithm.kl_penalty=reward"])


def test_ppo_defaults_and_recipes_are_unchanged_by_the_grpo_entry_point():
    ppo_cfg = load_config(PPOConfig, "recipes/tiny/ppo.yaml", ["output_dir=x"])
    assert (ppo_cfg.algorithm.advantage, ppo_cfg.rollout.n, ppo_cfg.algorithm.kl_penalty) == ("gae", 1, "reward")
    grpo = load_config(GRPOConfig, TINY_GRPO, ["output_dir=x", "algorithm.advantage=gae", "rollout.n=2",
                                               "algorithm.kl_penalty=reward"])
    assert grpo.algorithm.advantage == "gae"  # the same keys: PPO with a critic from align.grpo


def test_reward_terms_are_logged_one_by_one_in_training_and_held_out(tmp_path):
    recipe = tmp_path / "grpo_terms.yaml"
    cfg = yaml.safe_load(open(TINY_GRPO))
    cfg["reward"] = {"terms": [{"rule": "length", "rule_args": {"per_char": 0.01}, "name": "long"},
                               {"rule": "regex", "rule_args": {"pattern": "e"}, "weight": 0.5, "name": "has_e"}]}
    recipe.write_text(yaml.safe_dump(cfg))
    _, report = run(tmp_path, "terms", "train.max_steps=2", recipe=str(recipe))
    for row in [*rows(tmp_path / "terms"), report["last_train"]]:
        assert row["reward/score"] == pytest.approx(row["reward/term/long"] + 0.5 * row["reward/term/has_e"], abs=1e-5)
    after = report["after"]
    assert after["reward/val"] == pytest.approx(after["reward/term/long/val"] + 0.5 * after["reward/term/has_e/val"],
                                                abs=1e-5)
