"""The tiny pipeline on a CUDA GPU, PPO's rollouts from a colocated vLLM engine (the GPU recipe's shape in seconds).

    python -m pytest tests/gpu/test_pipeline_gpu.py -q

Skipped without CUDA (tests/conftest.py) or without vllm (importorskip). Never run yet: this project has not had a GPU.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.gpu
DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def test_tiny_pipeline_with_vllm_rollouts_runs_every_stage_and_evaluates(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "pipeline"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # a fresh process: vLLM's group is per process
    env["ALIGN_CACHE"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "align.pipeline", "recipes/tiny/pipeline.yaml", f"output_dir={out}",
           "ppo.overrides.rollout.engine=vllm", "ppo.overrides.rollout.vllm.gpu_memory_utilization=0.2",
           "ppo.overrides.rollout.vllm.max_model_length=512"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["ppo"]["report"]["engine"] == "vllm"
    assert set(report["evaluations"]) == {"dpo", "ppo"}
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["rollout/logprob_diff"] for r in rows if "rollout/logprob_diff" in r]
    assert diffs and all(0 <= d < 0.1 for d in diffs), diffs  # vLLM sampled from the weights being trained
