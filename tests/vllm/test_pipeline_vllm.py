"""The tiny pipeline with vLLM where it samples: PPO's rollouts from a colocated engine, and the evaluation's
responses from one engine per policy (built after PPO's engine was closed). On this CPU or a GPU.

    python -m pytest tests/vllm/test_pipeline_vllm.py -q
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def test_tiny_pipeline_with_vllm_rollouts_and_vllm_evaluation(tmp_path):
    out = tmp_path / "pipeline"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # a fresh process: vLLM's group is per process
    env["ALIGN_CACHE"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "align.pipeline", "recipes/tiny/pipeline.yaml", f"output_dir={out}",
           "ppo.overrides.rollout.engine=vllm", "ppo.overrides.rollout.vllm.max_model_length=512",
           "evaluate.engine=vllm", "evaluate.vllm.max_model_length=512"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["ppo"]["report"]["engine"] == "vllm"
    assert set(report["evaluations"]) == {"dpo", "ppo"}
    for name in ("dpo", "ppo"):
        ev = json.loads((out / f"eval_{name}" / "eval.json").read_text())
        samples = (out / f"eval_{name}" / "samples.jsonl").read_text().splitlines()
        assert ev["sampling"]["engine"] == "vllm" and ev["n"] == len(samples) > 0
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["rollout/logprob_diff"] for r in rows if "rollout/logprob_diff" in r]
    assert diffs and all(d < 1e-2 for d in diffs), diffs  # vLLM sampled from the weights being trained
