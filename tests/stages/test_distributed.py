"""Sharded training: gathered saves are the files an unsharded run writes, FSDP2 over gloo matches one process and
resumes exactly, and PPO under two processes matches one."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from align import models

from helpers import ROOT, tiny_causal_lm

TINY_SFT = "recipes/tiny/sft.yaml"
FSDP_ON_CPU = str(ROOT / "tests" / "stages" / "fsdp_on_cpu.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd, name):
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _rows(folder, key):
    return [(r["step"], r[key]) for r in map(json.loads, open(folder / "metrics.jsonl")) if key in r]


def _same_weights(a, b, atol):
    a, b = load_file(a), load_file(b)
    assert sorted(a) == sorted(b)  # the same entries: tied weights stored once, as an unsharded save stores them
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def test_saving_a_gathered_state_dict_writes_what_saving_the_model_writes(tmp_path, tiny_tokenizer):
    """Under FSDP/ZeRO-3 the main process saves the gathered state dict (separate tensors, lm_head and the embeddings
    included) instead of the model's own shards: the folder must hold the same tensors under the same names."""
    model = tiny_causal_lm(init_std=0.1)
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}  # what get_state_dict returns
    assert "lm_head.weight" in gathered
    models.save(model, tiny_tokenizer, tmp_path / "plain")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # a shard's worth of nothing: only the gathered dict may be written
    models.save(model, tiny_tokenizer, tmp_path / "gathered", state_dict=gathered)
    _same_weights(tmp_path / "plain" / "model.safetensors", tmp_path / "gathered" / "model.safetensors", 0.0)


def test_merged_lora_model_from_a_gathered_state_dict_equals_the_merged_model(tmp_path, tiny_tokenizer):
    from align.config import LoraConfig

    model = models.add_lora(tiny_causal_lm(init_std=0.1), LoraConfig(enabled=True, r=4), "CAUSAL_LM", seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: give the adapters something to merge
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    models.save_merged(model, tiny_tokenizer, tmp_path / "plain")
    models.save_merged(model, tiny_tokenizer, tmp_path / "gathered", state_dict=gathered)
    _same_weights(tmp_path / "plain" / "model.safetensors", tmp_path / "gathered" / "model.safetensors", 0.0)
    models.save(model, tiny_tokenizer, tmp_path / "adapter", state_dict=gathered)
    plain_adapter = tmp_path / "adapter-plain"
    models.save(model, tiny_tokenizer, plain_adapter)
    _same_weights(plain_adapter / "adapter_model.safetensors", tmp_path / "adapter" / "adapter_model.safetensors", 0.0)


@pytest.mark.slow
def test_sft_under_fsdp2_on_two_cpu_processes_matches_one_process_and_resumes_exactly(tmp_path):
    """FSDP2 over gloo (accelerate's FSDP selection patched for CPU: tests/stages/fsdp_on_cpu.py): the loss curve and
    the final weights match one process; the mid-run checkpoint holds full weights; a resume from it reproduces the
    uninterrupted run; the final folder loads with plain transformers."""
    from transformers import AutoModelForCausalLM

    overrides = ["log.every=1", "train.max_steps=4", "train.save_every=2", "log.progress=false", "overwrite=false"]
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp2.yaml",
            "--num_processes", "2", FSDP_ON_CPU, "align.sft", TINY_SFT]
    _run([sys.executable, "-m", "align.sft", TINY_SFT, f"output_dir={tmp_path / 'one'}", *overrides], "one")
    done = _run([*fsdp, f"output_dir={tmp_path / 'fsdp'}", *overrides], "fsdp")
    assert "weights sharded over 2 processes (FSDP)" in done.stdout
    one, two = tmp_path / "one", tmp_path / "fsdp"
    for key in ("loss/train", "loss/val"):
        a, b = _rows(one, key), _rows(two, key)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 2
        assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-5), key
    _same_weights(one / "model" / "model.safetensors", two / "model" / "model.safetensors", 1e-5)
    checkpoint = "checkpoints/step-000002/model/model.safetensors"
    _same_weights(one / checkpoint, two / checkpoint, 1e-5)
    AutoModelForCausalLM.from_pretrained(two / "model")

    crashed = tmp_path / "crashed"  # stopped after step 3: the step-2 checkpoint is the newest
    shutil.copytree(two, crashed)
    shutil.rmtree(crashed / "model")
    (crashed / "report.json").unlink()
    done = _run([*fsdp, f"output_dir={crashed}", *overrides, "resume=true"], "resume")
    assert "resumed from" in done.stdout and "(step 2)" in done.stdout
    assert _rows(crashed, "loss/train") == _rows(two, "loss/train")  # optimizer state restored, not restarted
    _same_weights(two / "model" / "model.safetensors", crashed / "model" / "model.safetensors", 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_ppo_and_grpo_two_processes_under_accelerate_launch_match_one_process(tmp_path, stage):
    """Every response is drawn with its own seed (training and held-out), a group stays on one process, and every
    process holds the iteration's rows and takes its share of each seeded global minibatch: two processes do what
    one does (grpo: the same group advantages, so the same losses and weights)."""
    overrides = ["log.every=1", "train.max_steps=2", "train.micro_batch_size=4", "eval_samples=8",
                 "log.progress=false"]
    recipe = f"recipes/tiny/{stage}.yaml"
    _run([sys.executable, "-m", f"align.{stage}", recipe, f"output_dir={tmp_path / 'one'}", *overrides], "one")
    done = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", f"align.{stage}",
                 recipe, f"output_dir={tmp_path / 'two'}", *overrides], "two")
    assert "on 2 processes" in done.stdout
    rows = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]  # noqa: E731
    one, two = rows("one"), rows("two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        keys = [k for k in a if not k.startswith("perf/") and isinstance(a[k], (int, float))]
        assert sorted(keys) == sorted(k for k in b if not k.startswith("perf/") and isinstance(b[k], (int, float)))
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, abs=1e-5), a["step"]
    _same_weights(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "two" / "model" / "model.safetensors",
                  1e-5)
