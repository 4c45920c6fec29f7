"""A DPO policy as a reward model: r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, eq. 5;
how RewardBench scores DPO models), or SimPO's reference-free beta/|y| log pi(y|x).

`ImplicitRewardScorer` has RewardScorer's interface (tokenize, score_sequences, score), so
`python -m reward_models.evaluate --policy DIR [--reference DIR]` prints the same report as for a classifier.
The reference is --reference, else the one align.dpo recorded in align_dpo.json (a DPO run's `reference:` model, or
a full policy's starting weights), else, for a peft adapter folder trained against its own base, that base with the
adapters disabled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from align import data, losses, models
from reward_models.model import as_prompt, as_response


def _load_causal_lm(folder: str, device: str):
    from transformers import AutoModelForCausalLM

    attention = models.folder_attention(AutoModelForCausalLM, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention, dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device).eval()


class ImplicitRewardScorer:
    def __init__(self, policy: str | Path, reference: Optional[str] = None, beta: Optional[float] = None,
                 device: Optional[str] = None, max_length: Optional[int] = None, max_tokens: int = 8192):
        from transformers import AutoTokenizer

        self.folder = Path(policy)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        settings_file = self.folder / "align_dpo.json"
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        self.beta = beta if beta is not None else settings.get("beta", 0.1)
        self.reference_free = bool(settings.get("reference_free", False)) and reference is None
        self.max_length = max_length or settings.get("max_length", 4096)
        self.truncation = settings.get("truncation", "left")
        self.max_tokens = max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.template = settings.get("template") or data.resolve_policy_template(self.tokenizer, "auto")

        # The reference: --reference, else the one align.dpo recorded (a separate `reference:` model), else, for an
        # adapter policy, its base with the adapters disabled (None here).
        reference = reference or settings.get("reference")
        self.reference = None
        if (self.folder / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            base = PeftConfig.from_pretrained(str(self.folder)).base_model_name_or_path
            self.policy = PeftModel.from_pretrained(_load_causal_lm(base, self.device), str(self.folder)).eval()
            if reference is not None and not self.reference_free:
                self.reference = _load_causal_lm(reference, self.device)
        else:
            self.policy = _load_causal_lm(str(self.folder), self.device)
            if reference is None and not self.reference_free:
                raise ValueError(f"{self.folder}: a full policy needs its reference model: pass --reference DIR")
            if not self.reference_free:
                self.reference = _load_causal_lm(reference, self.device)
        shown = None if self.reference_free else reference or "base, adapters disabled"
        self.description = {"policy": str(self.folder), "beta": self.beta, "reference_free": self.reference_free,
                            "reference": shown}

    def tokenize(self, prompt, response) -> data.Tokenized:
        """prompt + response with the response as targets; a long sequence loses its oldest prompt tokens (or
        follows the policy's recorded truncation rule)."""
        tok = data.tokenize_response(self.tokenizer, as_prompt(prompt), as_response(response), self.template)
        kept = data.truncate_pair(tok, tok, self.max_length, self.truncation)
        if kept is None:
            raise ValueError(f"a sequence of {len(tok)} tokens is longer than max_length={self.max_length}")
        return kept[0]

    def _logps(self, model, batch: data.TokenBatch, counts: torch.Tensor) -> torch.Tensor:
        return losses.sequence_logprobs(losses.token_logprobs(models.logits_at(model, batch), batch.targets), counts)

    @torch.no_grad()
    def score_sequences(self, seqs: Sequence[data.Tokenized], progress: bool = False) -> torch.Tensor:
        """Implicit rewards [n]: packed forwards of up to max_tokens tokens (sequences sorted by length)."""
        from tqdm.auto import tqdm

        out = torch.empty(len(seqs))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches, current, size = [], [], 0
        for i in order:
            if current and size + len(seqs[i]) > self.max_tokens:
                batches.append(current)
                current, size = [], 0
            current.append(i)
            size += len(seqs[i])
        batches += [current] if current else []
        for ids in tqdm(batches, disable=not progress, desc="scoring", mininterval=2.0):
            batch = data.collate([seqs[i] for i in ids], True, self.tokenizer.pad_token_id or 0).to(self.device)
            counts = torch.tensor([seqs[i].num_targets for i in ids], device=self.device)
            policy = self._logps(self.policy, batch, counts)
            if self.reference_free:
                reward = self.beta * policy / counts.clamp(min=1)
            elif self.reference is not None:
                reward = self.beta * (policy - self._logps(self.reference, batch, counts))
            else:
                with self.policy.disable_adapter():
                    reward = self.beta * (policy - self._logps(self.policy, batch, counts))
            out[torch.tensor(ids)] = reward.float().cpu()
        return out

    def score(self, prompts: Sequence, responses: Sequence, progress: bool = False) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        return self.score_sequences([self.tokenize(p, r) for p, r in zip(prompts, responses)], progress)
