"""bf16 autocast on the tiny model, on this CPU: the same losses as fp32 within a stated tolerance, float32 master
weights and optimizer state, the DPO and PPO probes intact; and a resume under another precision is refused.

On a CPU without native bf16 these are slow per FLOP (emulated), but the tiny model keeps them to seconds."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState
from safetensors.torch import load_file

from align import dpo, ppo, precision, sft
from align.config import ConfigError, DPOConfig, PPOConfig, SFTConfig, load_config

from helpers import ROOT


def run(main, cls, recipe, out, *overrides):
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    cfg = load_config(cls, ROOT / "recipes" / "tiny" / recipe,
                      [f"output_dir={out}", "log.progress=false", "log.report_to=[]", *overrides])
    return main(cfg)


def logged(folder, key):
    return [r[key] for r in map(json.loads, open(folder / "metrics.jsonl")) if key in r]


def test_bf16_sft_follows_fp32_within_tolerance_and_keeps_float32_master_weights(tmp_path):
    reports = {p: run(sft.main, SFTConfig, "sft.yaml", tmp_path / p, "train.max_steps=6", "train.save_every=3",
                      "log.every=1", f"train.precision={p}") for p in ("fp32", "bf16")}
    fp32, bf16 = (logged(tmp_path / p, "loss/train") for p in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) == 6
    # Stated tolerance: 2e-3 absolute on a loss of ~7.6 (bf16 keeps 8 bits of mantissa in the matmuls only; the
    # log-softmax and the loss are float32, align/losses.py).
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 2e-3
    assert fp32 != bf16  # autocast did run in bf16: the numbers are not float32's bit for bit
    assert reports["bf16"]["precision"]["used"] == "bf16" and reports["fp32"]["precision"]["used"] == "fp32"
    assert json.loads((tmp_path / "bf16" / "report.json").read_text())["precision"]["asked"] == "bf16"
    checkpoint = tmp_path / "bf16" / "checkpoints" / "step-000003"
    assert {t.dtype for t in load_file(checkpoint / "model" / "model.safetensors").values()} == {torch.float32}
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}


def test_bf16_dpo_starts_at_an_exact_tie_and_caches_the_reference_per_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    first = run(dpo.main, DPOConfig, "dpo.yaml", tmp_path / "a", "train.max_steps=3", "train.precision=bf16")
    assert first["reference"]["forwards"] > 0
    # policy == reference, both scored in bf16 the same way: every implicit reward margin is exactly 0
    assert first["val_accuracy_before"] == 0.5 and first["val_margin_before"] == 0.0
    second = run(dpo.main, DPOConfig, "dpo.yaml", tmp_path / "b", "train.max_steps=3", "train.precision=bf16")
    assert second["reference"]["forwards"] == 0 and second["train_loss"] == pytest.approx(first["train_loss"], abs=1e-6)
    fp32 = run(dpo.main, DPOConfig, "dpo.yaml", tmp_path / "c", "train.max_steps=3", "train.precision=fp32")
    assert fp32["reference"]["forwards"] > 0  # another precision: other reference numbers, another cache entry
    assert fp32["val_accuracy_before"] == 0.5 and fp32["train_loss"] == pytest.approx(first["train_loss"], abs=5e-3)


def test_bf16_ppo_rollouts_agree_with_the_trainer(tmp_path):
    """The rollout engine generates under the run's autocast: its log-probs match the trainer's teacher-forced ones
    (rollout/logprob_diff) to bf16's precision, and the first rollout's KL to the reference is exactly 0."""
    run(ppo.main, PPOConfig, "ppo.yaml", tmp_path / "bf16", "train.max_steps=3", "train.precision=bf16")
    diffs = logged(tmp_path / "bf16", "rollout/logprob_diff")
    assert len(diffs) == 3 and max(diffs) < 1e-3, diffs  # measured 4e-6 to 5e-5 here; float32 gives ~1e-7
    assert logged(tmp_path / "bf16", "kl/ref")[0] == 0.0


def test_resume_where_auto_picks_another_precision_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    precision.auto_choice.cache_clear()
    try:
        monkeypatch.setenv("ALIGN_AUTO_PRECISION", "bf16")  # a machine with native bf16
        report = run(sft.main, SFTConfig, "sft.yaml", out, "train.max_steps=2", "train.save_every=1")
        assert report["precision"] == {"asked": "auto", "used": "bf16",
                                       "reason": "ALIGN_AUTO_PRECISION=bf16 in the environment"}
        precision.auto_choice.cache_clear()
        monkeypatch.setenv("ALIGN_AUTO_PRECISION", "fp32")  # the same folder on a machine without
        before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
        with pytest.raises(ConfigError, match="it computed in bf16 and this run would compute in fp32") as err:
            run(sft.main, SFTConfig, "sft.yaml", out, "train.max_steps=2", "train.save_every=1", "resume=true",
                "overwrite=false")
        assert "set train.precision=bf16 to go on as it ran" in str(err.value)
        assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # untouched
        again = run(sft.main, SFTConfig, "sft.yaml", out, "train.max_steps=2", "train.save_every=1", "resume=true",
                    "overwrite=false", "train.precision=bf16")  # as it ran: accepted (and already finished)
        assert again["precision"]["used"] == "bf16" and again["steps"] == 2
    finally:
        precision.auto_choice.cache_clear()
