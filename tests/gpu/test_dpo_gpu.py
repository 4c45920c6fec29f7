"""DPO on a CUDA GPU in bf16: the cached reference pass and the policy agree exactly before any update, and a
second run reads the cache. Skipped without CUDA (see tests/conftest.py)."""

import pytest
from accelerate.state import AcceleratorState, PartialState

from align import dpo
from align.config import DPOConfig, load_config

from helpers import ROOT

pytestmark = pytest.mark.gpu


def run(tmp_path, name, *overrides):
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    cfg = load_config(DPOConfig, ROOT / "recipes" / "tiny" / "dpo.yaml",
                      [f"output_dir={tmp_path / name}", "log.progress=false", "train.precision=bf16",
                       "train.max_steps=3", *overrides])
    return dpo.main(cfg)


@pytest.mark.parametrize("lora", ["false", "true"])
def test_bf16_reference_cache_on_gpu(tmp_path, monkeypatch, lora):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    first = run(tmp_path, "a", f"lora.enabled={lora}")
    assert first["reference"]["forwards"] > 0
    assert first["val_accuracy_before"] == 0.5 and first["val_margin_before"] == 0.0
    second = run(tmp_path, "b", f"lora.enabled={lora}")
    assert second["reference"]["forwards"] == 0
    assert second["train_loss"] == pytest.approx(first["train_loss"], abs=1e-6)
