"""The vllm rollout engine's own logic, without vLLM: TRL's `VLLMGeneration` is replaced by a fake that records what
it is given and answers as TRL does (completions as token lists, log-probs as [sequence][token][1]). The engines are
built in server mode here (nothing local to load); what vLLM itself computes, colocated on this CPU or a GPU, is
checked in tests/vllm."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from align import rollout
from align.config import RolloutConfig, VLLMConfig
from align.rollout import Sampling, VLLMEngine, cut_at_stop, make_engine, stop_token_ids

EOS, END_OF_TURN = 2, 5  # the tokenizer's EOS, and an extra stop id from the model's generation config


class FakeGeneration:
    """Stands in for trl.generation.vllm_generation.VLLMGeneration."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.model = kwargs["model"]
        self.pushed = []  # the model held at each completed push
        self.push = lambda: None  # what a push does (sleep, raise...); replaced by tests
        self.answers = []  # (completions, logprobs) returned by the next generate calls, in order
        self.calls = []
        self.llm = object()
        FakeGeneration.instances.append(self)

    def sync_weights(self):
        self.push()
        self.pushed.append(self.model)

    def generate(self, prompts, images, num_generations):
        self.calls.append((prompts, images, num_generations))
        completions, logprobs = self.answers.pop(0)
        return prompts, completions, logprobs, None


@pytest.fixture
def fake_trl(monkeypatch):
    """VLLMEngine imports VLLMGeneration from TRL's module when it is built: patch it there."""
    import trl.generation.vllm_generation as vg

    FakeGeneration.instances = []
    monkeypatch.setattr(vg, "VLLMGeneration", FakeGeneration)
    return FakeGeneration


def tokenizer(eos=EOS):
    return SimpleNamespace(eos_token_id=eos)


def model(eos=(EOS, END_OF_TURN)):
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=list(eos) if eos is not None else None))


SAMPLING = Sampling(max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=50)


def engine(fake_trl, policy=None, **kwargs):
    kwargs.setdefault("mode", "server")
    return VLLMEngine(policy if policy is not None else model(), tokenizer(), accelerator=object(),
                      sampling=SAMPLING, **kwargs)


def trl_logprobs(values):
    """TRL's shape with logprobs=0: one [sampled token's log-prob] list per generated token."""
    return [[[v] for v in seq] for seq in values]


# ---- building ---------------------------------------------------------------------------------------------------

def test_building_passes_the_sampling_to_trl_and_pushes_the_policy_before_version_0(fake_trl):
    policy = model()
    eng = engine(fake_trl, policy, mode="server", server_base_url="http://127.0.0.1:8000", server_timeout=12.0,
                 gpu_memory_utilization=0.3, enable_sleep_mode=True, max_model_length=1024, sync_timeout=30.0)
    gen = fake_trl.instances[-1]
    assert gen.kwargs["model"] is policy and gen.kwargs["processing_class"] is not None
    assert gen.kwargs["temperature"] == 0.9 and gen.kwargs["top_p"] == 0.95 and gen.kwargs["top_k"] == 50
    assert gen.kwargs["max_completion_length"] == 8
    assert gen.kwargs["logprobs"] == 0  # only the sampled token's log-prob: inner lists of length 1
    assert (gen.kwargs["mode"], gen.kwargs["server_base_url"], gen.kwargs["server_timeout"]) == (
        "server", "http://127.0.0.1:8000", 12.0)
    assert (gen.kwargs["gpu_memory_utilization"], gen.kwargs["enable_sleep_mode"], gen.kwargs["max_model_length"]) \
        == (0.3, True, 1024)
    # vLLM loaded the weights from disk: the policy's own are pushed once before anything is sampled
    assert gen.pushed == [policy]
    assert eng.version == 0 and eng.sync_timeout == 30.0 and eng.stop_ids == [EOS, END_OF_TURN]


def test_a_failed_first_push_fails_the_build(fake_trl, monkeypatch):
    """An engine is never handed out with the weights vLLM read from disk instead of the policy's."""
    import trl.generation.vllm_generation as vg

    class Unreachable(FakeGeneration):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.push = self.fail

        def fail(self):
            raise OSError("no route to host")

    monkeypatch.setattr(vg, "VLLMGeneration", Unreachable)
    with pytest.raises(RuntimeError, match="no route to host"):
        engine(fake_trl)
    assert len(fake_trl.instances) == 1 and fake_trl.instances[0].pushed == []


# ---- sync ---------------------------------------------------------------------------------------------------------

def test_a_hung_weight_sync_raises_timeout_promptly_and_keeps_the_version(fake_trl):
    eng = engine(fake_trl, sync_timeout=0.2)
    gen = fake_trl.instances[-1]
    release, entered = threading.Event(), threading.Event()

    def hang():
        entered.set()
        release.wait(10.0)  # a push that would take 10 s

    gen.push = hang
    start = time.perf_counter()
    try:
        with pytest.raises(TimeoutError, match="sync_timeout"):
            eng.sync(model())
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert entered.is_set()
    assert 0.15 <= elapsed < 2.0, elapsed  # waited for the timeout, not for the push
    assert eng.version == 0
    # the push finishing later (in its own thread) does not bump the version either
    deadline = time.time() + 5
    while len(gen.pushed) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert len(gen.pushed) == 2 and eng.version == 0


def test_a_failed_weight_sync_raises_naming_the_cause_and_keeps_the_version(fake_trl):
    eng = engine(fake_trl)
    gen = fake_trl.instances[-1]

    def broken():
        raise ConnectionError("vLLM server went away")

    gen.push = broken
    with pytest.raises(RuntimeError, match="vLLM server went away") as info:
        eng.sync(model())
    assert isinstance(info.value.__cause__, ConnectionError)
    assert eng.version == 0 and len(gen.pushed) == 1  # only the initial push completed
    gen.answers.append(([[7, 8]], trl_logprobs([[-0.5, -0.6]])))
    assert eng.generate([[1, 3]], SAMPLING).policy_version == 0


def test_a_successful_sync_pushes_the_given_model_and_stamps_the_next_rollouts(fake_trl):
    eng = engine(fake_trl)
    gen = fake_trl.instances[-1]
    updated, again = model(), model()
    eng.sync(updated)
    assert eng.version == 1 and gen.pushed[-1] is updated and gen.model is updated
    gen.answers.append(([[7, EOS]], trl_logprobs([[-0.5, -0.25]])))
    assert eng.generate([[1, 3]], SAMPLING).policy_version == 1
    eng.sync(again)
    assert eng.version == 2 and gen.pushed[-1] is again
    gen.answers.append(([[7, EOS]], trl_logprobs([[-0.5, -0.25]])))
    assert eng.generate([[1, 3]], SAMPLING).policy_version == 2


def test_a_sync_runs_the_push_on_another_thread_but_waits_for_it(fake_trl):
    eng = engine(fake_trl)
    gen = fake_trl.instances[-1]
    threads = []
    gen.push = lambda: (threads.append(threading.current_thread()), time.sleep(0.05))
    eng.sync(model())
    assert threads and threads[0] is not threading.current_thread()
    assert not threads[0].is_alive() and eng.version == 1


# ---- generate -----------------------------------------------------------------------------------------------------

def test_generate_cuts_at_the_first_stop_token_and_keeps_logprobs_aligned(fake_trl):
    eng = engine(fake_trl)
    gen = fake_trl.instances[-1]
    completions = [
        [10, 11, END_OF_TURN, 12, EOS],  # stops at the generation config's end-of-turn; the rest is dropped
        (13, 14, 15, 16, 17, 18, 19, 20),  # vLLM hands out tuples; hit max_new_tokens
        [EOS, 9, 9],  # stops at once
        [16, EOS, END_OF_TURN],  # the first of two stop tokens
        [],  # nothing generated
    ]
    logprobs = [[-(i + 1) - t / 10 for t in range(len(c))] for i, c in enumerate(completions)]
    gen.answers.append((completions, trl_logprobs(logprobs)))
    prompts = [(1, 3, 4), [1], [1, 2, 3, 4, 5], [6], [7, 7]]
    ro = eng.generate(prompts, Sampling(max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=50))

    assert gen.calls == [([[1, 3, 4], [1], [1, 2, 3, 4, 5], [6], [7, 7]], None, 1)]  # lists, no images, n=1
    assert ro.prompt_ids == [[1, 3, 4], [1], [1, 2, 3, 4, 5], [6], [7, 7]]
    assert ro.response_ids == [[10, 11, END_OF_TURN], [13, 14, 15, 16, 17, 18, 19, 20], [EOS], [16, EOS], []]
    assert ro.finish_reason == ["stop", "length", "stop", "stop", "length"]
    assert ro.stopped.tolist() == [True, False, True, True, False]
    assert ro.logprobs == [[-1.0, -1.1, -1.2], [-2.0, -2.1, -2.2, -2.3, -2.4, -2.5, -2.6, -2.7], [-3.0],
                           [-4.0, -4.1], []]
    assert all(isinstance(x, float) for lp in ro.logprobs for x in lp)
    assert [len(lp) for lp in ro.logprobs] == [len(r) for r in ro.response_ids]
    assert ro.num_response_tokens == 14 and len(ro) == 5 and ro.policy_version == 0 and ro.seconds >= 0


def test_generate_reads_the_sampled_tokens_logprob_when_trl_returns_top_n(fake_trl):
    """With logprobs=N TRL returns the sampled token's log-prob first, then the top-N: the first is the one kept."""
    eng = engine(fake_trl)
    gen = fake_trl.instances[-1]
    gen.answers.append(([[7, EOS]], [[[-3.0, -0.1, -0.2], [-0.4, -0.3]]]))
    assert eng.generate([[1]], SAMPLING).logprobs == [[-3.0, -0.4]]


@pytest.mark.parametrize("other", [
    Sampling(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50),
    Sampling(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50),
    Sampling(max_new_tokens=8, temperature=0.9, top_p=1.0, top_k=50),
    Sampling(max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=0),
])
def test_generate_with_other_sampling_settings_raises(fake_trl, other):
    eng = engine(fake_trl)
    gen = fake_trl.instances[-1]
    with pytest.raises(ValueError, match="built for"):
        eng.generate([[1, 2]], other)
    assert gen.calls == []  # nothing was sampled with the wrong settings


def test_close_drops_the_llm_and_tolerates_a_server_engine(fake_trl):
    eng = engine(fake_trl)
    gen = fake_trl.instances[-1]
    assert gen.kwargs["generation_kwargs"] == {}  # no seed: PPO draws afresh every iteration
    eng.close()
    assert not hasattr(gen, "llm")
    eng.close()  # server mode has no llm: nothing to drop


# ---- make_engine ----------------------------------------------------------------------------------------------------

def test_make_engine_vllm_server_without_cuda_is_a_clear_error(fake_trl, monkeypatch):
    """TRL's client pushes weights to a server over NCCL: without CUDA that cannot work, so it fails before building."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = RolloutConfig(engine="vllm", vllm=VLLMConfig(mode="server", server_base_url="http://127.0.0.1:8123"))
    with pytest.raises(RuntimeError, match=r"vllm\.mode=server.*NCCL.*mode=colocate"):
        make_engine(cfg, model(), tokenizer(), object(), SAMPLING)
    assert fake_trl.instances == []


def test_make_engine_vllm_forwards_the_vllm_section(fake_trl, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # server mode pushes over NCCL
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    cfg = RolloutConfig(engine="vllm", vllm=VLLMConfig(mode="server", server_base_url="http://127.0.0.1:8123",
                                                       server_timeout=5.0, gpu_memory_utilization=0.25,
                                                       max_model_length=2048, sync_timeout=42.0))
    eng = make_engine(cfg, model(), tokenizer(), object(), SAMPLING, seed=11)
    gen = fake_trl.instances[-1]
    assert gen.kwargs["generation_kwargs"] == {"seed": 11}  # evaluation seeds every request alike
    assert isinstance(eng, VLLMEngine) and eng.name == "vllm" and eng.sync_timeout == 42.0
    assert (gen.kwargs["mode"], gen.kwargs["server_base_url"], gen.kwargs["server_timeout"],
            gen.kwargs["gpu_memory_utilization"], gen.kwargs["max_model_length"]) == (
        "server", "http://127.0.0.1:8123", 5.0, 0.25, 2048)
    assert eng.sampling == SAMPLING


def test_make_engine_without_trl_vllm_support_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "trl.generation.vllm_generation", None)  # import fails
    cfg = RolloutConfig(engine="vllm")
    with pytest.raises(RuntimeError, match="rollout.engine=vllm needs"):
        make_engine(cfg, model(), tokenizer(), object(), SAMPLING)


# ---- helpers --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, stops, want", [
    ([], [2], ([], "length")),
    ([4, 9, 9], [2], ([4, 9, 9], "length")),
    ([2], [2], ([2], "stop")),
    ([4, 2, 9, 2], [2], ([4, 2], "stop")),
    ([4, 5, 2], [2, 5], ([4, 5], "stop")),
    ((4, 9, 5), [2, 5], ([4, 9, 5], "stop")),
])
def test_cut_at_stop(tokens, stops, want):
    got = cut_at_stop(tokens, stops)
    assert got == want and isinstance(got[0], list)


def test_stop_token_ids_merge_the_tokenizer_and_generation_config():
    assert stop_token_ids(tokenizer(2)) == [2]
    assert stop_token_ids(tokenizer(2), model((5, 2, 7))) == [2, 5, 7]  # tokenizer's first, no duplicates
    assert stop_token_ids(tokenizer(2), SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=9))) == [2, 9]
    assert stop_token_ids(tokenizer(None), model((9,))) == [9]
    assert stop_token_ids(tokenizer(2), SimpleNamespace()) == [2]  # no generation config
    with pytest.raises(ValueError, match="could never stop"):
        stop_token_ids(tokenizer(None), model(None))
    with pytest.raises(ValueError, match="could never stop"):
        stop_token_ids(tokenizer(None))


def test_the_engines_share_one_interface():
    for cls in (rollout.HFEngine, rollout.VLLMEngine):
        assert all(callable(getattr(cls, name)) for name in ("generate", "sync", "close"))
    assert {rollout.HFEngine.name, rollout.VLLMEngine.name} == {"hf", "vllm"}


# ---- what a colocated engine is built from ------------------------------------------------------------------------

def test_the_engine_folder_holds_the_policys_config_without_weights_or_gguf_quantization(tmp_path, tiny_tokenizer):
    import json

    from align.config import LoraConfig, ModelConfig
    from align.models import load_causal_lm

    policy = load_causal_lm(ModelConfig(name_or_path="recipes/tiny/model", init="random"),
                            LoraConfig(enabled=True, r=4, alpha=8), seed=0)  # peft-wrapped: the base's config
    policy.get_base_model().config.quantization_config = {"quant_method": "gguf"}  # as a GGUF conversion leaves
    rollout.write_engine_folder(policy, tiny_tokenizer, str(tmp_path), "float32")
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"]  # built from a config: none recorded, vLLM needs one
    assert config["head_dim"] == 32 and config["vocab_size"] == len(tiny_tokenizer)
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "generation_config.json").exists()
    assert (tmp_path / "tokenizer.json").is_file()


def test_the_engine_computes_in_the_policys_dtype():
    net = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert rollout.engine_dtype(net, SimpleNamespace(mixed_precision="no")) == "bfloat16"
    assert rollout.engine_dtype(torch.nn.Linear(2, 2), SimpleNamespace(mixed_precision="no")) == "float32"
    assert rollout.engine_dtype(torch.nn.Linear(2, 2), SimpleNamespace(mixed_precision="bf16")) == "bfloat16"
    assert rollout.engine_dtype(torch.nn.Linear(2, 2), object()) == "float32"


def test_building_llm_adds_the_settings_to_trls_llm_call_and_puts_it_back(monkeypatch):
    import trl.generation.vllm_generation as vg

    calls = []
    monkeypatch.setattr(vg, "LLM", lambda **kwargs: calls.append(kwargs), raising=False)
    real = vg.LLM
    with rollout.building_llm({"model": "/engine-folder", "dtype": "float32", "load_format": "dummy"}, None):
        vg.LLM(model="policy/name_or_path", seed=0, max_model_len=512)
    assert calls == [{"model": "/engine-folder", "seed": 0, "max_model_len": 512, "dtype": "float32",
                      "load_format": "dummy"}]
    assert vg.LLM is real
    with pytest.raises(RuntimeError, match="engine failed"), rollout.building_llm({"dtype": "float32"}, None):
        raise RuntimeError("engine failed")
    assert vg.LLM is real  # restored after an error too


def test_closing_under_a_launcher_keeps_the_default_process_group(monkeypatch):
    """vLLM's shutdown destroys the default group; under a launcher that group is the training's: it is kept, and
    vLLM's own groups still go."""
    import torch.distributed as dist

    destroyed = []
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: destroyed.append(group))
    own = object()  # one of vLLM's groups
    with rollout.keeping_default_process_group():
        dist.destroy_process_group(own)
        dist.destroy_process_group()  # the default group: kept
        dist.destroy_process_group(None)
    assert destroyed == [own]
    dist.destroy_process_group()
    assert destroyed == [own, None]  # outside, destroying works as before
