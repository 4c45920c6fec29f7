"""Candidates for people to rank: K responses per prompt from one or more policies, sampled once.

With P policies and K responses per prompt, policy j writes responses j, j + P, j + 2P, ... (K >= P), so each
policy answers every prompt about K / P times and the page never shows them in a fixed order (it shuffles anyway).
With the hf engine sampling is seeded per policy and row (rollout.row_seeds), so the same command draws the same
candidates; vLLM's are not reproducible (see below). Either way they are drawn once and kept (align.label rank).
"""

from __future__ import annotations

import logging
from typing import Sequence

from .. import data, models, rollout, train
from ..config import ConfigError, RolloutConfig
from ..formats import PromptExample

log = logging.getLogger("align")


def shares(k: int, n_policies: int) -> list[list[int]]:
    """Which of the K response slots each policy fills: policy j gets j, j + P, ..."""
    if k < n_policies:
        raise ConfigError(f"--k={k}: fewer responses per prompt than policies ({n_policies}); every policy must "
                          f"answer every prompt at least once")
    return [list(range(j, k, n_policies)) for j in range(n_policies)]


def sample_candidates(examples: Sequence[PromptExample], policies: Sequence[str], k: int, sampling: rollout.Sampling,
                      seed: int,
                      engine: str = "hf", max_prompt_length: int = 1024, generation_batch_size: int = 16,
                      precision: str = "auto") -> list[dict]:
    """One record per prompt, `{"prompt", "responses", "policies"}`: the ranking format without ranks. Prompts
    longer than max_prompt_length keep their last tokens (every prompt gets its candidates)."""
    slots = shares(k, len(policies))
    rows = [{"prompt": ex.prompt, "responses": [None] * k, "policies": [None] * k} for ex in examples]
    accelerator = train.plain_accelerator(precision, seed)
    for j, (location, mine) in enumerate(zip(policies, slots)):
        try:
            model, tokenizer = models.load_policy_for_inference(location, "label.policy")
        except OSError as err:
            raise ConfigError(f"--policy {location}: cannot load it: {err}") from None
        model.to(accelerator.device)
        template = data.resolve_policy_template(tokenizer, "auto")
        tokenized, stats = data.tokenize_prompts(examples, tokenizer, template, max_prompt_length, "left")
        log.info("sampling %d responses to each of %d prompts from %s with the %s engine (%s)", len(mine),
                 len(tokenized), location, engine, stats.summary())
        # every prompt repeated once per slot this policy fills, in prompt order
        batch = [p.ids for p in tokenized for _ in mine]
        settings = rollout_settings(engine, generation_batch_size)
        # hf: every row its own seeded draw (the same candidates whatever the batching). vLLM takes no per-row seeds
        # and one engine seed would give a prompt's repeats the same response: it is left unseeded.
        eng = rollout.make_engine(settings, model, tokenizer, accelerator, sampling, seed=None)
        seeds = rollout.row_seeds(seed, f"label/{j}", range(len(batch)))
        try:
            with accelerator.autocast():
                ro = eng.generate(batch, sampling, seeds)
        finally:
            eng.close()
        texts = iter(rollout.decode(tokenizer, ro))
        for row in rows:
            for slot in mine:
                row["responses"][slot] = next(texts)
                row["policies"][slot] = location
        del model
    # A ranking with an empty response is refused by align.rm (formats._check_responses): such prompts are left out.
    kept = [row for row in rows if all(r.strip() for r in row["responses"])]
    if len(kept) < len(rows):
        log.warning("%d of %d prompts left out: a policy's response to them was empty", len(rows) - len(kept),
                    len(rows))
    if not kept:
        raise ConfigError("every prompt got an empty response from some policy: nothing to rank")
    return kept


def rollout_settings(engine: str, generation_batch_size: int) -> RolloutConfig:
    """The rollout section make_engine reads (the vLLM engine's settings at their defaults)."""
    return RolloutConfig(engine=engine, generation_batch_size=generation_batch_size)
