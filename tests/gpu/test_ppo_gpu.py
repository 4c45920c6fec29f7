"""PPO's vllm rollout engine on a CUDA GPU with vLLM installed, on a tiny random Llama saved to a folder.

The consistency probe is the one align.ppo logs as rollout/logprob_diff: the mean |engine log-prob - the policy's
teacher-forced log-prob| of the sampled tokens. vLLM runs the model in bf16 while the policy here is float32, so
"in sync" is a small number (bf16 rounding, ~0.01), not 0; a stale engine reads ~1 (see SYNCED and STALE).

    python -m pytest tests/gpu/test_ppo_gpu.py -q

Skipped without CUDA (tests/conftest.py) or without vllm (importorskip).
"""

import copy
import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from align import ppo, rollout
from align.config import LoraConfig, ModelConfig
from align.models import load_causal_lm

from helpers import ROOT

pytestmark = pytest.mark.gpu

SAMPLING = rollout.Sampling(max_new_tokens=24, temperature=1.0)
SYNCED = 0.05  # probe below this: the engine samples from the policy's weights (bf16 rounding only)
STALE = 0.3  # probe above this: it samples from other weights (a 0.02-std weight change reads ~0.9 on CPU)
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TEXTS = ["Hello there", "What is two plus two?", "Tell me a story about a dog.", "x",
         "A much longer prompt than the others, with quite a few more words in it than any of them.",
         "Why is the sky blue?", "Name three colours.", "Count to ten, please."]


def save_tiny_llama(folder, tokenizer, seed=3):
    """A random 2-layer Llama that vLLM's attention kernels accept (head_dim 64; tests/helpers' tiny model has 16),
    with an untied output head, saved in bf16 (vLLM runs it in the saved dtype) with the tiny tokenizer. A large
    init std makes the outputs depend on the context."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, initializer_range=0.1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_policy(folder, lora: bool = False, device="cuda"):
    """The policy as align.ppo loads it (packed-SDPA attention), in float32 (a LoRA base too)."""
    lora_cfg = LoraConfig(enabled=True, r=8, alpha=16) if lora else LoraConfig()
    model = load_causal_lm(ModelConfig(name_or_path=str(folder), dtype="float32"), lora_cfg, seed=0)
    return model.to(device).eval()


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
    device = next(policy.parameters()).device
    logps, _ = ppo.response_logprobs(policy, ppo.sequences(ro, range(len(ro))), SAMPLING.temperature, pad_id, device)
    engine = torch.tensor([x for lp in ro.logprobs for x in lp], device=device)
    assert logps.shape == engine.shape
    return (logps.float() - engine).abs().mean().item()


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama", tiny_tokenizer)


# ---- (c) the recipe: align.ppo with rollout.engine=vllm ---------------------------------------------------------
# First in the file: it runs `python -m align.ppo` in a fresh process (vLLM's in-process engine and its
# torch.distributed group are per process), before the module's own colocated engine below takes GPU memory.

@pytest.mark.parametrize("lora", ["false", "true"])
def test_ppo_with_the_vllm_engine_runs_and_its_rollouts_match_the_policy(tmp_path, tiny_folder, lora):
    pytest.importorskip("vllm")
    from safetensors.torch import load_file

    out = tmp_path / "ppo"
    # No launcher variables: TRL sets RANK/MASTER_PORT... in this process when it builds a colocated engine, and a
    # child that inherits them would start a one-process DDP group on a port this process already holds.
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["ALIGN_CACHE"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "align.ppo", "recipes/tiny/ppo.yaml", f"output_dir={out}",
           f"model.name_or_path={tiny_folder}", "model.init=pretrained", f"lora.enabled={lora}",
           "rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.2", "rollout.vllm.max_model_length=512",
           "train.max_steps=3", "train.learning_rate=1e-3", "eval_samples=8", "log.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"

    report = json.loads((out / "report.json").read_text())
    assert report["engine"] == "vllm" and report["iterations"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    diffs = [r["rollout/logprob_diff"] for r in rows if "rollout/logprob_diff" in r]
    # every iteration sampled from the weights it then trained (the loop also checks the policy version)
    assert len(diffs) == 3 and all(0 <= d < 0.1 for d in diffs), diffs
    assert all(r["ppo/updates"] > 0 for r in rows if "ppo/updates" in r)
    # ... and the weights did move, so the syncs had something to push
    if lora == "true":
        adapters = load_file(out / "model" / "adapter_model.safetensors")
        assert max(t.abs().max().item() for k, t in adapters.items() if "lora_B" in k) > 0  # B starts at zero
    else:
        before, after = load_file(tiny_folder / "model.safetensors"), load_file(out / "model" / "model.safetensors")
        moved = max((after[k].float() - before[k].float()).abs().max().item() for k in before if k in after)
        assert moved > 1e-4, moved


# ---- (a), (b) a colocated engine in this process ------------------------------------------------------------------

@pytest.fixture(scope="module")
def colocated(tiny_folder, tiny_tokenizer):
    """A colocated VLLMEngine on the tiny model, and the policy it was built from. Tests that push other weights
    push this policy back when they finish."""
    pytest.importorskip("vllm")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    with pytest.MonkeyPatch.context() as mp:
        for var in DIST_ENV:  # TRL sets these for vLLM; they are put back as they were afterwards
            mp.delenv(var, raising=False)
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        accelerator = Accelerator()
        policy = load_policy(tiny_folder)
        engine = rollout.VLLMEngine(policy, tiny_tokenizer, accelerator, SAMPLING, mode="colocate",
                                    gpu_memory_utilization=0.2, max_model_length=512, sync_timeout=300)
        try:
            yield engine, policy
        finally:
            engine.close()
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            AcceleratorState._reset_state(reset_partial_state=True)
            PartialState._reset_state()


def test_colocated_vllm_samples_with_the_policys_logprobs(colocated, tiny_tokenizer):
    """(a) The engine's sampling log-probs are the policy's own teacher-forced ones: the probe reads ~0."""
    engine, policy = colocated
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
    """(b) Weights changed without a sync: the engine still samples from the old ones and the probe says so.
    After the sync: the probe is ~0 again and the rollouts carry the new version."""
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
