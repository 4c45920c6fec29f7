"""Examples -> token ids and loss masks -> batches. Pure steps, each tested.

Where a batch goes (SFT):
    formats.load_examples      file -> [SFTExample]
    tokenize_sft               SFTExample -> Tokenized(input_ids, loss_mask, origin)   (template, masking, truncation)
    StepSampler.indices(step)  which examples make optimizer step `step` (seeded per epoch; resumable)
    collate                    [Tokenized] -> TokenBatch, padded or padding-free (one packed row)
    recipe                     logits = model(**batch.model_inputs(), logits_to_keep=batch.predict_mask)

Assistant-only masking uses the tokenizer's own chat template, rendered incrementally: the characters that
rendering turn i adds after the generation prompt (`<|im_start|>assistant\\n`) are that assistant turn, up to and
including its end-of-turn token. The rendered text is tokenized once with offsets, and a token is a target when
its first character lies inside an assistant turn. This needs no `{% generation %}` markers, only a template that
renders a conversation's prefix as a prefix of the whole (checked; an error says so otherwise).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .formats import DataError, Message, Origin, PromptExample, SFTExample

log = logging.getLogger("align")
IGNORE = -100  # label of a token that carries no loss (the value torch's cross_entropy ignores)


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[bool]
    """loss_mask[t]: token t is a training target (predicted from tokens < t). loss_mask[0] is always False."""
    origin: Optional[Origin] = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


@dataclass
class TruncationStats:
    """What the truncation rule did, for the log and the run report."""

    rule: str
    max_length: int
    total: int = 0
    too_long: int = 0
    dropped: Counter = field(default_factory=Counter)
    responses_cut: Optional[int] = None
    """Responses that lost tokens of their own, not only their prompt's (counted where sequences are scored as
    prompt + response: reward models; None where not counted)."""

    def summary(self) -> str:
        kept = self.total - sum(self.dropped.values())
        parts = [f"{self.too_long} of {self.total} examples longer than max_length={self.max_length} "
                 f"(truncation={self.rule})"]
        if self.responses_cut:
            parts.append(f"{self.responses_cut} responses cut too (not only their prompt)")
        for reason, n in sorted(self.dropped.items()):
            parts.append(f"{n} dropped: {reason}")
        parts.append(f"{kept} kept")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        out = {"rule": self.rule, "max_length": self.max_length, "total": self.total,
               "too_long": self.too_long, "dropped": dict(self.dropped)}
        if self.responses_cut is not None:
            out["responses_cut"] = self.responses_cut
        return out


# --------------------------------------------------------------------------------------------------------------
# Chat templates


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise DataError(
            f"{name}: the tokenizer has no chat template; set model.chat_template (a Jinja template or a .jinja "
            f"file) or use plain text data (format text)"
        )


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[Message], origin: Optional[Origin] = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn in it."""
    text = render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            where = f"{origin}: " if origin else ""
            raise DataError(
                f"{where}field 'messages[{i}]': the chat template does not render this turn the same way inside the "
                f"whole conversation (not prefix-preserving), so assistant tokens cannot be located; set "
                f"model.chat_template to a template that is, or data.loss_on=all"
            )
        spans.append((len(before), len(through)))
    return text, spans


def prompt_ids(tokenizer, prompt: Sequence[Message]) -> list[int]:
    """Token ids of a prompt rendered with the generation prompt (what the policy sees before answering)."""
    return tokenizer(render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------------------
# SFT tokenization


def tokenize_sft_example(example: SFTExample, tokenizer, loss_on: str = "assistant") -> Tokenized:
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]  # so the model learns where a document ends
        return Tokenized(ids, [False] + [True] * (len(ids) - 1), example.origin)

    require_chat_template(tokenizer)
    if loss_on == "all":
        text, spans = render(tokenizer, example.messages), [(0, math.inf)]
    else:
        text, spans = assistant_spans(tokenizer, example.messages, example.origin)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    if mask:
        mask[0] = False  # nothing predicts the first token
    return Tokenized(ids, mask, example.origin)


def truncate(tok: Tokenized, max_length: int, rule: str) -> Optional[Tokenized]:
    """Apply the truncation rule to one example; None when it is dropped."""
    if len(tok) <= max_length:
        return tok
    if rule == "error":
        raise DataError(
            f"{tok.origin}: {len(tok)} tokens, longer than data.max_length={max_length} (data.truncation=error)"
        )
    if rule == "drop":
        return None
    if rule == "right":
        return Tokenized(tok.input_ids[:max_length], tok.loss_mask[:max_length], tok.origin)
    ids, mask = tok.input_ids[-max_length:], list(tok.loss_mask[-max_length:])
    mask[0] = False
    return Tokenized(ids, mask, tok.origin)


def tokenize_sft(examples: Sequence[SFTExample], tokenizer, max_length: int, truncation: str = "right",
                 loss_on: str = "assistant") -> tuple[list[Tokenized], TruncationStats]:
    stats = TruncationStats(truncation, max_length, total=len(examples))
    out = []
    for ex in examples:
        tok = tokenize_sft_example(ex, tokenizer, loss_on)
        if len(tok) > max_length:
            stats.too_long += 1
        tok = truncate(tok, max_length, truncation)
        if tok is None:
            stats.dropped["longer than max_length"] += 1
        elif tok.num_targets == 0:
            stats.dropped["no target tokens left after truncation"] += 1
        else:
            out.append(tok)
    if not out:
        raise DataError(f"no usable examples: {stats.summary()}")
    return out, stats


# --------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class TokenBatch:
    """A micro-batch of token sequences.

    Padding-free: input_ids/position_ids/labels are [1, N] (N = total tokens), examples packed end to end with
    positions restarting at 0; transformers then masks attention at the example boundaries (use_cache=False).
    Padded: input_ids/attention_mask/labels are [B, T] with right padding.
    """

    input_ids: torch.Tensor  # [1, N] or [B, T]
    labels: torch.Tensor  # same shape; IGNORE where the token is not a target
    position_ids: Optional[torch.Tensor] = None  # [1, N] (padding-free)
    attention_mask: Optional[torch.Tensor] = None  # [B, T] (padded)
    num_examples: int = 0

    @property
    def predict_mask(self) -> torch.Tensor:
        """[B, T] bool: positions whose logits are needed (the next token is a target)."""
        keep = torch.zeros_like(self.labels, dtype=torch.bool)
        keep[:, :-1] = self.labels[:, 1:] != IGNORE
        return keep

    @property
    def targets(self) -> torch.Tensor:
        """[K] target ids, in the order of the positions selected by predict_mask."""
        nxt = self.labels[:, 1:]
        return nxt[nxt != IGNORE]

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs

    def to(self, device) -> "TokenBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TokenBatch(move(self.input_ids), move(self.labels), move(self.position_ids),
                          move(self.attention_mask), self.num_examples)


def _labels(tok: Tokenized) -> list[int]:
    return [i if m else IGNORE for i, m in zip(tok.input_ids, tok.loss_mask)]


def collate(examples: Sequence[Tokenized], padding_free: bool = True, pad_token_id: int = 0) -> TokenBatch:
    if padding_free:
        ids = [i for ex in examples for i in ex.input_ids]
        labels = [label for ex in examples for label in _labels(ex)]
        positions = [p for ex in examples for p in range(len(ex))]
        as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
        return TokenBatch(as_row(ids), as_row(labels), position_ids=as_row(positions), num_examples=len(examples))
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(_labels(ex))
        attention[row, :n] = 1
    return TokenBatch(ids, labels, attention_mask=attention, num_examples=len(examples))


# --------------------------------------------------------------------------------------------------------------
# Data order


class StepSampler:
    """Which examples make each optimizer step: a seeded permutation per epoch, cut into global batches.

    A pure function of (seed, step), so a resumed run picks up the exact data order, and every process computes
    the same global batch and takes its own contiguous slice. The incomplete batch at the end of an epoch is left
    out (every step has the same size, which keeps processes in step); the next epoch reshuffles.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < batch_size:
            raise DataError(f"{num_examples} training examples is fewer than train.batch_size={batch_size}")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        epoch = self.epoch_of(step)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.num_examples, generator=gen).tolist(), epoch
        k = step % self.steps_per_epoch
        return self._perm[k * self.batch_size: (k + 1) * self.batch_size]


def shard(items: Sequence, process_index: int, num_processes: int) -> list:
    """This process's contiguous slice of a global batch (sizes are checked to divide evenly)."""
    per = len(items) // num_processes
    return list(items[process_index * per: (process_index + 1) * per])


def spread(items: Sequence, process_index: int, num_processes: int) -> list:
    """Every item, dealt out over the processes (sizes may differ by one): for evaluation, where nothing is lost
    to rounding and no process steps in lockstep with the others."""
    return list(items[process_index::num_processes])


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


# --------------------------------------------------------------------------------------------------------------
# Reward-model tokenization: (prompt, response) -> one sequence scored by the model
#
# Two templates, chosen by `data.template` (auto: chat when the tokenizer has a chat template, else pair):
#   chat   the tokenizer's chat template over prompt + response; a causal LM scores the sequence's last token
#   pair   a sentence pair for encoders (BERT, MiniLM): ("Human: ...\n\nAssistant: ...", "Assistant: ...") with
#          their [CLS] a [SEP] b [SEP] and token type ids; the model scores [CLS]
# Truncation `left` (the default) drops the start of the prompt so the final assistant turn survives; cutting
# from the right makes HH pairs token-identical when their shared dialogue is long.

ROLE_LABELS = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool"}


def plain_text(messages: Sequence[Message]) -> str:
    """Messages as `Human: ...\\n\\nAssistant: ...` text (the HH-RLHF convention), for templates without a chat
    template."""
    return "\n\n".join(f"{ROLE_LABELS[m['role']]}: {m['content']}" for m in messages)


def resolve_template(tokenizer, template: str) -> str:
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "pair"
    if template == "chat":
        require_chat_template(tokenizer)
    return template


@dataclass
class RewardSequence:
    """One tokenized (prompt, response) to score."""

    input_ids: list[int]
    token_type_ids: Optional[list[int]] = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedGroup:
    """The responses to one prompt, tokenized, with their human ranks (lower is better)."""

    sequences: list[RewardSequence]
    ranks: list[float]
    margin: Optional[float] = None
    response_chars: list[int] = field(default_factory=list)
    origin: Optional[Origin] = None

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def tokenize_for_reward(tokenizer, prompt: Sequence[Message], response: Sequence[Message], template: str,
                        max_length: int, truncation: str = "left", origin: Optional[Origin] = None
                        ) -> tuple[Optional[RewardSequence], str]:
    """(sequence, what was cut to fit max_length):
        ""          nothing, it fits
        "prompt"    prompt tokens only, from the side `truncation` names
        "response"  response tokens too: the response did not fit beside its prompt (chat `right` always cuts the
                    end, which is the response's)
        "dropped"   the rule drops a sequence that is too long (the sequence is None)
    The pair template keeps at least one prompt token when cutting the prompt alone can make it fit; otherwise the
    prompt keeps up to half the room (cut by the rule) and the response its beginning in the rest."""
    if template == "chat":
        text = render(tokenizer, list(prompt) + list(response))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_length:
            return RewardSequence(ids), ""
        if truncation == "error":
            raise DataError(f"{origin}: {len(ids)} tokens, longer than data.max_length={max_length} "
                            f"(data.truncation=error)")
        if truncation == "drop":
            return None, "dropped"
        if truncation != "left":
            return RewardSequence(ids[:max_length]), "response"
        # The scored last token stays; the response is cut too when the cut reaches past the prompt's tokens.
        prompt_chars = len(render(tokenizer, prompt, add_generation_prompt=True))
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        prompt_tokens = sum(start < prompt_chars for start, _ in offsets)
        return RewardSequence(ids[-max_length:]), "response" if len(ids) - max_length > prompt_tokens else "prompt"

    full = tokenizer(plain_text(prompt), plain_text(response))
    ids, types = full["input_ids"], full.get("token_type_ids")
    if len(ids) <= max_length:
        return RewardSequence(ids, types), ""
    if truncation == "error":
        raise DataError(f"{origin}: {len(ids)} tokens, longer than data.max_length={max_length} "
                        f"(data.truncation=error)")
    if truncation == "drop":
        return None, "dropped"
    # Cut positions of the encoded pair rather than re-encode it with truncation: the tokenizer's truncation side
    # is a setting shared with its other users, and its only_first strategy fails when the response alone is too
    # long. Keeping the special tokens and cutting the two segments' tokens gives what only_first would.
    owner = full.sequence_ids()  # per position: 0 prompt, 1 response, None special token
    prompt_at = [i for i, k in enumerate(owner) if k == 0]
    response_at = [i for i, k in enumerate(owner) if k == 1]
    excess = len(ids) - max_length
    if excess < len(prompt_at):
        keep_prompt, keep_response, cut = len(prompt_at) - excess, len(response_at), "prompt"
    else:
        room = max(max_length - (len(ids) - len(prompt_at) - len(response_at)), 0)
        keep_prompt = min(len(prompt_at), room // 2)
        keep_response, cut = room - keep_prompt, "response"
    dropped_prompt = prompt_at[: len(prompt_at) - keep_prompt] if truncation == "left" else prompt_at[keep_prompt:]
    dropped = set(dropped_prompt) | set(response_at[keep_response:])
    kept = [i for i in range(len(ids)) if i not in dropped]
    return RewardSequence([ids[i] for i in kept], None if types is None else [types[i] for i in kept]), cut


def tokenize_groups(examples: Sequence, tokenizer, template: str, max_length: int, truncation: str = "left"
                    ) -> tuple[list[TokenizedGroup], TruncationStats]:
    """PreferenceExample / RankingExample -> TokenizedGroup. A group is dropped (and counted) when truncation
    leaves two differently ranked responses token-identical: their pair would teach nothing but noise."""
    stats = TruncationStats(truncation, max_length, total=len(examples), responses_cut=0)
    out = []
    for ex in examples:
        ranking = ex.as_ranking() if hasattr(ex, "as_ranking") else ex
        seqs, cuts = [], []
        for response in ranking.responses:
            seq, cut = tokenize_for_reward(tokenizer, ranking.prompt, response, template, max_length, truncation,
                                           ranking.origin)
            seqs.append(seq)
            cuts.append(cut)
        stats.too_long += any(cuts)
        stats.responses_cut += cuts.count("response")
        if any(s is None for s in seqs):
            stats.dropped["longer than max_length"] += 1
            continue
        seen: dict[tuple, float] = {}
        clash = False
        for seq, rank in zip(seqs, ranking.ranks):
            key = (tuple(seq.input_ids), tuple(seq.token_type_ids or ()))
            clash |= key in seen and seen[key] != rank
            seen.setdefault(key, rank)
        if clash:
            stats.dropped["differently ranked responses identical after truncation"] += 1
            continue
        chars = [sum(len(m["content"]) for m in r) for r in ranking.responses]
        out.append(TokenizedGroup(seqs, list(ranking.ranks), ranking.margin, chars, ranking.origin))
    if not out:
        raise DataError(f"no usable examples: {stats.summary()}")
    return out, stats


@dataclass
class RewardBatch:
    """Sequences to score, in one or more forward passes ("parts").

    Each part is a dict of model inputs plus `last` (the position of each sequence's final token, used by causal
    backbones). A causal backbone gets one padding-free part (sequences packed, positions restarting). An encoder
    gets padded parts of sequences of similar length, so short sequences are not padded to the longest one.
    Scores of the parts, concatenated, are put back in input order with `order`.
    """

    parts: list[dict[str, torch.Tensor]]
    order: torch.Tensor  # [R]: scores_in_input_order = cat(part scores)[order]
    num_tokens: int

    def to(self, device) -> "RewardBatch":
        parts = [{k: v.to(device) for k, v in p.items()} for p in self.parts]
        return RewardBatch(parts, self.order.to(device), self.num_tokens)


def length_buckets(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut into runs whose padded size (count x longest) stays within max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            buckets.append(current)
            current = []
        current.append(i)
    if current:
        buckets.append(current)
    return buckets


def collate_reward(seqs: Sequence[RewardSequence], pad_token_id: int, packed: bool, max_tokens: int = 4096
                   ) -> RewardBatch:
    num_tokens = sum(len(s) for s in seqs)
    if packed:
        ids = torch.tensor([i for s in seqs for i in s.input_ids]).unsqueeze(0)
        positions = torch.tensor([p for s in seqs for p in range(len(s))]).unsqueeze(0)
        last = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
        part = {"input_ids": ids, "position_ids": positions, "last": last}
        return RewardBatch([part], torch.arange(len(seqs)), num_tokens)
    parts, placed = [], []
    for bucket in length_buckets([len(s) for s in seqs], max_tokens):
        width = max(len(seqs[i]) for i in bucket)
        ids = torch.full((len(bucket), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(bucket), width), dtype=torch.long)
        types = torch.zeros((len(bucket), width), dtype=torch.long) if seqs[0].token_type_ids is not None else None
        for row, i in enumerate(bucket):
            n = len(seqs[i])
            ids[row, :n] = torch.tensor(seqs[i].input_ids)
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.tensor(seqs[i].token_type_ids)
        part = {"input_ids": ids, "attention_mask": mask, "last": mask.sum(1) - 1}
        if types is not None:
            part["token_type_ids"] = types
        parts.append(part)
        placed.extend(bucket)
    order = torch.empty(len(seqs), dtype=torch.long)
    order[torch.tensor(placed)] = torch.arange(len(seqs))
    return RewardBatch(parts, order, num_tokens)


def group_tensors(groups: Sequence[TokenizedGroup]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranks [G, Kmax], valid [G, Kmax] (bool) and margins [G] (NaN where none), for the ranking losses.
    Group g's responses are the next K_g sequences of the flattened batch, in order."""
    k_max = max(len(g.ranks) for g in groups)
    ranks = torch.zeros(len(groups), k_max)
    valid = torch.zeros(len(groups), k_max, dtype=torch.bool)
    margins = torch.full((len(groups),), float("nan"))
    for row, g in enumerate(groups):
        ranks[row, : len(g.ranks)] = torch.tensor(g.ranks)
        valid[row, : len(g.ranks)] = True
        if g.margin is not None:
            margins[row] = g.margin
    return ranks, valid, margins


def scatter_groups(flat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Flat per-sequence scores [R] -> [G, Kmax] in the layout of `valid` (padding entries are 0)."""
    out = flat.new_zeros(valid.shape)
    out[valid] = flat
    return out


# --------------------------------------------------------------------------------------------------------------
# Policy tokenization of preference pairs (DPO): (prompt, response) -> Tokenized whose targets are the response
#
#   chat    the tokenizer's chat template: the response is what rendering prompt + response adds after the prompt
#           rendered with its generation prompt, i.e. exactly the characters the policy would generate (end-of-turn
#           token included)
#   plain   "Human: ...\n\nAssistant:" and the response after it, then EOS: base models without a chat template
# The two responses of a pair are truncated alike (see truncate_pair), so they keep the same prompt.


@dataclass
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    origin: Optional[Origin] = None

    @property
    def num_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


def resolve_policy_template(tokenizer, template: str) -> str:
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat":
        require_chat_template(tokenizer)
    return template


def tokenize_response(tokenizer, prompt: Sequence[Message], response: Sequence[Message], template: str,
                      origin: Optional[Origin] = None) -> Tokenized:
    """prompt + response as one sequence whose targets are the response's tokens (nothing is truncated here)."""
    if template == "chat":
        before = render(tokenizer, prompt, add_generation_prompt=True)
        text = render(tokenizer, list(prompt) + list(response))
        if not text.startswith(before):
            raise DataError(f"{origin}: the chat template renders the prompt differently when a response follows "
                            f"(not prefix-preserving), so the response tokens cannot be located; set "
                            f"model.chat_template, or data.template=plain")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:
        first = response[0]["role"] if response else "assistant"
        before = plain_text(prompt) + f"\n\n{ROLE_LABELS[first]}:"
        text = plain_text(list(prompt) + list(response))
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [start >= len(before) and end > start for start, end in offsets]
    if template == "plain" and tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)  # the policy learns to stop
        mask.append(True)
    mask[0] = False
    return Tokenized(ids, mask, origin)


def _first_target(tok: Tokenized) -> int:
    return next((i for i, m in enumerate(tok.loss_mask) if m), len(tok))


def truncate_pair(chosen: Tokenized, rejected: Tokenized, max_length: int, rule: str
                  ) -> Optional[tuple[Tokenized, Tokenized]]:
    """Apply the truncation rule to both sequences of a pair; None when the pair is dropped.

    left   cut the oldest prompt tokens, the same number from both (at least one prompt token stays, so the first
           response token is still predicted); a response still too long then loses its end
    right  keep each sequence's first max_length tokens (TRL's keep_start)"""
    longest = max(len(chosen), len(rejected))
    if longest <= max_length:
        return chosen, rejected
    if rule == "error":
        raise DataError(f"{chosen.origin}: {longest} tokens, longer than data.max_length={max_length} "
                        f"(data.truncation=error)")
    if rule == "drop":
        return None

    def cut(tok: Tokenized, start: int) -> Tokenized:
        ids, mask = tok.input_ids[start: start + max_length], list(tok.loss_mask[start: start + max_length])
        mask[0] = False
        return Tokenized(ids, mask, tok.origin)

    start = 0
    if rule == "left":
        start = max(0, min(longest - max_length, _first_target(chosen) - 1, _first_target(rejected) - 1))
    return cut(chosen, start), cut(rejected, start)


def tokenize_pairs(examples: Sequence, tokenizer, template: str, max_length: int, truncation: str = "left"
                   ) -> tuple[list[TokenizedPair], TruncationStats]:
    """PreferenceExample -> TokenizedPair. Pairs left without response tokens, or token-identical, after
    truncation are dropped and counted."""
    stats = TruncationStats(truncation, max_length, total=len(examples))
    out = []
    for ex in examples:
        chosen = tokenize_response(tokenizer, ex.prompt, ex.chosen, template, ex.origin)
        rejected = tokenize_response(tokenizer, ex.prompt, ex.rejected, template, ex.origin)
        stats.too_long += max(len(chosen), len(rejected)) > max_length
        kept = truncate_pair(chosen, rejected, max_length, truncation)
        if kept is None:
            stats.dropped["longer than max_length"] += 1
        elif kept[0].num_targets == 0 or kept[1].num_targets == 0:
            stats.dropped["no response tokens left after truncation"] += 1
        elif kept[0].input_ids == kept[1].input_ids:
            stats.dropped["chosen and rejected identical after truncation"] += 1
        else:
            out.append(TokenizedPair(kept[0], kept[1], ex.origin))
    if not out:
        raise DataError(f"no usable pairs: {stats.summary()}")
    return out, stats


def collate_pairs(pairs: Sequence[TokenizedPair], padding_free: bool, pad_token_id: int) -> TokenBatch:
    """Chosen and rejected of every pair in ONE batch (one forward): sequences [c_1..c_B, r_1..r_B]."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], padding_free, pad_token_id)


# --------------------------------------------------------------------------------------------------------------
# Prompts for online RL (align.ppo, align.grpo) and evaluation


@dataclass
class Prompt:
    messages: list[dict]  # what the reward model sees (re-templated with its own tokenizer)
    ids: list[int]  # what the policy sees: the prompt rendered with its generation prompt
    origin: Optional[Origin] = None


def with_system_prompt(messages: list[dict], system_prompt: Optional[str]) -> list[dict]:
    """The prompt's messages with `system_prompt` first, unless it has a system message of its own."""
    if system_prompt is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def tokenize_prompts(examples: Sequence[PromptExample], tokenizer, template: str, max_length: int,
                     truncation: str, system_prompt: Optional[str] = None) -> tuple[list[Prompt], TruncationStats]:
    stats = TruncationStats(truncation, max_length, total=len(examples))
    out = []
    for ex in examples:
        messages = with_system_prompt(ex.prompt, system_prompt)
        if template == "chat":
            ids = prompt_ids(tokenizer, messages)
        else:
            ids = tokenizer(plain_text(messages) + "\n\nAssistant:")["input_ids"]
        if len(ids) > max_length:
            stats.too_long += 1
            if truncation == "error":
                raise DataError(f"{ex.origin}: the prompt is {len(ids)} tokens, longer than "
                                f"data.max_prompt_length={max_length} (data.truncation=error; or drop, or left)")
            if truncation == "drop":
                stats.dropped["prompt longer than max_prompt_length"] += 1
                continue
            ids = ids[-max_length:]
        out.append(Prompt(messages, ids, ex.origin))
    if not out:
        raise DataError(f"no usable prompts: {stats.summary()}")
    return out, stats


# --------------------------------------------------------------------------------------------------------------
# Command line: `python -m align.data audit RECIPE.yaml [key=value ...] [--out DIR] [--clean DIR]`


def main(argv: Optional[list[str]] = None) -> None:
    """The data commands; `audit` is the one there is (align/audit.py)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "audit":
        print("usage: python -m align.data audit RECIPE.yaml [key=value ...] [--out DIR] [--clean DIR]",
              file=sys.stderr)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    from . import audit

    sys.exit(audit.main(argv[1:]))


if __name__ == "__main__":
    main()
