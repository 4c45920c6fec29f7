"""scripts/bench.py and its harness (scripts/benchlib.py) without training: the precision trials (the time cap, the
choice of the faster precision), the machine description, the summaries over rounds, the RL timing helpers, and the
grpo stage's settings on both sides and its TRL reward."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))  # as `python scripts/bench.py` has it: the harness and the stage files

import bench  # noqa: E402  (the command line)
import bench_grpo  # noqa: E402
import benchlib  # noqa: E402  (the harness)


def busy(seconds: float) -> dict:
    """A pure-Python loop (the handler runs between bytecodes, as it does between torch ops)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return {"done": True}


def test_time_cap_stops_a_slow_run_and_clears_the_timer():
    before = signal.getsignal(signal.SIGALRM)
    res, seconds = benchlib.capped_trial(lambda: busy(5.0), cap=0.2)
    assert res is None and 0.2 <= seconds < 2.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_time_cap_lets_a_fast_run_finish_and_clears_the_timer():
    res, _ = benchlib.capped_trial(lambda: busy(0.01), cap=5.0)
    assert res == {"done": True}
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    busy(0.05)  # no late alarm


def test_time_cap_clears_the_timer_when_the_run_fails():
    with pytest.raises(ValueError):
        benchlib.capped_trial(lambda: (_ for _ in ()).throw(ValueError("boom")), cap=5.0)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_the_timeout_is_not_an_exception_the_run_could_swallow():
    def swallowing():
        try:
            busy(5.0)
        except Exception:  # what a library's broad handler would do
            return {"swallowed": True}

    res, _ = benchlib.capped_trial(swallowing, cap=0.1)
    assert res is None


def test_keep_faster():
    trial = lambda rate: {"rate": rate, "seconds": 1.0, "cap_s": None}  # noqa: E731
    assert benchlib.keep_faster({"fp32": trial(100.0), "bf16": trial(250.0)}) == "bf16"
    assert benchlib.keep_faster({"fp32": trial(100.0), "bf16": trial(90.0)}) == "fp32"
    assert benchlib.keep_faster({"fp32": trial(100.0), "bf16": trial(100.0)}) == "fp32"  # a tie keeps float32
    assert benchlib.keep_faster({"fp32": trial(100.0), "bf16": trial(None)}) == "fp32"  # stopped: the slower


def test_describe_trials():
    trials = {"fp32": {"rate": 1130.4, "seconds": 9.2, "cap_s": None},
              "bf16": {"rate": None, "seconds": 61.0, "cap_s": 60.0}}
    line = benchlib.describe_trials(trials, "fp32", "tok/s")
    assert line == "fp32 1130 tok/s, bf16 stopped after 61 s (cap 60 s; fp32's trial took 9 s) -> fp32"
    trials["bf16"] = {"rate": 2.5, "seconds": 3.0, "cap_s": 60.0}
    assert benchlib.describe_trials(trials, "fp32", "pairs/s") == "fp32 1130 pairs/s, bf16 2.5 pairs/s -> fp32"


def test_cpu_info_reads_the_model_and_the_bf16_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                       "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    info = benchlib.cpu_info(str(cpuinfo))
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert {f for f, on in info["flags"].items() if on} == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert info["flags"]["avx512_fp16"] is False
    assert benchlib.cpu_info(str(tmp_path / "absent"))["flags"] == {}


def test_an_emulated_dtype_skips_the_larger_sizes(monkeypatch):
    """Once one product takes over a quarter of the budget, the larger sizes are not tried."""
    import torch

    tried = []
    real = torch.randn

    def randn(n, m, dtype):
        tried.append(n)
        return real(8, 8, dtype=dtype)  # small stand-ins: the sleep below plays the slow product

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: time.sleep(0.06))
    benchlib.matmul_peak_gflops(torch.bfloat16, sizes=(64, 128, 256), seconds=0.2)
    assert tried == [64, 64]


def test_the_bf16_cap_is_four_times_fp32_and_at_least_a_minute_unless_set():
    from argparse import Namespace

    assert benchlib.bf16_cap(Namespace(trial_cap_s=None), fp32_seconds=5.0) == 60.0
    assert benchlib.bf16_cap(Namespace(trial_cap_s=None), fp32_seconds=30.0) == 120.0
    assert benchlib.bf16_cap(Namespace(trial_cap_s=10.0), fp32_seconds=30.0) == 10.0


# ----------------------------------------------------------------------------------------------------------------
# grpo: the two sides' settings and reward


def test_trl_length_reward_scores_as_align_length_rule():
    """TRL hands the reward function decode(skip_special_tokens=True), unstripped, as a string or (chat prompts) an
    assistant message; align's rule scores the same decode stripped. Same text in, same float32 score out."""
    from reward_models.rules import LengthReward

    decoded = ["  Hello, world \n", "x", "", "\n\nThe answer is 42.  ", "héllo wörld"]
    prompts = [[{"role": "user", "content": "q"}]] * len(decoded)
    align_scores = LengthReward(per_char=0.01).score(prompts, [d.strip() for d in decoded]).tolist()
    reward = benchlib.trl_length_reward({"per_char": 0.01})
    assert reward(prompts, [[{"role": "assistant", "content": d}] for d in decoded]) == align_scores
    assert reward(["q"] * len(decoded), decoded) == align_scores
    assert align_scores[0] == pytest.approx(0.12)  # "Hello, world": 12 characters, not 16


def shape(**kw):
    sizes = dict(prompts=8, group=4, micro=8, mini=None, epochs=2, iterations=6)
    return bench_grpo.GRPOShape(**{**sizes, **kw})


@pytest.mark.parametrize("sizes", [{}, {"mini": 16}, {"epochs": 1}, {"prompts": 4, "group": 2, "micro": 2, "mini": 4}])
def test_grpo_sides_get_the_same_sizes(tmp_path, sizes):
    """align's GRPOConfig from the overrides and TRL's GRPOConfig from its arguments: the same responses per
    iteration in one generation batch, micro-batch, minibatch, optimizer steps per iteration, total optimizer steps,
    passes, response budget, temperature, KL weight and clipping."""
    from trl import GRPOConfig as TRLGRPOConfig

    from align.config import GRPOConfig, load_config

    s = shape(**sizes)
    s.check()
    cfg = load_config(GRPOConfig, None, bench_grpo.grpo_align_overrides(s, tmp_path / "model", tmp_path / "data.jsonl",
                                                                   tmp_path / "out", 32, 1e-5, "fp32"))
    trl = TRLGRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none",
                        **bench_grpo.grpo_trl_args(s, 32))
    responses = cfg.train.batch_size * cfg.rollout.n
    mini = cfg.algorithm.mini_batch_size or responses
    assert responses == s.responses == trl.generation_batch_size
    assert cfg.rollout.generation_batch_size == responses  # one generate call for the iteration, as TRL
    assert cfg.rollout.n == trl.num_generations
    assert cfg.train.micro_batch_size == trl.per_device_train_batch_size
    assert mini == trl.per_device_train_batch_size * trl.gradient_accumulation_steps
    align_steps = cfg.algorithm.ppo_epochs * responses // mini
    trl_steps = trl.num_iterations * trl.steps_per_generation // trl.gradient_accumulation_steps
    assert align_steps == trl_steps == s.steps_per_iteration
    assert trl.max_steps == cfg.train.max_steps * align_steps
    assert cfg.rollout.max_new_tokens == trl.max_completion_length == 32
    assert cfg.rollout.temperature == trl.temperature and (cfg.rollout.top_p, cfg.rollout.top_k) == (trl.top_p,
                                                                                                      trl.top_k)
    assert cfg.algorithm.kl_coef == trl.beta and cfg.algorithm.kl_penalty == "loss" and cfg.algorithm.kl_estimator \
        == "k3"
    assert cfg.algorithm.clip_eps == trl.epsilon and cfg.algorithm.loss_agg == "token_mean" and trl.loss_type == "dapo"
    assert cfg.algorithm.advantage == "grpo" and cfg.algorithm.scale_rewards and trl.scale_rewards == "group"
    assert not cfg.algorithm.whiten_advantages
    # TRL skips the old-policy forward exactly when its generation batch makes one optimizer step
    assert bench_grpo.trl_computes_old_logprobs(s) == (trl.gradient_accumulation_steps % (trl.steps_per_generation *
                                                                                       trl.num_iterations) != 0)


@pytest.mark.parametrize("sizes, message", [({"group": 1}, "at least 2"), ({"micro": 3}, "must divide the 8 prompts"),
                                            ({"mini": 12}, "must divide the 32 responses"),
                                            ({"micro": 4, "mini": 6}, "multiple of the micro-batch")])
def test_grpo_shape_rejects_sizes_a_side_would_refuse(sizes, message):
    with pytest.raises(ValueError, match=message):
        shape(**sizes).check()


def test_grpo_flops_count_the_old_forward_only_when_needed():
    one = bench_grpo.grpo_flops(10, 5, 100, 20, epochs=1, old_forward=False)
    assert one == 2 * (1 + 1 + 3) * (10 * 100 + 5 * 20)
    two = bench_grpo.grpo_flops(10, 5, 100, 20, epochs=2, old_forward=True)
    assert two == 2 * (1 + 1 + 1 + 6) * (10 * 100 + 5 * 20)
    assert bench_grpo.trl_computes_old_logprobs(shape(epochs=1)) is False
    assert bench_grpo.trl_computes_old_logprobs(shape(epochs=1, mini=16)) is True
    assert bench_grpo.trl_computes_old_logprobs(shape(epochs=2)) is True


def test_align_phases_and_time_split():
    assert benchlib.rollout_and_score_s({"perf/rollout_and_score_s": 3.0, "perf/rollout_s": 9.0}) == 3.0
    assert benchlib.rollout_and_score_s({"perf/rollout_s": 2.0, "perf/score_s": 0.5}) == 2.5
    res = {"iteration_s": [100.0, 10.0, 10.0], "rollout_and_score_s": [50.0, 5.0, 4.0], "forward_s": [1.0, 2.0, 2.0],
           "update_s": [1.0, 2.0, 3.0]}
    split = benchlib.time_split(res, skip=1)  # the warm-up iteration left out
    assert split == pytest.approx({"rollout_and_score": 0.45, "forward": 0.2, "update": 0.25, "other": 0.1})


def test_trl_rl_result_cuts_iterations_at_every_generation():
    """An iteration is one generation batch and its optimizer steps: with 2 steps per iteration, every second mark."""
    from types import SimpleNamespace

    clock = SimpleNamespace(marks=[0.0, 1.0, 3.0, 4.0, 7.0])
    phases = {"generate_s": [1.5, 1.0], "score_s": [0.1, 0.2], "generate_and_score_s": [2.0, 1.5],
              "response_tokens": [64, 60]}
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[{"reward": 0.3}, {"loss": 1.0}, {"reward": 0.4}]))
    res = benchlib.trl_rl_result("grpo", trainer, clock, phases, iterations=2, steps_per_iteration=2)
    assert res["iteration_s"] == [3.0, 4.0]
    assert res["rollout_and_score_s"] == pytest.approx([1.6, 1.2])
    assert res["forward_s"] == pytest.approx([0.4, 0.3])
    assert res["update_s"] == pytest.approx([1.0, 2.5])
    assert res["reward"] == [0.3, 0.4]
    with pytest.raises(RuntimeError, match="expected 3"):
        benchlib.trl_rl_result("grpo", trainer, clock, phases, iterations=3, steps_per_iteration=2)


def test_quick_fills_only_what_was_not_given():
    from argparse import Namespace

    unset = {k: None for k in {**bench.DEFAULTS, **bench.QUICK}}
    quick = bench.settle_defaults(Namespace(**{**unset, "quick": True, "batch": 4}))
    assert (quick.steps, quick.batch, quick.rounds, quick.precision, quick.layers) == (2, 4, 1, "fp32", 2)
    full = bench.settle_defaults(Namespace(**{**unset, "quick": False}))
    assert (full.steps, full.batch, full.rounds, full.precision) == (None, 8, 2, "best")
    assert (full.group_size, full.layers, full.max_new_tokens) == (4, 8, 32)


def test_summarize_takes_medians_first_round_values_and_the_mfu():
    rounds = [{"items_per_s": 3.0, "flops_per_s": 3e9, "loss_first": 1.0, "time_split": {"update": 0.5},
               "reference_s": None, "logprob_diff": [0.1]},
              {"items_per_s": 1.0, "flops_per_s": 1e9, "loss_first": 2.0, "time_split": {"update": 0.7},
               "reference_s": None, "logprob_diff": [0.2]},
              {"items_per_s": 2.0, "flops_per_s": 2e9, "loss_first": 3.0, "time_split": {"update": 0.6},
               "reference_s": None, "logprob_diff": [0.3]}]
    choice = {"kept": "fp32", "trials": None}
    out = benchlib.summarize(rounds, choice, {"fp32": 10.0, "bf16": 1.0}, "items_per_s")
    assert out["items_per_s"] == 2.0 and out["time_split"] == {"update": 0.6}
    assert out["loss_first"] == 1.0 and out["logprob_diff"] == [0.1] and out["reference_s"] is None  # round one's
    assert out["mfu"] == pytest.approx(0.2) and "flops_per_s" not in out  # 2 GFLOP/s of a 10 GFLOP/s fp32 peak
    assert (out["precision"], out["peak_gflops"], out["rounds"]) == ("fp32", 10.0, [3.0, 1.0, 2.0])


@pytest.mark.parametrize("stage", bench.STAGES)
def test_every_stage_file_has_the_harness_interface(stage):
    module = bench.stage_module(stage)
    assert callable(module.bench) and callable(module.print_table)
    assert set(bench.ALL) <= set(bench.STAGES) and "grpo" in bench.ALL
