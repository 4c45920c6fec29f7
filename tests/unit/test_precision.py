"""`precision: auto` decided from the hardware (align/precision.py), and a resume under another precision."""

import json

import pytest
import torch

from align import precision, train

AVX2 = {"model": "AMD EPYC", "flags": frozenset({"fpu", "sse2", "avx", "avx2", "fma"})}
SAPPHIRE = {"model": "Intel Xeon Platinum 8480", "flags": frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16",
                                                                    "amx_tile", "amx_bf16"})}


def no_probe(info):
    raise AssertionError("the probe must not run where the flags rule bf16 out")


def test_auto_keeps_fp32_on_a_cpu_without_native_bf16_and_never_probes():
    choice = precision.decide_cpu(AVX2, no_probe)
    assert (choice.used, choice.mixed_precision) == ("fp32", "no")
    assert "AVX2" in choice.reason and "no native bf16" in choice.reason


def test_auto_picks_bf16_where_the_flags_and_the_probe_agree():
    choice = precision.decide_cpu(SAPPHIRE, lambda info: {"bf16_gflops": 830.0, "fp32_gflops": 200.0})
    assert (choice.used, choice.mixed_precision) == ("bf16", "bf16")
    assert "amx_bf16" in choice.reason and "830" in choice.reason and "4.2x" in choice.reason


def test_auto_keeps_fp32_when_the_probe_does_not_confirm_the_flags():
    choice = precision.decide_cpu(SAPPHIRE, lambda info: {"bf16_gflops": 240.0, "fp32_gflops": 200.0})
    assert choice.used == "fp32" and "1.2x" in choice.reason


def test_auto_on_a_gpu_follows_its_compute_capability():
    assert precision.decide_gpu("NVIDIA H200", (9, 0)).used == "bf16"
    assert precision.decide_gpu("NVIDIA A100", (8, 0)).used == "bf16"
    old = precision.decide_gpu("Tesla T4", (7, 5))  # torch.cuda.is_bf16_supported() is True here (emulated)
    assert old.used == "fp32" and "7.5" in old.reason


def test_cpu_info_reads_x86_and_arm_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
                   "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n")
    assert precision.cpu_info(str(x86)) == {"model": "AMD EPYC 7B13", "flags": frozenset({"fpu", "avx2", "fma"})}
    assert precision.decide_cpu(precision.cpu_info(str(x86)), no_probe).used == "fp32"
    probed = []
    graviton = precision.decide_cpu(precision.cpu_info(str(arm)),
                                    lambda info: probed.append(info) or {"bf16_gflops": 90.0, "fp32_gflops": 45.0})
    assert graviton.used == "bf16" and len(probed) == 1
    assert precision.cpu_info(str(tmp_path / "absent")) is None
    assert precision.decide_cpu(None, no_probe).used == "fp32"


def test_probe_is_measured_once_per_machine_and_kept_as_json(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return {torch.float32: 200.0, torch.bfloat16: 800.0}[dtype]

    first = precision.cached_probe(SAPPHIRE, measure)
    again = precision.cached_probe(SAPPHIRE, measure)
    assert len(calls) == 2 and (first["bf16_gflops"], again["bf16_gflops"]) == (800.0, 800.0)
    files = list((tmp_path / "hardware").glob("bf16-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["fp32_gflops"] == 200.0
    files[0].write_text("{damaged")  # our own file, unreadable: measured again and rewritten
    precision.cached_probe(SAPPHIRE, measure)
    assert len(calls) == 4 and json.loads(files[0].read_text())["bf16_gflops"] == 800.0
    other = {**SAPPHIRE, "model": "Intel Xeon Platinum 8580"}  # another CPU: another measurement
    assert precision.machine_key(other) != precision.machine_key(SAPPHIRE)


def test_this_machine_auto_follows_its_flags(monkeypatch):
    """On a CPU without native bf16 (AVX2 only, like the machine this was written on) auto is fp32 with no probe;
    on one with native bf16, auto follows the probe's measurement."""
    monkeypatch.delenv("ALIGN_AUTO_PRECISION", raising=False)
    precision.auto_choice.cache_clear()
    try:
        info = precision.cpu_info()
        if torch.cuda.is_available():
            expected = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp32"
        elif info is None or not any(f in info["flags"] for f in precision.NATIVE_BF16_FLAGS):
            monkeypatch.setattr(precision, "cached_probe", no_probe)
            expected = "fp32"
        else:
            measured = precision.cached_probe(info)
            expected = "bf16" if measured["bf16_gflops"] >= precision.MIN_SPEEDUP * measured["fp32_gflops"] else "fp32"
        choice = precision.auto_choice()
        assert choice.asked == "auto" and choice.used == expected, choice
        assert precision.resolve("auto") == choice
    finally:
        precision.auto_choice.cache_clear()


def test_environment_decides_auto_and_explicit_settings_win(monkeypatch):
    precision.auto_choice.cache_clear()
    monkeypatch.setenv("ALIGN_AUTO_PRECISION", "bf16")
    try:
        assert precision.resolve("auto").used == "bf16" and "ALIGN_AUTO_PRECISION" in precision.resolve("auto").reason
        assert precision.resolve("fp32").used == "fp32" and precision.resolve("fp16").mixed_precision == "fp16"
        precision.auto_choice.cache_clear()
        monkeypatch.setenv("ALIGN_AUTO_PRECISION", "fp8")
        with pytest.raises(ValueError, match="ALIGN_AUTO_PRECISION=fp8"):
            precision.auto_choice()
    finally:
        precision.auto_choice.cache_clear()


def identity(setting, used):
    return {"stage": "sft", "settings": {"train.precision": setting, "train.learning_rate": 1e-3}, "inputs": {},
            "precision": used}


def test_resume_is_compared_by_the_precision_the_run_computed_in():
    problem = train.identity_mismatch(identity("auto", "bf16"), identity("auto", "fp32"))
    assert problem.startswith("it computed in bf16 and this run would compute in fp32")
    assert "train.precision=bf16" in problem
    assert train.identity_mismatch(identity("auto", "bf16"), identity("bf16", "bf16")) is None  # as it ran
    assert train.identity_mismatch(identity("auto", "fp32"), identity("auto", "fp32")) is None
    assert "computed in fp32" in train.identity_mismatch(identity("fp32", "fp32"), identity("auto", "bf16"))
    old = identity("auto", None)  # a run.json written before precision was recorded: the setting is compared
    assert train.identity_mismatch(old, identity("auto", "bf16")) is None
    assert "train.precision ('auto' -> 'bf16')" in train.identity_mismatch(old, identity("bf16", "bf16"))
    other = {**identity("auto", "fp32"), "settings": {"train.precision": "auto", "train.learning_rate": 1e-2}}
    assert train.identity_mismatch(identity("auto", "bf16"), other).startswith("its settings differ")
