"""Which precision a run computes in: `precision: auto` decided from what the hardware does.

bf16 autocast (float32 master weights and optimizer state, bf16 matmuls) pays only where the hardware multiplies
bf16 natively: a CUDA GPU of compute capability 8.0 or later (A100, H100...), or a CPU with AVX-512 BF16 or AMX
(x86) or the BF16 extension (Arm). Elsewhere bf16 is emulated: on an AVX2-only CPU a bf16 matmul ran about 180x
slower than float32, so `auto` keeps float32 there. Flags can promise what torch's build does not deliver, so on a
CPU whose flags say bf16 is native a short matmul probe (about a second, cached per machine in
$ALIGN_CACHE/hardware/) confirms that bf16 is really faster before `auto` picks it.

Every stage, the evaluator and the rollout engines take their precision from `resolve` (through
train.plain_accelerator); the decision and its reason are logged and written in each run's report.json.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("align")

# accelerate's mixed_precision for each of the recipes' precisions
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# CPU flags that mean native bf16 arithmetic: x86 (/proc/cpuinfo `flags`) and Arm (`Features`)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# bf16 must beat float32 by this much on the probe: autocast's casts eat a small win
MIN_SPEEDUP = 1.3


@dataclass(frozen=True)
class Choice:
    """What a run computes in, and why."""

    asked: str  # the recipe's value: auto | fp32 | bf16 | fp16
    used: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def mixed_precision(self) -> str:
        return MIXED_PRECISION[self.used]

    def describe(self) -> str:
        return f"{self.used} ({'auto: ' if self.asked == 'auto' else ''}{self.reason})"

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(asked: str) -> Choice:
    """The precision of a recipe's `precision` setting on this machine."""
    if asked == "auto":
        return auto_choice()
    if asked == "fp32":
        return Choice(asked, asked, "set by the recipe")
    auto = auto_choice()
    if auto.used == "fp32" and not torch.cuda.is_available():
        return Choice(asked, asked, f"set by the recipe, although auto would keep fp32 here: {auto.reason}")
    return Choice(asked, asked, "set by the recipe")


def autocast(choice: Choice, device) -> contextlib.AbstractContextManager:
    """torch's autocast for `choice` on `device`, for forwards outside an accelerator (the scoring entry points)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(choice.used)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def auto_choice() -> Choice:
    """`auto` on this machine (decided once per process). ALIGN_AUTO_PRECISION=fp32|bf16|fp16 decides it instead
    (the tests pin it to fp32, so that their numbers compare exactly on any machine)."""
    forced = os.environ.get("ALIGN_AUTO_PRECISION")
    if forced:
        if forced not in MIXED_PRECISION:
            raise ValueError(f"ALIGN_AUTO_PRECISION={forced}: expected one of {', '.join(MIXED_PRECISION)}")
        return Choice("auto", forced, f"ALIGN_AUTO_PRECISION={forced} in the environment")
    if torch.cuda.is_available():
        return decide_gpu(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    return decide_cpu(cpu_info(), cached_probe)


def decide_gpu(name: str, capability: tuple[int, int]) -> Choice:
    cc = f"{capability[0]}.{capability[1]}"
    if tuple(capability) >= (8, 0):
        return Choice("auto", "bf16", f"the GPU ({name}, compute capability {cc}) multiplies bf16 natively")
    # torch.cuda.is_bf16_supported() says yes here too, counting emulation: slower than float32
    return Choice("auto", "fp32", f"the GPU ({name}, compute capability {cc} < 8.0) has no fast bf16")


def decide_cpu(info: Optional[dict], probe: Callable[[dict], dict]) -> Choice:
    """`info`: cpu_info() (None where the flags cannot be read); `probe(info)`: measured matmul GFLOP/s per dtype,
    asked only when the flags say bf16 is native."""
    if info is None:
        return Choice("auto", "fp32", "this CPU's flags could not be read (no /proc/cpuinfo), so bf16 is not known "
                                      "to be native")
    native = [f for f in NATIVE_BF16_FLAGS if f in info["flags"]]
    if not native:
        return Choice("auto", "fp32", f"the CPU ({vector_level(info['flags'])}) has no native bf16 (no "
                                      f"{', '.join(NATIVE_BF16_FLAGS[:2])}): bf16 would be emulated, far slower")
    measured = probe(info)
    bf16, fp32 = measured["bf16_gflops"], measured["fp32_gflops"]
    figures = f"bf16 matmul {bf16:.0f} GFLOP/s against {fp32:.0f} in fp32 ({bf16 / fp32:.1f}x)"
    if bf16 >= MIN_SPEEDUP * fp32:
        return Choice("auto", "bf16", f"the CPU has native bf16 ({', '.join(native)}); measured {figures}")
    return Choice("auto", "fp32", f"the CPU reports native bf16 ({', '.join(native)}) but measured {figures}, "
                                  f"under the {MIN_SPEEDUP}x that pays for autocast")


def vector_level(flags: frozenset) -> str:
    for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "Arm NEON")):
        if flag in flags:
            return name
    return "no AVX2"


def cpu_info(path: str = "/proc/cpuinfo") -> Optional[dict]:
    """{"model": name, "flags": frozenset} of the first processor listed; None where the file is absent (macOS,
    Windows)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = frozenset(value.split())
    return None if flags is None else {"model": model, "flags": flags}


# --------------------------------------------------------------------------------------------------------------
# The probe: bf16 against float32 matmul, measured once per machine


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """Matmul throughput (GFLOP/s) at n x n with torch's threads; at least one timed product."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: kernels chosen, memory allocated
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def machine_key(info: dict) -> str:
    """What the probe's answer depends on: the CPU, its bf16 flags, torch's build and its thread count."""
    parts = [info["model"], sorted(f for f in info["flags"] if f in NATIVE_BF16_FLAGS or f.startswith("avx512")),
             torch.__version__, torch.get_num_threads()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def cached_probe(info: dict, measure: Callable[[torch.dtype], float] = matmul_gflops) -> dict:
    """The probe's figures for this machine: read from $ALIGN_CACHE/hardware/bf16-<key>.json (plain JSON) when a
    run measured them before, else measured now and written there."""
    from .models import cache_dir

    path = cache_dir() / "hardware" / f"bf16-{machine_key(info)}.json"
    try:
        cached = json.loads(path.read_text())
        if all(isinstance(cached.get(k), (int, float)) and cached[k] > 0 for k in ("bf16_gflops", "fp32_gflops")):
            return cached
    except (OSError, ValueError):
        pass  # not measured yet, or a damaged file of ours: measure again
    measured = {"fp32_gflops": measure(torch.float32), "bf16_gflops": measure(torch.bfloat16),
                "cpu": info["model"], "torch": torch.__version__, "threads": torch.get_num_threads(),
                "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    log.info("bf16 probe: %.0f GFLOP/s bf16, %.0f fp32 (cached in %s)", measured["bf16_gflops"],
             measured["fp32_gflops"], path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(measured, indent=1))
        tmp.replace(path)
    except OSError as err:  # a read-only cache costs a second per run, nothing else
        log.warning("could not cache the bf16 probe in %s: %s", path, err)
    return measured
