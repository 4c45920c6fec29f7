"""Early stopping and the best model in a real stage: the reward model on the tiny recipe with a scripted held-out
loss (so the step it must stop at is known), a resume in the middle of the patience, and PPO on its held-out reward
(with its forgetting check)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align import ppo, rm, train
from align.config import ConfigError, PPOConfig, RMConfig, load_config

TINY_RM, TINY_PPO = "recipes/tiny/rm.yaml", "recipes/tiny/ppo.yaml"
# held-out loss after N steps: best at step 4, then 3 evaluations without improvement -> stop at step 10
SCRIPT = {0: 1.0, 2: 0.9, 4: 0.8, 6: 0.85, 8: 0.81, 10: 0.86, 12: 0.5, 14: 0.4, 16: 0.3, 18: 0.2}
WATCHED = ["train.eval_every=2", "train.early_stopping.enabled=true", "train.early_stopping.patience=3",
           "train.keep_best=true", "train.max_steps=18", "data.train.limit=160", "log.every=1"]


@pytest.fixture
def scripted_rm(monkeypatch):
    """The reward model's held-out loss follows SCRIPT by step (its other numbers are real)."""
    at = {"step": 0}
    real_end, real_eval = train.Loop.end_step, rm.evaluate_groups

    def end_step(self, step, metrics, tokens):
        at["step"] = step + 1
        return real_end(self, step, metrics, tokens)

    def evaluate_groups(*args, **kwargs):
        return {**real_eval(*args, **kwargs), "loss/val": SCRIPT[at["step"]]}

    monkeypatch.setattr(train.Loop, "end_step", end_step)
    monkeypatch.setattr(rm, "evaluate_groups", evaluate_groups)


def run_rm(out, *overrides):
    return rm.main(load_config(RMConfig, TINY_RM, [f"output_dir={out}", "log.progress=false", "overwrite=false",
                                                   *WATCHED, *overrides]))


def weights(folder):
    return load_file(folder / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_stops_at_the_scripted_step_and_keeps_the_best_model(tmp_path, scripted_rm):
    out = tmp_path / "rm"
    report = run_rm(out, "train.save_every=2", "train.keep_checkpoints=10")
    assert report["steps"] == 10 and report["final_model"] == "last"
    es = report["early_stopping"]
    assert (es["stopped_at"], es["best_step"], es["best"], es["evaluations"]) == (10, 4, 0.8, 6)
    assert json.loads((out / "best" / "best.json").read_text()) == {"step": 4, "metric": "loss/val", "value": 0.8}
    # best/ holds the weights of step 4, which the step-4 checkpoint also holds (no checkpoint is written at the stop)
    assert same(weights(out / "best"), weights(out / "checkpoints" / "step-000004" / "model"))
    assert not same(weights(out / "best"), weights(out / "checkpoints" / "step-000008" / "model"))
    assert not (out / "checkpoints" / "step-000010").exists()
    trained = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss/train" in r]
    assert trained == list(range(1, 11))  # nothing trained after the stop


def test_final_model_best_puts_the_best_weights_in_model_and_reports_their_numbers(tmp_path, scripted_rm):
    out = tmp_path / "rm"
    report = run_rm(out, "train.final_model=best", "train.save_every=2", "train.keep_checkpoints=10")
    assert report["final_model"] == "best (step 4)"
    saved = load_file(out / "model" / "model.safetensors")
    best = weights(out / "checkpoints" / "step-000004" / "model")
    shared = [k for k in saved if k in best]
    assert len(shared) > 10 and all(torch.equal(saved[k], best[k]) for k in shared)


def test_a_resume_in_the_middle_of_the_patience_stops_where_the_whole_run_stops(tmp_path, scripted_rm):
    common = ["train.save_every=2", "train.keep_checkpoints=10"]
    whole = tmp_path / "whole"
    expected = run_rm(whole, *common)
    crashed = tmp_path / "crashed"
    shutil.copytree(whole, crashed)
    # as if killed after step 6's checkpoint: one evaluation without improvement so far (best: step 4)
    for name in ("model", "report.json"):
        shutil.rmtree(crashed / name) if (crashed / name).is_dir() else (crashed / name).unlink()
    shutil.rmtree(crashed / "checkpoints" / "step-000008")
    state = json.loads((crashed / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["watch"]["since_best"] == 1 and state["watch"]["best_step"] == 4
    resumed = run_rm(crashed, *common, "resume=true")
    assert resumed["early_stopping"] == expected["early_stopping"] and resumed["steps"] == 10
    assert same(weights(crashed / "model"), weights(whole / "model"))
    assert same(weights(crashed / "best"), weights(whole / "best"))


def test_early_stopping_without_held_out_data_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "rm"
    with pytest.raises(ConfigError, match="no held-out data"):
        run_rm(out, "data.validation_fraction=0")
    assert not out.exists()


def test_ppo_keeps_the_policy_of_its_best_held_out_reward(tmp_path, monkeypatch):
    """PPO's own loop: a scripted held-out reward peaks at iteration 4; patience 2 stops it at 8."""
    script = iter([0.1, 0.2, 0.5, 0.3, 0.4, 0.5])  # before training, after iterations 2, 4, 6, 8; the best again
    real = ppo.evaluate

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "reward/val": next(script)}

    monkeypatch.setattr(ppo, "evaluate", evaluate)
    out = tmp_path / "ppo"
    cfg = load_config(PPOConfig, TINY_PPO, [f"output_dir={out}", "log.progress=false", "train.eval_every=2",
                                            "train.early_stopping.enabled=true", "train.early_stopping.patience=2",
                                            "train.keep_best=true", "train.final_model=best",
                                            "forgetting.enabled=true"])
    report = ppo.main(cfg)
    assert report["iterations"] == 8 and report["early_stopping"]["best_step"] == 4
    assert report["early_stopping"]["stopped_at"] == 8 and report["final_model"] == "best (step 4)"
    assert json.loads((out / "best" / "best.json").read_text())["value"] == 0.5
    assert same(weights(out / "model"), weights(out / "best"))
    # the forgetting check runs in PPO's loop too (measured on the model it keeps)
    assert report["forgetting"]["records"] == 32 and (out / "forgetting_before.json").is_file()
