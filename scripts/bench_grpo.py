"""grpo: align.grpo against TRL's GRPOTrainer, both with transformers generate, on the random Llama.

The same prompts in the same order (align's seeded StepSampler; TRL unshuffled), group size, response budget,
temperature, reward (the `length` rule: TRL's reward function scores align's text exactly), KL weight and estimator
(k3 in the loss), loss aggregation (token mean: TRL's dapo), clipping, update passes (align algorithm.ppo_epochs, TRL
num_iterations), micro-batch and minibatch: the same responses per iteration and the same optimizer steps. TRL's
generation batch is the iteration's responses (steps_per_generation = responses / micro-batch), as align generates
them in one call. TRL runs at its best on the machine: no gradient checkpointing, the precision its trial picked.

Both sides stop a response at EOS, so besides responses per second (the ratio) the table gives response tokens per
second (tokens_ratio) and each side's mean response length (the random model nearly always fills the budget). The
time split is align's logged phases (perf/rollout_and_score_s, perf/forward_s, perf/update_s) and clocks around
TRL's _generate, reward call and _generate_and_score_completions; TRL's update is the rest of its iteration.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Optional

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

GRPO_BETA = 0.04  # the KL weight: align.grpo's algorithm.kl_coef default (k3 in the loss), as TRL's GRPO uses it


@dataclass(frozen=True)
class GRPOShape:
    """One GRPO run's sizes, in align's terms: `prompts` per iteration, `group` responses each (align rollout.n, TRL
    num_generations), `micro` responses per forward, `mini` responses per optimizer step (None: all of the
    iteration's), `epochs` passes over each rollout batch (align algorithm.ppo_epochs, TRL num_iterations)."""

    prompts: int
    group: int
    micro: int
    mini: Optional[int]
    epochs: int
    iterations: int

    @property
    def responses(self) -> int:
        return self.prompts * self.group

    @property
    def minibatch(self) -> int:
        return self.mini or self.responses

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per iteration, both sides: `epochs` passes of responses / minibatch steps."""
        return self.epochs * self.responses // self.minibatch

    def check(self) -> None:
        """The sizes both sides accept: align's train.micro_batch_size divides train.batch_size (prompts) and the
        minibatch, the minibatch divides the iteration's responses; TRL's group size is at least 2."""
        problems = []
        if self.group < 2:
            problems.append(f"group size {self.group}: GRPO needs at least 2 responses per prompt (TRL's minimum)")
        if self.prompts % self.micro:
            problems.append(f"micro-batch {self.micro} must divide the {self.prompts} prompts per iteration "
                            f"(align's train.batch_size % train.micro_batch_size)")
        if self.responses % self.minibatch or self.minibatch % self.micro:
            problems.append(f"minibatch {self.minibatch} must divide the {self.responses} responses per iteration "
                            f"and be a multiple of the micro-batch {self.micro}")
        if problems:
            raise ValueError("bench grpo: " + "; ".join(problems))


def grpo_align_overrides(shape: GRPOShape, model_dir: Path, data_file: Path, out: Path, max_new_tokens: int,
                         lr: float, precision: str) -> list[str]:
    """align.grpo's settings (load_config overrides) for `shape`. Every algorithm setting that TRL's GRPOTrainer
    also has is spelled out, not left to align's defaults: group-normalised advantages (no whitening), k3 KL in the
    loss with weight GRPO_BETA, token-mean loss (TRL's dapo), clip 0.2; hf generate of the whole iteration's
    responses in one call (as TRL's generation batch); no held-out evaluation."""
    return [
        f"output_dir={out}", "overwrite=true", f"model.name_or_path={model_dir}", f"data.train.path={data_file}",
        "data.max_prompt_length=100000", "reward.rule=length",
        *(f"reward.rule_args.{k}={v}" for k, v in LENGTH_RULE.items()),
        "rollout.engine=hf", f"rollout.n={shape.group}", f"rollout.max_new_tokens={max_new_tokens}",
        f"rollout.generation_batch_size={shape.responses}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0", "algorithm.advantage=grpo", "algorithm.scale_rewards=true",
        "algorithm.whiten_advantages=false", "algorithm.kl_penalty=loss", "algorithm.kl_estimator=k3",
        f"algorithm.kl_coef={GRPO_BETA}", f"algorithm.ppo_epochs={shape.epochs}",
        f"algorithm.mini_batch_size={shape.minibatch}", "algorithm.loss_agg=token_mean", "algorithm.clip_eps=0.2",
        "lora.enabled=false", f"train.batch_size={shape.prompts}", f"train.micro_batch_size={shape.micro}",
        f"train.max_steps={shape.iterations}", f"train.learning_rate={lr}", "train.scheduler=constant",
        f"train.precision={precision}", "eval_samples=0", "log.every=1", "log.report_to=[]", "log.progress=false",
        "save_merged=false",
    ]


def grpo_trl_args(shape: GRPOShape, max_new_tokens: int) -> dict:
    """TRL GRPOConfig's sizes and algorithm for `shape`: per_device_train_batch_size is in completions (align's
    micro-batch), gradient accumulation makes align's minibatch, and steps_per_generation makes the generation batch
    all of the iteration's responses (generation_batch_size = prompts x group); max_steps counts optimizer steps."""
    return {"num_generations": shape.group, "per_device_train_batch_size": shape.micro,
            "gradient_accumulation_steps": shape.minibatch // shape.micro,
            "steps_per_generation": shape.responses // shape.micro, "num_iterations": shape.epochs,
            "max_steps": shape.iterations * shape.steps_per_iteration, "max_completion_length": max_new_tokens,
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, "beta": GRPO_BETA, "epsilon": 0.2, "loss_type": "dapo",
            "scale_rewards": "group", "importance_sampling_level": "token", "mask_truncated_completions": False}


def trl_computes_old_logprobs(shape: GRPOShape) -> bool:
    """Whether TRL's GRPOTrainer runs the old-policy log-prob forward: only when the rollout batch is not used in one
    optimizer step (ratio 1 otherwise, so it reuses the loss forward's). align always runs it."""
    return shape.steps_per_iteration > 1


def _run_align_grpo(model_dir: Path, data_file: Path, out: Path, shape: GRPOShape, max_new_tokens: int, lr: float,
                    *, precision: str) -> dict:
    from align import ppo
    from align.config import GRPOConfig, load_config

    reset_accelerate()
    cfg = load_config(GRPOConfig, None, grpo_align_overrides(shape, model_dir, data_file, out, max_new_tokens, lr,
                                                             precision))
    ppo.main(cfg)
    return align_rl_rows(out, "grpo", shape.iterations, shape.steps_per_iteration, shape.responses)


def _run_trl_grpo(model_dir: Path, prompts: list, out: Path, shape: GRPOShape, max_new_tokens: int, lr: float, *,
                  precision: str) -> dict:
    """TRL's GRPOTrainer with transformers generate on `prompts` (in align's order, unshuffled, each sampled
    `group` times), no gradient checkpointing, the precision its trial picked."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    reset_accelerate()
    args = TRLGRPOConfig(
        output_dir=str(out), **grpo_trl_args(shape, max_new_tokens), learning_rate=lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=precision == "bf16", fp16=False,
        gradient_checkpointing=False, use_cpu=True, use_vllm=False, shuffle_dataset=False, disable_dropout=True,
        log_completions=False, logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0,
        seed=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    clock = step_clock()
    trainer = GRPOTrainer(model=model, reward_funcs=trl_length_reward(LENGTH_RULE), args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])
    phases = trl_phase_clocks(trainer)
    trainer.train()
    return trl_rl_result("grpo", trainer, clock, phases, shape.iterations, shape.steps_per_iteration)


def grpo_flops(n_body: int, n_head: int, tokens: float, targets: float, epochs: int, old_forward: bool) -> float:
    """The matmul FLOPs an iteration's work needs: generation (one forward over every token, the head on each
    response token), the reference's log-prob forward, the old policy's when the batch takes more than one optimizer
    step (else the ratio is 1), then `epochs` training passes. The same on both sides: work a side does beyond this
    lowers its MFU."""
    return model_flops(n_body, n_head, tokens, targets, passes=1 + 1 + int(old_forward) + 3 * epochs)


def bench(args, peaks: dict) -> dict:
    from align import data

    tokenizer, work, model = stage_setup("grpo", args.layers)
    shape = GRPOShape(prompts=args.batch, group=args.group_size, micro=args.micro_batch or args.batch,
                      mini=args.mini_batch, epochs=args.ppo_epochs, iterations=args.steps or 6)
    shape.check()
    lr, new_tokens, iterations = 1e-5, args.max_new_tokens, shape.iterations
    picked = chat_prompts(tokenizer, shape.prompts * iterations, args.max_length)
    if len(picked) < shape.prompts * iterations:
        raise SystemExit(f"only {len(picked)} prompts fit max_length={args.max_length}; lower --steps")
    data_file = work / "prompts.jsonl"
    data_file.write_text("".join(json.dumps(record) + "\n" for record, _, _ in picked))
    # align shuffles with its seeded StepSampler; TRL gets the prompts in that order, unshuffled
    sampler = data.StepSampler(len(picked), shape.prompts, seed=42)  # align.grpo's default seed
    ordered = [picked[i][1].prompt for step in range(iterations) for i in sampler.indices(step)]
    prompt_tokens = [sum(picked[i][2] for i in sampler.indices(step)) for step in range(iterations)]
    old_forward = trl_computes_old_logprobs(shape)

    def run(side: str, precision: str, out: Path, n: int) -> dict:
        sized = dataclass_replace(shape, iterations=n)
        if side == "align":
            return _run_align_grpo(model.dir, data_file, out, sized, new_tokens, lr, precision=precision)
        return _run_trl_grpo(model.dir, ordered[: shape.prompts * n], out, sized, new_tokens, lr, precision=precision)

    def measure(side: str, res: dict, skip: int) -> dict:
        n, seconds, tokens = len(res["iteration_s"]), sum(res["iteration_s"][skip:]), res["response_tokens"]
        flops = sum(grpo_flops(model.body, model.head, shape.group * p + t, t, shape.epochs, old_forward)
                    for p, t in zip(prompt_tokens[skip:n], tokens[skip:]))
        out = {"items_per_s": shape.responses * (n - skip) / seconds, "tokens_per_s": sum(tokens[skip:]) / seconds,
               "rollout_tokens_per_s": sum(tokens[skip:]) / sum(res["rollout_and_score_s"][skip:]),
               "response_length": sum(tokens) / (shape.responses * n), "flops_per_s": flops / seconds,
               "time_split": time_split(res, skip), "iteration_s": statistics.median(res["iteration_s"][skip:]),
               "reward_first": res["reward"][0], "reward_last": res["reward"][-1]}
        if "generate_s" in res:  # TRL: generation and scoring apart
            out["score_share_of_gen_score"] = sum(res["score_s"][skip:]) / sum(res["rollout_and_score_s"][skip:])
        return out

    sides = compare(args, "grpo", work, peaks, run, measure, key="items_per_s", unit="responses/s", steps=iterations,
                    skip=min(1, iterations - 1))  # the first iteration warms up allocators and kernels
    return {
        "stage": "grpo", "ratio": sides["align"]["items_per_s"] / sides["trl"]["items_per_s"],
        "tokens_ratio": sides["align"]["tokens_per_s"] / sides["trl"]["tokens_per_s"], "unit": "responses/s",
        **sides, "model": model.fields(),
        "work": {"iterations": iterations, "prompts_per_iteration": shape.prompts, "group_size": shape.group,
                 "responses_per_iteration": shape.responses, "micro_batch": shape.micro,
                 "minibatch": shape.minibatch, "passes_per_batch": shape.epochs,
                 "optimizer_steps_per_iteration": shape.steps_per_iteration, "max_new_tokens": new_tokens,
                 "temperature": 1.0, "learning_rate": lr, "kl_coef": GRPO_BETA, "kl": "k3 in the loss",
                 "loss": "token mean (TRL dapo), clip 0.2, group-normalised advantages",
                 "reward": f"length {LENGTH_RULE}", "engine": "hf (transformers generate), both sides",
                 "prompt_tokens": sum(prompt_tokens), "data": "data/gsm8k_400.jsonl questions (chat template)",
                 "rounds": args.rounds, "old_logprob_forward": {"align": True, "trl": old_forward},
                 "differences": grpo_differences(shape)},
    }


def grpo_differences(shape: GRPOShape) -> list[str]:
    """What still differs between the two sides' work, for the table and the JSON."""
    notes = ["both stop a response at EOS: throughput counts responses, tokens_ratio counts response tokens (the "
             "table prints each side's mean response length; with the random model nearly all run the full budget)",
             "align samples each response from its own seeded generator (Gumbel-max), TRL from torch's global RNG; "
             "align's generate also returns the sampled tokens' logits (its engine log-probs)"]
    if not trl_computes_old_logprobs(shape):
        notes.append("one optimizer step per rollout batch: TRL skips the old-policy log-prob forward (ratio 1), "
                     "align runs it (its forward phase holds one forward more)")
    return notes


def print_table(result: dict) -> None:
    w = result["work"]
    print(f"\ngrpo: matmul peak {peaks_text(result['peaks_gflops'])} (MFU against the peak of the side's precision), "
          f"model {result['model']['params'] / 1e6:.1f}M parameters; {w['iterations']} iterations of "
          f"{w['prompts_per_iteration']} prompts x {w['group_size']} responses, up to {w['max_new_tokens']} new "
          f"tokens, {w['passes_per_batch']} passes per batch, {w['optimizer_steps_per_iteration']} optimizer steps per "
          f"iteration; time split of an iteration")
    print(f"{'side':<8}{'precision':>10}{'resp/s':>8}{'resp tok/s':>12}{'mean len':>10}{'gen tok/s':>11}{'MFU':>7}"
          f"{'gen+score':>11}{'forward':>9}{'update':>8}{'other':>7}{'reward first':>14}{'reward last':>13}   rounds")
    for name in ("align", "trl"):
        side = result[name]
        rounds = ", ".join(f"{x:.2f}" for x in side["rounds"])
        print(f"{name:<8}{side['precision']:>10}{side['items_per_s']:>8.2f}{side['tokens_per_s']:>12.1f}"
              f"{side['response_length']:>10.1f}{side['rollout_tokens_per_s']:>11.1f}{side['mfu'] * 100:>6.1f}%"
              f"{split_text(side['time_split'])}{side['reward_first']:>14.4f}{side['reward_last']:>13.4f}   {rounds}")
    print_trials(result, result["unit"])
    print(f"ratio align/trl: {result['ratio']:.2f}x responses/s, {result['tokens_ratio']:.2f}x response tokens/s")
    trl_score = result["trl"].get("score_share_of_gen_score")
    if trl_score is not None:
        print(f"TRL's gen+score is {(1 - trl_score) * 100:.1f}% generation, {trl_score * 100:.1f}% scoring (align logs "
              f"the two as one phase)")
    lengths = result["align"]["response_length"], result["trl"]["response_length"]
    if abs(lengths[0] - lengths[1]) > 0.02 * max(lengths):
        print(f"note: the mean response lengths differ (align {lengths[0]:.1f}, TRL {lengths[1]:.1f} tokens): "
              f"tokens_ratio ({result['tokens_ratio']:.2f}x) is the fairer comparison")
    for note in w["differences"]:
        print(f"note: {note}")
