"""ppo: align.ppo (hf generate, a critic, a frozen reference) against TRL's RLOOTrainer (TRL 1.x has no PPO trainer;
RLOO is its nearest on-policy peer) on the same model, prompts, reward rule (`length`), prompts per iteration,
response length limit and passes per batch.

RLOO samples at least two responses per prompt and has no critic, so the two do different work per prompt:
throughput is generated responses (prompt-response samples) per second, and the table splits each side's iteration
into rollout and scoring, log-prob forwards and update. With --engine vllm align's rollouts come from a colocated vLLM
engine; TRL's side keeps transformers generate (its own vLLM weight push fails on a CPU: see align/rollout.py
CPUWeightPacking).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
from benchlib import (
    LENGTH_RULE,
    align_rl_rows,
    chat_prompts,
    compare,
    model_flops,
    peaks_text,
    print_trials,
    reset_accelerate,
    split_text,
    stage_setup,
    step_clock,
    time_split,
    trl_length_reward,
    trl_phase_clocks,
    trl_rl_result,
)

PPO_BETA = 0.05  # the KL weight (align's algorithm.kl_coef default, TRL's beta default): both sides run a reference
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run_align_ppo(model_dir: Path, data_file: Path, out: Path, iterations: int, batch: int, epochs: int,
                   max_new_tokens: int, lr: float, engine: str = "hf", *, precision: str) -> dict:
    from align import ppo
    from align.config import PPOConfig, load_config

    reset_accelerate()
    launcher = {k: os.environ.get(k) for k in LAUNCHER_ENV}  # TRL sets these for a colocated vLLM engine
    cfg = load_config(PPOConfig, None, [
        f"output_dir={out}", "overwrite=true", f"model.name_or_path={model_dir}", f"data.train.path={data_file}",
        "data.max_prompt_length=100000", "reward.rule=length",
        *(f"reward.rule_args.{k}={v}" for k, v in LENGTH_RULE.items()),
        f"rollout.engine={engine}", f"rollout.max_new_tokens={max_new_tokens}",
        f"rollout.generation_batch_size={batch}", "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0",
        f"algorithm.ppo_epochs={epochs}", f"algorithm.mini_batch_size={batch}", f"algorithm.kl_coef={PPO_BETA}",
        "critic.init=policy", "lora.enabled=false",
        f"train.batch_size={batch}", f"train.micro_batch_size={batch}", f"train.max_steps={iterations}",
        f"train.learning_rate={lr}", "train.scheduler=constant", f"train.precision={precision}", "eval_samples=0",
        "log.every=1", "log.report_to=[]", "log.progress=false", "save_merged=false",
    ])
    try:
        report = ppo.main(cfg)
    finally:  # ...and TRL's trainer, next in this process, must not take them for a launcher's
        for key, value in launcher.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    res = align_rl_rows(out, "ppo", iterations, epochs, batch)
    return {**res, "report_seconds": report["seconds"]}


def _run_trl_rloo(model_dir: Path, prompts: list, out: Path, iterations: int, batch: int, epochs: int,
                  max_new_tokens: int, lr: float, *, precision: str) -> dict:
    """TRL's RLOOTrainer with transformers generate: `batch` prompts per generation, two completions each (RLOO's
    minimum), the whole generation batch in one optimizer step, `epochs` passes over it (num_iterations)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    reset_accelerate()
    length = trl_length_reward(LENGTH_RULE)
    generations = 2
    args = RLOOConfig(
        output_dir=str(out), max_steps=iterations * epochs, per_device_train_batch_size=batch * generations,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=generations, num_iterations=epochs,
        max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=PPO_BETA, epsilon=0.2,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False,
        shuffle_dataset=False, disable_dropout=True, logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    clock = step_clock()
    trainer = RLOOTrainer(model=model, reward_funcs=length, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])

    phases = trl_phase_clocks(trainer)
    trainer.train()
    return trl_rl_result("ppo", trainer, clock, phases, iterations, epochs)


def ppo_flops(n_body: int, n_head: int, tokens: float, targets: float, epochs: int, critic: bool) -> float:
    """The matmul FLOPs of one iteration: generation (one forward over every token, the head on each response
    token), the policy's and the reference's log-prob forwards, then `epochs` training passes of the policy; with a
    critic (align), its value forward and `epochs` training passes too (a backbone with a one-output head)."""
    flops = model_flops(n_body, n_head, tokens, targets, passes=1 + 2 + 3 * epochs)
    if critic:
        flops += model_flops(n_body, 0, tokens, 0, passes=1 + 3 * epochs)
    return flops


def bench(args, peaks: dict) -> dict:
    from align import data

    tokenizer, work, model = stage_setup("ppo", args.layers)
    batch, iterations, lr = args.batch, args.steps or 6, 1e-5
    epochs, new_tokens = args.ppo_epochs, args.max_new_tokens
    picked = chat_prompts(tokenizer, batch * iterations, args.max_length)
    if len(picked) < batch * iterations:
        raise SystemExit(f"only {len(picked)} prompts fit max_length={args.max_length}; lower --steps")
    data_file = work / "prompts.jsonl"
    data_file.write_text("".join(json.dumps(record) + "\n" for record, _, _ in picked))
    # align shuffles with its seeded StepSampler; TRL gets the prompts in that order, unshuffled, each sampled twice
    sampler = data.StepSampler(len(picked), batch, seed=42)  # align.ppo's default seed
    ordered = [picked[i][1].prompt for step in range(iterations) for i in sampler.indices(step)]
    prompt_tokens = [sum(picked[i][2] for i in sampler.indices(step)) for step in range(iterations)]
    per_prompt = {"align": 1, "trl": 2}  # responses sampled per prompt

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        if side == "align":
            return _run_align_ppo(model.dir, data_file, out, n, batch, epochs, new_tokens, lr, args.engine,
                                  precision=precision)
        return _run_trl_rloo(model.dir, ordered, out, n, batch, epochs, new_tokens, lr, precision=precision)

    def measure(side: str, res: dict, skip: int) -> dict:
        n, seconds, k = len(res["iteration_s"]), sum(res["iteration_s"][skip:]), per_prompt[side]
        flops = sum(ppo_flops(model.body, model.head, k * p + t, t, epochs, critic=side == "align")
                    for p, t in zip(prompt_tokens[skip:n], res["response_tokens"][skip:]))
        return {"items_per_s": k * batch * (n - skip) / seconds,
                "rollout_tokens_per_s": sum(res["response_tokens"][skip:]) / sum(res["rollout_and_score_s"][skip:]),
                "response_length": sum(res["response_tokens"]) / (k * batch * n),
                "flops_per_s": flops / seconds, "time_split": time_split(res, skip),
                "iteration_s": statistics.median(res["iteration_s"][skip:]),
                "reward_first": res["reward"][0], "reward_last": res["reward"][-1],
                "report_seconds": res.get("report_seconds"), "logprob_diff": res.get("logprob_diff"),
                "samples_per_iteration": k * batch}

    sides = compare(args, "ppo", work, peaks, run, measure, key="items_per_s", unit="samples/s", steps=iterations,
                    skip=min(1, iterations - 1))  # the first iteration warms up allocators and kernels
    return {
        "stage": "ppo", "ratio": sides["align"]["items_per_s"] / sides["trl"]["items_per_s"], "unit": "samples/s",
        "engine": args.engine, **sides, "model": model.fields(),
        "work": {"iterations": iterations, "prompts_per_iteration": batch, "max_new_tokens": new_tokens,
                 "passes_per_batch": epochs, "optimizer_steps_per_iteration": epochs, "learning_rate": lr,
                 "kl_coef": PPO_BETA, "reward": f"length {LENGTH_RULE}",
                 "engine": {"align": args.engine, "trl": "hf (transformers generate)"},
                 "prompt_tokens": sum(prompt_tokens), "data": "data/gsm8k_400.jsonl questions (chat template)",
                 "rounds": args.rounds,
                 "mismatch": "align: PPO, 1 response per prompt, a critic (value model) trained alongside the policy "
                             "with GAE; TRL RLOO: 2 responses per prompt (its minimum), no critic, leave-one-out "
                             "baseline. Throughput counts generated responses (prompt-response samples) per second"},
    }


def print_table(result: dict) -> None:
    w = result["work"]
    print(f"\nppo: matmul peak {peaks_text(result['peaks_gflops'])} (MFU against the peak of the side's precision), "
          f"model {result['model']['params'] / 1e6:.1f}M parameters; {w['iterations']} iterations of "
          f"{w['prompts_per_iteration']} prompts, up to {w['max_new_tokens']} new tokens, {w['passes_per_batch']} "
          f"passes per batch; time split of an iteration")
    print(f"{'side':<8}{'precision':>10}{'samples/s':>10}{'rollout tok/s':>15}{'MFU':>7}{'gen+score':>11}"
          f"{'forward':>9}{'update':>8}{'other':>7}{'reward first':>14}{'reward last':>13}   rounds")
    for name in ("align", "trl"):
        side = result[name]
        rounds = ", ".join(f"{x:.2f}" for x in side["rounds"])
        print(f"{name:<8}{side['precision']:>10}{side['items_per_s']:>10.2f}{side['rollout_tokens_per_s']:>15.1f}"
              f"{side['mfu'] * 100:>6.1f}%{split_text(side['time_split'])}{side['reward_first']:>14.4f}"
              f"{side['reward_last']:>13.4f}   {rounds}")
    print_trials(result, result["unit"])
    print(f"ratio align/trl (responses per second): {result['ratio']:.2f}x; align's rollout engine: "
          f"{result['engine']}")
    if result["align"].get("logprob_diff") and result["engine"] == "vllm":
        print("align's rollout/logprob_diff per iteration (engine vs policy): "
              + ", ".join(f"{d:.1e}" for d in result["align"]["logprob_diff"]))
    print(f"align samples 1 response per prompt and trains a critic; TRL's RLOO samples "
          f"{result['trl']['samples_per_iteration'] // w['prompts_per_iteration']} per prompt and has no critic")

