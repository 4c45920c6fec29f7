"""rollout: align's two rollout engines, not align against TRL: hf (transformers generate) and vllm (colocated), on
SmolLM2-135M-Instruct's real weights, the same chat-rendered GSM8K prompts and sampling settings, interleaved over
--rounds after one warm-up call each. The ratio is vllm's samples (responses) per second over hf's; the engine's
start-up is reported apart (it is paid once per run). Both engines compute in float32 (the model's dtype): this
compares engines, not precisions, so there is no precision trial. Needs vLLM: `all` leaves it out.
"""

from __future__ import annotations

import statistics
import time

import torch
from benchlib import SMOLLM2, chat_prompts, reset_accelerate


def bench(args, peaks: dict) -> dict:
    from accelerate import Accelerator

    from align import data, models, rollout
    from align.config import LoraConfig, ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    policy = models.load_causal_lm(ModelConfig(name_or_path=SMOLLM2, dtype="float32"), LoraConfig(), seed=0).eval()
    count = args.batch * (args.steps or 4)
    picked = chat_prompts(tokenizer, count, args.max_length)
    prompts = [data.prompt_ids(tokenizer, example.prompt) for _, example, _ in picked]
    sampling = rollout.Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0)
    reset_accelerate()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    hf = rollout.HFEngine(policy.to(accelerator.device), tokenizer, generation_batch_size=64)  # align.ppo's default
    start = time.perf_counter()
    vllm = rollout.VLLMEngine(policy, tokenizer, accelerator, sampling, max_model_length=1024, cpu_kv_cache_gib=2,
                              gpu_memory_utilization=0.3)
    startup = time.perf_counter() - start
    try:
        for engine in (hf, vllm):  # the first call of each allocates and picks kernels: not timed
            engine.generate(prompts[: args.batch], sampling)
        runs = {"hf": [], "vllm": []}
        for r in range(args.rounds):
            for name, engine in (("hf", hf), ("vllm", vllm)):
                print(f"[bench] rollout round {r + 1}/{args.rounds}: {name}", flush=True)
                ro = engine.generate(prompts, sampling)
                runs[name].append({"samples_per_s": len(ro) / ro.seconds,
                                   "tokens_per_s": ro.num_response_tokens / ro.seconds,
                                   "response_length": ro.num_response_tokens / len(ro), "seconds": ro.seconds})
    finally:
        vllm.close()

    def summary(name: str) -> dict:
        rounds = runs[name]
        return {"items_per_s": statistics.median(x["samples_per_s"] for x in rounds),
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rounds),
                "response_length": statistics.median(x["response_length"] for x in rounds),
                "rounds": [x["samples_per_s"] for x in rounds]}

    hf_side, vllm_side = summary("hf"), summary("vllm")
    return {"stage": "rollout", "ratio": vllm_side["items_per_s"] / hf_side["items_per_s"],
            "tokens_ratio": vllm_side["tokens_per_s"] / hf_side["tokens_per_s"], "unit": "samples/s",
            "vllm_startup_s": startup, "hf": hf_side, "vllm": vllm_side,
            "device": str(accelerator.device), "torch_threads": torch.get_num_threads(),
            "work": {"model": "SmolLM2-135M-Instruct (float32)", "prompts": len(prompts),
                     "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "rounds": args.rounds,
                     "data": "data/gsm8k_400.jsonl questions (chat template)"}}


def print_table(result: dict) -> None:
    w = result["work"]
    print(f"\nrollout: {w['model']}, {w['prompts']} prompts, up to {w['max_new_tokens']} new tokens, temperature "
          f"{w['temperature']}, on {result['device']} ({result['torch_threads']} threads)")
    print(f"{'engine':<8}{'samples/s':>11}{'tokens/s':>10}{'mean length':>13}   rounds")
    for name in ("hf", "vllm"):
        side = result[name]
        rounds = ", ".join(f"{x:.2f}" for x in side["rounds"])
        print(f"{name:<8}{side['items_per_s']:>11.2f}{side['tokens_per_s']:>10.1f}{side['response_length']:>13.1f}"
              f"   {rounds}")
    print(f"ratio vllm/hf: {result['ratio']:.2f}x samples/s, {result['tokens_ratio']:.2f}x tokens/s; vLLM start-up "
          f"{result['vllm_startup_s']:.1f} s (once per run)")

