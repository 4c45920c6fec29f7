"""The reward model: a transformers sequence-classification model with one output, scored the way align trains it.

`RewardModel` wraps the transformers (or peft) model so that one forward call scores a `RewardBatch`:
    causal backbones (Llama, Qwen...): the backbone runs on a padding-free packed row and the `score` head reads
        each sequence's last token (transformers' own head would pick the last non-pad token by token id, which
        misfires when the pad token is also the end-of-turn token);
    encoders (BERT, MiniLM...): the model's own forward on padded, length-bucketed parts; the head reads [CLS].
A saved reward model is a plain `AutoModelForSequenceClassification` folder plus `align_reward.json` (the template
and truncation used in training), which `RewardScorer`, `reward_models.score`/`evaluate` and `align.ppo` read so
that scoring matches training.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from align import data, models
from align.config import LoraConfig, ModelConfig
from align.formats import Origin

SETTINGS_FILE = "align_reward.json"


@dataclass
class RewardSettings:
    template: str
    """chat | pair (see align/data.py)."""
    max_length: int
    truncation: str = "left"

    @classmethod
    def load(cls, folder: str | Path, tokenizer) -> "RewardSettings":
        """Settings saved by align.rm, or defaults for any other sequence-classification model."""
        path = Path(folder) / SETTINGS_FILE
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        limit = getattr(tokenizer, "model_max_length", 1024)
        return cls(data.resolve_template(tokenizer, "auto"), min(int(limit), 1024) if limit else 1024, "left")

    def save(self, folder: str | Path) -> None:
        (Path(folder) / SETTINGS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def _inner(hf):
    return hf.get_base_model() if models.is_peft(hf) else hf


class RewardModel(torch.nn.Module):
    """Scores (prompt, response) sequences: forward(RewardBatch) -> rewards [R] (float32)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf  # the transformers/peft model (what is saved)
        self.causal = hasattr(_inner(hf), "score")  # transformers names decoder heads `score`, encoder heads not

    @property
    def packed(self) -> bool:
        """Whether batches for this model are packed padding-free (causal backbones) or padded (encoders)."""
        return self.causal

    def forward(self, batch: data.RewardBatch) -> torch.Tensor:
        scores = []
        for part in batch.parts:
            inputs = {k: v for k, v in part.items() if k != "last"}
            if self.causal:
                inner = _inner(self.hf)
                backbone = getattr(inner, inner.base_model_prefix)
                hidden = backbone(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
                rows = torch.arange(hidden.shape[0], device=hidden.device) if hidden.shape[0] > 1 else 0
                scores.append(inner.score(hidden[rows, part["last"]]).squeeze(-1).float())
            else:
                scores.append(self.hf(**inputs).logits.squeeze(-1).float())
        return torch.cat(scores)[batch.order]


def new_modules(info: dict) -> list[str]:
    """Top-level module names whose weights the checkpoint lacked (the new head): always trained."""
    return sorted({key.split(".")[0] for key in info.get("missing_keys", ())})


def reward_pad_token(tokenizer) -> None:
    """Give a causal tokenizer a pad token that is not its end-of-turn token, so that transformers' own
    sequence-classification head (last non-pad token) and ours (last token) pick the same position."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    for candidate in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", tokenizer.unk_token):
        if candidate and candidate in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(candidate) != \
                tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return


def load_reward_model(cfg: ModelConfig, lora: LoraConfig, seed: int, tokenizer,
                      gradient_checkpointing: bool = False) -> RewardModel:
    """A one-output sequence-classification model from a recipe: the head is new unless the checkpoint has one;
    with LoRA, adapters on the backbone and the new modules trained in full."""
    from transformers import AutoModelForSequenceClassification

    if cfg.init == "random":
        hf, fresh = models.load_pretrained(AutoModelForSequenceClassification, cfg, lora, seed, num_labels=1), []
    else:
        hf, info = models.load_pretrained(AutoModelForSequenceClassification, cfg, lora, seed, num_labels=1,
                                          output_loading_info=True)
        fresh = new_modules(info)
    hf.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        head = [name for name in ("score", "classifier") if hasattr(hf, name)]
        hf = models.add_lora(hf, lora, task_type="SEQ_CLS", seed=seed, modules_to_save=sorted(set(head + fresh)))
    return RewardModel(hf)


def save_reward_model(model: RewardModel, tokenizer, settings: RewardSettings, out: str | Path) -> None:
    """A plain AutoModelForSequenceClassification folder (LoRA adapters merged in), tokenizer, settings."""
    hf = model.hf
    if models.is_peft(hf):
        hf = copy.deepcopy(hf).merge_and_unload()
    hf.save_pretrained(Path(out))
    tokenizer.save_pretrained(Path(out))
    settings.save(out)


class RewardScorer:
    """Load a reward-model folder (align's or any one-output sequence-classification model) and score
    (prompt, response) pairs with the template and truncation it was trained with."""

    def __init__(self, folder: str | Path, device: Optional[str] = None, max_tokens: int = 8192,
                 max_length: Optional[int] = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.folder = str(folder)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.settings = RewardSettings.load(self.folder, self.tokenizer)
        if max_length:
            self.settings.max_length = max_length
        attention = models.folder_attention(AutoModelForSequenceClassification, self.folder)
        hf = AutoModelForSequenceClassification.from_pretrained(self.folder, attn_implementation=attention,
                                                                dtype=torch.float32)
        if hf.config.num_labels != 1:
            raise ValueError(f"{self.folder}: a reward model has one output; this one has {hf.config.num_labels}")
        self.model = RewardModel(hf).to(self.device).eval()
        self.max_tokens = max_tokens
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def tokenize(self, prompt, response, origin: Optional[Origin] = None) -> data.RewardSequence:
        """`origin` (the record's file and line) is named by the error of truncation=error."""
        prompt, response = as_prompt(prompt), as_response(response)
        seq, _ = data.tokenize_for_reward(self.tokenizer, prompt, response, self.settings.template,
                                          self.settings.max_length, self.settings.truncation, origin)
        return seq

    @torch.no_grad()
    def score_sequences(self, seqs: Sequence[data.RewardSequence], progress: bool = False) -> torch.Tensor:
        """Rewards [n], batched by length (sorted, up to max_tokens padded tokens per forward)."""
        from tqdm.auto import tqdm

        out = torch.empty(len(seqs))
        buckets = data.length_buckets([len(s) for s in seqs], self.max_tokens)
        for bucket in tqdm(buckets, disable=not progress, desc="scoring", mininterval=2.0):
            batch = data.collate_reward([seqs[i] for i in bucket], self.tokenizer.pad_token_id,
                                        self.model.packed, self.max_tokens).to(self.device)
            out[torch.tensor(bucket)] = self.model(batch).cpu()
        return out

    def score(self, prompts: Sequence, responses: Sequence, progress: bool = False) -> torch.Tensor:
        """Same signature as the programmatic rules: prompts and responses as strings or message lists."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        return self.score_sequences([self.tokenize(p, r) for p, r in zip(prompts, responses)], progress)


def as_prompt(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def as_response(response) -> list[dict]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
