import pytest

from helpers import ROOT


@pytest.fixture(autouse=True)
def _repo_cwd_and_fresh_accelerate(monkeypatch):
    """Recipes name paths relative to the repository; each in-process run builds its own accelerate state."""
    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.chdir(ROOT)
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@pytest.fixture
def tiny_pretrained(tmp_path, tiny_tokenizer):
    """A tiny random Llama saved as a normal pretrained folder (weights, config, tokenizer)."""
    from helpers import tiny_causal_lm

    folder = tmp_path / "tiny-pretrained"
    tiny_causal_lm(init_std=0.1, seed=3).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
