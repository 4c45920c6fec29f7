"""align.evaluate end to end on tiny random policies (seconds): same seeds, the KL, the files, the command line."""

import json
import sys

import pytest
import torch

from align import evaluate, models, train
from align.config import ConfigError, EvalConfig, RewardConfig, TrainConfig, load_config
from align.rewards import load_reward

from helpers import tiny_causal_lm

PROMPTS = "data/hh_harmless.jsonl"


@pytest.fixture
def two_policies(tmp_path, tiny_tokenizer):
    """Two tiny random policies with the same tokenizer, saved as pretrained folders."""
    folders = []
    for seed in (3, 4):
        folder = tmp_path / f"policy{seed}"
        tiny_causal_lm(init_std=0.1, seed=seed).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def config(policy, baseline, out=None, **extra) -> EvalConfig:
    layer = {"policy": policy, "baseline": baseline, "output_dir": out, "max_new_tokens": 10,
             "reward": {"rule": "length", "rule_args": {"per_char": 0.01}},
             "prompts": {"path": PROMPTS, "offset": 1700, "limit": 6}, **extra}
    return load_config(EvalConfig, layers=[layer])


def test_a_policy_against_itself_ties_every_prompt_with_zero_kl(two_policies):
    """Same sampling settings and the same seed give the same responses: all ties, KL exactly 0."""
    result = evaluate.main(config(two_policies[0], two_policies[0]))
    assert result["n"] == 6 and result["ties"] == 6
    assert result["win_rate"] == 0.5 and result["win_rate_ci95"] == evaluate.wilson_interval(0.5, 6)
    assert result["lc_win_rate"] is None  # equal lengths everywhere: no length effect to estimate
    assert result["kl"] == 0.0
    assert result["length_candidate"] == result["length_baseline"]


def test_kl_equals_a_naive_per_token_sum_over_full_softmaxes(two_policies, tiny_tokenizer):
    """The per-response KL (packed forwards of both models) equals sum_t log p_c(y_t) - log p_b(y_t) computed one
    sequence at a time with full tempered softmaxes."""
    cfg = config(*two_policies, temperature=0.8)
    candidate, tokenizer = models.load_policy_for_inference(cfg.policy)
    baseline, _ = models.load_policy_for_inference(cfg.baseline)
    accelerator = train.make_accelerator(TrainConfig(batch_size=1, micro_batch_size=1), 0)
    prompts, _ = evaluate.load_prompts(cfg, tokenizer)
    samples = evaluate.sample_and_score(candidate, tokenizer, prompts, load_reward(cfg.reward, "cpu"), cfg,
                                        accelerator)
    kl = evaluate.sequence_kl(candidate, baseline, samples, cfg, tokenizer.pad_token_id, accelerator)
    ro = samples.rollout
    for i in range(len(ro)):
        ids = torch.tensor([ro.prompt_ids[i] + ro.response_ids[i]])
        p = len(ro.prompt_ids[i])
        targets = ids[0, p:]
        with torch.no_grad():
            lc = torch.log_softmax(candidate(ids).logits[0, p - 1: -1].double() / 0.8, -1)
            lb = torch.log_softmax(baseline(ids).logits[0, p - 1: -1].double() / 0.8, -1)
        naive = (lc.gather(-1, targets[:, None]) - lb.gather(-1, targets[:, None])).sum().item()
        assert kl[i].item() == pytest.approx(naive, abs=1e-4)
    assert kl.abs().sum() > 0.1  # two different models: the check is not blind


def test_command_line_prints_the_summary_as_its_last_line_and_writes_files(two_policies, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["align.evaluate", "--policy", two_policies[0], "--baseline", two_policies[1],
                                      "--rule", "length", "--rule-args", '{"per_char": 0.01}', "--prompts", PROMPTS,
                                      "--offset", "1700", "--n", "5", "--max-new-tokens", "8", "--out", str(out)])
    evaluate.cli()
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"win_rate", "win_rate_ci95", "lc_win_rate", "kl", "n"} <= set(last)
    assert last["n"] == 5 and last["wins"] + last["ties"] + last["losses"] == 5
    saved = json.loads((out / "eval.json").read_text())
    assert saved["win_rate"] == last["win_rate"] and saved["kl"] == last["kl"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5
    # The summary is what the per-prompt rows say.
    wins = sum(0.5 if s["candidate"] == s["baseline"] or s["reward_candidate"] == s["reward_baseline"] else
               float(s["reward_candidate"] > s["reward_baseline"]) for s in samples)
    assert last["win_rate"] == pytest.approx(wins / 5)
    assert last["kl"] == pytest.approx(sum(s["kl"] for s in samples) / 5)
    for name in ("rewards.png", "kl_vs_reward.png", "lengths.png"):
        assert (out / name).stat().st_size > 1000


def test_missing_inputs_and_different_tokenizers_are_clear_errors(two_policies, tiny_tokenizer, smol_tokenizer):
    with pytest.raises(ConfigError, match="--prompts FILE"):
        EvalConfig(policy="a", baseline="b", reward=RewardConfig(rule="length")).check_complete("evaluate")
    with pytest.raises(ConfigError, match="different tokenizers"):
        evaluate.check_same_vocabulary(tiny_tokenizer, smol_tokenizer, config(*two_policies))
    with pytest.raises(ConfigError, match="temperature"):
        config(*two_policies, temperature=0.0)


def test_an_out_folder_is_never_replaced_silently(two_policies, tmp_path):
    """A folder that is not an evaluation is refused untouched; one that holds an evaluation needs overwrite=true,
    which replaces the evaluation's files and nothing else."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "thesis.tex").write_text("my thesis")
    with pytest.raises(ConfigError, match="holds files that are not an align evaluation"):
        evaluate.main(config(*two_policies, out=str(out)))
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]

    fresh = tmp_path / "fresh"
    first = evaluate.main(config(*two_policies, out=str(fresh)))
    (fresh / "notes.md").write_text("mine")
    with pytest.raises(ConfigError, match="already holds an evaluation; pass --overwrite"):
        evaluate.main(config(*two_policies, out=str(fresh), seed=7))
    assert json.loads((fresh / "eval.json").read_text())["sampling"]["seed"] == first["sampling"]["seed"] == 42
    evaluate.main(config(*two_policies, out=str(fresh), seed=7, overwrite=True))
    assert json.loads((fresh / "eval.json").read_text())["sampling"]["seed"] == 7
    assert (fresh / "notes.md").read_text() == "mine"


def test_under_top_p_the_kl_is_not_reported(two_policies, tmp_path):
    """Responses from truncated distributions: the full-softmax KL is not theirs, so it is null (and not plotted)."""
    out = tmp_path / "eval"
    result = evaluate.main(config(*two_policies, out=str(out), top_p=0.9))
    assert result["kl"] is None and result["n"] == 6
    assert all(json.loads(line)["kl"] is None for line in (out / "samples.jsonl").read_text().splitlines())
    assert not (out / "kl_vs_reward.png").exists() and (out / "rewards.png").is_file()
