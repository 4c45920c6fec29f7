"""train.Watch: early stopping and the best model on scripted sequences of held-out metrics."""

import math

import pytest

from align import train
from align.config import ConfigError, EarlyStoppingConfig, TrainConfig


def watch(stage="sft", state=None, **early):
    cfg = TrainConfig(eval_every=1, keep_best=True, early_stopping=EarlyStoppingConfig(enabled=True, **early))
    return train.Watch(cfg, stage, state)


def play(w, values, start=0, every=2):
    """Feed values as the evaluations at steps start, start + every, ...; return (stop step, steps saved as best)."""
    saved = []
    for i, value in enumerate(values):
        step = start + i * every
        if w.observe(step, {w.metric: value}, lambda s, v: saved.append(s)):
            return step, saved
    return None, saved


def test_stops_after_patience_evaluations_without_improvement_and_keeps_the_best():
    w = watch(patience=3)
    stop, saved = play(w, [1.0, 0.9, 0.8, 0.85, 0.81, 0.86, 0.5])
    assert stop == 10  # 0.85, 0.81, 0.86 at steps 6, 8, 10 do not beat 0.8 (step 4); 0.5 is never seen
    assert saved == [0, 2, 4] and w.best_step == 4 and w.best == 0.8
    assert w.summary()["stopped_at"] == 10 and w.summary()["evaluations"] == 6


def test_an_improvement_resets_the_patience():
    stop, _ = play(watch(patience=2), [1.0, 1.1, 0.9, 1.0, 0.95, 0.99])
    assert stop == 8  # steps 0 (best), 2 (1 without), 4 (0.9: best again), 6 (1), 8 (2: stop)


def test_min_delta_counts_small_gains_as_no_improvement():
    stop, saved = play(watch(patience=2, min_delta=0.05), [1.0, 0.97, 0.96, 0.5])
    assert stop == 4 and saved == [0]  # 0.97 and 0.96 are within 0.05 of 1.0


@pytest.mark.parametrize("metric, mode", [("loss/val", "min"), ("ppl/val", "min"), ("kl/val", "min"),
                                          ("accuracy/val", "max"), ("reward/val", "max")])
def test_auto_mode_minimises_losses_and_maximises_the_rest(metric, mode):
    assert watch(metric=metric).mode == mode


def test_max_mode_keeps_the_highest_reward():
    w = watch(stage="ppo", patience=2)
    assert w.metric == "reward/val"
    stop, saved = play(w, [0.1, 0.3, 0.2, 0.25])
    assert stop == 6 and saved == [0, 2] and w.best == 0.3


def test_a_non_finite_metric_never_improves():
    w = watch(patience=2)
    stop, saved = play(w, [math.nan, 1.0, math.inf, math.nan])
    assert saved == [2] and stop == 6


def test_a_resume_mid_patience_stops_where_the_uninterrupted_run_stops():
    values = [1.0, 0.9, 0.8, 0.85, 0.81, 0.86, 0.5]
    whole, _ = play(watch(patience=3), values)
    first = watch(patience=3)
    play(first, values[:4])  # steps 0-6: one evaluation without improvement so far
    assert first.since_best == 1
    resumed = watch(patience=3, state={"watch": first.state_dict()})
    stop, saved = play(resumed, values[4:], start=8)
    assert stop == whole == 10 and saved == [] and resumed.best_step == 4


def test_the_last_evaluation_never_stops_a_run_that_ran_to_the_end():
    w = watch(patience=1)
    w.observe(0, {"loss/val": 1.0})
    assert not w.observe(8, {"loss/val": 2.0}, last=True) and w.stopped_at is None


def test_an_unknown_metric_is_one_line_naming_the_ones_there():
    w = watch(metric="accuracy/val")
    with pytest.raises(ConfigError, match=r"early_stopping.metric=accuracy/val.*it has loss/val, ppl/val"):
        w.observe(0, {"loss/val": 1.0, "ppl/val": 2.7})


def test_off_by_default_it_observes_nothing():
    w = train.Watch(TrainConfig(), "sft")
    assert not w.active and not w.observe(2, {"unrelated": 1.0}) and w.evaluations == 0


def test_the_config_needs_evaluations_and_keep_best_for_the_best_final_model():
    from align.config import SFTConfig, load_config

    with pytest.raises(ConfigError, match="eval_every > 0"):
        load_config(SFTConfig, None, ["output_dir=x", "model.name_or_path=m", "data.train.path=f",
                                      "train.early_stopping.enabled=true"])
    with pytest.raises(ConfigError, match="final_model=best needs train.keep_best=true"):
        load_config(SFTConfig, None, ["output_dir=x", "model.name_or_path=m", "data.train.path=f",
                                      "train.final_model=best"])
