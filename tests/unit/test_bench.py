"""scripts/bench.py's precision trials without training: the time cap, the choice of the faster precision, the
machine description."""

from __future__ import annotations

import importlib.util
import signal
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def busy(seconds: float) -> dict:
    """A pure-Python loop (the handler runs between bytecodes, as it does between torch ops)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return {"done": True}


def test_time_cap_stops_a_slow_run_and_clears_the_timer():
    before = signal.getsignal(signal.SIGALRM)
    res, seconds = bench.capped_trial(lambda: busy(5.0), cap=0.2)
    assert res is None and 0.2 <= seconds < 2.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_time_cap_lets_a_fast_run_finish_and_clears_the_timer():
    res, _ = bench.capped_trial(lambda: busy(0.01), cap=5.0)
    assert res == {"done": True}
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    busy(0.05)  # no late alarm


def test_time_cap_clears_the_timer_when_the_run_fails():
    with pytest.raises(ValueError):
        bench.capped_trial(lambda: (_ for _ in ()).throw(ValueError("boom")), cap=5.0)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_the_timeout_is_not_an_exception_the_run_could_swallow():
    def swallowing():
        try:
            busy(5.0)
        except Exception:  # what a library's broad handler would do
            return {"swallowed": True}

    res, _ = bench.capped_trial(swallowing, cap=0.1)
    assert res is None


def test_keep_faster():
    trial = lambda rate: {"rate": rate, "seconds": 1.0, "cap_s": None}  # noqa: E731
    assert bench.keep_faster({"fp32": trial(100.0), "bf16": trial(250.0)}) == "bf16"
    assert bench.keep_faster({"fp32": trial(100.0), "bf16": trial(90.0)}) == "fp32"
    assert bench.keep_faster({"fp32": trial(100.0), "bf16": trial(100.0)}) == "fp32"  # a tie keeps float32
    assert bench.keep_faster({"fp32": trial(100.0), "bf16": trial(None)}) == "fp32"  # stopped: the slower


def test_describe_trials():
    trials = {"fp32": {"rate": 1130.4, "seconds": 9.2, "cap_s": None},
              "bf16": {"rate": None, "seconds": 61.0, "cap_s": 60.0}}
    line = bench.describe_trials(trials, "fp32", "tok/s")
    assert line == "fp32 1130 tok/s, bf16 stopped after 61 s (cap 60 s; fp32's trial took 9 s) -> fp32"
    trials["bf16"] = {"rate": 2.5, "seconds": 3.0, "cap_s": 60.0}
    assert bench.describe_trials(trials, "fp32", "pairs/s") == "fp32 1130 pairs/s, bf16 2.5 pairs/s -> fp32"


def test_cpu_info_reads_the_model_and_the_bf16_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                       "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    info = bench.cpu_info(str(cpuinfo))
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert {f for f, on in info["flags"].items() if on} == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert info["flags"]["avx512_fp16"] is False
    assert bench.cpu_info(str(tmp_path / "absent"))["flags"] == {}


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
    bench.matmul_peak_gflops(torch.bfloat16, sizes=(64, 128, 256), seconds=0.2)
    assert tried == [64, 64]


def test_the_bf16_cap_is_four_times_fp32_and_at_least_a_minute_unless_set():
    from argparse import Namespace

    assert bench.bf16_cap(Namespace(trial_cap_s=None), fp32_seconds=5.0) == 60.0
    assert bench.bf16_cap(Namespace(trial_cap_s=None), fp32_seconds=30.0) == 120.0
    assert bench.bf16_cap(Namespace(trial_cap_s=10.0), fp32_seconds=30.0) == 10.0
