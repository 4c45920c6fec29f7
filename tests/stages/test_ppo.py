"""align.ppo and the hf rollout engine end to end on tiny random models (seconds each)."""

import json
import shutil

import pytest
import torch

from align import data, formats, models, ppo, rollout
from align.config import ConfigError, PPOConfig, load_config
from align.formats import DataError

from helpers import TINY, tiny_causal_lm

TINY_PPO = "recipes/tiny/ppo.yaml"
# The toy task: the length rule pays 0.01 per character, so the policy should learn to pick long tokens. With a
# weak KL penalty and a high learning rate a random 2-layer model learns it within a dozen iterations.
TOY = ["algorithm.kl_coef=0.001", "train.learning_rate=1e-2", "algorithm.ppo_epochs=4"]


def run(tmp_path, name, *overrides, recipe=TINY_PPO):
    cfg = load_config(PPOConfig, recipe, [f"output_dir={tmp_path / name}", "log.progress=false", *overrides])
    return cfg, ppo.main(cfg)


def rows(folder, key="reward/score"):
    return [r for r in map(json.loads, open(folder / "metrics.jsonl")) if key in r]


def recipe_with_reward_model(tmp_path, folder) -> str:
    """The tiny recipe with a reward-model folder in place of its rule."""
    import yaml

    recipe = yaml.safe_load(open(TINY_PPO))
    recipe["reward"] = {"model": str(folder)}
    path = tmp_path / "ppo_rm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def write_jsonl(path, rows_):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return path


# ---- the hf engine --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hf_engine_logprobs_equal_teacher_forced_logprobs(tiny_tokenizer, temperature):
    """The engine's sampling log-probs (KV cache, left padding, prompts of different lengths) equal the policy's
    log-probs of the same tokens recomputed by a packed teacher-forced forward: the probe reads ~0 when in sync."""
    model = tiny_causal_lm(init_std=0.1, seed=1)
    engine = rollout.HFEngine(model, tiny_tokenizer, generation_batch_size=4)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ["Hello there", "A much longer prompt than the first one is",
                                                        "x", "What is two plus two?", "Tell me a story"]]
    torch.manual_seed(0)
    ro = engine.generate(prompts, rollout.Sampling(max_new_tokens=12, temperature=temperature))
    assert len(ro) == 5 and ro.policy_version == 0
    assert all(len(r) == len(lp) > 0 for r, lp in zip(ro.response_ids, ro.logprobs))
    logps, _ = models.response_logprobs(model, models.sequences(ro, range(len(ro))), temperature,
                                     tiny_tokenizer.pad_token_id, "cpu")
    engine_logps = torch.tensor([x for lp in ro.logprobs for x in lp])
    assert torch.allclose(logps, engine_logps, atol=1e-4), (logps - engine_logps).abs().max()
    # and the probe is not blind: another model's log-probs differ clearly
    other, _ = models.response_logprobs(tiny_causal_lm(init_std=0.1, seed=2), models.sequences(ro, range(len(ro))),
                                     temperature, tiny_tokenizer.pad_token_id, "cpu")
    assert (other - engine_logps).abs().mean() > 0.1


def test_seeded_hf_sampling_depends_on_each_prompts_seed_alone_and_samples_the_tempered_softmax(tiny_tokenizer):
    """With seeds, a prompt's response is the same whichever prompts share its batch (what makes PPO's rollouts
    the same under one or two processes), different seeds give different responses, the engine's log-probs are
    still the tempered softmax's, and the draws follow that distribution (Gumbel-max, checked by counting)."""
    model = tiny_causal_lm(init_std=0.1, seed=1)
    sampling = rollout.Sampling(max_new_tokens=10, temperature=0.8)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ["Hello there", "A much longer prompt than the first one is",
                                                        "x", "What is two plus two?"]]
    seeds = rollout.row_seeds(7, "rollout/0", range(4))
    assert seeds == rollout.row_seeds(7, "rollout/0", range(4)) and len(set(seeds)) == 4
    together = rollout.HFEngine(model, tiny_tokenizer, generation_batch_size=4).generate(prompts, sampling, seeds)
    torch.manual_seed(123)  # the global RNG plays no part
    halves = rollout.HFEngine(model, tiny_tokenizer, generation_batch_size=2)
    split = [halves.generate(prompts[:2], sampling, seeds[:2]), halves.generate(prompts[2:], sampling, seeds[2:])]
    assert together.response_ids == split[0].response_ids + split[1].response_ids
    again = rollout.HFEngine(model, tiny_tokenizer).generate(prompts[::-1], sampling, seeds[::-1])
    assert again.response_ids == together.response_ids[::-1]
    other = rollout.HFEngine(model, tiny_tokenizer).generate(prompts, sampling, rollout.row_seeds(8, "rollout/0",
                                                                                                  range(4)))
    assert other.response_ids != together.response_ids
    logps, _ = models.response_logprobs(model, models.sequences(together, range(4)), 0.8, tiny_tokenizer.pad_token_id,
                                     "cpu")
    assert torch.allclose(logps, torch.tensor([x for lp in together.logprobs for x in lp]), atol=1e-4)

    # the first token's frequencies over many seeds match softmax(logits / T) at the prompt
    one = rollout.Sampling(max_new_tokens=1, temperature=0.8)
    n = 3000
    ro = rollout.HFEngine(model, tiny_tokenizer, generation_batch_size=n).generate(
        [prompts[2]] * n, one, rollout.row_seeds(0, "freq", range(n)))
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompts[2]])).logits[0, -1] / 0.8, -1)
    counts = torch.bincount(torch.tensor([r[0] for r in ro.response_ids]), minlength=len(probs)).float() / n
    top = probs.topk(5).indices
    assert (counts[top] - probs[top]).abs().max() < 4 * (probs[top] * (1 - probs[top]) / n).sqrt().max() + 1e-3


def test_hf_engine_stops_at_eos_and_marks_finish_reasons(tiny_tokenizer):
    """A model pushed to emit EOS stops after one token ('stop', the stop token kept); without the push a random
    model runs to max_new_tokens ('length')."""
    model = tiny_causal_lm(seed=1)
    engine = rollout.HFEngine(model, tiny_tokenizer)
    sampling = rollout.Sampling(max_new_tokens=5)
    ro = engine.generate([[5, 6, 7], [8]], sampling)
    assert ro.finish_reason == ["length", "length"] and [len(r) for r in ro.response_ids] == [5, 5]
    push = torch.zeros(model.config.vocab_size)
    push[tiny_tokenizer.eos_token_id] = 100.0
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + push)
    try:
        ro = engine.generate([[5, 6, 7], [8]], sampling)
    finally:
        hook.remove()
    assert ro.response_ids == [[tiny_tokenizer.eos_token_id]] * 2 and ro.finish_reason == ["stop", "stop"]
    assert ro.stopped.tolist() == [True, True]
    assert rollout.cut_at_stop([4, 9, 9], [2]) == ([4, 9, 9], "length")
    assert rollout.cut_at_stop([4, 2, 9, 2], [2]) == ([4, 2], "stop")


# ---- the loop ---------------------------------------------------------------------------------------------------

def test_toy_task_reward_rises_while_kl_stays_finite(tmp_path):
    _, report = run(tmp_path, "toy", *TOY, "train.max_steps=15")
    logged = rows(tmp_path / "toy")
    scores = [r["reward/score"] for r in logged]
    assert len(scores) == 15
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.2, scores
    assert report["after"]["reward/val"] > report["before"]["reward/val"] + 0.2
    assert all(torch.isfinite(torch.tensor(r["kl/ref"])) for r in logged)
    assert logged[0]["kl/ref"] == 0.0  # the first rollout comes from the reference weights themselves
    assert max(r["rollout/logprob_diff"] for r in logged) < 1e-4
    assert report["before"]["kl/val"] == 0.0 and report["after"]["kl/val"] > 0
    assert (tmp_path / "toy" / "model" / "model.safetensors").is_file()
    assert set(report["seconds"]) == {"rollout", "score", "forward", "update"}


@pytest.mark.parametrize("lora", [False, True])
def test_resume_mid_epoch_and_at_epoch_boundary_reproduce_the_uninterrupted_run(tmp_path, lora):
    """64 prompts in batches of 16: 4 iterations per epoch. Checkpoints after iterations 2 (mid-epoch) and 4 (the
    epoch boundary); resuming from either reproduces the whole run's metrics and final weights exactly. The KL
    reference stays the initial weights (a frozen copy, or the base under LoRA), not the checkpoint's."""
    from safetensors.torch import load_file

    common = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5", "overwrite=false",
              "algorithm.normalize_reward=true", "algorithm.adaptive_kl=true", "algorithm.kl_target=0.5",
              "algorithm.kl_horizon=100",
              "algorithm.missing_eos_penalty=0.5", *(["lora.enabled=true", "lora.r=4"] if lora else [])]
    run(tmp_path, "whole", *common)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    want_rows = [(r["step"], r["reward/score"], r["loss/policy"], r["loss/value"], r["kl/coef"])
                 for r in rows(tmp_path / "whole")]
    assert len(want_rows) == 6 and want_rows[-1][4] != want_rows[0][4]  # the adaptive coefficient moved
    for name, keep in (("mid-epoch", "step-000002"), ("boundary", "step-000004")):
        crashed = tmp_path / name
        shutil.copytree(tmp_path / "whole", crashed)
        for ckpt in (crashed / "checkpoints").glob("step-*"):
            if ckpt.name > keep:
                shutil.rmtree(ckpt)
        shutil.rmtree(crashed / "model")
        (crashed / "report.json").unlink()
        cfg = load_config(PPOConfig, TINY_PPO, [f"output_dir={crashed}", "log.progress=false", *common,
                                                "resume=true"])
        ppo.main(cfg)
        got = [(r["step"], r["reward/score"], r["loss/policy"], r["loss/value"], r["kl/coef"]) for r in rows(crashed)]
        assert got == want_rows, name
        a, b = (load_file(d / "model" / weights) for d in (tmp_path / "whole", crashed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_stale_engine_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(rollout.HFEngine, "sync", lambda self, model: None)  # forgets to take the new weights
    with pytest.raises(RuntimeError, match="stale"):
        run(tmp_path, "stale", "train.max_steps=2")


# ---- models -----------------------------------------------------------------------------------------------------

def _reward_folder(tmp_path, tokenizer, name="rm"):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    folder = tmp_path / name
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_critic_starts_from_a_compatible_reward_model_else_from_the_policy(tmp_path, tiny_tokenizer, smol_tokenizer):
    from safetensors.torch import load_file

    same = _reward_folder(tmp_path, tiny_tokenizer, "same-tokenizer")
    cfg = load_config(PPOConfig, recipe_with_reward_model(tmp_path, same), [f"output_dir={tmp_path / 'x'}"])
    critic, source = ppo.load_critic(cfg, str(TINY), tiny_tokenizer)
    assert source == "reward"
    rm = load_file(same / "model.safetensors")
    assert torch.equal(critic.model.embed_tokens.weight, rm["model.embed_tokens.weight"])
    assert torch.equal(critic.score.weight, rm["score.weight"])  # the reward head starts the value head

    other = _reward_folder(tmp_path, smol_tokenizer, "other-tokenizer")
    cfg.reward.model = str(other)
    assert ppo.load_critic(cfg, str(TINY), tiny_tokenizer)[1] == "policy"
    cfg.critic.init = "reward"
    with pytest.raises(ConfigError, match="another tokenizer"):
        ppo.load_critic(cfg, str(TINY), tiny_tokenizer)


def test_reward_model_folder_scores_with_its_own_tokenizer(tmp_path, tiny_tokenizer):
    """A run with a reward-model folder (not a rule): scores come from it, and the critic starts from it."""
    folder = _reward_folder(tmp_path, tiny_tokenizer)
    # (This test once ran PPO with output_dir = the reward model's own folder, and overwrite=true deleted it.)
    _, report = run(tmp_path, "with_rm", "train.max_steps=2", recipe=recipe_with_reward_model(tmp_path, folder))
    assert report["critic_init"] == "reward"
    assert len({r["reward/score"] for r in rows(tmp_path / "with_rm")}) == 2


# ---- bad input --------------------------------------------------------------------------------------------------

def test_prompt_longer_than_the_limit_is_an_error_naming_its_line(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "short one"}] * 3 + [{"prompt": "long " * 300}]
                          + [{"prompt": "short two"}] * 20)
    with pytest.raises(DataError, match=r"prompts\.jsonl:4: the prompt is \d+ tokens, longer than "
                                        r"data\.max_prompt_length=64"):
        run(tmp_path, "long", f"data.train.path={prompts}", "data.train.limit=null", "data.max_prompt_length=64")
    assert not (tmp_path / "long").exists()  # nothing written on bad input
    _, report = run(tmp_path, "dropped", f"data.train.path={prompts}", "data.train.limit=null",
                    "data.max_prompt_length=64", "data.truncation=drop", "train.max_steps=1")
    assert report["data"]["train"]["dropped"] == {"prompt longer than max_prompt_length": 1}


def test_missing_reward_model_and_bad_reward_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.model=.*nowhere.*align\.rm"):
        run(tmp_path, "a", recipe=recipe_with_reward_model(tmp_path, tmp_path / "nowhere"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="exactly one of reward.model"):
        load_config(PPOConfig, TINY_PPO, ["output_dir=x", "reward.model=somewhere"])
    with pytest.raises(ConfigError, match="critic.init=reward needs reward.model"):
        load_config(PPOConfig, TINY_PPO, ["output_dir=x", "critic.init=reward"])
    with pytest.raises(ConfigError, match="algorithm.mini_batch_size=6 must divide"):
        load_config(PPOConfig, TINY_PPO, ["output_dir=x", "algorithm.mini_batch_size=6"])
    with pytest.raises(ConfigError, match="reward.rule=length"):
        run(tmp_path, "b", "reward.rule_args={nonsense: 1}")


# ---- pieces -----------------------------------------------------------------------------------------------------

def test_running_moments_equal_the_statistics_of_everything_seen():
    moments = ppo.RunningMoments()
    seen = [torch.randn(n) * 3 + 1 for n in (5, 1, 17, 8)]
    for x in seen:
        moments.update(x)
    everything = torch.cat(seen).double()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std().item())


def test_prompt_formats_take_the_turns_before_the_last_answer(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: bad"}])
    (ex,) = formats.convert_records(formats.read_records(str(path)), "auto", "prompt")
    assert ex.prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "how are you?"}]
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "#### 4"}])
    (ex,) = formats.convert_records(formats.read_records(str(path)), "auto", "prompt")
    assert ex.prompt == [{"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "assistant", "content": "I speak first"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'prompt'"):
        formats.convert_records(formats.read_records(str(path)), "auto", "prompt")


def test_to_rows_and_from_rows_round_trip():
    flat = torch.arange(6.0)
    rows_ = rollout.to_rows(flat, [3, 1, 2], 3)
    assert rows_.tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    assert rollout.from_rows(rows_, [2, 0], [3, 1, 2]).tolist() == [4, 5, 0, 1, 2]
    assert data.chunks([1, 2, 3], 2) == [[1, 2], [3]]


class OneOfSeveralProcesses:
    """What ppo.evaluate asks of an accelerator, as process `index` of `num` would answer (its sums not yet reduced
    with the others')."""

    def __init__(self, index, num):
        import contextlib

        self.process_index, self.num_processes, self.device = index, num, torch.device("cpu")
        self.autocast = contextlib.nullcontext

    def reduce(self, tensor, op):
        return tensor

    def unwrap_model(self, model):
        return model


@pytest.mark.parametrize("processes", [2, 3, 8])
def test_held_out_prompts_are_all_evaluated_whatever_the_number_of_processes(tiny_tokenizer, processes):
    """Seven held-out prompts over 2, 3 or 8 processes: every prompt is evaluated once (an even split dropped
    7 mod processes of them), and a process left without one contributes nothing rather than failing."""
    from reward_models.rules import LengthReward

    policy = tiny_causal_lm(init_std=0.1, seed=1)
    cfg = load_config(PPOConfig, TINY_PPO, ["output_dir=/unused"])
    prompts = [data.Prompt([{"role": "user", "content": f"question {i}"}],
                          tiny_tokenizer(f"question {i}")["input_ids"]) for i in range(7)]
    sampling = rollout.Sampling(max_new_tokens=4, temperature=1.0)
    engine = rollout.HFEngine(policy, tiny_tokenizer)
    counts = [ppo.evaluate(cfg, policy, policy, engine, LengthReward(per_char=0.01), prompts, tiny_tokenizer,
                           OneOfSeveralProcesses(i, processes), sampling)["response/count/val"]
              for i in range(processes)]
    assert sum(counts) == 7 and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("recipe", ["recipes/tiny/ppo.yaml", "recipes/tiny/grpo.yaml"])
def test_the_update_is_the_same_with_one_micro_batch_or_several(tmp_path, recipe):
    """Each micro-batch adds its share of the step's loss (token counts of the whole minibatch), so splitting one
    optimizer step's batch (16 responses for ppo, 8 prompts x 4 for grpo) into 2, 4 or 8 forwards changes nothing but
    rounding: iteration 1's loss and ratio statistics agree to 1e-5, and iteration 2's, taken after the first update,
    to a relative 1e-4 (a wrong share, e.g. a per-micro-batch mean, would move the update and so iteration 2).
    Weights are not compared: Adam's first step divides each gradient by its own magnitude, so coordinates whose
    gradient is near 0 amplify the rounding."""
    from align.config import GRPOConfig

    cls = GRPOConfig if "grpo" in recipe else PPOConfig
    logged = []
    for micro in (8, 4, 2):
        out = tmp_path / f"micro{micro}"
        cfg = load_config(cls, recipe, [f"output_dir={out}", "log.progress=false", "train.max_steps=2",
                                        "eval_samples=0", f"train.micro_batch_size={micro}",
                                        "algorithm.mini_batch_size=null", "algorithm.ppo_epochs=1"])
        ppo.main(cfg)
        logged.append([[r[k] for k in ("loss/policy", "policy/approx_kl", "policy/clipfrac")] for r in rows(out)])
    for other in logged[1:]:
        assert other[0] == pytest.approx(logged[0][0], abs=1e-5)
        assert other[1] == pytest.approx(logged[0][1], rel=1e-4, abs=1e-6)
        assert other[1] != pytest.approx(logged[0][0], rel=1e-3)  # the first update moved the policy
